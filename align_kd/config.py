"""Every option of :func:`align_kd.fit` and :class:`align_kd.Distiller`, validated in one place.

:data:`DISTILLER_OPTIONS` are the loss, plan, bank and model-path fields a :class:`~align_kd.Distiller`
takes; the other fields drive ``fit()``'s loop (epochs, optimiser, schedule, checkpoints, logging).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .losses import KD_LOSSES
from .mi import BANK_LAYOUTS, MI_ESTIMATORS
from .plans import PLANS
from .plans.projection import ROW_MARGINAL_MODES

__all__ = ["DISTILLER_OPTIONS", "FitConfig", "LOOP_OPTIONS", "PLAN_OBJECTIVES"]

#: what a learned plan's logits follow: today's rule (the MI they weight) or held-out cross-entropy
PLAN_OBJECTIVES = ("mi", "heldout")
HELDOUT_GRAD_POINTS = ("before_step", "after_step")
HELDOUT_JVPS = ("exact", "finite_difference")

OPTIMIZERS = ("sgd", "adam")


@dataclass
class FitConfig:
    """Every option of :func:`fit`, with units; validated on construction."""

    strategy: str = "sinkhorn"  # one of PLAN_STRATEGIES; "fixed" when fit() was given a (T, S) tensor
    epochs: int = 10
    # train only the first N of the `epochs` epochs (the learning rate follows the `epochs`-long schedule up
    # to there): a truncated run, as a search for a strategy runs it (align_kd.select_strategy); None: all
    stop_after_epochs: int | None = None
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
    # "equal": teacher rows sum to row_marginal; "at_most" ("sinkhorn" only): rows sum to at most it, capacities
    # summing to >= S (None: max(1, S / T) each, so a column may be one-hot and a teacher layer unused)
    row_marginal_mode: str = "equal"
    plan_init: str = "depth"  # "depth" (soft diagonal by relative depth) or "zeros"
    plan_lr: float | None = None  # learning rate of the plan logits (None: same as lr)
    plan_schedule: str = "cosine"  # the plan logits' rate: "cosine" (the student's schedule) or "constant" (after the warm-up)
    dustbin: bool = False  # learned plans: one more row, "no teacher", so a student layer can learn from none (see plans.registry)
    dustbin_mass: float = 1.0  # "sinkhorn" with dustbin: the dustbin row's fixed mass (student layers' worth, 0 < m < S)
    plan_objective: str = "mi"  # learned plans: "mi" (ascend sum(lam * mi)) or "heldout" (descend the held-out CE hypergradient)
    heldout_fraction: float = 0.1  # plan_objective="heldout": share of the training set kept aside (never trained on)
    heldout_every: int = 10  # plan_objective="heldout": steps between plan updates
    heldout_warmup: int = 0  # plan_objective="heldout": training steps before the first plan update (the plan stays at its init)
    heldout_lr: float = 0.01  # plan_objective="heldout": step size on the plan logits (Z; the plan sees Z / tau)
    heldout_optimizer: str = "adam"  # plan_objective="heldout": the plan logits' optimiser, "adam" or "sgd" (plain)
    heldout_train_on_split: bool = False  # plan_objective="heldout": the student also trains on the held-out images
    # plan_objective="heldout": the mode of the forward whose MI gradients enter the hypergradient: "train" (batch
    # statistics, the gradients the training step takes; running statistics restored) or "eval" (running statistics)
    heldout_grad_mode: str = "train"
    # plan_objective="heldout": where the MI gradients are taken: "before_step" (the student and bank as they were
    # before the step the update follows: the exact one-step derivative) or "after_step" (after it, on the same batch)
    heldout_grad_point: str = "before_step"
    # plan_objective="heldout": how the T x S inner products <grad I_ij, grad CE_heldout> are computed: "exact" (one
    # Jacobian-vector product by double backward) or "finite_difference" (two MI forwards at theta +- h v / ||v||)
    heldout_jvp: str = "exact"
    # heldout_jvp="finite_difference": h, the perturbation's norm in parameter space (DistPro uses 0.01; 1e-3 was closer to
    # the exact product on setting (i)'s pair and on the tests' tiny nets: benchmarks/heldout_jvp.py)
    heldout_fd_step: float = 1e-3
    lr: float = 0.05
    weight_decay: float = 5e-4  # student and regressors; never the log-variances or plan logits
    momentum: float = 0.9
    optimizer: str = "sgd"  # "sgd" (nesterov) or "adam"
    warmup_epochs: float = 0.0  # linear LR warm-up, then cosine decay to 0
    bank_layout: str = "shared"  # MI bank regressors: "shared" (cheap) or "full" (reference VID)
    infonce_memory: int = 0  # mi_estimator="infonce": teacher samples per tap kept as extra negatives (0: in-batch only)
    mi_estimator: str = "vid"  # the bound on I(t_i; s_j): "vid" (Gaussian, nats per element) or "infonce" (contrastive, in-batch negatives, nats per sample)
    # mi_estimator="vid": the per-channel variance floor, var = softplus(alpha) + vid_eps, on standardised teacher
    # features (unit variance), so a pair's bound is at most 0.5 - 0.5 log(vid_eps) nats per element
    vid_eps: float = 1e-4
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
    amp: bool = False  # bfloat16 autocast where the device has native bf16 (else a warning and float32); likelihood stays float32
    channels_last: bool = False  # models, the "full" bank's convolutions and 4-D batches in channels_last memory format
    compile: bool = False  # torch.compile the teacher and student forwards (with their taps) and the MI bank
    seed: int = 0
    device: str | None = None  # None: CUDA when available, else CPU (under torchrun: cuda:$LOCAL_RANK)
    progress: bool = True  # progress bar and one line per epoch (rank 0 only)
    checkpoint_dir: str | None = None  # write checkpoint-epochNNNN.pt here after every epoch (rank 0)
    resume: bool = False  # continue from the newest good checkpoint in checkpoint_dir (fresh start if none)
    keep_checkpoints: int = 2  # how many of the newest checkpoints to keep (2: one fallback)
    log_dir: str | None = None  # steps.csv / epochs.csv (and TensorBoard events when installed) here (rank 0); None: checkpoint_dir
    allow_few_taps: bool = False  # warn (instead of stopping) when a side has fewer than two feature taps

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        check(isinstance(self.strategy, str) and (self.strategy in PLANS or self.strategy == "fixed"),
              f"Expected argument `strategy` to be one of {list(PLANS)} or a (T, S) tensor but got {self.strategy!r}.")
        check(isinstance(self.epochs, int) and self.epochs >= 1, f"Expected `epochs` to be an int >= 1 but got {self.epochs!r}.")
        check(self.stop_after_epochs is None or (isinstance(self.stop_after_epochs, int) and 1 <= self.stop_after_epochs <= self.epochs),
              f"Expected `stop_after_epochs` to be None or an int in [1, epochs={self.epochs}] (the first epochs of the "
              f"schedule to train) but got {self.stop_after_epochs!r}.")
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
        check(self.plan_schedule in ("cosine", "constant"),
              f"Expected argument `plan_schedule` to be one of ['cosine', 'constant'] but got {self.plan_schedule!r}.")
        check(self.plan_objective in PLAN_OBJECTIVES,
              f"Expected argument `plan_objective` to be one of {list(PLAN_OBJECTIVES)} but got {self.plan_objective!r}.")
        check(self.plan_objective == "mi" or self.strategy in ("softmax", "sinkhorn"),
              f"plan_objective={self.plan_objective!r} updates a learned plan's logits; it needs strategy 'softmax' or "
              f"'sinkhorn', not {self.strategy!r}.")
        check(self.row_marginal_mode in ROW_MARGINAL_MODES,
              f"Expected argument `row_marginal_mode` to be one of {list(ROW_MARGINAL_MODES)} but got "
              f"{self.row_marginal_mode!r}.")
        check(self.row_marginal_mode == "equal" or (self.strategy == "sinkhorn" and not self.dustbin),
              f"row_marginal_mode={self.row_marginal_mode!r} bounds the rows of the learned Sinkhorn plan; it needs "
              f"strategy 'sinkhorn' without a dustbin (a plan under capacities can already leave teacher layers "
              f"unused), not strategy {self.strategy!r} with dustbin={self.dustbin!r}.")
        check(not self.dustbin or self.strategy in ("softmax", "sinkhorn"),
              f"dustbin=True adds a learned 'no teacher' row; it needs strategy 'softmax' or 'sinkhorn', not {self.strategy!r}.")
        check(isinstance(self.dustbin_mass, (int, float)) and math.isfinite(self.dustbin_mass) and self.dustbin_mass > 0,
              f"Expected `dustbin_mass` > 0 (in student layers) but got {self.dustbin_mass!r}.")
        check(isinstance(self.heldout_fraction, (int, float)) and 0 < self.heldout_fraction < 1,
              f"Expected `heldout_fraction` in (0, 1) (a share of the training set) but got {self.heldout_fraction!r}.")
        check(isinstance(self.heldout_every, int) and not isinstance(self.heldout_every, bool) and self.heldout_every >= 1,
              f"Expected `heldout_every` to be an int >= 1 but got {self.heldout_every!r}.")
        check(isinstance(self.heldout_warmup, int) and not isinstance(self.heldout_warmup, bool) and self.heldout_warmup >= 0,
              f"Expected `heldout_warmup` to be an int >= 0 (training steps before the first plan update) but got "
              f"{self.heldout_warmup!r}.")
        check(isinstance(self.heldout_lr, (int, float)) and math.isfinite(self.heldout_lr) and self.heldout_lr > 0,
              f"Expected `heldout_lr` > 0 but got {self.heldout_lr!r}.")
        check(not self.heldout_train_on_split or self.plan_objective == "heldout",
              "heldout_train_on_split=True trains the student on the held-out split of plan_objective='heldout'; "
              f"it needs plan_objective='heldout', not {self.plan_objective!r}.")
        check(self.heldout_grad_mode in ("train", "eval"),
              f"Expected `heldout_grad_mode` to be 'train' or 'eval' but got {self.heldout_grad_mode!r}.")
        check(self.heldout_grad_point in HELDOUT_GRAD_POINTS,
              f"Expected `heldout_grad_point` to be one of {list(HELDOUT_GRAD_POINTS)} but got {self.heldout_grad_point!r}.")
        check(self.heldout_jvp in HELDOUT_JVPS,
              f"Expected `heldout_jvp` to be one of {list(HELDOUT_JVPS)} but got {self.heldout_jvp!r}.")
        check(isinstance(self.heldout_fd_step, (int, float)) and math.isfinite(self.heldout_fd_step) and self.heldout_fd_step > 0,
              f"Expected `heldout_fd_step` > 0 (the finite difference's step, a norm in parameter space; DistPro uses "
              f"0.01) but got {self.heldout_fd_step!r}.")
        check(self.heldout_optimizer in OPTIMIZERS,
              f"Expected argument `heldout_optimizer` to be one of {list(OPTIMIZERS)} but got {self.heldout_optimizer!r}.")
        check(self.optimizer in OPTIMIZERS, f"Expected argument `optimizer` to be one of {list(OPTIMIZERS)} but got {self.optimizer!r}.")
        check(self.bank_layout in BANK_LAYOUTS,
              f"Expected argument `bank_layout` to be one of {list(BANK_LAYOUTS)} but got {self.bank_layout!r}.")
        check(self.mi_estimator in MI_ESTIMATORS,
              f"Expected argument `mi_estimator` to be one of {list(MI_ESTIMATORS)} but got {self.mi_estimator!r}.")
        check(self.mi_estimator == "vid" or self.bank_layout == "shared",
              f"bank_layout={self.bank_layout!r} is a layout of the VID regressors; mi_estimator={self.mi_estimator!r} "
              f"has its own heads. Use bank_layout='shared' (the default) with it.")
        check(isinstance(self.vid_eps, (int, float)) and not isinstance(self.vid_eps, bool) and 0 < self.vid_eps < 1,
              f"Expected `vid_eps` in (0, 1) (the VID variance floor on unit-variance teacher features; default 1e-4) "
              f"but got {self.vid_eps!r}.")
        check(self.vid_eps == FitConfig.vid_eps or self.mi_estimator == "vid",
              f"vid_eps={self.vid_eps} is the floor of the VID bound's variances; mi_estimator={self.mi_estimator!r} has "
              f"none. Leave `vid_eps` at its default with it, or use mi_estimator='vid'.")
        check(isinstance(self.infonce_memory, int) and not isinstance(self.infonce_memory, bool) and self.infonce_memory >= 0,
              f"Expected `infonce_memory` to be an int >= 0 (teacher samples kept as negatives) but got {self.infonce_memory!r}.")
        check(not self.infonce_memory or self.mi_estimator == "infonce",
              f"infonce_memory={self.infonce_memory} keeps negatives for the contrastive bound; it needs "
              f"mi_estimator='infonce', not {self.mi_estimator!r}.")
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
        for name in ("checkpoint_dir", "log_dir"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
            v = getattr(self, name)
            check(v is None or (isinstance(v, str) and v != ""), f"Expected `{name}` to be a directory path or None but got {v!r}.")
        for name in ("resume", "amp", "channels_last", "compile", "allow_few_taps", "dustbin", "heldout_train_on_split"):
            v = getattr(self, name)
            check(isinstance(v, bool), f"Expected `{name}` to be True or False but got {v!r}.")
        check(not self.resume or self.checkpoint_dir is not None,
              "resume=True needs `checkpoint_dir` (the directory the interrupted run wrote its checkpoints to).")
        check(isinstance(self.keep_checkpoints, int) and not isinstance(self.keep_checkpoints, bool) and self.keep_checkpoints >= 1,
              f"Expected `keep_checkpoints` to be an int >= 1 but got {self.keep_checkpoints!r}.")


#: the fields of FitConfig a Distiller takes (the objective, the plan, the MI bank, the model path)
DISTILLER_OPTIONS = (
    "beta", "kd_weight", "kd_temperature", "kd_loss", "dkd_alpha", "dkd_beta", "ce_weight", "feature_weight",
    "tau", "row_marginal", "row_marginal_mode", "plan_init", "bank_layout", "mi_estimator", "vid_eps", "infonce_memory", "pool", "width", "skip_pairs_below", "full_pass_every",
    "exact_every", "exact_warmup", "exact_method", "exact_tau", "amp", "channels_last", "compile", "allow_few_taps",
    "plan_objective", "heldout_every", "heldout_warmup", "heldout_lr", "heldout_optimizer", "heldout_grad_mode", "heldout_grad_point",
    "heldout_jvp", "heldout_fd_step", "dustbin", "dustbin_mass",
)
#: the fields that only fit()'s loop reads
LOOP_OPTIONS = tuple(f for f in FitConfig.__dataclass_fields__ if f not in DISTILLER_OPTIONS + ("strategy",))
