"""``Distiller``: the align_kd objective as an ``nn.Module`` for your own training loop.

    distiller = Distiller(teacher, student, example_batch, strategy="sinkhorn")
    opt = torch.optim.SGD(distiller.param_groups(lr=0.05, weight_decay=5e-4), lr=0.05, momentum=0.9)
    for x, y in loader:
        out = distiller(x, y)          # out.loss, out.logits (B, K), out.terms, out.plan (T, S), out.mi (T, S)
        opt.zero_grad(); out.loss.backward(); opt.step()

One forward (rows of every (T, S) matrix are teacher layers, columns student layers):

    t_1..t_T, t_logits = teacher(x)            eval mode, no grad, never trained
    s_1..s_S, s_logits = student(x)
    lam = plan()                               (T, S), every column sums to 1
    mi  = bank(t, s, student_grad_weight=lam)  (T, S) nats per element (VID) or per sample (InfoNCE)
    loss = beta * CE + (1 - beta) * (kd_weight * KD - feature_weight * sum(lam * mi))

(``ce_weight`` given: ``ce_weight * CE + kd_weight * KD - feature_weight * sum(lam * mi)``.)
``out.loss`` has the value of that objective and the gradient of its surrogate: the student
receives sum_ij lam_ij * grad(mi_ij); each pair's variational regressor receives the full
grad(mi_ij), so that every bound stays tight (and the MI matrix stays meaningful for pairs the plan
has switched off); the plan's logits receive the gradient of sum(lam * mi) with mi held fixed.

The teacher is not a submodule: it is frozen (eval mode, ``requires_grad`` off) and none of its
tensors is in ``parameters()`` or ``state_dict()``; ``.to()`` moves it along. ``state_dict()``
holds the student, the MI bank (regressors, log-variances, standardisers) and the plan (logits,
Sinkhorn warm start, or the solved value). Wrap it in ``DistributedDataParallel`` for data
parallelism (see ``examples/torchrun_distill.py``).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _env
from .config import DISTILLER_OPTIONS, LOOP_OPTIONS, FitConfig
from .distributed import data_parallel, mean_over_ranks
from .evaluation import preserve_buffers, preserve_mode
from .losses import kd_term
from .mi import MIBank
from .plans import DUSTBIN, PLANS, Plan, make_plan
from .plans.projection import check_row_masses
from .taps import FeatureTap, check_tap_count, describe_taps, discover_layers

__all__ = ["Distiller", "DistillerOutput"]


@dataclass
class DistillerOutput:
    """What ``distiller(x, y)`` returns.

    loss: scalar to call ``.backward()`` on; its value is the objective (see the module docstring).
    logits: (B, K) the student's logits.
    terms: named detached scalars: ``ce``, ``kd`` (the logit term, unweighted), ``feature``
        (sum(lam * mi), nats; 0 without a feature term).
    plan: (T, S) the plan of this step, every column sums to 1 (detached); with ``dustbin=True``
        (T + 1, S), the last row the weight each student layer gives to no teacher.
    mi: (T, S) MI estimates of this step (detached), None without a feature term.
    pairs_evaluated: share of the T x S bounds computed this step (1.0 unless ``skip_pairs_below``).
    """

    loss: Tensor
    logits: Tensor
    terms: dict[str, Tensor]
    plan: Tensor
    mi: Tensor | None
    pairs_evaluated: float = 1.0


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ["no details"])[0]


# ----------------------------------------------------------------------------------------------
# the GPU path: channels_last memory format and torch.compile


def channels_last_batch(x: Tensor) -> Tensor:
    """A 4-D batch (B, C, H, W) in channels_last memory format (same values); other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def to_channels_last(module: nn.Module) -> None:
    """Every 4-D parameter and buffer of ``module`` (the conv weights) to channels_last, in place (same Parameters)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.dim() == 4:
            t.data = channels_last_batch(t.data)


class ChannelsLastInput(nn.Module):
    """``model`` run on batches converted by :func:`channels_last_batch` (evaluation under channels_last=True)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(channels_last_batch(x))


def compile_error(err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"compile=True: torch.compile failed ({type(err).__name__}: {_first_line(err)}). Run with compile=False "
        "(eager; the same results); on CPU the inductor backend also needs a working C++ compiler."
    )


def is_compile_error(err: BaseException) -> bool:
    import torch._dynamo  # already loaded once torch.compile has run

    return isinstance(err, torch._dynamo.exc.TorchDynamoException)


def _compiled(fn, enabled: bool):
    """``torch.compile(fn)`` when enabled (``fn`` itself is not changed), else ``fn``."""
    if not enabled:
        return fn
    try:
        return torch.compile(fn)
    except Exception as err:  # e.g. a Python version or platform torch.compile does not support
        raise compile_error(err) from err


# ----------------------------------------------------------------------------------------------
# model checks


def _probe_logits(model: nn.Module, x: Tensor, role: str) -> Tensor:
    """The model's logits (B, K) on ``x`` in eval mode, or a clear error when it cannot take the batch."""
    try:
        with torch.no_grad(), preserve_mode(model, training=False):
            out = model(x)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        kind = TypeError if isinstance(err, TypeError) else RuntimeError
        raise kind(
            f"The {role} ({type(model).__name__}) cannot take the training batches: on a batch of shape "
            f"{tuple(x.shape)} ({x.dtype}) it raised {type(err).__name__}: {_first_line(err)}. Expected a {role} that "
            f"accepts the loader's inputs; check its input channels and size against the data (or the data's transform)."
        ) from err
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise TypeError(f"Expected the {role} to return logits of shape (B, num_classes) but got {getattr(out, 'shape', type(out).__name__)}.")
    return out


def _warn_if_ls_cannot_standardize(student_logits: Tensor) -> None:
    """kd_loss="ls" z-scores the student's logits, dividing by their spread + 1e-7: logits with no
    spread (a zero-initialised classifier head, as torchvision's VisionTransformer has) scale the first
    steps' gradients by up to 1e7, and training diverges within a few steps."""
    spread = float(student_logits.float().std(dim=1).min())
    if spread < 1e-4:
        warnings.warn(
            f"kd_loss='ls' standardises the student's logits, but on the example batch they have (almost) no "
            f"spread across classes (std {spread:.1e}; a zero-initialised classifier head, as in torchvision's "
            "VisionTransformer): dividing by std + 1e-7 scales the first gradients by up to 1e7 and training "
            "diverges (measured: the benchmark's ViT student, NaN loss from step 3). Initialise the head with small "
            "random weights (e.g. torch.nn.init.normal_(head.weight, std=0.01)) or use kd_loss='hinton' or 'dkd'.",
            RuntimeWarning, stacklevel=3)


def _model_device(model: nn.Module) -> torch.device | None:
    t = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return None if t is None else t.device


def check_options(options: dict, where: str = "Distiller") -> None:
    """Refuse option names that are not Distiller options (with what to do instead)."""
    loop = sorted(set(options) & set(LOOP_OPTIONS))
    if loop:
        raise TypeError(
            f"{where}() got training-loop option(s) {loop}: those belong to fit() (or to your own loop: the optimiser, "
            f"schedule, epochs). A Distiller takes: {sorted(DISTILLER_OPTIONS)}."
        )
    unknown = sorted(set(options) - set(DISTILLER_OPTIONS))
    if unknown:
        raise TypeError(f"{where}() got unknown option(s) {unknown}; valid options: {sorted(DISTILLER_OPTIONS)}.")


class Distiller(nn.Module):
    """The distillation objective of align_kd as a module: ``out = distiller(x, y)``.

    Args:
        teacher: trained ``nn.Module`` returning logits (B, K); frozen here (eval, no grad).
        student: ``nn.Module`` returning logits (B, K), on the same device as the teacher.
        example_input: a batch (B >= 1, on the models' device) used to find the layers and their shapes.
        strategy: a name from :data:`align_kd.PLAN_STRATEGIES` or a fixed (T, S) tensor.
        teacher_layers / student_layers: tap names; default :func:`align_kd.discover_layers`.
        verbose: print the taps used (``fit()`` passes its ``progress``).
        **options: the loss, plan, bank and model-path fields of :class:`align_kd.FitConfig`
            (:data:`align_kd.config.DISTILLER_OPTIONS`: beta, kd_weight, kd_temperature, kd_loss,
            feature_weight, tau, row_marginal, plan_init, bank_layout, pool, width, ...), checked as
            ``fit()`` checks them.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, example_input: Tensor, *, strategy="sinkhorn",
                 teacher_layers: list[str] | None = None, student_layers: list[str] | None = None,
                 verbose: bool = False, **options):
        super().__init__()
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, nn.Module):
                raise TypeError(f"Expected the {role} to be a torch.nn.Module but got {type(model).__name__}.")
        if teacher is student:
            raise ValueError("The teacher and the student are the same module; distil into a separate student.")
        check_options(options)
        fixed = strategy if isinstance(strategy, Tensor) else None
        cfg = FitConfig(strategy="fixed" if fixed is not None else strategy, **options)
        self.cfg = cfg
        self.strategy = cfg.strategy
        if not isinstance(example_input, Tensor) or example_input.dim() < 1 or len(example_input) == 0:
            got = tuple(example_input.shape) if isinstance(example_input, Tensor) else type(example_input).__name__
            raise TypeError(f"Expected `example_input` to be a non-empty batch tensor (B, ...) but got {got}.")
        x = example_input[:2]
        self.device = x.device
        _env.amp_in_effect(cfg.amp, self.device)  # warns where amp=True would be emulated (autocast() then stays off)
        for role, model in (("teacher", teacher), ("student", student)):
            where = _model_device(model)
            if where is not None and where != x.device:
                raise ValueError(
                    f"The {role} is on {where} but `example_input` is on {x.device}. Move both models and the batches to "
                    f"one device first (e.g. {role}.to({str(x.device)!r}))."
                )
        if not any(p.requires_grad for p in student.parameters()):
            raise ValueError(
                f"The student ({type(student).__name__}) has no parameter with requires_grad=True, so it would train "
                "nothing. Unfreeze it (student.requires_grad_(True)) or the parts you mean to train."
            )
        # channels_last as asked, except where oneDNN's kernels get the models' gradients wrong (then a warning)
        self.channels_last = _env.channels_last_in_effect(cfg.channels_last, self.device, teacher, student)
        if self.channels_last:
            to_channels_last(teacher)
            to_channels_last(student)
        teacher.eval()
        teacher.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: no parameters, no state_dict entries
        self.student = student

        t_logits, s_logits = _probe_logits(teacher, x, "teacher"), _probe_logits(student, x, "student")  # (B, K) each
        nt, ns = t_logits.shape[1], s_logits.shape[1]
        if nt != ns:
            raise ValueError(f"Teacher and student must predict the same classes but the teacher has {nt} outputs and the student {ns}.")
        self.num_classes = nt
        self.teacher_layers = list(teacher_layers or discover_layers(teacher, x))
        self.student_layers = list(student_layers or discover_layers(student, x))
        t_info = FeatureTap.check_names(teacher, self.teacher_layers, x, role="teacher")
        s_info = FeatureTap.check_names(student, self.student_layers, x, role="student")
        self.teacher_shapes = [list(i.shape) for i in t_info]
        self.student_shapes = [list(i.shape) for i in s_info]
        T, S = len(t_info), len(s_info)
        plan_cls = PLANS.get(cfg.strategy)
        weighs_distil = cfg.beta < 1 or cfg.ce_weight is not None
        self.uses_features = ((fixed is not None or plan_cls.uses_features) and cfg.feature_weight > 0 and weighs_distil)
        if self.uses_features:
            for role, model, names, given in (("teacher", teacher, self.teacher_layers, teacher_layers),
                                               ("student", student, self.student_layers, student_layers)):
                check_tap_count(model, names, x, role=role, chosen=given is not None, allow_few=cfg.allow_few_taps)
        if verbose:
            print(describe_taps(self.teacher_layers, self.teacher_shapes, self.student_layers, self.student_shapes),
                  flush=True)

        row_marginal = None if cfg.row_marginal is None else torch.tensor(cfg.row_marginal, dtype=torch.float32)
        if row_marginal is not None:
            if row_marginal.shape != (T,):
                raise ValueError(f"Expected `row_marginal` to have T={T} entries (one per teacher layer) but got "
                                 f"{cfg.row_marginal}.")
            check_row_masses(row_marginal, S, cfg.row_marginal_mode)
        self.plan: Plan = make_plan(fixed if fixed is not None else cfg.strategy, T, S, tau=cfg.tau,
                                    row_marginal=row_marginal, init=cfg.plan_init,
                                    options={k: getattr(cfg, k) for k in DISTILLER_OPTIONS}).to(self.device)
        self.uses_kd = cfg.kd_weight > 0 and weighs_distil
        if self.uses_kd and cfg.kd_loss == "ls":
            _warn_if_ls_cannot_standardize(s_logits)
        self.uses_teacher = self.uses_kd or self.uses_features  # else (labels only) skip its forward
        self.bank = (
            MIBank(self.teacher_shapes, self.student_shapes, layout=cfg.bank_layout, estimator=cfg.mi_estimator,
                   memory=cfg.infonce_memory, eps=cfg.vid_eps,
                   pool=cfg.pool if cfg.bank_layout == "shared" else None, width=cfg.width).to(self.device)
            if self.uses_features else None
        )
        if self.channels_last and cfg.bank_layout == "full" and self.bank is not None:
            to_channels_last(self.bank.regressors)  # 1x1 convolutions; the shared layout has none (pair_maps are matrices)
        # training forwards so far: the full-pass schedule of skip_pairs_below (saved with the state)
        self.register_buffer("forward_count", torch.zeros((), dtype=torch.long, device=self.device))
        # the taps' hooks stay registered for the Distiller's life (close() removes them); they only
        # record inside the Distiller's own forwards
        self._taps = [FeatureTap(teacher, self.teacher_layers).__enter__(), FeatureTap(student, self.student_layers).__enter__()]
        # what forward calls: each tap's call (the model's forward with its hooks) and the bank's
        # forward, compiled under compile=True (the modules themselves are not wrapped)
        self._teacher_call, self._student_call = (_compiled(t.__call__, cfg.compile) for t in self._taps)
        # plan_objective="heldout": the (frozen, eval-mode) teacher's taps on the last training batch,
        # (input, its version, features), so that the update after a step reuses them (not state)
        self._teacher_cache: tuple | None = None
        # heldout_grad_point="before_step": the student's and bank's tensors before the step the next
        # update follows (capture_step_start()), consumed by heldout_hypergradient (not state)
        self._step_start: list[Tensor] | None = None
        self._bank_call = _compiled(self.bank.forward, cfg.compile) if self.bank is not None else None

    # -- modes and devices ------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()  # whatever the mode, the teacher stays in eval mode
        return self

    def _apply(self, fn, recurse=True):
        self.teacher._apply(fn)  # .to(), .cuda(), .double() move the (frozen) teacher along
        out = super()._apply(fn, recurse)
        self.device = self.forward_count.device
        return out

    def close(self) -> None:
        """Remove the taps' hooks from the teacher and the student (the Distiller cannot run after this)."""
        for tap in self._taps:
            tap.__exit__(None, None, None)

    def autocast(self):
        """bfloat16 autocast on the Distiller's device under ``amp=True`` where the device computes bf16
        natively (:func:`align_kd._env.bf16_is_native`), else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.amp and _env.bf16_is_native(self.device))

    def batch(self, x: Tensor) -> Tensor:
        """An input batch on the device; (B, C, H, W) batches in channels_last under channels_last=True."""
        x = x.to(self.device, non_blocking=True)
        return channels_last_batch(x) if self.channels_last else x

    @property
    def plan_rows(self) -> list[str]:
        """Names of the plan's rows: the teacher layers, then the dustbin's row ("no teacher") when it has one."""
        return list(self.teacher_layers) + ([DUSTBIN] if self.plan.dustbin else [])

    @property
    def eval_model(self) -> nn.Module:
        """The student as evaluation should call it (batches converted under channels_last=True)."""
        return ChannelsLastInput(self.student) if self.channels_last else self.student

    # -- optimisation ---------------------------------------------------------------------------

    def param_groups(self, lr: float, weight_decay: float = 0.0, plan_lr: float | None = None) -> list[dict]:
        """torch optimiser parameter groups, each with a ``name`` ("student", "bank",
        "bank_log_variances", "plan"): student and regressors with ``weight_decay``; the
        log-variances and the plan logits without (plan logits at ``plan_lr``, default ``lr``)."""
        groups = [{"name": "student", "params": [p for p in self.student.parameters() if p.requires_grad],
                   "weight_decay": weight_decay}]
        if self.bank is not None:
            no_decay = {id(p) for p in self.bank.no_decay_parameters()}
            groups.append({"name": "bank", "params": [p for p in self.bank.parameters() if id(p) not in no_decay],
                           "weight_decay": weight_decay})
            groups.append({"name": "bank_log_variances", "params": self.bank.no_decay_parameters(), "weight_decay": 0.0})
        plan_params = list(self.plan.parameters()) if self.plan.learned else []  # not the held-out plan's: update_plan moves it
        if plan_params and self.bank is not None:
            groups.append({"name": "plan", "params": plan_params, "weight_decay": 0.0, "lr": plan_lr or lr})
        return groups

    def running_buffers(self) -> list[Tensor]:
        """The running statistics a training forward updates in place (student BatchNorm, the bank's
        standardisers); ``fit()`` restores them when it skips a step."""
        return [b for m in (self.student, self.bank) if m is not None for b in m.buffers()] + [self.forward_count]

    # -- the objective --------------------------------------------------------------------------

    def forward(self, x: Tensor, y: Tensor, *, kd_scale: float = 1.0) -> DistillerOutput:
        """The objective on batch ``x`` (B, ...) with labels ``y`` (B,); ``kd_scale`` multiplies the
        logit term (``fit()``'s ``kd_warmup`` ramp)."""
        try:
            return self._forward(x, y, kd_scale)
        except RuntimeError as err:
            if self.cfg.compile and is_compile_error(err):
                raise compile_error(err) from err
            raise

    def _forward(self, x: Tensor, y: Tensor, kd_scale: float) -> DistillerOutput:
        cfg = self.cfg
        raw, self._teacher_cache = x, None
        x, y = self.batch(x), y.to(self.device, non_blocking=True)
        training = self.training and torch.is_grad_enabled()
        with self.autocast():
            if self.uses_teacher:
                with torch.no_grad():
                    t_feats, t_logits = self._teacher_call(x)
                if training and self.plan.data == "heldout":
                    self._teacher_cache = (raw, raw._version, t_feats)
            s_feats, s_logits = self._student_call(x)
        ce = F.cross_entropy(s_logits.float(), y.long())
        kd = (kd_term(cfg.kd_loss, s_logits, t_logits, y, cfg.kd_temperature, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta)
              if self.uses_kd else ce.new_zeros(()))
        distil = cfg.kd_weight * kd_scale * kd
        full = self.plan()  # (T, S); with a dustbin (T + 1, S), the last row "no teacher"
        lam = full[: len(self.teacher_layers)] if self.plan.dustbin else full  # (T, S): what the bank weighs
        mi, active, objective_gap = None, None, None
        if self.bank is not None:
            if cfg.skip_pairs_below is not None and training and int(self.forward_count) % cfg.full_pass_every != 0:
                # pairs with a small plan weight send almost no gradient to the student: evaluate
                # them only on full passes and reuse their last estimate in between
                active = lam.detach() >= cfg.skip_pairs_below  # (T, S)
            with self.autocast():
                mi = self._bank_call(t_feats, s_feats, student_grad_weight=lam, active=active)  # (T, S)
            # gradient surrogate: regressors get the full gradient of every bound, the student the
            # lam-weighted one (inside the bank), the plan logits that of sum(lam * mi) at fixed mi
            surrogate = -mi.sum() - ((lam if self.plan.learned else lam.detach()) * mi.detach()).sum()
            objective = -(lam.detach() * mi.detach()).sum()
            objective_gap = cfg.feature_weight * (objective - surrogate.detach())
            distil = distil + cfg.feature_weight * surrogate
        outer = 1 - cfg.beta if cfg.ce_weight is None else 1.0
        loss = cfg.beta * ce + (1 - cfg.beta) * distil if cfg.ce_weight is None else cfg.ce_weight * ce + distil
        if objective_gap is not None:  # the value of the objective, the gradient of the surrogate
            loss = loss + outer * objective_gap
        if training:
            with torch.no_grad():
                self.forward_count += 1
        plan = full.detach()
        feature = (lam.detach() * mi.detach()).sum().float() if mi is not None else ce.new_zeros(())
        return DistillerOutput(
            loss=loss, logits=s_logits,
            terms={"ce": ce.detach(), "kd": kd.detach().float(), "feature": feature.detach()},
            plan=plan, mi=None if mi is None else mi.detach(),
            pairs_evaluated=0.0 if mi is None else 1.0 if active is None else float(active.float().mean()),
        )

    # -- plans that learn from data of their own --------------------------------------------------

    @torch.no_grad()
    def estimate_mi(self, batches) -> Tensor:
        """(T, S) MI averaged over ``batches`` of (x, y, ...), everything in eval mode (running
        statistics untouched); averaged over ranks when a process group is initialised."""
        if self.bank is None:
            raise ValueError(f"strategy={self.strategy!r} has no feature term, so there is no MI to estimate.")
        total, n = None, 0
        with preserve_mode(self.student, self.bank, training=False):
            for x, *_ in batches:
                x = self.batch(x)
                with self.autocast():
                    t_feats, _ = self._teacher_call(x)
                    s_feats, _ = self._student_call(x)
                    mi = self._bank_call(t_feats, s_feats).float()
                total, n = (mi if total is None else total + mi), n + 1
        if n == 0:
            raise ValueError("estimate_mi() got no batches; pass a few held-out (x, y) batches.")
        return mean_over_ranks(total / n)  # data parallel: every rank's batches

    def _objective_weight(self) -> float:
        """d(training loss)/d(-sum(lam * mi)): the factor of the feature term in the objective."""
        cfg = self.cfg
        return cfg.feature_weight * ((1 - cfg.beta) if cfg.ce_weight is None else 1.0)

    def _step_tensors(self) -> list[Tensor]:
        """The tensors a training step changes and the MI gradients read: the student's and the bank's
        parameters and buffers (the teacher is frozen, the plan is not read by the MI forward)."""
        return [t for m in (self.student, self.bank) if m is not None for t in (*m.parameters(), *m.buffers())]

    def capture_step_start(self) -> None:
        """Remember the student and the MI bank as they are now, before the training step that the
        next held-out plan update follows (call it before ``optimizer.step()`` when
        :meth:`plan_update_due` will say so). With ``heldout_grad_point="before_step"`` (the default)
        the next :meth:`heldout_hypergradient` takes its MI gradients there; with "after_step", or
        without a feature term, this does nothing."""
        if self.bank is not None and self.cfg.heldout_grad_point == "before_step":
            self._step_start = [t.detach().clone() for t in self._step_tensors()]

    @contextmanager
    def _at_step_start(self):
        """Inside: the student's and the bank's tensors as :meth:`capture_step_start` saw them; after:
        as they were (the capture is used once)."""
        saved, self._step_start = self._step_start, None
        tensors = self._step_tensors()
        if saved is None or len(saved) != len(tensors) or any(a.shape != b.shape for a, b in zip(saved, tensors)):
            raise RuntimeError(
                "heldout_grad_point='before_step' takes the MI gradients at the student as it was before the step the "
                "update follows, but no capture of it matches the student: call distiller.capture_step_start() "
                "before optimizer.step() on every step whose plan update is due (fit() does), or pass "
                "heldout_grad_point='after_step'.")
        with preserve_buffers(tensors):  # parameters and buffers alike: back to their values on exit
            with torch.no_grad():
                for t, v in zip(tensors, saved):
                    t.copy_(v)
            yield

    def heldout_hypergradient(self, train, heldout) -> Tensor:
        """(T, S) derivative of the held-out cross-entropy after one SGD step of the student with
        respect to the plan, per unit of learning rate.

        The step from theta moves the student by ``lr * w * sum_ij lam_ij * grad I_ij(theta)`` (w: the
        feature term's weight in the loss; linear in lam), so d CE_heldout(theta') / d lam_ij =
        lr * w * <grad CE_heldout(theta'), grad I_ij(theta)> (times 1 + momentum under nesterov SGD):
        the held-out gradient v after the step (on ``heldout``, scored in eval mode as the student is
        tested), the MI gradients before it (on ``train``, the step's batch). ``heldout_grad_point``
        says where the MI gradients are taken: "before_step" (default; exact, from the tensors
        :meth:`capture_step_start` kept) or "after_step" (at theta', first order only: at lr 0.1 with
        momentum 0.9 ``benchmarks/horizon_check.py`` measured it anti-correlated with the exact
        effect). All T x S inner products are one Jacobian-vector product J v of the map theta ->
        MI matrix: ``heldout_jvp="exact"`` (default) computes it by the transpose trick (J v = d/du
        <J^T u, v>: one forward, a backward with its graph, one more backward; attention in that
        forward takes the math kernel: the fused CPU kernels have no double backward);
        ``"finite_difference"`` by central differences, two forwards at theta +- h v / ||v|| and no
        backward (DistPro's form; O(h^2) from the exact value on smooth nets). The MI forward runs in the mode
        ``heldout_grad_mode`` names: "train" (default), the batch statistics the training step's
        gradient has (with BatchNorm the eval-mode gradient is another derivative:
        tests/test_heldout.py), or "eval". The teacher's features of ``train`` are those of the
        training forward that just ran on the same tensor (the teacher is frozen and in eval mode,
        so they are the same numbers); any other batch gets a teacher forward of its own. Running
        statistics, weights, parameter gradients and RNG streams are left as they were. Averaged
        over ranks when data parallel.
        """
        if self.bank is None:
            raise ValueError(f"strategy={self.strategy!r} has no feature term, so the plan has no held-out gradient.")
        params = [p for p in self.student.parameters() if p.requires_grad]
        (xh, yh, *_), (raw, *_) = heldout, train
        cache, self._teacher_cache = self._teacher_cache, None
        cached = cache is not None and cache[0] is raw and cache[1] == raw._version
        xh, yh, xt = self.batch(xh), yh.to(self.device), self.batch(raw)
        at_mi_point = self._at_step_start() if self.cfg.heldout_grad_point == "before_step" else nullcontext()
        with torch.enable_grad():
            with preserve_mode(self.student, self.bank, training=False), self.autocast():
                ce = F.cross_entropy(self.student(xh).float(), yh.long())
            v = torch.autograd.grad(ce, params, allow_unused=True)  # at theta', after the step
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with (at_mi_point, preserve_mode(self.student, self.bank, training=self.cfg.heldout_grad_mode == "train"),
              preserve_buffers(self.running_buffers()), torch.random.fork_rng(devices=rng_devices)):
            if cached:
                t_feats = cache[2]
            else:
                with torch.no_grad(), self.autocast():
                    t_feats, _ = self._teacher_call(xt)
            if self.cfg.heldout_jvp == "finite_difference":
                directional = self._mi_jvp_finite_difference(xt, t_feats, params, v, rng_devices)
            else:
                directional = self._mi_jvp_exact(xt, t_feats, params, v)
        return mean_over_ranks(self._objective_weight() * directional.detach())  # (T, S): w * <grad I_ij, grad CE_heldout>

    def _mi_jvp_exact(self, xt: Tensor, t_feats, params: list[Tensor], v) -> Tensor:
        """(T, S) J v, J the Jacobian of theta -> MI matrix on ``xt``: exact, by the transpose trick
        (J v = d/du <J^T u, v>: one forward, a backward with its graph, one more backward). Attention
        takes the math kernel: the fused CPU kernels (flash) have no double backward."""
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            with self.autocast():
                s_feats, _ = self._student_call(xt)
                mi = self._bank_call(t_feats, s_feats).float()  # (T, S)
            u = torch.zeros_like(mi, requires_grad=True)
            jt_u = torch.autograd.grad(mi, params, grad_outputs=u, create_graph=True, allow_unused=True)
            dot = sum((a * b).sum() for a, b in zip(jt_u, v) if a is not None and b is not None)
            if not (torch.is_tensor(dot) and dot.requires_grad):
                return torch.zeros_like(mi)
            return torch.autograd.grad(dot, u)[0]

    @torch.no_grad()
    def _mi_jvp_finite_difference(self, xt: Tensor, t_feats, params: list[Tensor], v, rng_devices) -> Tensor:
        """(T, S) J v by central differences, as DistPro takes its mixed derivative: two MI forwards at
        theta +- h v / ||v|| (h = ``heldout_fd_step``, the perturbation's norm in parameter space),
        J v ~ ||v|| (MI(+) - MI(-)) / (2 h), no backward; O(h^2) from the exact value where the nets are
        smooth at scale h, O(h) across ReLU kinks (tests/test_heldout.py). The forwards run
        in float32 even under ``amp=True`` (bfloat16's 8-bit mantissa would swamp a difference of two
        nearby forwards) and from the same RNG state and running statistics; the parameters are put
        back bit for bit."""
        moved = [(p, g) for p, g in zip(params, v) if g is not None]
        norm = torch.sqrt(sum(g.double().pow(2).sum() for _, g in moved)) if moved else torch.zeros((), dtype=torch.float64)
        h = self.cfg.heldout_fd_step
        step = h / norm if norm > 0 else torch.zeros_like(norm)  # v = 0: both passes at theta, J v = 0 (and every
        # rank runs the same two forwards: the bank's train-mode standardisers all-reduce)
        mis = []
        with preserve_buffers([p for p, _ in moved]) as start:
            for sign in (1.0, -1.0):
                for (p, g), p0 in zip(moved, start):
                    p.copy_(p0 + (sign * step).to(p.dtype) * g)
                # each pass from the same RNG state and running statistics (a train-mode forward moves them)
                with (torch.random.fork_rng(devices=rng_devices), preserve_buffers(self.running_buffers()),
                      torch.autocast(self.device.type, enabled=False)):
                    s_feats, _ = self._student_call(xt)
                    mis.append(self._bank_call(t_feats, s_feats).float())  # (T, S)
        return (mis[0] - mis[1]) * (norm.float() / (2 * h))

    def update_plan(self, batches=None, *, train=None, heldout=None) -> dict | None:
        """Update a plan that learns from data of its own; call it from your loop when
        :meth:`plan_update_due` says so. ``strategy="exact"``: ``batches``, a few held batches of
        (x, y); ``plan_objective="heldout"``: ``train=(x, y)`` (the step's batch) and
        ``heldout=(x, y)`` (a batch never trained on). Returns the update's record (None for plans
        that need no data). Data parallel: every rank calls it; the plan ends identical on all
        ranks (rank 0's)."""
        if self.plan.data is None:
            return None
        record = self.plan.update(self, batches, train=train, heldout=heldout)
        if data_parallel():
            for b in self.plan.buffers():  # identical plans even if a solver is not deterministic
                torch_dist.broadcast(b, src=0)
        return record

    def plan_update_due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the plan wants :meth:`update_plan` after training step ``step`` (counted from 1)."""
        return self.plan.data is not None and self.plan.update_due(step, steps_per_epoch)

    def extra_repr(self) -> str:
        return (f"strategy={self.strategy!r}, T={len(self.teacher_layers)}, S={len(self.student_layers)}, "
                f"teacher={type(self.teacher).__name__}")

