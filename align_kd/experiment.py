"""Strategy comparisons on CIFAR-10: the demo and the strategy benchmark share this code.

A :class:`Setting` names a teacher/student pair and a training budget. :func:`run_setting` trains
(or loads the cached) teacher once, then runs every strategy with every seed on an identical
budget, saves each run, and returns one record per run. :func:`summarise` turns records into the
table (mean +- std, share of the teacher-student gap closed), and the plot helpers draw the
accuracy curves and the alignment panels.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ._env import versions
from ._io import atomic_write_text
from .checkpoint import list_checkpoints
from .config import DISTILLER_OPTIONS, FitConfig
from .data import cifar10_loaders, heldout_count
from .losses import KD_PAPER_SETTINGS
from .distributed import setup as setup_distributed
from .models import build_model, load_or_train_teacher
from .plans import DUSTBIN, PLANS, make_plan
from .training import TrainingDiverged, fit

__all__ = ["ALL_STRATEGIES", "REAL_SETTINGS", "REAL_TABLE", "SETTINGS", "Setting", "collect_records", "finished_record",
           "format_overview", "format_status", "format_table", "overview", "paired_interval", "plan_patterns", "plot_curves",
           "plot_overview", "report", "row_settings", "run_folder", "run_key", "run_setting", "run_states", "select_for_setting",
           "search_label", "selection_folder", "summarise", "versions", "write_outputs"]

#: seeds the `real` protocol runs per row (issue 12: at least 3); the report marks rows with fewer
PROTOCOL_SEEDS = 3

#: "alone" is the student trained on labels only (beta = 1, no KD), same loop and budget; "dkd" and
#: "ls" are the logit baselines (decoupled KD, logit-standardised KD) at their papers' settings;
#: the other rows are the registered plans (:data:`align_kd.plans.PLANS`), "hinton" first
LOGIT_BASELINES = ("dkd", "ls")
#: rows that are a registered plan with other options: the plan learned from held-out cross-entropy
#: (issue 13), and plans on the contrastive MI estimator instead of the Gaussian one
# the held-out rows take the MI gradients of the hypergradient in train mode (the step's own) and before
# the step (the exact one-step derivative); stated explicitly, so that records made before those fixes
# (eval mode; after the step) are not read as these rows
def _paper_logit_term(kd_loss: str) -> dict:
    """fit() options of a logit term at its paper's CIFAR settings (:data:`align_kd.losses.KD_PAPER_SETTINGS`)."""
    paper = KD_PAPER_SETTINGS[kd_loss]
    opts = {"kd_loss": kd_loss, "ce_weight": paper["ce_weight"], "kd_weight": paper["kd_weight"],
            "kd_temperature": paper["temperature"], "kd_warmup": paper["warmup"]}
    if kd_loss == "dkd":
        opts.update(dkd_alpha=paper["alpha"], dkd_beta=paper["beta"])
    return opts


_HELDOUT = {"plan_objective": "heldout", "heldout_grad_mode": "train", "heldout_grad_point": "before_step"}
PLAN_VARIANTS = {"sinkhorn-heldout": ("sinkhorn", _HELDOUT),
                 "sinkhorn-heldout-dustbin": ("sinkhorn", {**_HELDOUT, "dustbin": True}),
                 # the relaxed dustbin: a column softmax has no row marginal, so the plan chooses the dustbin's
                 # mass (0 to all S student layers) instead of holding it at one layer's worth
                 "softmax-heldout-dustbin": ("softmax", {**_HELDOUT, "dustbin": True}),
                 "sinkhorn-heldout-slow": ("sinkhorn", {**_HELDOUT, "heldout_lr": 1e-3}),
                 # issue 13's other knobs, one at a time: a plan update every 40 steps instead of 10 (a quarter of
                 # the moves; 1.21x hinton's step in overhead.py against 1.32x), and DistPro's 20% held-out split
                 "sinkhorn-heldout-every40": ("sinkhorn", {**_HELDOUT, "heldout_every": 40}),
                 "sinkhorn-heldout-split20": ("sinkhorn", {**_HELDOUT, "heldout_fraction": 0.2}),
                 # the plan held at its init for the first half of training (8 of 16 epochs of 176 steps on the
                 # 45,000 images the held-out rule trains on): benchmarks/heldout_signal.py measured the one-step
                 # signal against the deep teacher layers early in training and for them late
                 "sinkhorn-heldout-late": ("sinkhorn", {**_HELDOUT, "heldout_warmup": 1408}),
                 # the control: the same split and the same initial plan, never updated (2816 = all 16 epochs),
                 # so what the rule's moves gain or cost is read against the same 45,000 training images
                 "sinkhorn-heldout-frozen": ("sinkhorn", {**_HELDOUT, "heldout_warmup": 2816}),
                 "softmax-heldout": ("softmax", _HELDOUT),
                 # the MI rule with the VID variance floor raised from 1e-4 to 1e-2 (on unit-variance teacher
                 # features): real-resnet-vit's `softmax` seed 2 diverged when its plan-weighted bound fell to
                 # -12,776 nats, a residual far above a variance learned near the 1e-4 floor
                 "softmax-vid-floor": ("softmax", {"vid_eps": 1e-2}),
                 # the MI rule with teacher rows capped at one student layer's worth instead of held at S / T each:
                 # on real-resnet-vit the equal marginal kept every column below 6/11, where the fixed pairing that
                 # beat it puts weight 1 on one teacher layer; capacities allow one-hot columns and unused layers
                 "sinkhorn-capped": ("sinkhorn", {"row_marginal_mode": "at_most"}),
                 # the feature term on top of the strongest logit baseline instead of Hinton's term: does it
                 # carry anything DKD does not? (on real-cnn-noaug dkd and pairwise score the same, 0.775)
                 "pairwise-dkd": ("pairwise", _paper_logit_term("dkd")),
                 # and the learned plan (MI rule) on DKD: does choosing the pairs add to DKD what the depth pairing does?
                 "sinkhorn-dkd": ("sinkhorn", _paper_logit_term("dkd")),
                 # InfoNCE is in nats per sample (up to log B = 5.5 per pair): at feature weight 1 its five
                 # columns swamp cross-entropy (setting (i), seed 0: 0.44 test accuracy after 3 epochs against
                 # 0.63 for the VID pairwise row), so it takes CRD's total weight 0.8 spread over ~4 columns
                 "pairwise-infonce": ("pairwise", {"mi_estimator": "infonce", "feature_weight": 0.2}),
                 "sinkhorn-infonce": ("sinkhorn", {"mi_estimator": "infonce", "feature_weight": 0.2}),
                 # the MI rule without a row marginal on InfoNCE's estimates: VID's per-pair bounds differ by an
                 # order of magnitude with the teacher layer's scale (on real-resnet-vit VID `softmax` sends every
                 # column to the shallowest ResNet layers and loses 4-5 points to the depth pairing), InfoNCE's
                 # are in nats capped at log B for every pair
                 "softmax-infonce": ("softmax", {"mi_estimator": "infonce", "feature_weight": 0.2}),
                 # in-batch InfoNCE saturates at log 256 (most pairs within 0.5 nats of it): 4096 remembered
                 # teacher samples per tap lift the ceiling to log 4352 = 8.4
                 "sinkhorn-infonce-memory": ("sinkhorn", {"mi_estimator": "infonce", "feature_weight": 0.2,
                                                          "infonce_memory": 4096})}
#: the held-out rows' control: their split and initial plan, never updated; the report pairs every
#: held-out row (and the fixed diagonal) with it
HELDOUT_CONTROL = "sinkhorn-heldout-frozen"
#: the final plan a row learned on the same seed, held fixed from step 0 on all the data: search then
#: retrain (DistPro's protocol) for the held-out row; for `softmax` (the MI rule's plan that hardens in
#: epoch 1 and wins setting (iii)) the control that tells learning the plan from the plan it finds
PLAN_FROM_ROW = {"sinkhorn-heldout-retrain": "sinkhorn-heldout", "softmax-retrain": "softmax",
                 "sinkhorn-heldout-mean-retrain": "sinkhorn-heldout", "sinkhorn-heldout-signal-retrain": "sinkhorn-heldout"}
#: retrain rows whose plan is not the source's final plan but one its held-out signal picks:
#: "mean", the plan the whole run's mean signal picks (:func:`plan_from_mean_hypergradient`; the
#: one-step signal reverses within a run, so the final plan follows its last part while the mean weighs
#: every part); "signal", the source's own plan update replayed on its signal without the batch noise
#: (:func:`plan_from_signal_replay`; most of one update is noise, and the noise alone moves a plan
#: 0.2-0.6 of a column's mass: benchmarks/heldout_signal.py)
PLAN_FROM_SIGNAL = {"sinkhorn-heldout-mean-retrain": "mean", "sinkhorn-heldout-signal-retrain": "signal"}
#: the parts of a run whose mean hypergradient stands for the signal in :func:`plan_from_signal_replay`
SIGNAL_PARTS = 4
ALL_STRATEGIES = ("alone", "hinton", *LOGIT_BASELINES, *(name for name in PLANS if name != "hinton"), *PLAN_VARIANTS,
                  *PLAN_FROM_ROW)
#: plans that are learned (by gradient or from data of their own) vs. fixed ones with a feature term
_LEARNED_PLANS = tuple(name for name, cls in PLANS.items() if cls.learned or cls.data is not None)
LEARNED = (*_LEARNED_PLANS, *(v for v, (base, _) in PLAN_VARIANTS.items() if base in _LEARNED_PLANS), *PLAN_FROM_ROW)
FIXED = tuple(name for name, cls in PLANS.items() if cls.uses_features and name not in LEARNED)
#: the rows of the `real` protocol's table (issue 12); `bench --status` lists them even before they run
TABLE_ROWS = ("alone", "hinton", *LOGIT_BASELINES, "pairwise", "uniform", "softmax", "sinkhorn", "exact")
#: fit() options every record states at top level, so that rows can be told apart (issue 13)
RECORD_OPTIONS = ("plan_objective", "dustbin", "mi_estimator")


@dataclass
class Setting:
    """A teacher/student pair and the budget every strategy gets."""

    name: str
    teacher: str
    teacher_kwargs: dict
    student: str
    student_kwargs: dict
    teacher_epochs: int = 10
    epochs: int = 5  # distillation epochs, identical for every strategy
    train_limit: int | None = None  # training images (None: all 50,000)
    test_limit: int | None = None  # test images (None: all 10,000)
    batch_size: int = 128
    lr: float = 0.05
    teacher_lr: float = 0.05
    fit_options: dict = field(default_factory=dict)  # any FitConfig field (beta, tau, kd_weight, ...)
    description: str = ""
    teacher_zoo: str | None = None  # a shipped teacher (align_kd.zoo) instead of training one
    protocol: str = "toy"  # "toy" (small budgets, the old tables) or "real" (full CIFAR-10, shipped teachers)
    augment: bool = True  # the students' training images: random translation and flip (False: as stored)


#: Setting fields added after runs were recorded: left out of run_key at their defaults, so that
#: those runs stay finished
_ADDED_FIELDS = ("augment",)


# Budgets are sized for a 2-core CPU: the demo in a few minutes, the benchmark (4 settings x 7
# strategies x 3 seeds) in about an hour. Every strategy of a setting gets the identical budget.
_BENCH = dict(teacher_epochs=6, epochs=3, train_limit=8192, test_limit=2000)
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("seed-size", "cnn", {"width": 12}, "cnn", {"width": 8}, **_BENCH,
                description="the study's regime: 3 conv + 2 linear on both sides, teacher only 1.5x wider"),
        Setting("big-teacher", "resnet", {"depth": 20, "width": 16}, "cnn", {"width": 8}, **_BENCH,
                description="the same student with a clearly larger teacher (ResNet-20, 11 taps)"),
        Setting("resnet-mlp", "resnet", {"depth": 20, "width": 16}, "mlp", {"hidden": [512, 256, 128]}, **_BENCH,
                description="heterogeneous: residual CNN teacher (11 taps) into an MLP student (4 taps)"),
        Setting("cnn-vit", "cnn", {"width": 32}, "vit", {"hidden_dim": 64, "mlp_dim": 128, "num_layers": 4},
                **_BENCH, description="heterogeneous: CNN teacher (5 taps) into a small ViT student (6 taps, tokens)"),
    ]
}

# The `real` protocol: shipped teachers, all 50,000 training and 10,000 test images, bf16 autocast
# and channels_last (the CPU has AMX), batch 256. Every KD and feature row weighs cross-entropy 1
# (the step size of `alone`) plus the T^2-scaled logit term; see REAL_ROWS.
_REAL = dict(train_limit=None, test_limit=None, batch_size=256, lr=0.1,
             fit_options={"amp": True, "channels_last": True, "ce_weight": 1.0, "kd_weight": 1.0})
REAL_SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("real-cnn", "fastcnn", {}, "cnn", {"width": 16}, teacher_zoo="fastcnn", protocol="real", epochs=16, **_REAL,
                description="(i) the study's 3 conv + 2 linear student (width 16) from the shipped fast CNN teacher"),
        Setting("real-resnet", "resnet", {"depth": 20, "width": 16}, "cnn", {"width": 16}, teacher_zoo="resnet20",
                protocol="real", epochs=16, **_REAL,
                description="(ii) the same student from the shipped ResNet-20 (T much larger than S)"),
        # sized by benchmarks/vit_sizing.py (batch 256, 2 threads, results/vit_sizing.json): 8x8 patches (16
        # tokens, not 64) with channels_last (it converts the CNN teacher) make the step 2.1-2.8x cheaper than
        # the first sizing's 4x4 patches in float32 (alone 124 against 344 ms, hinton 227 against 484, sinkhorn
        # 283 against 619); float32, not bf16 autocast: bf16 made the ViT's step about 2x slower here
        # (patch 4: alone 1135 against 543 ms)
        Setting("real-vit", "fastcnn", {}, "vit", {"hidden_dim": 64, "mlp_dim": 128, "num_layers": 4, "patch_size": 8},
                teacher_zoo="fastcnn", protocol="real", epochs=16,
                **{**_REAL, "fit_options": {**_REAL["fit_options"], "amp": False}},
                description="(iii) the fast CNN teacher into a small ViT student (16 tokens of 8x8 patches)"),
        Setting("real-mlp", "fastcnn", {}, "mlp", {"hidden": [512, 256, 128]}, teacher_zoo="fastcnn", protocol="real",
                epochs=16, **_REAL, description="(iv) the fast CNN teacher into an MLP student"),
    ]
}
#: the four settings of the `real` protocol's table (issue 12: (i) to (iv))
REAL_TABLE = tuple(REAL_SETTINGS)
# the library's default weighting (beta 0.5: 0.5 CE + 0.5 KD) on setting (i), to measure what it costs
REAL_SETTINGS["real-cnn-beta"] = replace(
    REAL_SETTINGS["real-cnn"], name="real-cnn-beta",
    fit_options={k: v for k, v in REAL_SETTINGS["real-cnn"].fit_options.items() if k not in ("ce_weight", "kd_weight")},
    description="(i) with the library's default weighting beta = 0.5 (0.5 CE + 0.5 KD): what the smaller CE step costs")
# a diagnostic beside the table: setting (i) without augmentation, where the student can overfit
# (does distillation help a student with a generalisation gap?)
REAL_SETTINGS["real-cnn-noaug"] = replace(
    REAL_SETTINGS["real-cnn"], name="real-cnn-noaug", augment=False,
    description="(i) without augmentation (diagnostic): the student sees the stored images, so it can overfit")
# the same diagnostic for setting (ii): many teacher taps into five student taps, where the diagonal is not
# the obvious plan (issue 13: is this where a learned plan can show?)
REAL_SETTINGS["real-resnet-noaug"] = replace(
    REAL_SETTINGS["real-resnet"], name="real-resnet-noaug", augment=False,
    description="(ii) without augmentation (diagnostic): the shipped ResNet-20 into the study's student, stored images")
# the library's pitch in one setting: a deep CNN into a transformer, where neither depth nor family gives
# the pairing (the ResNet-20's 11 taps into the ViT's 6). It differs from (iii) only in the teacher, whose
# accuracy is (iii)'s (0.8673 against 0.8677), so the two tables tell the teacher's architecture apart
REAL_SETTINGS["real-resnet-vit"] = replace(
    REAL_SETTINGS["real-vit"], name="real-resnet-vit",
    **{k: getattr(REAL_SETTINGS["real-resnet"], k) for k in ("teacher", "teacher_kwargs", "teacher_zoo")},
    description="(ii) x (iii): the shipped ResNet-20 into the small ViT student (11 teacher taps into 6)")
# setting (ii) from the deep teacher at issue 12's 90%: the wide ResNet-20 (zoo `resnet20-w32`, 0.9021, the same 11
# taps as resnet20's) into the study's student, everything else as real-resnet
REAL_SETTINGS["real-resnet-w32"] = replace(
    REAL_SETTINGS["real-resnet"], name="real-resnet-w32", teacher_kwargs={"depth": 20, "width": 32},
    teacher_zoo="resnet20-w32",
    description="(ii) from the 90% deep teacher: the wide ResNet-20 (resnet20-w32, 11 taps) into the study's student")
SETTINGS.update(REAL_SETTINGS)
SETTINGS["demo"] = Setting(
    "demo", "fastcnn", {}, "cnn", {"width": 16}, teacher_zoo="fastcnn", protocol="real", epochs=4,
    **{**_REAL, "fit_options": {**_REAL["fit_options"]}},
    description="the study's 3 conv + 2 linear student from the shipped fast CNN teacher, full CIFAR-10 (demo budget)",
)


def _fit_options(setting: Setting, strategy: str, seed: int, progress: bool) -> tuple[str, dict]:
    """The fit() strategy and options of one row: alone (labels only), the logit baselines at their
    papers' settings (:data:`align_kd.losses.KD_PAPER_SETTINGS`), or a plan with the setting's KD term."""
    opts = {"epochs": setting.epochs, "lr": setting.lr, "seed": seed, "progress": progress, **setting.fit_options}
    if strategy == "alone":
        return "hinton", {**opts, "beta": 1.0, "kd_weight": 0.0, "ce_weight": None}
    if strategy in LOGIT_BASELINES:
        return "hinton", {**opts, **_paper_logit_term(strategy)}
    if strategy in PLAN_VARIANTS:
        plan, extra = PLAN_VARIANTS[strategy]
        return plan, {**opts, **extra}
    if strategy in PLAN_FROM_ROW:  # the plan itself comes from the source row's record (see run_setting)
        return "fixed", opts
    return strategy, opts


def run_folder(folder, strategy: str, seed: int) -> Path:
    """The folder of row ``strategy``'s run with ``seed`` in a setting's results ``folder``."""
    return Path(folder) / f"{strategy}-s{seed}"


def _current_record(out: Path, setting: Setting, strategy: str, seed: int, name: str = "record.json") -> dict | None:
    """The finished record of row ``strategy``, seed ``seed``, if it was made with the row's options of today
    (``name``: :data:`DIVERGED_FILE` for the record of a run that diverged)."""
    done = finished_record(run_folder(out, strategy, seed), run_key(setting, strategy, seed), name)
    if done is None or not _same_options(done.get("fit_options", {}), _fit_options(setting, strategy, seed, False)[1]):
        return None
    if strategy in PLAN_FROM_ROW:  # trained with the plan its source row gave then: current only if it still gives it
        try:
            plan = _plan_from_row(out, setting, strategy, seed)
        except (ValueError, OSError):  # the source run is gone or out of date
            return None
        if plan.tolist() != done.get("plan"):
            return None
    return done


def plan_from_mean_hypergradient(hypergrads) -> Tensor:
    """The plan a run's held-out signal picks as a whole: per student layer (column), weight 1 on the
    teacher layer (row) whose hypergradient, averaged over the run's updates, is lowest (raising that
    pair's weight lowered held-out cross-entropy most, or raised it least, over the run).

    ``hypergrads``: (U, T, S), one (T, S) hypergradient per plan update (``result.json``'s ``solves``).
    The minimiser of the mean signal over column simplices, so one-hot; ties go to the shallower row."""
    h = torch.as_tensor(hypergrads, dtype=torch.float64)
    finite = bool(torch.isfinite(h).all())
    if h.dim() != 3 or h.shape[0] == 0 or not finite:
        raise ValueError(f"Expected a non-empty (updates, T, S) array of finite hypergradients, got shape "
                         f"{tuple(h.shape)}{'' if finite else ' with non-finite values'}. "
                         "Pass the 'hypergrad' of every 'heldout' entry of a plan_objective='heldout' run's solves.")
    mean = h.mean(0)  # (T, S): rows teacher layers, columns student layers
    return torch.nn.functional.one_hot(mean.argmin(0), mean.shape[0]).T.to(torch.float32)  # (T, S)


def heldout_hypergradients(result: dict) -> list:
    """The (T, S) hypergradient of every plan update of a plan_objective="heldout" run (its
    ``result.json``'s ``solves``), without a dustbin's row (0 by construction)."""
    return [u["hypergrad"][:len(teacher_rows(result))] for u in result["solves"] if u.get("kind") == "heldout"]


def teacher_rows(result: dict) -> list[str]:
    """A run's teacher layers, the plan rows that carry a feature term (a dustbin run lists its
    "no teacher" row last)."""
    return [name for name in result["teacher_layers"] if name != DUSTBIN]


class _RecordedHypergradients:
    """What :meth:`align_kd.plans.registry.LearnedPlan.update` asks the Distiller for, read from a
    record instead: the (T, S) hypergradients in order (the plan appends a dustbin's zero row itself)."""

    def __init__(self, hypergrads):
        self.hypergrads, self.next = torch.as_tensor(hypergrads, dtype=torch.float32), 0

    def heldout_hypergradient(self, train, heldout) -> Tensor:
        self.next += 1
        return self.hypergrads[self.next - 1]


def replay_heldout_plan(result: dict, hypergrads) -> tuple[Tensor, Tensor]:
    """(initial plan, final plan) of a plan_objective="heldout" run's plan, rebuilt from its
    ``result.json`` config, after the plan's own update (projection, optimiser, step size) on each
    (T, S) entry of ``hypergrads`` in turn. On the run's recorded hypergradients it ends at the
    run's final plan (plan updates depend on nothing else)."""
    config = result["config"]
    margin = config.get("row_marginal")
    plan = make_plan(config["strategy"], len(teacher_rows(result)), len(result["student_layers"]), tau=config["tau"],
                     row_marginal=None if margin is None else torch.tensor(margin, dtype=torch.float32),
                     init=config["plan_init"], options={k: config[k] for k in DISTILLER_OPTIONS if k in config})
    if plan.data != "heldout":
        raise ValueError(f"Expected the result of a plan_objective='heldout' run, got strategy {config['strategy']!r} "
                         f"with plan_objective={config.get('plan_objective')!r}.")
    recorded = _RecordedHypergradients(hypergrads)
    with torch.no_grad():
        init = plan().clone()
        for _ in range(len(recorded.hypergrads)):
            plan.update(recorded, train=(), heldout=())
        return init, plan()


def part_means(hypergrads, parts: int):
    """(U, T, S) hypergradients with each replaced by the mean of its part (``parts`` consecutive
    runs of updates, as ``numpy.array_split`` cuts them): the signal without its batch-to-batch noise."""
    import numpy as np

    h = np.asarray(hypergrads, dtype=np.float64)
    out = np.empty_like(h)
    for idx in np.array_split(np.arange(len(h)), parts):
        if len(idx):  # (a run with fewer updates than parts has empty ones)
            out[idx] = h[idx].mean(0)
    return out


def plan_from_signal_replay(result: dict, parts: int = SIGNAL_PARTS) -> Tensor:
    """The (T, S) plan a held-out run would have ended at had every update seen its part's mean
    signal instead of its own noisy batch pair (:func:`replay_heldout_plan` on :func:`part_means`)."""
    return replay_heldout_plan(result, part_means(heldout_hypergradients(result), parts))[1]


def mi_depth_order(mi) -> dict:
    """How a (T, S) matrix of MI estimates (rows teacher taps from shallow to deep, columns student
    layers) orders the teacher's depth. The taps of a feed-forward teacher form a Markov chain
    x -> t_1 -> ... -> t_T, so by the data-processing inequality the true I(t_k; s) cannot grow with k:
    the MI rule, exactly estimated, would send every column to the first tap.

    ``ordered``: share of adjacent taps (k, k + 1), over all columns, whose estimates obey that
    (I(t_{k+1}; s) <= I(t_k; s)); ``rho``: Spearman correlation of depth and estimate per column,
    averaged over the columns that are not constant (-1: falls strictly with depth); ``argmax_depth``:
    the relative depth (0 first tap, 1 last) of each column's largest estimate, averaged over columns,
    and ``head_argmax_depth`` the same for the last column (the student's head) alone."""
    from scipy import stats

    m = torch.as_tensor(mi, dtype=torch.float64)
    finite = bool(torch.isfinite(m).all())
    if m.dim() != 2 or m.shape[0] < 2 or not finite:
        raise ValueError(f"Expected a finite (T, S) matrix of MI estimates with at least 2 teacher rows, got shape "
                         f"{tuple(m.shape)}{'' if finite else ' with non-finite values'}. Pass result.json's 'mi' "
                         "without the dustbin row.")
    depth = torch.linspace(0, 1, m.shape[0], dtype=torch.float64)  # (T,)
    rhos = [stats.spearmanr(depth.numpy(), col).statistic for col in m.T.numpy() if col.max() > col.min()]
    argmax = depth[m.argmax(0)]  # (S,)
    return {"ordered": float((m.diff(dim=0) <= 0).double().mean()),
            "rho": float(sum(rhos) / len(rhos)) if rhos else math.nan,
            "argmax_depth": float(argmax.mean()), "head_argmax_depth": float(argmax[-1])}


def _plan_from_row(out: Path, setting: Setting, strategy: str, seed: int) -> Tensor:
    """The (T, S) plan row ``strategy`` retrains with: the final plan of its source row on the same
    seed, or for :data:`PLAN_FROM_SIGNAL` the plan that run's held-out signal picks."""
    source = PLAN_FROM_ROW[strategy]
    done = _current_record(out, setting, source, seed)
    if done is None:
        raise ValueError(f"Row {strategy!r} retrains with the plan that row {source!r} learned on seed {seed}, but that "
                         f"run has not finished in {out}. Run --strategies {source} {strategy} (in that order).")
    if strategy not in PLAN_FROM_SIGNAL:
        return torch.tensor(done["plan"])
    result = json.loads((run_folder(out, source, seed) / "result.json").read_text())
    if PLAN_FROM_SIGNAL[strategy] == "mean":
        return plan_from_mean_hypergradient(heldout_hypergradients(result))
    return plan_from_signal_replay(result)


def _teacher(setting: Setting, train, test, *, progress: bool) -> tuple[torch.nn.Module, dict]:
    """The setting's teacher: a shipped zoo teacher (its card's accuracy), else trained or cached."""
    if setting.teacher_zoo is not None:
        from . import zoo

        teacher, card = zoo.load_teacher(setting.teacher_zoo)
        return teacher, {"test_acc": card["test_acc"], "key": card["sha256"][:12], "path": f"zoo:{setting.teacher_zoo}",
                         "cached": True, "card": {k: card[k] for k in ("test_acc", "test_acc_flip", "params", "train_seconds")}}
    tag = f"cifar10-train{setting.train_limit or 'all'}-bs{setting.batch_size}-aug"
    return load_or_train_teacher(setting.teacher, setting.teacher_kwargs, train, test, epochs=setting.teacher_epochs,
                                 lr=setting.teacher_lr, data_tag=tag, progress=progress)


def _data_and_teacher(setting: Setting, data_root, progress: bool):
    """The setting's (train, test) loaders (data order seeded per fit() run) and its teacher with its info."""
    train, test = cifar10_loaders(data_root, batch_size=setting.batch_size, limit=setting.train_limit, augment=setting.augment,
                                  test_limit=setting.test_limit, seed=0)
    teacher, tinfo = _teacher(setting, train, test, progress=progress)
    return train, test, teacher, tinfo


def _seed_student(setting: Setting, seed: int) -> torch.nn.Module:
    """The student of ``seed``. Paired seeds: every row of a seed (and every candidate of a selection) starts
    from this same initialisation."""
    torch.manual_seed(seed)
    return build_model(setting.student, **setting.student_kwargs)


def run_key(setting: Setting, strategy: str, seed: int) -> str:
    """Hash of everything that determines one run (setting with its budget, row, seed, library version)."""
    import hashlib

    import align_kd

    defaults = Setting.__dataclass_fields__
    fields = {k: v for k, v in asdict(setting).items() if not (k in _ADDED_FIELDS and v == defaults[k].default)}
    blob = json.dumps({"setting": fields, "strategy": strategy, "seed": seed, "align_kd": align_kd.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def finished_record(run_dir: Path, key: str, name: str = "record.json") -> dict | None:
    """The record of a finished run in ``run_dir`` when it was made with the same ``key``, else None
    (``name``: :data:`DIVERGED_FILE` for a run that diverged)."""
    file = Path(run_dir) / name
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record: run again
    if record.get("run_key") != key:
        return None
    for name, value in _record_options(record.get("fit_options", {})).items():  # records written before these fields
        record.setdefault(name, value)
    if "train_acc" not in record:  # records written before it: the run's own history has it
        try:
            record["train_acc"] = json.loads((Path(run_dir) / "result.json").read_text())["history"][-1]["train_acc"]
        except (OSError, json.JSONDecodeError, KeyError, IndexError):
            record["train_acc"] = None
    return record


def _stale_reason(record: dict, opts: dict, tinfo: dict) -> str | None:
    """Why a finished run with the right ``run_key`` can still not be reused (None: it can).

    Its fit() options may no longer be the row's, and its teacher may not be the setting's teacher
    today: ``run_key`` names a zoo teacher only by name, so a teacher retrained in place would mix
    two teachers' runs in one table. Records carry the teacher's key (the zoo card's sha256 prefix,
    or a trained teacher's cache key); records written before that field are compared by accuracy.
    """
    if not _same_options(record.get("fit_options", {}), opts):
        return "was recorded with other options than the row has today"
    same_teacher = (record["teacher_key"] == tinfo["key"] if "teacher_key" in record
                    else abs(record["teacher_acc"] - tinfo["test_acc"]) <= 1e-9)
    if not same_teacher:
        return (f"was distilled from another teacher (recorded: {record.get('teacher_key', 'no key')}, test acc "
                f"{record['teacher_acc']:.4f}; now: {tinfo['key']}, {tinfo['test_acc']:.4f})")
    return None


def _same_options(recorded: dict, current: dict) -> bool:
    """Whether a record's fit() options are the row's options today (the progress bar aside)."""
    def canonical(opts):
        return json.dumps({k: v for k, v in opts.items() if k != "progress"}, sort_keys=True, default=str)

    return canonical(recorded) == canonical(current)


def _option(opts: dict, name: str):
    """A fit() option of a row: its own value, else FitConfig's default."""
    return opts.get(name, FitConfig.__dataclass_fields__[name].default)


def _record_options(opts: dict) -> dict:
    """The :data:`RECORD_OPTIONS` of a run's fit() options (FitConfig's defaults where a row leaves them)."""
    return {name: _option(opts, name) for name in RECORD_OPTIONS}


def run_setting(
    setting: Setting,
    strategies=ALL_STRATEGIES,
    seeds=(0,),
    out_dir="runs",
    *,
    data_root=None,
    progress: bool = True,
    log=print,
) -> tuple[list[dict], dict]:
    """Train/load the teacher, then every strategy x seed on the same budget.

    Returns ``(records, teacher_info)``; each run is saved to ``out_dir/<setting>/<strategy>-s<seed>/``.
    Under ``torchrun`` every rank trains (data parallel) but only rank 0 logs and writes files.
    """
    unknown = [s for s in strategies if s not in ALL_STRATEGIES]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; choose from {list(ALL_STRATEGIES)}.")
    dist = setup_distributed()  # under torchrun: join the process group; a no-op in one process
    if not dist.is_main:
        log, progress = (lambda *args, **kwargs: None), False
    out = Path(out_dir) / setting.name
    out.mkdir(parents=True, exist_ok=True)
    with dist.main_first():  # rank 0 decodes the data and trains the teacher; the others then read the caches
        train, test, teacher, tinfo = _data_and_teacher(setting, data_root, progress)
    log(f"teacher {setting.teacher}{setting.teacher_kwargs}: test acc {tinfo['test_acc']:.4f} "
        f"({'cached' if tinfo['cached'] else 'trained'}: {tinfo['path']})")
    records = []
    for seed in seeds:  # seed by seed, so that an interrupted benchmark leaves complete, paired seeds
        for strategy in strategies:
            run_dir = run_folder(out, strategy, seed)
            key = run_key(setting, strategy, seed)
            name, opts = _fit_options(setting, strategy, seed, progress)
            # a retrain row's plan, read once from its source run (a clear error if that run is missing)
            plan = _plan_from_row(out, setting, strategy, seed) if strategy in PLAN_FROM_ROW else name
            done = finished_record(run_dir, key)
            stale = _stale_reason(done, opts, tinfo) if done is not None else None
            if done is not None and not stale and isinstance(plan, Tensor) and plan.tolist() != done.get("plan"):
                stale = f"was trained with a plan that row {PLAN_FROM_ROW[strategy]!r} no longer gives"
            if stale:
                log(f"  {strategy:<9} seed {seed}: {run_dir} {stale}; running it again")
                done = None
            if done is not None:  # resumable: a finished run is read back, never rerun
                records.append(done)
                log(f"  {strategy:<9} seed {seed}: test acc {done['test_acc']:.4f} (finished earlier: {run_dir})")
                continue
            # the same seed diverges the same way: current by the same rules as a record (a retrain row's plan too)
            gave_up = _current_record(out, setting, strategy, seed, DIVERGED_FILE)
            if gave_up is not None and not _stale_reason(gave_up, opts, tinfo):
                log(f"  {strategy:<9} seed {seed}: diverged earlier, at step {gave_up['step']} ({run_dir / DIVERGED_FILE})")
                continue
            student = _seed_student(setting, seed)
            # a run cut off in an earlier sitting continues from its last finished epoch (bitwise the same run)
            stamp = {"run_key": key, "fit_strategy": name, "fit_options": {k: v for k, v in opts.items() if k != "progress"},
                     "teacher_key": tinfo["key"], "plan": plan.tolist() if isinstance(plan, Tensor) else plan}
            resumed = _resume_point(run_dir, stamp, log) if dist.is_main else 0
            # what identifies the run, in its record and, if fit() gives up, in its diverged.json
            identity = {"protocol": setting.protocol, "dataset": "cifar10", "setting": setting.name, "strategy": strategy,
                        "seed": seed, **_record_options(opts), "epochs": setting.epochs,
                        "teacher_acc": tinfo["test_acc"], "teacher_key": tinfo["key"], "run_dir": str(run_dir),
                        "run_key": key, "fit_strategy": name, "fit_options": opts,
                        "setting_config": asdict(setting), "versions": versions()}
            start = time.perf_counter()
            # steps.csv / epochs.csv (and TensorBoard events when installed) beside the record
            try:
                result = fit(teacher, student, (train, test), strategy=plan, log_dir=str(run_dir),
                             checkpoint_dir=str(run_dir / CHECKPOINT_DIR), resume=True, keep_checkpoints=1, **opts)
            except TrainingDiverged as err:  # one row's blow-up is that row's result: recorded, and the others still run
                if dist.is_main:
                    atomic_write_text(run_dir / DIVERGED_FILE, json.dumps({
                        **identity, "diverged": True, "first_step": err.first_step, "step": err.step,
                        "reason": err.reason, "error": str(err), "wall_s": time.perf_counter() - start,
                        "plan": stamp["plan"] if isinstance(plan, Tensor) else None}, indent=1))
                    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
                log(f"  {strategy:<9} seed {seed}: diverged at step {err.step} ({err.reason}); recorded in {run_dir / DIVERGED_FILE}")
                continue
            # the epochs an earlier sitting trained count towards the run's cost
            wall = time.perf_counter() - start + sum(h["wall_s"] for h in result.history[:resumed])
            record = {
                **identity, "test_acc": result.test_acc, "best_acc": result.best_acc,
                "train_acc": result.history[-1]["train_acc"],  # last epoch's, on the training images as trained on
                "test_images": len(test.labels), "train_images": len(train.labels),
                "wall_s": wall, "resumed_after_epoch": resumed,
                "curve": [h["test_acc"] for h in result.history],
                "plan": result.plan.tolist(), "teacher_layers": result.teacher_layers,
                "student_layers": result.student_layers,
            }
            if dist.is_main:
                result.save(run_dir)
                atomic_write_text(run_dir / "record.json", json.dumps(record, indent=1))  # written the moment it finishes
                shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # the record supersedes them
                (run_dir / DIVERGED_FILE).unlink(missing_ok=True)  # and an older option's divergence
            records.append(record)
            log(f"  {strategy:<9} seed {seed}: test acc {result.test_acc:.4f} (best {result.best_acc:.4f}, {wall:.0f} s"
                + (f"; resumed after epoch {resumed}" if resumed else "") + ")")
    return records, tinfo


def search_label(schedule: str, search_epochs: int) -> str:
    """How a search's length is named in its folder and result files: ``short4`` (a whole 4-epoch schedule per
    candidate), ``truncated6`` (the first 6 epochs of the setting's schedule)."""
    return f"{schedule}{search_epochs}"


def selection_folder(out_dir, setting: Setting, seed: int, schedule: str, search_epochs: int) -> Path:
    """Where :func:`select_for_setting` keeps its candidates' results: ``<out_dir>/<setting>/select-<label>-s<seed>/``
    (label: :func:`search_label`), so that searches of other lengths never overwrite each other."""
    return Path(out_dir) / setting.name / f"select-{search_label(schedule, search_epochs)}-s{seed}"


def select_for_setting(setting: Setting, seed: int, candidates, *, search_epochs: int, schedule: str = "truncated",
                       heldout_fraction: float = 0.1, fallback: str | None = None, alpha: float = 0.05, out_dir="runs",
                       data_root=None, progress: bool = False):
    """:func:`align_kd.select_strategy` among benchmark rows of ``setting``, for the student of ``seed``.

    Every candidate row runs with its own fit() options (as in :func:`run_setting`) and the seed's student
    initialisation and data order, so the choice trained on all the data is that row's run of the seed.
    ``schedule``: ``"truncated"`` stops each candidate after the first ``search_epochs`` of the setting's
    schedule; ``"short"`` gives each a whole schedule of ``search_epochs`` epochs. Each candidate's result is
    kept in :func:`selection_folder`, so a rerun skips finished ones. ``fallback`` / ``alpha``: a candidate row the
    best one must beat significantly on the held-out images (see :func:`align_kd.select_strategy`); the folder is
    the same with or without it, so a search with a fallback reads back the candidates of one without.

    Returns ``(selection, teacher_info)``.
    """
    from .selection import select_strategy

    unknown = [row for row in candidates if row not in ALL_STRATEGIES]
    derived = [row for row in candidates if row in PLAN_FROM_ROW]
    if unknown or derived:
        raise ValueError(f"Expected candidates among the benchmark rows {[r for r in ALL_STRATEGIES if r not in PLAN_FROM_ROW]} "
                         f"but got {unknown + derived}" + (" (a retrain row's plan comes from another row's finished run)"
                                                           if derived else "") + ".")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"Expected distinct candidates but got {list(candidates)} (a row appears twice).")
    if schedule not in ("truncated", "short"):
        raise ValueError(f"Expected schedule 'truncated' or 'short' but got {schedule!r}.")
    train, _, teacher, tinfo = _data_and_teacher(setting, data_root, progress)
    options = {}
    for row in candidates:
        name, opts = _fit_options(setting, row, seed, progress)
        options[row] = {"strategy": name, **opts, **({"epochs": search_epochs} if schedule == "short" else {})}
    selection = select_strategy(teacher, _seed_student(setting, seed), train, candidates=options, search_epochs=search_epochs,
                                heldout_fraction=heldout_fraction, fallback=fallback, alpha=alpha,
                                cache_dir=selection_folder(out_dir, setting, seed, schedule, search_epochs))
    return selection, tinfo


#: a run's folder holds its per-epoch checkpoints here while it trains; removed once its record is written
CHECKPOINT_DIR = "checkpoint"
#: written instead of record.json when fit() gives up (TrainingDiverged); reruns skip such a run like a finished one
DIVERGED_FILE = "diverged.json"


def _resume_point(run_dir: Path, stamp: dict, log) -> int:
    """Make ``run_dir/checkpoint`` ready for ``fit(resume=True)`` and return the epoch the run resumes after.

    A cut-off run's checkpoints are kept when ``stamp`` (run key, fit() strategy and options, teacher,
    fixed plan) is the one they were written under, so the run continues where it stopped; checkpoints
    of anything else (the row's options or the teacher changed since) are deleted and the run starts
    over (0).
    """
    folder = run_dir / CHECKPOINT_DIR
    stamp_file = folder / "run.json"
    stamp = json.loads(json.dumps(stamp, sort_keys=True, default=str))  # as it reads back from disk
    saved = list_checkpoints(folder)
    try:
        same_run = json.loads(stamp_file.read_text()) == stamp
    except (OSError, json.JSONDecodeError):
        same_run = False
    if saved and same_run:
        log(f"  {run_dir.name}: continuing the run cut off after epoch {saved[-1][0]} ({folder})")
        return saved[-1][0]
    if saved:
        log(f"  {run_dir.name}: discarding checkpoints of a cut-off run made with other options ({folder})")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    atomic_write_text(stamp_file, json.dumps(stamp, sort_keys=True, indent=1))
    return 0


def paired_interval(a: list[float], b: list[float], confidence: float = 0.95) -> dict:
    """Mean of the paired differences a - b over seeds with its Student-t interval.

    Returns ``{"mean", "lo", "hi", "n"}`` (lo/hi None with fewer than two pairs).
    """
    from scipy import stats

    if len(a) != len(b) or not a:
        raise ValueError(f"Expected two equally long, non-empty lists of paired results but got {len(a)} and {len(b)}.")
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(d)
    if len(d) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": len(d)}
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}


def _paired(by: dict, strategy: str, reference: str) -> dict | None:
    """Paired difference of ``strategy`` to ``reference`` over the seeds both have run."""
    if reference not in by or strategy == reference:
        return None
    ref = {r["seed"]: r["test_acc"] for r in by[reference]}
    pairs = [(r["test_acc"], ref[r["seed"]]) for r in by[strategy] if r["seed"] in ref]
    return paired_interval([p[0] for p in pairs], [p[1] for p in pairs]) if pairs else None


def summarise(records: list[dict]) -> list[dict]:
    """Per strategy: mean/std of last-epoch and best-epoch accuracy, the share of the gap closed, and
    the paired differences (95% interval over seeds) to ``hinton`` and to the best fixed plan.

    gap closed = (acc - student alone) / (teacher - student alone), from the means. The best fixed
    plan is whichever of ``pairwise`` / ``uniform`` has the higher mean among those with the most
    finished seeds (a row on one lucky seed does not become the reference of a 3-seed table).
    """
    by = {}
    for r in records:
        by.setdefault(r["strategy"], []).append(r)
    teacher = records[0]["teacher_acc"] if records else None
    alone = statistics.mean(r["test_acc"] for r in by["alone"]) if "alone" in by else None
    fixed = [f for f in FIXED if f in by]
    best_fixed = max(fixed, key=lambda f: (len(by[f]), statistics.mean(r["test_acc"] for r in by[f]))) if fixed else None
    rows = []
    for strategy in [s for s in ALL_STRATEGIES if s in by]:
        rs = by[strategy]
        last = [r["test_acc"] for r in rs]
        best = [r["best_acc"] for r in rs]
        mean = statistics.mean(last)
        gap = None
        if alone is not None and teacher is not None and teacher - alone > 1e-9:
            gap = (mean - alone) / (teacher - alone)
        rows.append({
            "strategy": strategy, "runs": len(rs), "test_acc": mean,
            "test_std": statistics.stdev(last) if len(last) > 1 else 0.0,
            "best_acc": statistics.mean(best), "best_std": statistics.stdev(best) if len(best) > 1 else 0.0,
            "gap_closed": gap, "wall_s": statistics.mean(r["wall_s"] for r in rs),
            "train_acc": statistics.mean(t) if (t := [r["train_acc"] for r in rs if r.get("train_acc") is not None]) else None,
            "vs_hinton": _paired(by, strategy, "hinton"),
            "best_fixed": best_fixed, "vs_best_fixed": _paired(by, strategy, best_fixed) if best_fixed else None,
            "vs_control": (_paired(by, strategy, HELDOUT_CONTROL)
                           if HELDOUT_CONTROL in by and strategy != HELDOUT_CONTROL and _against_control(strategy) else None),
        })
    return rows


def _against_control(strategy: str) -> bool:
    """Rows the report pairs with :data:`HELDOUT_CONTROL`: those whose plan learns from held-out
    cross-entropy or retrains with such a plan, and the fixed diagonal (``pairwise``, all the data)."""
    opts = PLAN_VARIANTS.get(strategy, (None, {}))[1]
    if strategy in PLAN_FROM_ROW:
        return _against_control(PLAN_FROM_ROW[strategy])
    return strategy == "pairwise" or opts.get("plan_objective") == "heldout"


def _diff(p: dict | None) -> str:
    if p is None:
        return ""
    if p["lo"] is None:
        return f"{100 * p['mean']:+.2f}"
    return f"{100 * p['mean']:+.2f} [{100 * p['lo']:+.2f}, {100 * p['hi']:+.2f}]"


def format_table(rows: list[dict], teacher_acc: float, *, title: str = "") -> str:
    """Markdown table: teacher, then each strategy (last-epoch accuracy mean +- std, best epoch, gap closed,
    the last epoch's training accuracy: a student whose training accuracy is no higher than its test
    accuracy has no generalisation gap for a teacher to close)."""
    best_fixed = next((r["best_fixed"] for r in rows if r.get("best_fixed")), None)
    lines = [f"### {title}" if title else "", "",
             "| | runs | test acc (last epoch) | best-epoch acc | gap closed | vs hinton (points, 95% CI) | "
             f"vs best fixed{f' ({best_fixed})' if best_fixed else ''} | train acc* | wall s/run |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| teacher | 1 | {teacher_acc:.4f} | | | | | | |"]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        train = "" if r.get("train_acc") is None else f"{r['train_acc']:.4f}"
        lines.append(f"| {r['strategy']} | {r['runs']} | {r['test_acc']:.4f} ± {r['test_std']:.4f} | "
                     f"{r['best_acc']:.4f} ± {r['best_std']:.4f} | {gap} | {_diff(r.get('vs_hinton'))} | "
                     f"{_diff(r.get('vs_best_fixed'))} | {train} | {r['wall_s']:.0f} |")
    lines += ["", "\\* training accuracy of the last epoch (the training images as trained on: augmented unless the "
                  "setting says otherwise; running mean while training)"]
    controlled = [r for r in rows if r.get("vs_control") is not None]
    if controlled:
        lines += ["", f"Against the held-out rows' control `{HELDOUT_CONTROL}` (the same split and initial plan, never "
                      "updated; paired over the seeds both have, points, 95% CI):", "",
                  "| row | seeds | vs control |", "|---|---|---|"]
        lines += [f"| {r['strategy']} | {r['vs_control']['n']} | {_diff(r['vs_control'])} |" for r in controlled]
    return "\n".join(lines).strip() + "\n"


def plot_curves(records: list[dict], path, *, teacher_acc: float | None = None, title: str = "") -> Path:
    """Test accuracy per epoch: mean and min-max band per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    by = {}
    for r in records:
        by.setdefault(r["strategy"], []).append(r["curve"])
    for strategy, curves in by.items():
        c = np.array(curves, dtype=float)  # (seeds, epochs)
        x = np.arange(1, c.shape[1] + 1)
        line, = ax.plot(x, c.mean(0), marker="o", label=strategy)
        if len(c) > 1:
            ax.fill_between(x, c.min(0), c.max(0), color=line.get_color(), alpha=0.15)
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="black", ls="--", lw=1, label="teacher")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plan_patterns(records: list[dict]) -> list[dict]:
    """Per learned strategy, across seeds: how stable, how monotone, which teacher each student layer uses.

    stability: mean over entries of the std of lambda across seeds, and the mean pairwise total
    variation per column; monotonicity: weighted crossings normalised to [0, 1] (0 = monotone in
    depth) and the depth correlation (+1 in depth order, -1 reversed; mean over seeds); dominant teacher: per student layer the teacher layer with the largest lambda in its column,
    the one most seeds agree on, with that frequency (what a fan-in plan actually uses); modal
    matching: per student layer the teacher layer its one-to-one max-weight matching picks most often,
    with that frequency; fan-in: mean effective number of teacher layers per student layer.
    """
    from itertools import combinations

    from .graph.analysis import alignment_graph, compare, depth_correlation, fan_in, stability, weighted_crossings

    rows = []
    for strategy in [s for s in ALL_STRATEGIES if s in LEARNED]:
        runs = [r for r in records if r["strategy"] == strategy]
        if not runs:
            continue
        graphs = [alignment_graph(torch.tensor(r["plan"]), r["teacher_layers"], r["student_layers"]) for r in runs]
        st = stability(graphs)
        tvs = [compare(a, b)["tv_mean"] for a, b in combinations(graphs, 2)]
        rows.append({
            "strategy": strategy, "runs": len(runs),
            "lambda_std": float(st["std"].mean()),
            "tv_between_seeds": float(statistics.mean(tvs)) if tvs else 0.0,
            "crossings": statistics.mean(weighted_crossings(g, normalized=True) for g in graphs),
            "depth_corr": statistics.mean(depth_correlation(g) for g in graphs),
            "fan_in": statistics.mean(statistics.mean(fan_in(g).values()) for g in graphs),
            "dominant_teacher": {s: [t, f] for s, (t, f) in st["modal_dominant"].items()},
            "modal_matching": {s: [t, f] for s, (t, f) in st["modal_matching"].items()},
        })
    return rows


def format_patterns(rows: list[dict]) -> str:
    """Markdown for :func:`plan_patterns`."""
    if not rows:
        return ""
    lines = ["", "Learned plans across seeds (std of lambda, mean total variation between seeds per column, "
             "weighted crossings normalised to [0, 1], depth correlation (lambda-weighted correlation of teacher "
             "with student depth: +1 in depth order, -1 reversed), mean fan-in; dominant teacher: student <- the teacher layer "
             "with the most weight in its column (share of seeds agreeing); modal matching: student <- teacher "
             "(frequency) of the one-to-one max-weight matching, 'unmatched' where it gives the column no teacher "
             "layer):", "",
             "| strategy | std(lambda) | TV between seeds | crossings | depth corr | fan-in | dominant teacher | modal matching |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dominant = ", ".join(f"{s}<-{t} ({f:.0%})" for s, (t, f) in r["dominant_teacher"].items())
        match = ", ".join(f"{s}<-unmatched" if t is None else f"{s}<-{t} ({f:.0%})"
                          for s, (t, f) in r["modal_matching"].items())
        lines.append(f"| {r['strategy']} | {r['lambda_std']:.3f} | {r['tv_between_seeds']:.3f} | "
                     f"{r['crossings']:.3f} | {r['depth_corr']:+.2f} | {r['fan_in']:.2f} | {dominant} | {match} |")
    return "\n".join(lines) + "\n"


def write_outputs(setting: Setting, records: list[dict], teacher_info: dict, out_dir, *, seeds, strategies) -> dict:
    """JSON (records + configuration + versions), markdown table, accuracy plot, alignment panels, and
    for every learned row the plan's evolution over epochs in its lowest seed (``plans/<row>.png``)."""
    from .graph.drawing import draw_panels, draw_plan_evolution

    out = Path(out_dir) / setting.name
    rows = summarise(records)
    patterns = plan_patterns(records)
    table = format_table(rows, teacher_info["test_acc"], title=f"{setting.name}: {setting.description}")
    table += format_patterns(patterns)
    (out / "table.md").write_text(table)
    payload = {
        "setting": asdict(setting), "strategies": list(strategies), "seeds": list(seeds),
        "teacher": {k: teacher_info[k] for k in ("test_acc", "key", "path", "cached")},
        "versions": versions(), "summary": rows, "plan_patterns": patterns, "runs": records,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    plot_curves(records, out / "accuracy.png", teacher_acc=teacher_info["test_acc"], title=setting.name)
    best = {}
    for r in records:
        if r["strategy"] in LEARNED + ("uniform", "pairwise") and (
                r["strategy"] not in best or r["test_acc"] > best[r["strategy"]]["test_acc"]):
            best[r["strategy"]] = r
    if best:
        draw_panels([b["run_dir"] for b in best.values()], out / "alignment.png",
                    titles=[f"{s} ({b['test_acc']:.3f})" for s, b in best.items()])
    first = {}  # learned row -> its record of the lowest seed
    for r in sorted(records, key=lambda r: r["seed"]):
        if r["strategy"] in LEARNED and r["strategy"] not in PLAN_FROM_ROW:  # a retrain row's plan does not move
            first.setdefault(r["strategy"], r)
    for strategy, r in first.items():
        (out / "plans").mkdir(exist_ok=True)
        draw_plan_evolution(r["run_dir"], out / "plans" / f"{strategy}.png")
    return {"table": table, "rows": rows, "dir": out}


def row_settings(setting: Setting) -> str:
    """Markdown lines stating each row's loss settings (weights, temperature, warm-up), from the code that runs them."""
    lines = ["", f"Rows ({setting.protocol} protocol; {setting.epochs} epochs, batch {setting.batch_size}, lr {setting.lr}, "
                 f"{setting.train_limit or 50000} training and {setting.test_limit or 10000} test images):", ""]
    for strategy in ALL_STRATEGIES:
        name, opts = _fit_options(setting, strategy, 0, False)
        if strategy == "alone":
            what = "cross-entropy only (weight 1)"
        elif opts.get("ce_weight") is not None:
            what = (f"{opts['ce_weight']} CE + {opts.get('kd_weight', 1.0)} x {opts.get('kd_loss', 'hinton')} "
                    f"(T {opts.get('kd_temperature', 4.0)}, warm-up {opts.get('kd_warmup', 0.0):.3f} of training)")
        else:
            b = opts.get("beta", 0.5)
            what = f"{b} CE + {1 - b} x ({opts.get('kd_weight', 1.0)} x hinton (T {opts.get('kd_temperature', 4.0)}) ...)"
        if name not in ("hinton",):
            what += f" - {opts.get('feature_weight', 1.0)} x sum(lambda * MI), plan {name}"
        if opts.get("plan_objective", "mi") == "heldout":
            frac, every, lr, optimizer = (_option(opts, k) for k in ("heldout_fraction", "heldout_every", "heldout_lr",
                                                                       "heldout_optimizer"))
            warmup = _option(opts, "heldout_warmup")
            n_train = setting.train_limit or 50000
            steps = setting.epochs * math.ceil((n_train - heldout_count(n_train, frac)) / setting.batch_size)
            if warmup >= steps:  # the control: the held-out rule's split and initial plan, never updated
                what += (f", the plan held at its init all {steps} steps ({100 * frac:.0f}% of the training images "
                         f"kept aside, as the held-out rule keeps them)")
            else:
                what += (f" learned from held-out cross-entropy ({100 * frac:.0f}% of the training images kept aside, "
                         f"{'an Adam' if optimizer == 'adam' else 'an SGD'} step of {lr:g} on the plan logits every "
                         f"{every} steps{f' after the first {warmup} (the plan held at its init until then)' if warmup else ''}, "
                         f"MI gradients {_option(opts, 'heldout_grad_point').replace('_', ' the ')} in "
                         f"{_option(opts, 'heldout_grad_mode')} mode)")
        if opts.get("row_marginal_mode") == "at_most":
            what += (", teacher rows summing to at most max(1, S/T) (capacities, not the equal marginal S/T: a column "
                     "may be one-hot and a teacher layer unused)")
        if opts.get("mi_estimator", "vid") == "infonce":
            negatives = f"in-batch negatives and {opts['infonce_memory']} remembered" if opts.get("infonce_memory") else "in-batch negatives"
            what += f" (MI by the contrastive InfoNCE bound, {negatives}, instead of the Gaussian VID bound)"
        if "vid_eps" in opts:
            what += f" (the VID variances floored at {opts['vid_eps']:g} instead of {FitConfig.vid_eps:g})"
        if opts.get("dustbin") and PLANS[name].fixed_dustbin_mass:
            what += f", with a 'no teacher' row holding {opts.get('dustbin_mass', 1.0):g} student layer's worth of mass"
        elif opts.get("dustbin"):
            what += ", with a 'no teacher' row whose mass the plan chooses (no row marginal: 0 to every student layer)"
        if strategy in PLAN_FROM_ROW:
            source = PLAN_FROM_ROW[strategy]
            picked = {"mean": f"per student layer, the teacher layer with the lowest held-out hypergradient averaged over "
                              f"every update of `{source}` on the same seed (one-hot)",
                      "signal": f"the plan `{source}`'s own update reaches on the same seed when each update sees the mean "
                                f"hypergradient of its part ({SIGNAL_PARTS} parts of the run) instead of its own noisy one",
                      None: f"the final plan `{source}` learned on the same seed"}[PLAN_FROM_SIGNAL.get(strategy)]
            what += (f": {picked}, held fixed from step 0, trained on all "
                     f"{setting.train_limit or 50000} training images"
                     + (" (search, then retrain)" if _against_control(source) else " (learning the plan against the plan it finds)"))
        lines.append(f"- `{strategy}`: {what}")
    return "\n".join(lines) + "\n"


def collect_records(out_dir, setting: Setting, name: str = "record.json") -> list[dict]:
    """Every finished run's record of ``setting`` under ``out_dir`` made with the current configuration:
    its run key, the row's fit() options as they are today, and for a row that retrains with another
    row's plan, the plan that row has today (any other record is left out, as the benchmark would
    run it again). ``name=DIVERGED_FILE``: the records of the runs that diverged instead."""
    records = []
    for strategy in ALL_STRATEGIES:
        for file in sorted((Path(out_dir) / setting.name).glob(f"{strategy}-s*/{name}")):
            seed = file.parent.name.removeprefix(f"{strategy}-s")
            if not seed.isdigit():  # another row whose name continues with "-s" (sinkhorn-heldout-slow-s0)
                continue
            done = _current_record(file.parent.parent, setting, strategy, int(seed), name)
            if done is not None:
                records.append(done)
    return records


def run_states(out_dir, setting: Setting, strategies=None, seeds=(0, 1, 2)) -> list[dict]:
    """Where each run of ``setting`` stands under ``out_dir``: one dict per (row, seed) with ``state``
    "finished" (its current record: ``test_acc``, ``wall_s``), "diverged" (fit() gave up at ``step``;
    not run again), "cut" (a run of today's options stopped
    after ``epoch`` of ``epochs``; the next `bench` continues it) or "to run" (nothing, or a record or
    checkpoints that the benchmark would not reuse). Rows: ``strategies``, else :data:`TABLE_ROWS`
    and every other row with a folder."""
    folder = Path(out_dir) / setting.name
    if strategies is None:
        strategies = [s for s in ALL_STRATEGIES if s in TABLE_ROWS or any(run_folder(folder, s, n).is_dir() for n in seeds)]
    states = []
    for strategy in strategies:
        for seed in seeds:
            run_dir = run_folder(folder, strategy, seed)
            state = {"strategy": strategy, "seed": seed, "state": "to run", "epochs": setting.epochs}
            done = _current_record(folder, setting, strategy, seed)
            saved = list_checkpoints(run_dir / CHECKPOINT_DIR)
            if done is not None:
                state.update(state="finished", test_acc=done["test_acc"], wall_s=done["wall_s"])
            elif (gave_up := _current_record(folder, setting, strategy, seed, DIVERGED_FILE)) is not None:
                state.update(state="diverged", step=gave_up["step"])
            elif saved:
                try:
                    stamp = json.loads((run_dir / CHECKPOINT_DIR / "run.json").read_text())
                except (OSError, json.JSONDecodeError):
                    stamp = {}
                opts = _fit_options(setting, strategy, seed, False)[1]
                if stamp.get("run_key") == run_key(setting, strategy, seed) and _same_options(stamp.get("fit_options", {}), opts):
                    state.update(state="cut", epoch=saved[-1][0])
            states.append(state)
    return states


def format_status(setting: Setting, states: list[dict]) -> str:
    """A row x seed grid of :func:`run_states` and the hours left, each row's unfinished runs timed by
    the median wall time of its finished ones (a cut run by the epochs it has left)."""
    seeds = sorted({s["seed"] for s in states})
    lines = [f"### {setting.name}: {setting.description}", "", "| row | " + " | ".join(f"seed {n}" for n in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    hours, untimed, left = 0.0, 0, 0
    for strategy in dict.fromkeys(s["strategy"] for s in states):
        mine = [s for s in states if s["strategy"] == strategy]
        walls = [s["wall_s"] for s in mine if s["state"] == "finished"]
        cells = []
        for s in mine:
            if s["state"] in ("finished", "diverged"):
                cells.append(f"{s['test_acc']:.4f}" if s["state"] == "finished" else f"diverged (step {s['step']})")
                continue
            share = 1 - s.get("epoch", 0) / s["epochs"]
            cells.append(f"cut after {s['epoch']}/{s['epochs']}" if s["state"] == "cut" else "to run")
            left += 1
            if walls:
                hours += share * statistics.median(walls) / 3600
            else:
                untimed += 1
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    tail = f"{left} runs left" + (f", about {hours:.1f} h of this machine for the {left - untimed} whose row has a "
                                  "finished run to time them by" if left > untimed else "") + (
        f"; {untimed} not timed (no finished run of their row yet)" if untimed else "")
    return "\n".join(lines) + f"\n\n{tail}.\n"


def overview(summaries: dict[str, list[dict]]) -> dict:
    """One view over settings: per row and setting (``summaries``: setting name -> :func:`summarise`'s
    rows) the mean test accuracy, its seeds, and the paired difference to ``hinton`` (95% interval);
    ``best`` marks each setting's highest mean among the rows with the most seeds (as the best fixed
    plan is chosen: a row on one lucky seed is not the setting's best)."""
    cells = {}  # row -> setting -> cell
    for name, rows in summaries.items():
        best = max(rows, key=lambda r: (r["runs"], r["test_acc"]), default=None)  # summarise()'s best-fixed rule
        for r in rows:
            cells.setdefault(r["strategy"], {})[name] = {
                "test_acc": r["test_acc"], "runs": r["runs"], "vs_hinton": r["vs_hinton"], "best": r is best}
    order = [s for s in ALL_STRATEGIES if s in cells]
    return {"settings": list(summaries), "rows": {s: cells[s] for s in order}}


def _excludes_zero(p: dict | None) -> bool:
    return p is not None and p["lo"] is not None and (p["lo"] > 0 or p["hi"] < 0)


def format_overview(view: dict, seeds: int = PROTOCOL_SEEDS) -> str:
    """Markdown for :func:`overview`: rows the benchmark's rows, columns the settings."""
    lines = ["### At a glance: every setting, every row", "",
             "Mean test accuracy (last epoch) and the paired difference to `hinton` in points, `*` where its 95% "
             f"interval over seeds excludes 0; `(n)`: the row has only n seeds there (the protocol runs {seeds}); "
             "bold: the setting's best row among those with the most seeds. Each setting's own table below "
             "gives the intervals and the difference to the best fixed plan.", "",
             "| row | " + " | ".join(view["settings"]) + " |", "|---|" + "---|" * len(view["settings"])]
    for strategy, by_setting in view["rows"].items():
        cells = []
        for name in view["settings"]:
            c = by_setting.get(name)
            if c is None:
                cells.append("")
                continue
            acc = f"**{c['test_acc']:.4f}**" if c["best"] else f"{c['test_acc']:.4f}"
            diff = "" if c["vs_hinton"] is None else f" {100 * c['vs_hinton']['mean']:+.2f}{'*' if _excludes_zero(c['vs_hinton']) else ''}"
            cells.append(acc + diff + (f" ({c['runs']})" if c["runs"] < seeds else ""))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_overview(view: dict, path, seeds: int = PROTOCOL_SEEDS) -> Path:
    """Heat map of :func:`overview`: each row's paired difference to ``hinton`` (points) per setting,
    bold numbers where the 95% interval excludes 0, a frame around each setting's best row."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.patches import Rectangle

    from .graph.drawing import _new_figure, _save  # the package's pyplot-free figures

    rows, cols = list(view["rows"]), view["settings"]
    diff = np.full((len(rows), len(cols)), np.nan)  # (rows, settings), points
    for i, strategy in enumerate(rows):
        for j, name in enumerate(cols):
            c = view["rows"][strategy].get(name)
            if c is not None:
                diff[i, j] = 0.0 if strategy == "hinton" else (100 * c["vs_hinton"]["mean"] if c["vs_hinton"] else np.nan)
    # colours saturate at +-5 points, so one diverged-looking row (ls on the MLP: -18) does not wash out the rest
    span = min(max(float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0, 0.5), 5.0)
    fig = _new_figure((1.3 * len(cols) + 3, 0.32 * len(rows) + 1.6), 150)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(diff), cmap="RdBu", norm=TwoSlopeNorm(0.0, -span, span), aspect="auto")
    for i, strategy in enumerate(rows):
        for j, name in enumerate(cols):
            c = view["rows"][strategy].get(name)
            if c is None or not np.isfinite(diff[i, j]):
                continue
            ax.text(j, i, f"{diff[i, j]:+.1f}" + ("" if c["runs"] >= seeds else f" ({c['runs']})"), ha="center", va="center",
                    fontsize=7, fontweight="bold" if _excludes_zero(c["vs_hinton"]) else "normal",
                    color="white" if abs(diff[i, j]) > 0.6 * span else "black")
            if c["best"]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.5, color="black"))
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title("test accuracy against hinton (points; colours saturate at 5; bold: 95% interval excludes 0;\n"
                 f"frame: the setting's best row; (n): seeds where fewer than {seeds})", fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


README_START, README_END = "<!-- real-tables:start (generated by `python -m align_kd bench --report`) -->", "<!-- real-tables:end -->"


def report_settings(out_dir) -> list[Setting]:
    """The settings the README's block shows: the real protocol's table settings, then every other
    real setting (the diagnostics) that has a results folder under ``out_dir``."""
    return [SETTINGS[n] for n in REAL_TABLE] + [s for n, s in SETTINGS.items() if s.protocol == "real"
                                                and n not in REAL_TABLE and (Path(out_dir) / n).is_dir()]


def report(settings: list[Setting], out_dir, readme=None) -> str:
    """Rebuild each setting's table.md (and results.json, plots) from its record files; with ``readme``,
    replace the block between the markers in that file by the tables of ``settings`` and of every
    other setting of ``report_settings`` (a run of one setting never drops another's table).
    Returns the tables' markdown."""
    if readme is not None:
        asked = {s.name: s for s in settings}
        settings = [asked.pop(s.name, s) for s in report_settings(out_dir)] + list(asked.values())
    parts, summaries = [], {}  # summaries: setting name -> summarise() rows
    for setting in settings:
        records = collect_records(out_dir, setting)
        gave_up = collect_records(out_dir, setting, DIVERGED_FILE)
        diverged = "".join(f"\n`{r['strategy']}` seed {r['seed']} diverged: fit() gave up at step {r['step']} "
                           f"({r['reason']} from step {r['first_step']} on); no accuracy, not in the table.\n" for r in gave_up)
        if not records:
            parts.append(f"### {setting.name}: {setting.description}\n\nno finished runs yet\n{diverged}")
            continue
        seeds = sorted({r["seed"] for r in records})
        strategies = [s for s in ALL_STRATEGIES if any(r["strategy"] == s for r in records)]
        tinfo = {"test_acc": records[0]["teacher_acc"], "key": "", "path": setting.teacher_zoo or setting.teacher, "cached": True}
        summary = write_outputs(setting, records, tinfo, out_dir, seeds=seeds, strategies=strategies)
        summaries[setting.name] = summary["rows"]
        wall = sum(r["wall_s"] for r in records)
        parts.append(summary["table"] + row_settings(setting) + diverged
                     + f"\n{len(records)} runs, {wall / 3600:.2f} h of this machine in all (seeds {seeds}).\n")
    if len(summaries) > 1:  # the settings side by side, above their tables (and as overview.{png,json})
        view = overview(summaries)
        picture = plot_overview(view, Path(out_dir) / "overview.png")
        atomic_write_text(Path(out_dir) / "overview.json", json.dumps({**view, "versions": versions()}, indent=1))
        link = os.path.relpath(picture, Path(readme).parent) if readme is not None else picture
        parts.insert(0, format_overview(view) + f"\n![every setting against hinton]({link})\n")
    text = "\n".join(parts)
    if readme is not None:
        readme = Path(readme)
        body = readme.read_text() if readme.is_file() else ""
        block = f"{README_START}\n\n{text}\n{README_END}"
        if README_START in body and README_END in body:
            head, _, rest = body.partition(README_START)
            body = head + block + rest.partition(README_END)[2]
        else:
            body = body.rstrip() + "\n\n## The `real` protocol\n\n" + block + "\n"
        atomic_write_text(readme, body)
    return text


def quick(setting: Setting) -> Setting:
    """A few hundred images, one epoch: for CI and smoke tests."""
    return replace(setting, teacher_epochs=1, epochs=1, train_limit=512, test_limit=256, batch_size=64)
