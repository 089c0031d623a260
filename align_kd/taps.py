"""Layer taps: which layers to distil (``discover_layers``) and capturing their outputs (``FeatureTap``).

Taps are module outputs captured with forward hooks; the user's model is never rewritten: hooks are
removed on exit and ``model.training`` is restored. A module called several times in one forward
(weight sharing) gives one tap per call, named ``"name:k"`` (k = 0, 1, ...).

Discovery picks block/stage outputs rather than every activation:

* inside a *stage container* (an ``nn.Sequential``/``nn.ModuleList`` whose children are all
  composite modules, e.g. ResNet's ``layer1`` or a ViT's ``encoder.layers``) every child is a tap;
* a composite module that holds such a stage somewhere inside (ResNet, ViT's ``Encoder``) is
  descended into; any other composite module (a BasicBlock, a Conv-BN-ReLU unit) is one tap;
* runs of leaf modules (plain ``nn.Sequential`` CNNs and MLPs) are grouped into layers that start at
  a weight layer (Conv/Linear/...) and take in the parameter-free or normalisation modules after
  it; the tap is the group's last module, i.e. after the activation (and pooling), never a
  reshape (``Flatten``) or a dropout, so maps keep their spatial layout;
* the module that produces the model's output (the logits) is always the last tap.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["FeatureTap", "TapInfo", "discover_layers", "describe_layers", "feature_kind"]


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


@contextlib.contextmanager
def _preserve_mode(model: nn.Module, training: bool | None):
    flags = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _trace_calls(model: nn.Module, example_input) -> tuple[list[_Call], object]:
    """Run one eval-mode, no-grad forward recording every module call in order."""
    calls: list[_Call] = []
    counts: dict[str, int] = {}
    pending: dict[int, list] = {}
    clock = [0]
    handles = []

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
            calls.append(_Call(name, name, k, start, clock[0], shape, id(out)))
            clock[0] += 1

        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(pre_hook(name)))
            handles.append(mod.register_forward_hook(post_hook(name)))
    try:
        with _preserve_mode(model, False), torch.no_grad():
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


def _is_stage(mod: nn.Module) -> bool:
    kids = list(mod.children())
    return (
        isinstance(mod, (nn.Sequential, nn.ModuleList))
        and len(kids) >= 2
        and all(len(list(k.children())) > 0 for k in kids)
    )


def _holds_stage(mod: nn.Module) -> bool:
    return any(_is_stage(m) for m in mod.modules())


def _discover(model: nn.Module, calls: list[_Call], out) -> list[str]:
    by_module: dict[str, list[_Call]] = {}
    for c in calls:
        by_module.setdefault(c.module_name, []).append(c)
    modules = dict(model.named_modules())
    taps: list[_Call] = []

    def children_calls(prefix: str) -> list[_Call]:
        """Calls of the direct children of module `prefix`, in forward-entry order."""
        mod = modules[prefix]
        found = []
        for cname, _ in mod.named_children():
            full = f"{prefix}.{cname}" if prefix else cname
            found.extend(by_module.get(full, []))
        return sorted(found, key=lambda c: c.start)

    def visit(prefix: str):
        group: list[_Call] = []  # current run of leaf calls that opened with a weight layer

        def close():
            if group:
                last = group[-1]
                if last.shape is not None:
                    taps.append(last)
                group.clear()

        stage = prefix != "" and _is_stage(modules[prefix])
        for c in children_calls(prefix):
            mod = modules[c.module_name]
            composite = len(list(mod.children())) > 0
            if composite:
                close()
                if not stage and _holds_stage(mod):
                    visit(c.module_name)
                elif c.shape is not None:
                    taps.append(c)
            elif _is_weight_layer(mod):
                close()
                group.append(c)
            elif group and not isinstance(mod, _PASS_THROUGH):
                group.append(c)  # activation, norm, pooling after a weight layer
        close()

    visit("")
    # the logits: the call whose output is the model's output is always the last tap, also when
    # other modules run after it (e.g. an auxiliary head whose output the model does not return)
    last = None
    if isinstance(out, Tensor):
        final = [c for c in calls if c.output_id == id(out) and c.shape is not None]
        if final:
            last = max(final, key=lambda c: c.end)
            taps = [t for t in taps if t.name != last.name]
    taps.sort(key=lambda c: c.end)
    if last is not None:
        taps.append(last)
    names = []
    for t in taps:
        if t.name not in names:
            names.append(t.name)
    return names


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
            k = self._counts.get(base, 0)
            self._counts[base] = k + 1
            name = wanted.get(k) or (wanted.get(None) if k == 0 else None)
            if name is not None:
                self._store[name] = out

        return hook

    def __call__(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        self._store.clear()
        self._counts.clear()
        out = self.model(x)
        missing = [n for n in self.names if n not in self._store]
        if missing:
            raise RuntimeError(
                f"Layers {missing} were not called in this forward pass; taps must be called on every input."
            )
        feats = [self._store[n] for n in self.names]
        self._store.clear()
        return feats, out
