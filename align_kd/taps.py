"""Layer taps: which layers to distil (``discover_layers``) and capturing their outputs (``FeatureTap``).

Taps are module outputs captured with forward hooks; the user's model is never rewritten: hooks are
removed on exit and ``model.training`` is restored. A module called several times in one forward
(weight sharing, a block run in a loop) gives one tap per call, named ``"name:k"`` (k = 0, 1, ...).

Discovery runs one example forward, records every module call, and picks block/stage outputs rather
than every activation. The rule is structural; the container type does not matter:

* **Depth order is execution order**: the taps are sorted by when each call *returned* in the
  example forward, never by the order in which the modules were registered.
* **Containers that are never called are transparent**: an ``nn.ModuleList``, an ``nn.ModuleDict``
  or any module that only holds others and is driven by a custom ``forward`` (``for blk in
  self.blocks: x = blk(x)``) contributes the calls of its children, at any nesting depth.
* A **stage** is a container (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) whose two or
  more children are all composite modules, e.g. ResNet's ``layer1``, a ViT's ``encoder.layers`` or
  a research model's ``self.blocks``. A composite module that holds a stage somewhere inside (a
  ResNet, a ViT's ``Encoder``) is descended into; every other composite module (a BasicBlock, a
  Conv-BN-ReLU unit) is one tap, the output of its call.
* Runs of leaf modules (plain ``nn.Sequential`` CNNs and MLPs) are grouped into layers that start at
  a weight layer (Conv/Linear/...) and take in the parameter-free or normalisation modules after
  it; the tap is the group's last module, i.e. after the activation (and pooling), never a
  reshape (``Flatten``) or a dropout, so maps keep their spatial layout.
* A model that **advertises its stages** (timm's ``feature_info``: a list of ``{"module": name,
  ...}``) gets those modules as taps, when at least two of them produce tensors.
* The module that produces the model's output (the logits) is always the last tap.

Taps may be maps ``(B, C, H, W)``, tokens ``(B, N, D)`` or vectors ``(B, D)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .evaluation import preserve_mode

__all__ = ["FeatureTap", "TapInfo", "check_tap_count", "describe_layers", "describe_taps", "discover_layers", "feature_kind"]


@dataclass
class _Call:
    name: str  # tap name ("conv1" or "conv1:k" for the k-th call)
    module_name: str
    index: int  # call index of this module within one forward
    start: int  # order of forward entry
    end: int  # order of forward exit
    shape: tuple[int, ...] | None  # output shape, None when not a tensor
    output_id: int = 0


@dataclass
class TapInfo:
    """Metadata for one tap: name, per-sample shape (no batch dim) and kind (map/tokens/vector)."""

    name: str
    shape: tuple[int, ...]
    kind: str = field(init=False)

    def __post_init__(self):
        self.kind = feature_kind(self.shape)


def feature_kind(shape: tuple[int, ...]) -> str:
    """'map' for (C, H, W), 'tokens' for (N, D), 'vector' for (D,)."""
    return {3: "map", 2: "tokens", 1: "vector"}.get(len(shape), "other")


def _split_name(tap: str) -> tuple[str, int | None]:
    if ":" in tap:
        base, _, k = tap.rpartition(":")
        if k.isdigit():
            return base, int(k)
    return tap, None


def _trace_calls(model: nn.Module, example_input) -> tuple[list[_Call], object]:
    """Run one eval-mode, no-grad forward recording every module call in order."""
    calls: list[_Call] = []
    counts: dict[str, int] = {}
    pending: dict[int, list] = {}
    clock = [0]
    handles = []
    alive: list = []

    def pre_hook(name):
        def hook(mod, args):
            k = counts.get(name, 0)
            counts[name] = k + 1
            pending.setdefault(id(mod), []).append((k, clock[0]))
            clock[0] += 1

        return hook

    def post_hook(name):
        def hook(mod, args, out):
            k, start = pending[id(mod)].pop()
            shape = tuple(out.shape[1:]) if isinstance(out, Tensor) else None
            alive.append(out)  # keeps every output alive during the forward, so no two share an id()
            calls.append(_Call(name, name, k, start, clock[0], shape, id(out)))
            clock[0] += 1

        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(pre_hook(name)))
            handles.append(mod.register_forward_hook(post_hook(name)))
    try:
        with preserve_mode(model, training=False), torch.no_grad():
            out = model(example_input)
    finally:
        for h in handles:
            h.remove()
    for c in calls:
        if counts[c.module_name] > 1:
            c.name = f"{c.module_name}:{c.index}"
    return calls, out


# reshapes and dropout never end a tap: the tap keeps the map's spatial layout and is not dropped out
_PASS_THROUGH = (nn.Flatten, nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd)


def _is_weight_layer(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_composite(mod: nn.Module) -> bool:
    return next(mod.children(), None) is not None


def _is_stage(mod: nn.Module) -> bool:
    kids = list(mod.children())
    return isinstance(mod, _CONTAINERS) and len(kids) >= 2 and all(_is_composite(k) for k in kids)


def _holds_stage(mod: nn.Module) -> bool:
    return any(_is_stage(m) for m in mod.modules())


def _advertised(model: nn.Module, by_module: dict[str, list[_Call]]) -> list[_Call]:
    """The calls of the stages a model advertises (timm's ``feature_info``), [] if it advertises none."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)) and hasattr(info, "info"):
        info = info.info  # timm.models.FeatureInfo
    if not isinstance(info, (list, tuple)):
        return []
    names = [d.get("module") for d in info if isinstance(d, dict)]
    calls = [c for n in names if isinstance(n, str) for c in by_module.get(n, []) if c.shape is not None]
    return calls if len(calls) >= 2 else []


def _discover(model: nn.Module, calls: list[_Call], out) -> list[str]:
    by_module: dict[str, list[_Call]] = {}
    for c in calls:
        by_module.setdefault(c.module_name, []).append(c)
    modules = dict(model.named_modules())
    taps: list[_Call] = []

    def children_calls(prefix: str) -> list[tuple[_Call, bool]]:
        """(call, in_stage) for the children of module `prefix` in execution order, looking through
        containers that are never called themselves (ModuleList, ModuleDict, holder modules) at any
        depth; in_stage: the call's parent is a stage (called or not), so the call is one tap."""
        found: list[tuple[_Call, bool]] = []

        def collect(name: str, mod: nn.Module):
            in_stage = name != "" and _is_stage(mod)
            for cname, child in mod.named_children():
                full = f"{name}.{cname}" if name else cname
                if full in by_module:
                    found.extend((c, in_stage) for c in by_module[full])
                elif _is_composite(child):
                    collect(full, child)

        collect(prefix, modules[prefix])
        return sorted(found, key=lambda pair: pair[0].start)

    def visit(prefix: str):
        group: list[_Call] = []  # current run of leaf calls that opened with a weight layer

        def close():
            if group:
                last = group[-1]
                if last.shape is not None:
                    taps.append(last)
                group.clear()

        for c, in_stage in children_calls(prefix):
            mod = modules[c.module_name]
            if _is_composite(mod):
                close()
                if (not in_stage and _holds_stage(mod)) or c.output_id == out_id:
                    visit(c.module_name)
                elif c.shape is not None:
                    taps.append(c)
            elif _is_weight_layer(mod):
                close()
                group.append(c)
            elif group and _parent(c.module_name) != _parent(group[0].module_name):
                close()  # a leaf of another (uncalled) container does not extend this layer
            elif group and not isinstance(mod, _PASS_THROUGH):
                group.append(c)  # activation, norm, pooling after a weight layer
        close()

    out_id = id(out) if isinstance(out, Tensor) else None
    taps = _advertised(model, by_module)
    if not taps:
        visit("")
    # the logits: the call whose output is the model's output is always the last tap, also when
    # other modules run after it (e.g. an auxiliary head whose output the model does not return)
    last = _output_call(calls, out)
    if last is not None:
        taps = [t for t in taps if t.output_id != out_id]
    taps.sort(key=lambda c: c.end)
    if last is not None:
        taps.append(last)
    names = []
    for t in taps:
        if t.name not in names:
            names.append(t.name)
    return names


def _parent(module_name: str) -> str:
    return module_name.rpartition(".")[0]


def _output_call(calls: list[_Call], out) -> _Call | None:
    """The last call whose output tensor is the model's output (the logits layer), if any."""
    if not isinstance(out, Tensor):
        return None
    final = [c for c in calls if c.output_id == id(out) and c.shape is not None]
    return max(final, key=lambda c: c.end) if final else None


def _check_input(example_input, what: str = "example_input"):
    if not isinstance(example_input, Tensor):
        raise TypeError(f"Expected `{what}` to be a torch.Tensor batch (B, ...) but got {type(example_input).__name__}.")


def discover_layers(model: nn.Module, example_input: Tensor) -> list[str]:
    """Default layers to distil, in forward order, ending with the logits layer.

    Args:
        model: any ``nn.Module``.
        example_input: a batch ``(B, ...)`` the model accepts (B >= 1).

    Returns:
        Tap names usable as ``teacher_layers=`` / ``student_layers=`` in :func:`align_kd.fit`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module but got {type(model).__name__}.")
    _check_input(example_input)
    calls, out = _trace_calls(model, example_input)
    names = _discover(model, calls, out)
    if not names:
        raise ValueError(
            f"No layer of {type(model).__name__} produced a tensor output to tap; pass layer names explicitly "
            "(see align_kd.describe_layers(model, example_input) for what exists)."
        )
    return names


def describe_layers(model: nn.Module, example_input: Tensor) -> list[TapInfo]:
    """Every tappable module call (name and per-sample output shape), in forward order."""
    _check_input(example_input)
    calls, _ = _trace_calls(model, example_input)
    return [TapInfo(c.name, c.shape) for c in sorted(calls, key=lambda c: c.end) if c.shape is not None]


def _weight_layer_calls(model: nn.Module, calls: list[_Call], last: _Call | None) -> list[str]:
    """Names of the calls of weight layers (Conv, Linear, ...) other than the logits layer, in execution order."""
    modules = dict(model.named_modules())
    logits_modules = {last.module_name} if last is not None else set()
    if last is not None:  # the head's own weight layers (e.g. a classifier's Linear inside a Sequential head)
        logits_modules |= {n for n in modules if n.startswith(last.module_name + ".")}
    return [c.name for c in sorted(calls, key=lambda c: c.end)
            if c.shape is not None and c.module_name not in logits_modules and _is_weight_layer(modules[c.module_name])]


def check_tap_count(model: nn.Module, names: list[str], example_input: Tensor, *, role: str, chosen: bool,
                    allow_few: bool = False) -> None:
    """Refuse a plan side that silently degrades to one pair (``allow_few=True``: warn instead).

    Two cases: the side has a single tap (T = 1 or S = 1: a plan with one row or column is no
    alignment), or discovery found fewer than two taps besides the logits while the model has more
    weight layers (Conv/Linear/...) than that at other depths, i.e. discovery missed its blocks.
    ``chosen``: the names were given by the user (only the single-tap case applies to them).
    """
    import warnings

    calls, out = _trace_calls(model, example_input)
    last = _output_call(calls, out)
    features = [n for n in names if last is None or n != last.name]
    problem = None
    if len(names) < 2:
        problem = (f"it has a single {role} tap {names}, so the plan has one {'row' if role == 'teacher' else 'column'} "
                   "and all-pairs distillation is one pair per layer on the other side")
    elif not chosen and len(features) < 2:
        candidates = _weight_layer_calls(model, calls, last)  # the same trace: no second forward
        if len(candidates) > len(features):
            problem = (f"layer discovery found {len(features)} {role} tap(s) besides the logits ({names}) although "
                       f"{type(model).__name__} has {len(candidates)} weight layers at other depths ({candidates[:8]}"
                       f"{' ...' if len(candidates) > 8 else ''})")
    if problem is None:
        return
    option = f"{role}_layers"
    message = (f"The {role} ({type(model).__name__}): {problem}. Choose the layers by name: pass {option}=[...] with "
               f"two or more block outputs plus the logits (align_kd.describe_layers({role}, x) lists every candidate in "
               "execution order), or pass allow_few_taps=True to train with these taps anyway.")
    if not allow_few:
        raise ValueError(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def describe_taps(teacher_layers, teacher_shapes, student_layers, student_shapes) -> str:
    """One report of the chosen taps: names and per-sample shapes of each side, and the plan size T x S."""
    def side(names, shapes):
        return ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))

    return (f"taps: teacher T={len(teacher_layers)} [{side(teacher_layers, teacher_shapes)}]; "
            f"student S={len(student_layers)} [{side(student_layers, student_shapes)}]; "
            f"plan {len(teacher_layers)} x {len(student_layers)}")


class FeatureTap:
    """Capture the outputs of named layers during forward passes.

    Use as a context manager; inside it, ``tap(x)`` runs the model and returns
    ``(features, output)`` with ``features`` a list of tensors in the order of ``names``.
    Hooks are removed on exit. ``FeatureTap.check_names`` validates names against the model.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model
        self.names = list(names)
        self._store: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._handles = []
        self._armed = False  # hooks record only inside __call__ (the model called on its own leaves nothing behind)
        self._wanted: dict[str, dict[int | None, str]] = {}
        modules = dict(model.named_modules())
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise ValueError(f"FeatureTap names layers more than once: {dupes}.")
        for name in self.names:
            base, k = _split_name(name)
            if base not in modules or base == "":
                raise ValueError(
                    f"Unknown layer {name!r} of {type(model).__name__}. Available modules: {[n for n in modules if n]} "
                    "(a module called k times in one forward is tapped as 'name:0', ..., 'name:k-1'; "
                    "see align_kd.describe_layers(model, example_input))."
                )
            self._wanted.setdefault(base, {})[k] = name

    @staticmethod
    def check_names(model: nn.Module, names, example_input: Tensor, *, role: str) -> list[TapInfo]:
        """Validate ``names`` (unknown names, duplicates, non-tensor outputs) and return their TapInfo."""
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"Expected `{role}_layers` to be a list of layer names (str) but got {names!r}.")
        names = list(names)
        if not names:
            raise ValueError(f"Expected at least one name in `{role}_layers` but got an empty list.")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"`{role}_layers` names layers more than once: {dupes}.")
        infos = {i.name: i for i in describe_layers(model, example_input)}
        unknown = [n for n in names if n not in infos]
        if unknown:
            raise ValueError(
                f"Unknown {role} layer(s) {unknown}. Available layers of {type(model).__name__} (in forward order): "
                f"{list(infos)}. Default choice: {discover_layers(model, example_input)}."
            )
        return [infos[n] for n in names]

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for base in self._wanted:
            self._handles.append(modules[base].register_forward_hook(self._hook(base)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._store.clear()
        return False

    def _hook(self, base: str):
        wanted = self._wanted[base]

        def hook(mod, args, out):
            if not self._armed:
                return
            k = self._counts.get(base, 0)
            self._counts[base] = k + 1
            name = wanted.get(k) or (wanted.get(None) if k == 0 else None)
            if name is not None:
                self._store[name] = out

        return hook

    def __call__(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        self._store.clear()
        self._counts.clear()
        self._armed = True
        try:
            out = self.model(x)
        finally:
            self._armed = False
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(
                f"Layers {missing} were not called in this forward pass; taps must be called on every input."
            )
        feats = [self._store[n] for n in self.names]
        self._store.clear()
        return feats, out
