"""``fit()``: distil a teacher into a student with a learned layer-alignment plan.

One training step (rows of every (T, S) matrix are teacher layers, columns student layers):

    t_1..t_T, t_logits = teacher(x)          eval mode, no grad
    s_1..s_S, s_logits = student(x)
    lam = plan()                             (T, S), every column sums to 1
    mi  = bank(t, s, student_grad_weight=lam)  (T, S) nats per element
    loss = beta * CE + (1 - beta) * (kd_weight * KD - feature_weight * sum(lam * mi))

The student receives sum_ij lam_ij * grad(mi_ij); each pair's variational regressor receives the
full grad(mi_ij) so that every bound stays tight (and the MI matrix stays meaningful for pairs the
plan has switched off); the plan's logits receive grad of sum(lam * mi) with mi held fixed.
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import Checkpointer
from .distributed import DistContext
from .distributed import setup as _setup_distributed
from .result import FitResult
from .losses import KD_LOSSES, kd_term
from .mi import BANK_LAYOUTS, MIBank
from .plans import PLAN_STRATEGIES, ExactPlan, make_plan
from .taps import FeatureTap, check_tap_count, describe_taps, discover_layers

__all__ = ["FitConfig", "FitResult", "fit"]

OPTIMIZERS = ("sgd", "adam")


@dataclass
class FitConfig:
    """Every option of :func:`fit`, with units; validated on construction."""

    strategy: str = "sinkhorn"  # one of PLAN_STRATEGIES; "fixed" when fit() was given a (T, S) tensor
    epochs: int = 10
    beta: float = 0.5  # weight of cross-entropy; (1 - beta) weighs the distillation terms
    kd_weight: float = 1.0  # logit-KD term inside the (1 - beta) part (0 disables)
    kd_temperature: float = 4.0
    kd_loss: str = "hinton"  # the logit term: "hinton", "dkd" (decoupled KD) or "ls" (logit-standardised KD)
    kd_warmup: float = 0.0  # fraction of training over which the logit term's weight ramps from 0 to 1 (DKD: 20/240)
    dkd_alpha: float = 1.0  # "dkd": weight of the target-class term (TCKD)
    dkd_beta: float = 8.0  # "dkd": weight of the non-target term (NCKD)
    ce_weight: float | None = None  # None: beta * CE + (1 - beta) * (...); a number: ce_weight * CE + kd_weight * KD - feature_weight * sum(lam * mi)
    feature_weight: float = 1.0  # weight of -sum(lam * mi) inside the (1 - beta) part
    tau: float = 0.1  # plan temperature (softmax / sinkhorn / exact)
    row_marginal: list[float] | None = None  # teacher-row masses summing to S; None: uniform S / T
    plan_init: str = "depth"  # "depth" (soft diagonal by relative depth) or "zeros"
    plan_lr: float | None = None  # learning rate of the plan logits (None: same as lr)
    lr: float = 0.05
    weight_decay: float = 5e-4  # student and regressors; never the log-variances or plan logits
    momentum: float = 0.9
    optimizer: str = "sgd"  # "sgd" (nesterov) or "adam"
    warmup_epochs: float = 0.0  # linear LR warm-up, then cosine decay to 0
    bank_layout: str = "shared"  # MI bank regressors: "shared" (cheap) or "full" (reference VID)
    pool: int | None = 2  # cap on the resolution at which pairs are compared (shared bank)
    width: int | None = None  # hidden width of the MI regressors (None: from the student's channels, 16-64)
    skip_pairs_below: float | None = None  # skip pairs with lambda below this (last estimate reused); None: all pairs
    full_pass_every: int = 10  # with skip_pairs_below: every this many steps all pairs are evaluated
    exact_every: int | None = None  # "exact": steps between solves (None: once per epoch)
    exact_warmup: int = 50  # "exact": first solve after this many steps
    exact_method: str = "auto"  # "exact": exact_plan method
    exact_tau: float | None = None  # "exact": entropy weight (None: use tau; 0 for the LP)
    held_batches: int = 2  # "exact": training batches kept aside to estimate the MI matrix
    grad_clip: float | None = None  # max gradient norm (None: no clipping)
    max_bad_steps: int = 10  # consecutive non-finite losses or inputs before stopping
    amp: bool = False  # bfloat16 autocast (likelihood stays float32)
    channels_last: bool = False  # models, the "full" bank's convolutions and 4-D batches in channels_last memory format
    compile: bool = False  # torch.compile the teacher and student forwards (with their taps) and the MI bank
    seed: int = 0
    device: str | None = None  # None: CUDA when available, else CPU (under torchrun: cuda:$LOCAL_RANK)
    progress: bool = True  # progress bar and one line per epoch (rank 0 only)
    checkpoint_dir: str | None = None  # write checkpoint-epochNNNN.pt here after every epoch (rank 0)
    resume: bool = False  # continue from the newest good checkpoint in checkpoint_dir (fresh start if none)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep (2: one fallback)
    allow_few_taps: bool = False  # warn (instead of stopping) when a side has fewer than two feature taps

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        check(isinstance(self.strategy, str) and self.strategy in PLAN_STRATEGIES + ("fixed",),
              f"Expected argument `strategy` to be one of {list(PLAN_STRATEGIES)} or a (T, S) tensor but got {self.strategy!r}.")
        check(isinstance(self.epochs, int) and self.epochs >= 1, f"Expected `epochs` to be an int >= 1 but got {self.epochs!r}.")
        check(isinstance(self.beta, (int, float)) and 0.0 <= self.beta <= 1.0,
              f"Expected `beta` in [0, 1] (weight of cross-entropy) but got {self.beta!r}.")
        for name in ("kd_weight", "feature_weight", "weight_decay", "momentum", "warmup_epochs"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"Expected `{name}` >= 0 but got {v!r}.")
        for name in ("kd_temperature", "tau", "lr"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v > 0, f"Expected `{name}` > 0 but got {v!r}.")
        check(self.kd_loss in KD_LOSSES, f"Expected argument `kd_loss` to be one of {list(KD_LOSSES)} but got {self.kd_loss!r}.")
        check(isinstance(self.kd_warmup, (int, float)) and 0 <= self.kd_warmup <= 1,
              f"Expected `kd_warmup` in [0, 1] (a fraction of training) but got {self.kd_warmup!r}.")
        for name in ("dkd_alpha", "dkd_beta"):
            v = getattr(self, name)
            check(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0, f"Expected `{name}` >= 0 but got {v!r}.")
        check(self.ce_weight is None or (isinstance(self.ce_weight, (int, float)) and math.isfinite(self.ce_weight) and self.ce_weight >= 0),
              f"Expected `ce_weight` >= 0 or None but got {self.ce_weight!r}.")
        check(self.plan_lr is None or self.plan_lr > 0, f"Expected `plan_lr` > 0 or None but got {self.plan_lr!r}.")
        check(self.optimizer in OPTIMIZERS, f"Expected argument `optimizer` to be one of {list(OPTIMIZERS)} but got {self.optimizer!r}.")
        check(self.bank_layout in BANK_LAYOUTS,
              f"Expected argument `bank_layout` to be one of {list(BANK_LAYOUTS)} but got {self.bank_layout!r}.")
        check(self.plan_init in ("depth", "zeros"), f"Expected argument `plan_init` to be one of ['depth', 'zeros'] but got {self.plan_init!r}.")
        check(self.exact_every is None or (isinstance(self.exact_every, int) and self.exact_every >= 1),
              f"Expected `exact_every` to be an int >= 1 or None but got {self.exact_every!r}.")
        check(self.exact_tau is None or self.exact_tau >= 0, f"Expected `exact_tau` >= 0 or None but got {self.exact_tau!r}.")
        check(isinstance(self.max_bad_steps, int) and self.max_bad_steps >= 1, f"Expected `max_bad_steps` >= 1 but got {self.max_bad_steps!r}.")
        check(self.grad_clip is None or self.grad_clip > 0, f"Expected `grad_clip` > 0 or None but got {self.grad_clip!r}.")
        check(self.skip_pairs_below is None or (isinstance(self.skip_pairs_below, (int, float)) and 0 < self.skip_pairs_below < 1),
              f"Expected `skip_pairs_below` in (0, 1) (a plan weight; columns sum to 1) or None but got {self.skip_pairs_below!r}.")
        check(isinstance(self.full_pass_every, int) and not isinstance(self.full_pass_every, bool) and self.full_pass_every >= 1,
              f"Expected `full_pass_every` to be an int >= 1 but got {self.full_pass_every!r}.")
        if isinstance(self.checkpoint_dir, os.PathLike):
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        check(self.checkpoint_dir is None or (isinstance(self.checkpoint_dir, str) and self.checkpoint_dir != ""),
              f"Expected `checkpoint_dir` to be a directory path or None but got {self.checkpoint_dir!r}.")
        for name in ("resume", "amp", "channels_last", "compile", "allow_few_taps"):
            v = getattr(self, name)
            check(isinstance(v, bool), f"Expected `{name}` to be True or False but got {v!r}.")
        check(not self.resume or self.checkpoint_dir is not None,
              "resume=True needs `checkpoint_dir` (the directory the interrupted run wrote its checkpoints to).")
        check(isinstance(self.keep_checkpoints, int) and not isinstance(self.keep_checkpoints, bool) and self.keep_checkpoints >= 1,
              f"Expected `keep_checkpoints` to be an int >= 1 but got {self.keep_checkpoints!r}.")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ["no details"])[0]


def _oom_message(cfg: FitConfig, loader, err: BaseException) -> str:
    batch = getattr(loader, "batch_size", None)
    first = _first_line(err)
    hints = [f"the batch size{f' (now {batch})' if batch else ''}",
             f"the MI bank's pooling resolution `pool` (now {cfg.pool})", f"the regressor `width` (now {cfg.width})"]
    extra = " bank_layout='full' needs far more memory than 'shared'." if cfg.bank_layout == "full" else ""
    extra += "" if cfg.amp else " amp=True (bfloat16 autocast) also saves memory."
    return f"CUDA out of memory in fit() ({first}). Lower {', '.join(hints[:-1])} or {hints[-1]}.{extra}"


# ----------------------------------------------------------------------------------------------
# input checks


def _looks_like_batch(item) -> bool:
    return isinstance(item, dict) or (isinstance(item, (tuple, list)) and len(item) > 0 and isinstance(item[0], Tensor))


def _split_data(data):
    if isinstance(data, (tuple, list)):
        if len(data) > 0 and _looks_like_batch(data[0]):
            first = data[0]
            what = (f"dicts with keys {sorted(first)}" if isinstance(first, dict)
                    else f"{type(first).__name__}s of {[type(b).__name__ for b in first]}")
            raise TypeError(
                f"Expected `data` to be a loader (an iterable of (inputs, labels) batches, e.g. a DataLoader) or a "
                f"(train_loader, test_loader) pair, but got a {type(data).__name__} of {len(data)} batches ({what}). "
                "Pass the batches as the training loader with no test loader: fit(teacher, student, (batches, None))"
                + (", after converting each dict to a tuple, e.g. batches = [(b['image'], b['label']) for b in batches]."
                   if isinstance(first, dict) else ".")
            )
        if len(data) != 2:
            raise ValueError(f"Expected `data` to be a DataLoader or a (train_loader, test_loader) pair but got a sequence of length {len(data)}.")
        return data[0], data[1]
    return data, None


def _first_batch(loader, role: str):
    try:
        batch = next(iter(loader))
    except TypeError:
        raise TypeError(f"Expected the {role} data to be an iterable of (inputs, labels) batches (e.g. a DataLoader) but got {type(loader).__name__}.") from None
    except StopIteration:
        raise ValueError(f"The {role} loader yielded no batch; is the dataset empty?") from None
    if isinstance(batch, dict):
        keys = sorted(map(str, batch))
        raise TypeError(
            f"Expected the {role} loader to yield (inputs tensor, labels tensor) pairs but it yielded dicts with keys "
            f"{keys}. Wrap it so that it yields tuples, e.g. a generator class whose __iter__ yields "
            "(b['image'], b['label']) for each batch b and whose __len__ is len(loader), or return tuples from the "
            "dataset's __getitem__."
        )
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor) and isinstance(batch[1], Tensor)):
        got = type(batch).__name__ if not isinstance(batch, (tuple, list)) else f"a {type(batch).__name__} of {[type(b).__name__ for b in batch]}"
        raise TypeError(f"Expected the {role} loader to yield (inputs tensor, labels tensor) pairs but it yielded {got}.")
    x, y = batch[0], batch[1]
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.dim() != 1 or len(y) != len(x):
        raise TypeError(
            f"Expected {role} labels as an integer tensor of shape (B,) = ({len(x)},) but got dtype {y.dtype} and shape {tuple(y.shape)}."
        )
    return x, y


def _check_labels(loader, role: str, num_classes: int, first_labels: Tensor) -> None:
    """Labels in 0..num_classes-1: every label of a TensorLoader, else those of its first batch."""
    labels = getattr(loader, "labels", None)
    if not isinstance(labels, Tensor):
        labels = first_labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"The {role} loader has labels outside the teacher's class range 0..{num_classes - 1}: found "
            f"{sorted(set(bad.tolist()))[:10]} ({len(bad)} of {len(labels)} checked). Expected class indices the teacher "
            f"predicts; remap the labels or use a teacher with {int(labels.max()) + 1} outputs."
        )


def _num_classes(model: nn.Module, x: Tensor, role: str) -> int:
    try:
        out = _eval_forward(model, x)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        kind = TypeError if isinstance(err, TypeError) else RuntimeError
        raise kind(
            f"The {role} ({type(model).__name__}) cannot take the training batches: on a batch of shape "
            f"{tuple(x.shape)} ({x.dtype}) it raised {type(err).__name__}: {_first_line(err)}. Expected a {role} that "
            f"accepts the loader's inputs; check its input channels and size against the data (or the data's transform)."
        ) from err
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise TypeError(f"Expected the {role} to return logits of shape (B, num_classes) but got {getattr(out, 'shape', type(out).__name__)}.")
    return out.shape[1]


@torch.no_grad()
def _eval_forward(model: nn.Module, x: Tensor) -> Tensor:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return model(x)
    finally:
        for m, f in flags:
            m.training = f


# ----------------------------------------------------------------------------------------------
# the training engine


@torch.no_grad()
def count_correct(model: nn.Module, loader, device, *, flip: bool = False) -> tuple[int, int]:
    """(correct top-1 predictions, samples) of ``model`` over ``loader``; eval mode, flags restored.

    ``flip=True`` is test-time augmentation: the logits of each image and of its horizontal mirror
    are averaged before the argmax.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    correct = total = 0
    try:
        for x, y, *_ in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)  # (B, classes)
            if flip:
                logits = (logits + model(x.flip(-1))) / 2
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    finally:
        for m, f in flags:
            m.training = f
    return correct, total


def evaluate(model: nn.Module, loader, device) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode; the training flag is restored)."""
    correct, total = count_correct(model, loader, device)
    return correct / max(total, 1)


# ----------------------------------------------------------------------------------------------
# the GPU path: channels_last memory format and torch.compile


def _channels_last(x: Tensor) -> Tensor:
    """A 4-D batch (B, C, H, W) in channels_last memory format (same values); other tensors unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


@torch.no_grad()
def _to_channels_last(module: nn.Module) -> None:
    """Every 4-D parameter and buffer of ``module`` (the conv weights) to channels_last, in place (same Parameters)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.dim() == 4:
            t.data = _channels_last(t.data)


class _ChannelsLastInput(nn.Module):
    """``model`` run on batches converted by :func:`_channels_last` (evaluation under channels_last=True)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_channels_last(x))


def _compile_error(err: BaseException) -> RuntimeError:
    return RuntimeError(
        f"fit(compile=True): torch.compile failed ({type(err).__name__}: {_first_line(err)}). Run with compile=False "
        "(eager; the same results); on CPU the inductor backend also needs a working C++ compiler."
    )


def _is_compile_error(err: BaseException) -> bool:
    import torch._dynamo  # already loaded once torch.compile has run

    return isinstance(err, torch._dynamo.exc.TorchDynamoException)


class _Engine:
    """Holds everything one fit() run trains; one place for the step, the epoch and the MI estimate."""

    def __init__(self, teacher, student, train_loader, test_loader, cfg: FitConfig, fixed_plan, teacher_layers, student_layers,
                 dist: DistContext | None = None):
        self.cfg = cfg
        self.dist = dist or DistContext(device=torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
        self.device = self.dist.device
        self.teacher, self.student = teacher, student
        self.train_loader, self.test_loader = train_loader, test_loader
        x, first_labels = _first_batch(train_loader, "training")
        test_labels = _first_batch(test_loader, "test")[1] if test_loader is not None else None
        x = x[:2].to(self.device)
        teacher.to(self.device)
        student.to(self.device)
        if cfg.channels_last:
            _to_channels_last(teacher)
            _to_channels_last(student)
        if not any(p.requires_grad for p in student.parameters()):
            raise ValueError(
                f"The student ({type(student).__name__}) has no parameter with requires_grad=True, so fit() would train "
                "nothing. Unfreeze it (student.requires_grad_(True)) or the parts you mean to train."
            )
        nt, ns = _num_classes(teacher, x, "teacher"), _num_classes(student, x, "student")
        if nt != ns:
            raise ValueError(f"Teacher and student must predict the same classes but the teacher has {nt} outputs and the student {ns}.")
        _check_labels(train_loader, "training", nt, first_labels)
        if test_loader is not None:
            _check_labels(test_loader, "test", nt, test_labels)
        self.teacher_layers = teacher_layers or discover_layers(teacher, x)
        self.student_layers = student_layers or discover_layers(student, x)
        t_info = FeatureTap.check_names(teacher, self.teacher_layers, x, role="teacher")
        s_info = FeatureTap.check_names(student, self.student_layers, x, role="student")
        self.teacher_shapes = [list(i.shape) for i in t_info]
        self.student_shapes = [list(i.shape) for i in s_info]
        T, S = len(t_info), len(s_info)
        uses_features = ((cfg.strategy != "hinton" or fixed_plan is not None) and cfg.feature_weight > 0
                         and (cfg.beta < 1 or cfg.ce_weight is not None))
        if uses_features:
            for role, model, names, given in (("teacher", teacher, self.teacher_layers, teacher_layers),
                                               ("student", student, self.student_layers, student_layers)):
                check_tap_count(model, names, x, role=role, chosen=given is not None, allow_few=cfg.allow_few_taps)
        if cfg.progress and self.dist.is_main:
            print(describe_taps(self.teacher_layers, self.teacher_shapes, self.student_layers, self.student_shapes),
                  flush=True)

        row_marginal = None if cfg.row_marginal is None else torch.tensor(cfg.row_marginal, dtype=torch.float32)
        if row_marginal is not None and (row_marginal.shape != (T,) or abs(float(row_marginal.sum()) - S) > 1e-4 * S or (row_marginal <= 0).any()):
            raise ValueError(
                f"Expected `row_marginal` to have T={T} positive entries summing to S={S} but got {cfg.row_marginal}."
            )
        strategy = fixed_plan if fixed_plan is not None else cfg.strategy
        self.plan = make_plan(strategy, T, S, tau=cfg.tau, row_marginal=row_marginal, init=cfg.plan_init).to(self.device)
        self.row_marginal = self.plan.row_marginal if hasattr(self.plan, "row_marginal") else (
            row_marginal if row_marginal is not None else torch.full((T,), S / T))
        self.uses_features = uses_features
        self.uses_kd = cfg.kd_weight > 0 and (cfg.beta < 1 or cfg.ce_weight is not None)
        self.uses_teacher = self.uses_kd or self.uses_features  # else (labels only) skip its forward
        self.bank = (
            MIBank(self.teacher_shapes, self.student_shapes, layout=cfg.bank_layout,
                   pool=cfg.pool if cfg.bank_layout == "shared" else None, width=cfg.width).to(self.device)
            if self.uses_features else None
        )
        if cfg.channels_last and cfg.bank_layout == "full" and self.bank is not None:
            _to_channels_last(self.bank.regressors)  # 1x1 convolutions; the shared layout has none (pair_maps are matrices)
        # what the step calls: the bank's forward, compiled under compile=True (the same module: its
        # state_dict, optimiser and checkpoints keep using self.bank)
        self.bank_forward = self._compiled(self.bank.forward) if self.bank is not None else None
        self.eval_model = _ChannelsLastInput(student) if cfg.channels_last else student
        self.optimizer = self._make_optimizer()
        # running statistics a forward updates (student BatchNorm, the bank's standardisers);
        # updated in place, so the list is built once
        self.stat_buffers = [b for m in (self.student, self.bank) if m is not None for b in m.buffers()]
        self.steps_per_epoch = len(train_loader)
        total = cfg.epochs * self.steps_per_epoch
        warm = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda k: (k + 1) / warm if k < warm else 0.5 * (1 + math.cos(math.pi * (k - warm) / max(1, total - warm))),
        )
        self.step = 0
        self.bad_in_a_row = 0
        self.history: list[dict] = []
        self.solves: list[dict] = []
        self.held: list[tuple[Tensor, Tensor]] = []
        self.mi_last: Tensor | None = None
        self.start_epoch = 0  # > 0 when resumed from a checkpoint
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]  # everything trained
        # data parallel: every rank starts from rank 0's weights (a no-op in a single process)
        self.dist.broadcast_modules([teacher, student, self.bank, self.plan])

    def _make_optimizer(self):
        cfg = self.cfg
        groups = [{"params": [p for p in self.student.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
        if self.bank is not None:
            no_decay = {id(p) for p in self.bank.no_decay_parameters()}
            groups.append({"params": [p for p in self.bank.parameters() if id(p) not in no_decay], "weight_decay": cfg.weight_decay})
            groups.append({"params": self.bank.no_decay_parameters(), "weight_decay": 0.0})
        plan_params = list(self.plan.parameters())
        if plan_params and self.bank is not None:
            groups.append({"params": plan_params, "weight_decay": 0.0, "lr": cfg.plan_lr or cfg.lr})
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
        return torch.optim.AdamW(groups, lr=cfg.lr)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)

    def _batch(self, x: Tensor) -> Tensor:
        """An input batch on the device; (B, C, H, W) batches in channels_last under channels_last=True."""
        x = x.to(self.device, non_blocking=True)
        return _channels_last(x) if self.cfg.channels_last else x

    def _compiled(self, fn):
        """``torch.compile(fn)`` under compile=True (``fn`` itself is not changed), else ``fn``."""
        if not self.cfg.compile:
            return fn
        try:
            return torch.compile(fn)
        except Exception as err:  # e.g. a Python version or platform torch.compile does not support
            raise _compile_error(err) from err

    def _bad_step(self, what: str) -> None:
        self.bad_in_a_row += 1
        self.skipped += 1
        warnings.warn(f"Skipped training step {self.step}: {what}.", RuntimeWarning, stacklevel=3)
        if self.bad_in_a_row >= self.cfg.max_bad_steps:
            raise RuntimeError(
                f"{self.bad_in_a_row} training steps in a row were skipped ({what}). Likely causes: a learning rate "
                f"too high (lr={self.cfg.lr}), a plan temperature too low (tau={self.cfg.tau}), or NaN/inf in the "
                "input data. Lower `lr`, raise `tau` or check the data."
            )

    def _kd_ramp(self) -> float:
        """The logit term's warm-up factor: linear from 0 to 1 over the first kd_warmup of training."""
        warm = self.cfg.kd_warmup * self.cfg.epochs * self.steps_per_epoch
        return 1.0 if warm <= 0 else min(1.0, (self.step + 1) / warm)

    def train_step(self, x: Tensor, y: Tensor, t_tap: FeatureTap, s_tap: FeatureTap) -> dict | None:
        cfg = self.cfg
        x, y = self._batch(x), y.to(self.device, non_blocking=True)
        if not torch.isfinite(x).all():
            self.dist.all_reduce_grads(self.params, "input")  # data parallel: every rank skips this step
            self._bad_step("the input batch contains NaN or inf")
            return None
        # running statistics (student BatchNorm, the bank's standardisers) that this step's forward
        # updates; restored if the step is skipped so that one bad batch cannot poison later steps
        saved = [b.detach().clone() for b in self.stat_buffers]
        with self._autocast():
            if self.uses_teacher:
                with torch.no_grad():
                    t_feats, t_logits = t_tap(x)
            s_feats, s_logits = s_tap(x)
        ce = F.cross_entropy(s_logits.float(), y.long())
        kd = (kd_term(cfg.kd_loss, s_logits, t_logits, y, cfg.kd_temperature, dkd_alpha=cfg.dkd_alpha, dkd_beta=cfg.dkd_beta)
              if self.uses_kd else ce.new_zeros(()))
        distil = cfg.kd_weight * self._kd_ramp() * kd
        lam = self.plan()  # (T, S)
        mi, active = None, None
        if self.bank is not None:
            if cfg.skip_pairs_below is not None and self.step % cfg.full_pass_every != 0:
                # pairs with a small plan weight send almost no gradient to the student: evaluate
                # them only on full passes and reuse their last estimate in between
                active = lam.detach() >= cfg.skip_pairs_below  # (T, S)
            with self._autocast():
                mi = self.bank_forward(t_feats, s_feats, student_grad_weight=lam, active=active)  # (T, S)
            # regressors: full gradient of every bound; student: lam-weighted (inside the bank);
            # plan logits: gradient of sum(lam * mi) at fixed mi
            feature = -mi.sum() - (lam * mi.detach()).sum()
            distil = distil + cfg.feature_weight * feature
        loss = cfg.beta * ce + (1 - cfg.beta) * distil if cfg.ce_weight is None else cfg.ce_weight * ce + distil
        self.optimizer.zero_grad(set_to_none=True)
        bad = None if torch.isfinite(loss) else f"the loss is {loss.item()}"
        if bad is None:
            loss.backward()
        # data parallel: average the gradients over ranks (missing ones count as zeros); a step
        # skipped on any rank is skipped on every rank. A no-op in a single process.
        bad = self.dist.all_reduce_grads(self.params, bad)
        if bad is not None:
            with torch.no_grad():
                for b, v in zip(self.stat_buffers, saved):
                    b.copy_(v)
            self._bad_step(bad)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.bad_in_a_row = 0
        return {
            "loss": loss.item(),
            "ce": ce.item(),
            "kd": kd.item(),
            "acc": (s_logits.argmax(1) == y).float().mean().item(),
            "mi": None if mi is None else mi.detach().float().cpu(),
            "feature": None if mi is None else float((lam.detach() * mi.detach()).sum()),
            "pairs_evaluated": 0.0 if mi is None else 1.0 if active is None else float(active.float().mean()),
        }

    @torch.no_grad()
    def estimate_mi(self, t_tap: FeatureTap, s_tap: FeatureTap) -> Tensor:
        """(T, S) MI on the held batches, everything in eval mode (running statistics untouched)."""
        flags = [(m, m.training) for m in list(self.student.modules()) + list(self.bank.modules())]
        self.student.eval()
        self.bank.eval()
        try:
            total = None
            for x, _ in self.held:
                x = self._batch(x)
                with self._autocast():
                    t_feats, _ = t_tap(x)
                    s_feats, _ = s_tap(x)
                    mi = self.bank_forward(t_feats, s_feats).float()
                total = mi if total is None else total + mi
            return total / len(self.held)
        finally:
            for m, f in flags:
                m.training = f

    def solve_exact(self, t_tap, s_tap) -> None:
        from .exact import exact_plan_info

        mi = self.estimate_mi(t_tap, s_tap)
        mi = self.dist.all_reduce_sum(mi) / self.dist.world_size  # data parallel: every rank's held batches
        tau = self.cfg.tau if self.cfg.exact_tau is None else self.cfg.exact_tau
        # exact_plan rescales a float32 marginal that misses sum(r) = S by round-off
        plan, info = exact_plan_info(mi.double().cpu(), self.row_marginal.double().cpu(), tau=tau,
                                     method=self.cfg.exact_method)
        self.plan.value.copy_(plan.to(self.plan.value))
        self.dist.broadcast_tensors([self.plan.value])  # identical plans even if a solver is not deterministic
        self.solves.append({"step": self.step, **info, "tau": tau, "mi": mi.tolist(), "plan": plan.tolist()})

    def run(self, checkpointer: Checkpointer | None = None) -> None:
        cfg = self.cfg
        from tqdm.auto import tqdm

        exact = isinstance(self.plan, ExactPlan)
        every = cfg.exact_every or self.steps_per_epoch
        total = cfg.epochs * self.steps_per_epoch
        show = cfg.progress and self.dist.is_main  # data parallel: only rank 0 prints
        bar = tqdm(total=total, initial=self.start_epoch * self.steps_per_epoch, disable=not show,
                   desc=f"fit[{cfg.strategy}]", unit="step", leave=False)
        with FeatureTap(self.teacher, self.teacher_layers) as t_tap, FeatureTap(self.student, self.student_layers) as s_tap:
            # compile=True: each tap's call (the model's forward with its hooks) is compiled, not the model
            t_tap, s_tap = self._compiled(t_tap.__call__), self._compiled(s_tap.__call__)
            for epoch in range(self.start_epoch, cfg.epochs):
                if hasattr(self.train_loader, "set_epoch"):
                    self.train_loader.set_epoch(epoch)
                self.skipped = 0
                sums, n, mi_sum, mi_n = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "acc": 0.0, "feature": 0.0, "pairs_evaluated": 0.0}, 0, None, 0
                start = time.perf_counter()
                self.student.train()
                for x, y, *_ in self.train_loader:
                    if exact and len(self.held) < cfg.held_batches:
                        self.held.append((x.to(self.device), y.to(self.device)))
                    out = self.train_step(x, y, t_tap, s_tap)
                    self.step += 1
                    bar.update(1)
                    if out is None:
                        continue
                    n += 1
                    for k in sums:
                        sums[k] += out[k] or 0.0
                    if out["mi"] is not None:
                        mi_sum = out["mi"] if mi_sum is None else mi_sum + out["mi"]
                        mi_n += 1
                    bar.set_postfix(loss=f"{out['loss']:.3f}", acc=f"{out['acc']:.3f}")
                    if exact and (self.step == cfg.exact_warmup or self.step % every == 0):
                        self.solve_exact(t_tap, s_tap)
                # data parallel: statistics over every rank's steps; BatchNorm and standardiser
                # statistics averaged, the plan's buffers (Sinkhorn potential) from rank 0
                sums, n, mi_sum, mi_n = self.dist.reduce_epoch_stats(sums, n, mi_sum, mi_n)
                self.dist.sync_buffers(average=[self.student, self.bank], broadcast=[self.plan])
                record = {"epoch": epoch + 1, "step": self.step, **{k: v / max(n, 1) for k, v in sums.items()}}
                record["train_acc"] = record.pop("acc")
                record["skipped_steps"] = self.skipped
                record["lr"] = self.scheduler.get_last_lr()[0]
                record["wall_s"] = time.perf_counter() - start
                record["test_acc"] = self.dist.evaluate(self.eval_model, self.test_loader, self.device) if self.test_loader is not None else None
                with torch.no_grad():
                    record["plan"] = self.plan().detach().float().cpu().tolist()
                self.mi_last = None if mi_sum is None else mi_sum / mi_n
                record["mi"] = None if self.mi_last is None else self.mi_last.tolist()
                self.history.append(record)
                if checkpointer is not None:
                    checkpointer.save(self)
                if show:
                    acc = "" if record["test_acc"] is None else f" test_acc {record['test_acc']:.4f}"
                    bar.write(f"[{cfg.strategy}] epoch {epoch + 1}/{cfg.epochs} loss {record['loss']:.4f} "
                              f"train_acc {record['train_acc']:.4f}{acc} ({record['wall_s']:.1f} s)")
        bar.close()


def fit(
    teacher: nn.Module,
    student: nn.Module,
    data,
    *,
    strategy="sinkhorn",
    teacher_layers: list[str] | None = None,
    student_layers: list[str] | None = None,
    **options,
) -> FitResult:
    """Distil ``teacher`` into ``student`` with a learned (or fixed) layer-alignment plan.

    Args:
        teacher: trained ``nn.Module`` returning logits (B, K); frozen, run in eval mode.
        student: ``nn.Module`` returning logits (B, K); trained in place.
        data: a DataLoader of ``(x, y)`` or a ``(train_loader, test_loader)`` pair.
        strategy: "hinton" (logit KD only), "pairwise" (one-to-one by relative depth), "uniform"
            (1/T everywhere), "softmax" (learned, column softmax), "sinkhorn" (learned transport
            plan, default), "exact" (solved from the MI estimates), or a fixed (T, S) tensor.
        teacher_layers / student_layers: tap names; default :func:`align_kd.discover_layers`.
        **options: any field of :class:`FitConfig` (epochs, beta, tau, lr, seed, device,
            checkpoint_dir, resume, ...).

    Returns:
        :class:`FitResult` with the student, final plan (T, S), MI (T, S), names and history.

    Under ``torchrun`` the run is data parallel (see :mod:`align_kd.distributed`); every rank
    returns the same result. With ``checkpoint_dir`` a checkpoint is written after every epoch and
    ``resume=True`` continues from the last one (see :mod:`align_kd.checkpoint`). On Ctrl-C the
    last completed epoch is on disk, a message says how to resume, and KeyboardInterrupt is
    re-raised. CUDA out-of-memory is re-raised with what to lower (batch size, ``pool``, ``width``).

    GPU path: ``amp=True`` (bfloat16 autocast), ``channels_last=True`` (teacher and student are
    converted in place and stay in that memory format; so are 4-D batches) and ``compile=True``
    (``torch.compile`` of the teacher and student forwards with their taps and of the MI bank; the
    modules themselves, their state_dicts and the returned student are not wrapped; evaluation
    stays eager).
    """
    fixed_plan = None
    if isinstance(strategy, Tensor):
        fixed_plan, strategy = strategy, "fixed"
    unknown = sorted(set(options) - set(FitConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"fit() got unknown option(s) {unknown}; valid options: {sorted(FitConfig.__dataclass_fields__)}.")
    cfg = FitConfig(strategy=strategy, **options)
    for role, model in (("teacher", teacher), ("student", student)):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected the {role} to be a torch.nn.Module but got {type(model).__name__}.")
    train_loader, test_loader = _split_data(data)
    # under torchrun: join (or create) the process group and take this rank's share of the data
    dist = _setup_distributed(cfg.device)
    train_loader = dist.shard_train(train_loader, seed=cfg.seed)
    config = asdict(cfg)
    if fixed_plan is not None:
        config["fixed_plan"] = fixed_plan.tolist()

    torch.manual_seed(cfg.seed)
    teacher_flags = [(m, m.training) for m in teacher.modules()]
    student_training = student.training
    requires = [(p, p.requires_grad) for p in teacher.parameters()]
    engine = checkpointer = None
    try:
        teacher.eval()
        for p, _ in requires:
            p.requires_grad_(False)
        engine = _Engine(teacher, student, train_loader, test_loader, cfg, fixed_plan, teacher_layers, student_layers, dist=dist)
        if cfg.checkpoint_dir is not None:
            checkpointer = Checkpointer(cfg.checkpoint_dir, keep=cfg.keep_checkpoints, dist=dist, config=config, teacher=teacher)
            checkpointer.prepare(engine, resume=cfg.resume)
        engine.run(checkpointer)
    except KeyboardInterrupt:
        # Ctrl-C: the last completed epoch is on disk (saved now if it was not yet); then re-raise
        if checkpointer is not None:
            checkpointer.on_interrupt(engine)
        elif dist.is_main:
            done = 0 if engine is None else len(engine.history)
            print(f"fit() interrupted (KeyboardInterrupt) after {done}/{cfg.epochs} completed epochs; nothing was saved. "
                  "Pass checkpoint_dir=... to make a run resumable.", file=sys.stderr, flush=True)
        raise
    except torch.cuda.OutOfMemoryError as err:
        raise torch.cuda.OutOfMemoryError(_oom_message(cfg, train_loader, err)) from err
    except RuntimeError as err:
        if cfg.compile and _is_compile_error(err):
            raise _compile_error(err) from err
        raise
    finally:
        for m, f in teacher_flags:
            m.training = f
        for p, r in requires:
            p.requires_grad_(r)
        student.train(student_training)

    with torch.no_grad():
        plan = engine.plan().detach().float().cpu()
    return FitResult(
        student=student,
        plan=plan,
        mi=engine.mi_last,
        teacher_layers=list(engine.teacher_layers),
        student_layers=list(engine.student_layers),
        teacher_shapes=engine.teacher_shapes,
        student_shapes=engine.student_shapes,
        history=engine.history,
        solves=engine.solves,
        config=config,
    )
