#!/usr/bin/env python
"""Overhead of learned layer alignment: time per training step of strategy="sinkhorn" vs "hinton".

What is measured (issue 7):

1. **Step time** of the step ``fit()`` runs (``align_kd.training.train_step`` on an
   ``align_kd.Distiller`` built as ``fit()`` builds it: FitConfig -> Distiller with the
   DISTILLER_OPTIONS fields, ``make_optimizer``, ``make_scheduler``) on fixed real CIFAR-10 batches
   (128 images, augmented once, then reused), for each teacher/student pair and each strategy:
   ``alone`` (plain student: beta=1, kd_weight=0), ``hinton``, ``pairwise``, ``uniform``,
   ``sinkhorn`` (all T x S pairs, learned plan, shared MI bank). The timed step is exactly
   ``train_step``: running-buffer snapshot, finiteness checks of the input and the loss, the
   Distiller's forward, backward, optimizer and scheduler step (not fit()'s per-step logging,
   which reads the loss terms with ``.item()`` after it). Strategies run
   round-robin (the order rotates every round) so that load from other processes hits them all
   alike; warm-up rounds are excluded; we report the median ms/step, the median over rounds of
   the per-round ratio to hinton, and its interquartile range. Extra rows, not in the default
   set: ``sinkhorn-full`` (reference VID bank, bank_layout="full", pool=None) and
   ``sinkhorn-pool4`` (pool=4, the default before 2026-11-29: pairs compared at up to 4 x 4) and
   ``sinkhorn-skip`` (skip_pairs_below=0.05: pairs with a smaller plan weight evaluated only on
   every 10th step; the share of pairs evaluated is in the row's ``pairs_evaluated``).
   Targets: <= 1.3x hinton for SmallCNN(32) -> SmallCNN(8); <= 1.6x for the deep pairs.
2. **Where the time goes**: an instrumented pass (wall-clock timers wrapped around the Distiller's
   teacher and student tap calls ``_teacher_call`` / ``_student_call``, ``plan.forward``, the MI
   bank call ``_bank_call``, ``Tensor.backward``, the implicit-Sinkhorn backward and
   ``optimizer.step``), giving per-phase medians for hinton and sinkhorn and the fraction of
   the sinkhorn step spent in the plan projection (SinkhornPlan.forward, warm-started, plus its
   implicit backward). Target < 1% of a step. Plus a ``torch.profiler`` table of the top ops of
   the MI bank's forward+backward on the pair's real features, and bank ablations (pool, width,
   one teacher tap fewer).
3. **Peak memory** per strategy, each in a fresh subprocess: resident set size (Linux
   ``/proc/self/status``), high-water mark reset via ``/proc/self/clear_refs`` after the Distiller,
   optimizer and scheduler are built, so ``peak_delta_mib`` = VmHWM after the steps minus VmRSS
   before them (activations, gradients, optimizer state, allocator growth). Falls back to ``resource.getrusage`` max RSS
   deltas where clear_refs is unavailable. On CUDA: ``torch.cuda.max_memory_allocated``.
4. **Scaling with T x S**: the MI bank alone (forward + backward, shared layout, the library's
   default pool and width) on synthetic features, T = S in {5, 10, 15, 20}, teacher and student
   maps cycling through (32, 16, 16), (64, 8, 8), (128, 4, 4), (256,); the "full" layout at the
   small sizes for comparison; the SinkhornPlan forward+backward (warm-started) as well, and the
   library's Newton-first warm start against the sweeps-first schedule it replaced. A
   least-squares fit of log(time) on log(T*S) gives the growth exponent (sub-linear if < 1). The
   shared bank with skip_pairs_below is timed on a band of 3 teacher layers per student layer
   (what learned plans keep above 0.05) and amortised with a full pass every 10 steps.
   Plot: ``results/overhead_scaling.png`` (default; ``--plot``, else beside a non-default ``--out``).

GPU: ``--device cuda --amp --channels-last [--compile]`` applies those fit() options to every
strategy alike (``benchmarks/gpu_overhead.sh`` is the prepared run). Threads:
``torch.set_num_threads(1)`` (and OMP/MKL/OpenBLAS = 1) unless ``--threads``. Teachers have
random weights (timing and memory do not depend on the weights).

Usage:
    python benchmarks/overhead.py            # full run (about 5 minutes on one core)
    python benchmarks/overhead.py --quick --out /tmp/overhead-quick.json   # smoke run, about a minute
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import align_kd.mi as mi_module  # noqa: E402
import align_kd.plans.projection as plans_module  # noqa: E402
from align_kd._env import versions as package_versions  # noqa: E402
from align_kd.data import cifar10_loaders  # noqa: E402
from _common import default_root, write_json  # noqa: E402
from align_kd.mi import MIBank  # noqa: E402
from align_kd.models import MLP, ResNetCIFAR, SmallCNN  # noqa: E402
from align_kd.config import DISTILLER_OPTIONS  # noqa: E402
from align_kd.distiller import Distiller  # noqa: E402
from align_kd.distributed import DistContext  # noqa: E402
from align_kd.plans import SinkhornPlan, depth_prior  # noqa: E402
from align_kd.training import FitConfig, make_optimizer, make_scheduler, train_step  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CIFAR_TRAIN_STEPS_PER_EPOCH = math.ceil(50_000 / 128)  # 391: a full CIFAR-10 epoch at batch 128

STRATEGIES = OrderedDict(
    alone=dict(strategy="hinton", beta=1.0, kd_weight=0.0),
    hinton=dict(strategy="hinton"),
    pairwise=dict(strategy="pairwise"),
    uniform=dict(strategy="uniform"),
    sinkhorn=dict(strategy="sinkhorn"),
)
EXTRA = {
    "sinkhorn-full": dict(strategy="sinkhorn", bank_layout="full", pool=None),
    "sinkhorn-pool4": dict(strategy="sinkhorn", pool=4),
    "sinkhorn-skip": dict(strategy="sinkhorn", skip_pairs_below=0.05),
    # issue 13: the plan learned from held-out cross-entropy (an update every heldout_every steps,
    # timed inside the step it follows, as fit() runs it) and the contrastive MI estimator
    "sinkhorn-heldout": dict(strategy="sinkhorn", plan_objective="heldout"),
    # one update per 40 steps: an update costs about 1.2 sinkhorn steps, so this is the interval at
    # which the held-out plan's amortised cost comes within issue 13's 1.3x hinton
    "sinkhorn-heldout-every40": dict(strategy="sinkhorn", plan_objective="heldout", heldout_every=40),
    # the same rule with J v by central differences (two MI forwards at the default h, no backward)
    # instead of the exact double backward (benchmarks/heldout_jvp.py compares the two)
    "sinkhorn-heldout-fd": dict(strategy="sinkhorn", plan_objective="heldout", heldout_jvp="finite_difference"),
    "sinkhorn-infonce": dict(strategy="sinkhorn", mi_estimator="infonce"),
}
#: rows whose cost comes in bursts (a plan update every few steps): judged by the ratio of mean step times
AMORTISED = ("sinkhorn-heldout", "sinkhorn-heldout-every40", "sinkhorn-heldout-fd")


# ----------------------------------------------------------------------------------------------
# models


def cnn10(width: int = 8, num_classes: int = 10) -> nn.Sequential:
    """A 10-tap CNN student: 9 conv-BN-ReLU layers (width, 2w, 4w; max-pool after the 3rd and 6th;
    global average pool after the 9th), then a linear head. Taps: 9 conv layers + logits."""
    chans = [3] + [width] * 3 + [2 * width] * 3 + [4 * width] * 3
    layers: list[tuple[str, nn.Module]] = []
    for k in range(9):
        layers += [
            (f"conv{k + 1}", nn.Conv2d(chans[k], chans[k + 1], 3, padding=1, bias=False)),
            (f"bn{k + 1}", nn.BatchNorm2d(chans[k + 1])),
            (f"relu{k + 1}", nn.ReLU()),
        ]
        if k in (2, 5):
            layers.append((f"pool{k + 1}", nn.MaxPool2d(2)))
    layers += [("gap", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()), ("fc", nn.Linear(4 * width, num_classes))]
    return nn.Sequential(OrderedDict(layers))


#: FitConfig options for the GPU runs (every strategy alike) and their command-line flags
GPU_FLAGS = {"amp": "--amp", "channels_last": "--channels-last", "compile": "--compile"}

PAIRS = OrderedDict(
    cnn=dict(
        teacher=("SmallCNN(width=32)", lambda: SmallCNN(32)),
        student=("SmallCNN(width=8)", lambda: SmallCNN(8)),
        target=1.3,
        extra=["sinkhorn-pool4", "sinkhorn-skip", "sinkhorn-full", "sinkhorn-heldout", "sinkhorn-heldout-every40", "sinkhorn-heldout-fd", "sinkhorn-infonce"],
    ),
    **{
        "resnet20-cnn10": dict(
            teacher=("ResNetCIFAR(depth=20, width=16)", lambda: ResNetCIFAR(20, 16)),
            student=("cnn10(width=8) (9 conv layers + head, inline)", lambda: cnn10(8)),
            target=1.6,
            extra=["sinkhorn-pool4", "sinkhorn-skip", "sinkhorn-heldout", "sinkhorn-heldout-every40", "sinkhorn-heldout-fd", "sinkhorn-infonce"],
        ),
        "resnet20-mlp": dict(
            teacher=("ResNetCIFAR(depth=20, width=16)", lambda: ResNetCIFAR(20, 16)),
            student=("MLP(hidden=(256,)*9)", lambda: MLP(hidden=(256,) * 9)),
            target=1.6,
            extra=["sinkhorn-skip", "sinkhorn-heldout", "sinkhorn-heldout-every40", "sinkhorn-heldout-fd", "sinkhorn-infonce"],
        ),
    },
)


def nparams(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# what-if patches (local to this benchmark; align_kd/mi.py is not edited)


# ----------------------------------------------------------------------------------------------
# Distillers (built as fit() builds them) and data


def fixed_batches(root, n_batches: int, batch_size: int = 128, seed: int = 0):
    train, _ = cifar10_loaders(root, batch_size=batch_size, limit=n_batches * batch_size, test_limit=batch_size,
                               augment=True, seed=seed)
    return [(x.clone(), y.clone()) for x, y in train][:n_batches]


class Run:
    """What fit() trains for one strategy: the Distiller, the model it steps (the Distiller itself
    in one process), the optimizer and scheduler of ``make_optimizer`` / ``make_scheduler``."""

    def __init__(self, distiller: Distiller, model, optimizer, scheduler, cfg: FitConfig, dist: DistContext,
                 heldout: tuple, steps_per_epoch: int):
        self.distiller, self.model, self.optimizer, self.scheduler = distiller, model, optimizer, scheduler
        self.cfg, self.dist = cfg, dist
        self.pairs_evaluated: list[float] = []  # per step: share of the T x S bounds the bank computed
        self.heldout, self.steps_per_epoch = heldout, steps_per_epoch  # plan_objective="heldout": its batch
        self.steps = 0  # training steps taken (fit()'s state.step)
        self.plan_updates = 0

    def close(self) -> None:
        self.distiller.close()  # the taps' hooks come off the teacher and the student


def make_run(pair: str, name: str, batches, *, seed: int = 0, device: str = "cpu", total_steps: int = 1000,
             gpu_opts: dict | None = None) -> Run:
    """The Distiller, optimizer and scheduler of strategy ``name`` on ``pair``, built as fit() builds
    them (FitConfig -> Distiller with the DISTILLER_OPTIONS fields -> make_optimizer ->
    make_scheduler; under compile=True the Distiller compiles its tap calls and bank). Close with
    ``Run.close()``. gpu_opts: FitConfig options applied to every strategy (amp, channels_last, compile)."""
    spec = PAIRS[pair]
    opts = dict({**STRATEGIES, **EXTRA}[name], **(gpu_opts or {}))
    strategy = opts.pop("strategy")
    torch.manual_seed(seed)
    teacher = spec["teacher"][1]()
    torch.manual_seed(seed + 1)
    student = spec["student"][1]()
    epochs = max(1, math.ceil(total_steps / len(batches)))  # keeps the cosine schedule in its first half-period
    cfg = FitConfig(strategy=strategy, epochs=epochs, device=device, progress=False, seed=seed, **opts)
    dist = DistContext(device=torch.device(device))  # a single process, as fit() outside torchrun
    torch.manual_seed(cfg.seed)
    teacher.to(dist.device)
    student.to(dist.device)
    distiller = Distiller(teacher, student, batches[0][0][:2].to(dist.device), strategy=cfg.strategy,
                          verbose=False, **{k: getattr(cfg, k) for k in DISTILLER_OPTIONS})
    optimizer = make_optimizer(distiller, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(batches))  # the list of batches is the epoch
    model = dist.wrap(distiller, find_unused_parameters=cfg.skip_pairs_below is not None)  # the Distiller itself here
    distiller.train()
    # held-out rule: a batch the steps never train on (the fixed batches cycle, so the last one's flip side)
    heldout = (batches[-1][0].flip(-1), batches[-1][1])
    return Run(distiller, model, optimizer, scheduler, cfg, dist, heldout, len(batches))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_step(run: Run, x, y, device) -> float:
    """Seconds for one ``align_kd.training.train_step`` (the step fit() runs), device synchronised."""
    _sync(device)
    t0 = time.perf_counter()
    update = run.distiller.plan.data == "heldout" and run.distiller.plan_update_due(run.steps + 1, run.steps_per_epoch)
    if update:
        run.distiller.capture_step_start()  # as fit() does before a step whose update is due
    out = train_step(run.model, run.distiller, run.optimizer, run.scheduler, x, y, kd_scale=1.0,
                     grad_clip=run.cfg.grad_clip, dist=run.dist)  # kd_scale: no strategy here sets kd_warmup
    run.steps += 1
    if update:
        run.distiller.update_plan(train=(x, y), heldout=run.heldout)  # as fit() does after this step
        run.plan_updates += 1
    _sync(device)
    dt = time.perf_counter() - t0
    if isinstance(out, str):
        raise RuntimeError(f"a benchmark step was skipped ({out})")
    run.pairs_evaluated.append(out.pairs_evaluated)  # the Distiller counts its forwards (skip_pairs_below schedule)
    return dt


# ----------------------------------------------------------------------------------------------
# 1. step timing, round-robin


def time_pair(pair: str, names: list[str], batches, *, warmup: int, steps: int, device: str, seed: int,
              gpu_opts: dict | None = None) -> dict:
    runs: dict[str, Run] = {}
    times = {n: [] for n in names}
    try:
        for n in names:
            runs[n] = make_run(pair, n, batches, seed=seed, device=device, total_steps=warmup + steps + 50, gpu_opts=gpu_opts)
        for r in range(warmup + steps):
            k = r % len(names)
            order = names[k:] + names[:k]  # rotate so no strategy always runs first / after the same one
            x, y = batches[r % len(batches)]
            for n in order:
                dt = timed_step(runs[n], x, y, device)
                if r >= warmup:
                    times[n].append(dt)
        d0 = runs[names[0]].distiller
        info = {
            "teacher_layers": list(d0.teacher_layers),
            "student_layers": list(d0.student_layers),
            "teacher_shapes": d0.teacher_shapes,
            "student_shapes": d0.student_shapes,
            "T": len(d0.teacher_layers),
            "S": len(d0.student_layers),
            "teacher_params": nparams(d0.teacher),
            "student_params": nparams(d0.student),
        }
        rows = {}
        for n in names:
            run, e = runs[n], runs[n].distiller
            ts = times[n]
            ratios = [a / b for a, b in zip(ts, times["hinton"])] if "hinton" in times else []
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [float("nan")] * 3
            med = statistics.median(ts)
            rows[n] = {
                "ms_per_step_median": 1e3 * med,
                "ms_per_step_mean": 1e3 * statistics.fmean(ts),
                # with bursts (a plan update every few steps) the mean is the cost per step; the median hides them
                "ratio_of_means": statistics.fmean(ts) / statistics.fmean(times["hinton"]) if "hinton" in times else None,
                "plan_updates": run.plan_updates,
                "ms_per_step_iqr": [1e3 * v for v in statistics.quantiles(ts, n=4)] if len(ts) >= 2 else None,
                "ratio_to_hinton_median": statistics.median(ratios) if ratios else None,
                "ratio_to_hinton_iqr": [q[0], q[2]],
                "ratio_of_medians": med / statistics.median(times["hinton"]) if "hinton" in times else None,
                "s_per_cifar_epoch_est": med * CIFAR_TRAIN_STEPS_PER_EPOCH,
                "bank_params": nparams(e.bank),
                "plan_params": sum(p.numel() for p in e.plan.parameters()),
                "pairs_evaluated": statistics.fmean(run.pairs_evaluated[warmup:]),
                "bank_layout": e.cfg.bank_layout if e.bank is not None else None,
                "samples_ms": [round(1e3 * t, 3) for t in ts],
            }
        return {"info": info, "rows": rows}
    finally:
        for run in runs.values():
            run.close()


# ----------------------------------------------------------------------------------------------
# 2. where the time goes


class _Timed:
    """Callable proxy that adds its wall time to timers[key]."""

    def __init__(self, fn, timers, key, device):
        self.fn, self.timers, self.key, self.device = fn, timers, key, device

    def __call__(self, *a, **k):
        _sync(self.device)
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            _sync(self.device)
            self.timers[self.key] = self.timers.get(self.key, 0.0) + time.perf_counter() - t0


@contextlib.contextmanager
def _instrumented(run: Run, timers, device):
    """Time the phases of train_step by wrapping what the Distiller calls: the teacher and student
    tap calls (``_teacher_call`` / ``_student_call``), ``plan.forward``, the bank call
    (``_bank_call``), plus Tensor.backward (and the implicit-Sinkhorn backward inside it) and
    optimizer.step (its pre/post hooks). Everything is put back on exit."""
    distiller = run.distiller
    orig_backward = torch.Tensor.backward
    orig_sink_bwd = plans_module._ImplicitSinkhorn.__dict__["backward"]
    opt_start = []

    def pre_hook(opt, args, kwargs):
        _sync(device)
        opt_start.append(time.perf_counter())

    def post_hook(opt, args, kwargs):
        _sync(device)
        timers["optimizer"] = timers.get("optimizer", 0.0) + time.perf_counter() - opt_start.pop()

    hooks = [run.optimizer.register_step_pre_hook(pre_hook), run.optimizer.register_step_post_hook(post_hook)]
    # the Distiller's calls (compiled under compile=True) as instance attributes: wrapped, then put back
    calls = {"_teacher_call": "teacher_fwd", "_student_call": "student_fwd", "_bank_call": "bank_fwd"}
    originals = {a: getattr(distiller, a) for a in calls}
    for a, key in calls.items():
        if originals[a] is not None:  # _bank_call is None without a feature term
            setattr(distiller, a, _Timed(originals[a], timers, key, device))
    # look the class's forward up at call time (the instance attribute shadows it while timed)
    plan = distiller.plan
    plan.forward = _Timed(lambda *a, **k: type(plan).forward(plan, *a, **k), timers, "plan_fwd", device)
    timed_backward = _Timed(orig_backward, timers, "backward", device)

    def backward(self, *a, **k):  # a function, so that it binds as a method
        return timed_backward(self, *a, **k)

    torch.Tensor.backward = backward

    def sink_bwd(ctx, G):
        t0 = time.perf_counter()
        try:
            return orig_sink_bwd.__func__(ctx, G)
        finally:
            timers["plan_bwd"] = timers.get("plan_bwd", 0.0) + time.perf_counter() - t0

    plans_module._ImplicitSinkhorn.backward = staticmethod(sink_bwd)
    try:
        yield
    finally:
        torch.Tensor.backward = orig_backward
        plans_module._ImplicitSinkhorn.backward = orig_sink_bwd
        del plan.forward
        for a, fn in originals.items():
            setattr(distiller, a, fn)
        for h in hooks:
            h.remove()


PHASES = ["teacher_fwd", "student_fwd", "plan_fwd", "bank_fwd", "backward", "plan_bwd", "optimizer", "other"]


def breakdown_pair(pair: str, names: list[str], batches, *, warmup: int, steps: int, device: str, seed: int,
                   gpu_opts: dict | None = None) -> dict:
    runs: dict[str, Run] = {}
    per = {n: {p: [] for p in PHASES + ["total", "plan_fraction"]} for n in names}
    iters = {n: [] for n in names}
    try:
        for n in names:
            runs[n] = make_run(pair, n, batches, seed=seed, device=device, total_steps=warmup + steps + 50, gpu_opts=gpu_opts)
        for r in range(warmup + steps):
            k = r % len(names)
            x, y = batches[r % len(batches)]
            for n in names[k:] + names[:k]:
                timers: dict[str, float] = {}
                with _instrumented(runs[n], timers, device):
                    total = timed_step(runs[n], x, y, device)
                if r < warmup:
                    continue
                top = sum(timers.get(p, 0.0) for p in ("teacher_fwd", "student_fwd", "plan_fwd", "bank_fwd", "backward", "optimizer"))
                timers["other"] = total - top
                for p in PHASES:
                    per[n][p].append(timers.get(p, 0.0))
                per[n]["total"].append(total)
                per[n]["plan_fraction"].append((timers.get("plan_fwd", 0.0) + timers.get("plan_bwd", 0.0)) / total)
                iters[n].append(getattr(runs[n].distiller.plan, "last_iterations", 0))
        out = {}
        for n in names:
            out[n] = {f"{p}_ms": 1e3 * statistics.median(per[n][p]) for p in PHASES + ["total"]}
            out[n]["plan_fraction_median"] = statistics.median(per[n]["plan_fraction"])
            out[n]["plan_fraction_max"] = max(per[n]["plan_fraction"])
            out[n]["sinkhorn_iterations_median"] = statistics.median(iters[n])
        return out
    finally:
        for run in runs.values():
            run.close()


def bank_fwd_bwd(bank, t_feats, s_feats, lam, device, active=None) -> tuple[float, float]:
    """Seconds for one MI-bank forward and for forward + backward; gradients cleared after."""
    _sync(device)
    t0 = time.perf_counter()
    mi = bank(t_feats, s_feats, student_grad_weight=lam, active=active)
    t1 = time.perf_counter()
    (-mi.sum()).backward()
    _sync(device)
    t2 = time.perf_counter()
    bank.zero_grad(set_to_none=True)
    for s in s_feats:
        s.grad = None
    return t1 - t0, t2 - t0


def bank_profile_and_ablations(pair: str, batches, *, reps: int, device: str, seed: int, top: int = 12) -> dict:
    """The MI bank alone (forward + backward) on the pair's real features: profiler top ops and
    ablations (pool, width, fewer taps), interleaved with the default. Plain float32, eager."""
    from torch.profiler import ProfilerActivity, profile

    run = make_run(pair, "sinkhorn", batches, seed=seed, device=device)
    e = run.distiller
    try:
        x = e.batch(batches[0][0])
        with torch.no_grad():
            t_feats, _ = e._teacher_call(x)
            s_feats, _ = e._student_call(x)
        lam = e.plan().detach()
    finally:
        run.close()
    t_feats = [t.detach() for t in t_feats]
    s_feats = [s.detach().requires_grad_(True) for s in s_feats]
    T = len(t_feats)

    width = e.bank.width  # the width the Distiller chose (library default)

    def bank(**kw):
        torch.manual_seed(seed)
        args = dict(layout="shared", width=width)  # library default pool
        args.update(kw)
        return MIBank(e.teacher_shapes, e.student_shapes, **args).to(device)

    variants = OrderedDict(default=bank())
    half = max(8, width // 2)
    variants.update(pool4=bank(pool=4), pool1=bank(pool=1), half_width=bank(width=half))
    # drop the widest teacher tap (most channels) as a "fewer taps" ablation
    widest = max(range(T), key=lambda i: mi_module.map_shape(tuple(e.teacher_shapes[i]))[0])
    keep = [i for i in range(T) if i != widest]
    torch.manual_seed(seed)
    variants["drop_widest_teacher_tap"] = MIBank([e.teacher_shapes[i] for i in keep], e.student_shapes, layout="shared",
                                                 width=width).to(device)

    def run(name):
        tf = [t_feats[i] for i in keep] if name == "drop_widest_teacher_tap" else t_feats
        lw = lam[keep] if name == "drop_widest_teacher_tap" else lam
        return bank_fwd_bwd(variants[name], tf, s_feats, lw, device)

    names = list(variants)
    fwd = {n: [] for n in names}
    tot = {n: [] for n in names}
    for r in range(reps + 2):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            a, b_ = run(n)
            if r >= 2:
                fwd[n].append(a)
                tot[n].append(b_)
    abl = {}
    for n in names:
        ratios = [a / b for a, b in zip(tot[n], tot["default"])]
        abl[n] = {
            "fwd_ms": 1e3 * statistics.median(fwd[n]),
            "fwd_bwd_ms": 1e3 * statistics.median(tot[n]),
            "ratio_to_default": statistics.median(ratios),
            "bank_params": nparams(variants[n]),
        }
    abl["drop_widest_teacher_tap"]["dropped"] = {"index": widest, "shape": e.teacher_shapes[widest]}

    b = variants["default"]
    for _ in range(2):
        run("default")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else []),
                 record_shapes=True) as prof:
        for _ in range(3):
            run("default")
    ka = sorted(prof.key_averages(group_by_input_shape=True), key=lambda a: -a.self_cpu_time_total)
    total_self = sum(a.self_cpu_time_total for a in prof.key_averages())
    ops = [
        {
            "op": a.key,
            "input_shapes": str(a.input_shapes)[:120],
            "self_cpu_ms_per_call_of_bank": a.self_cpu_time_total / 3 / 1e3,
            "share": a.self_cpu_time_total / total_self,
            "calls_per_bank_call": a.count / 3,
        }
        for a in ka[:top]
    ]
    groups = {}
    for p in b.pairs:
        groups.setdefault((p.i, p.size), []).append(p.j)
    big = sorted(
        ({"teacher_tap": i, "size": list(size), "G": len(js), "elements_GBPC": len(js) * len(x) * size[0] * size[1]
          * mi_module.map_shape(tuple(e.teacher_shapes[i]))[0]} for (i, size), js in groups.items()),
        key=lambda d: -d["elements_GBPC"],
    )
    return {"bank_width": width, "bank_pool": e.bank.pool, "half_width": half, "ablations": abl, "profile_top_ops": ops,
            "profile_note": "self CPU time under torch.profiler (inflated by the profiler; shares are what matter)",
            "groups": len(groups), "largest_likelihood_tensors": big[:5]}


# ----------------------------------------------------------------------------------------------
# 3. peak memory (fresh subprocess per strategy)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(pair: str, name: str, batch_file: str, steps: int, device: str, seed: int, gpu_opts: dict) -> dict:
    batches = torch.load(batch_file, weights_only=True)
    run = make_run(pair, name, batches, seed=seed, device=device, gpu_opts=gpu_opts)
    cuda = torch.device(device).type == "cuda"
    method = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method = "torch.cuda.max_memory_allocated - memory_allocated before the steps"
    else:
        base_rss = _status_kib("VmRSS")
        ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            method = "VmHWM after the steps - VmRSS before (HWM reset via /proc/self/clear_refs)"
        except OSError:
            method = "ru_maxrss after - ru_maxrss before (getrusage; may underestimate if setup peaked higher)"
    for r in range(steps):
        x, y = batches[r % len(batches)]
        timed_step(run, x, y, device)
    if cuda:
        torch.cuda.synchronize()
        delta = (torch.cuda.max_memory_allocated() - base) / 2**20
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif method.startswith("VmHWM"):
        delta = (_status_kib("VmHWM") - base_rss) / 1024
        peak = _status_kib("VmHWM") / 1024
    else:
        ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        delta, peak = (ru_after - ru_before) / 1024, ru_after / 1024
    run.close()
    return {"peak_delta_mib": delta, "peak_mib": peak, "method": method, "steps": steps}


def measure_memory(pair: str, names: list[str], batches, *, steps: int, device: str, seed: int, gpu_opts: dict) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "batches.pt")
        torch.save(batches, path)
        for n in names:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory", pair, n, path,
                   "--mem-steps", str(steps), "--device", device, "--seed", str(seed)]
            cmd += [GPU_FLAGS[k] for k in gpu_opts]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if res.returncode != 0:
                out[n] = {"error": res.stderr[-2000:]}
                continue
            out[n] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------------------------
# 4. scaling with T x S


SCALING_SHAPES = [(32, 16, 16), (64, 8, 8), (128, 4, 4), (256,)]


#: skip_pairs_below as measured in the scaling: learned plans keep about 1-5 pairs >= 0.05 per column
#: (strategy benchmark, sinkhorn runs), so a band of 3 teacher layers per student layer around the
#: relative-depth diagonal is active between full passes, and every 10th step is a full pass
SKIP_BAND, SKIP_FULL_EVERY = 3, 10


def band_mask(T: int, S: int, k: int = SKIP_BAND) -> torch.Tensor:
    """(T, S) bool: for each student layer j, the k teacher layers nearest its relative depth."""
    centre = torch.tensor([round(j * (T - 1) / max(S - 1, 1)) for j in range(S)])  # (S,)
    lo = (centre - k // 2).clamp(0, max(T - k, 0))
    rows = torch.arange(T)[:, None]
    return (rows >= lo[None, :]) & (rows < lo[None, :] + k)


def bank_time(T: int, S: int, layout: str, *, batch: int, reps: int, device: str, seed: int = 0,
              active: torch.Tensor | None = None) -> dict:
    torch.manual_seed(seed)
    t_shapes = [SCALING_SHAPES[i % 4] for i in range(T)]
    s_shapes = [SCALING_SHAPES[(j + 1) % 4] for j in range(S)]  # offset: not every pair at equal shapes
    bank = MIBank(t_shapes, s_shapes, layout=layout, **({} if layout == "shared" else {"pool": None})).to(device)  # defaults
    g = torch.Generator().manual_seed(seed)
    tf = [torch.randn(batch, *s, generator=g).to(device) for s in t_shapes]
    sf = [torch.randn(batch, *s, generator=g).to(device).requires_grad_(True) for s in s_shapes]
    lam = torch.full((T, S), 1.0 / T, device=device)
    ts, fs = [], []
    for r in range(reps + 1):
        f, t = bank_fwd_bwd(bank, tf, sf, lam, device, active=None if active is None else active.to(device))
        if r:
            ts.append(t)
            fs.append(f)
    return {"T": T, "S": S, "pairs": T * S, "layout": layout, "width": bank.width, "fwd_bwd_ms": 1e3 * statistics.median(ts),
            "fwd_ms": 1e3 * statistics.median(fs), "bank_params": nparams(bank), "reps": reps,
            "active_pairs": T * S if active is None else int(active.sum())}


def plan_step(plan, nudge: torch.Tensor, g: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Nudge the logits (as an optimizer step would), then time one SinkhornPlan forward + backward
    of <lambda, g>; returns (seconds, lambda)."""
    with torch.no_grad():
        plan.logits.add_(nudge)
    t0 = time.perf_counter()
    lam = plan()
    (lam * g).sum().backward()
    dt = time.perf_counter() - t0
    plan.logits.grad = None
    return dt, lam.detach()


def plan_time(T: int, S: int, *, reps: int, tau: float = 0.1, seed: int = 0) -> dict:
    """SinkhornPlan forward + backward, warm-started, logits nudged between calls as in training."""
    torch.manual_seed(seed)
    plan = SinkhornPlan(T, S, tau=tau, init=depth_prior(T, S), row_marginal=torch.full((T,), S / T))
    g = torch.randn(T, S)
    ts = [plan_step(plan, 1e-3 * torch.randn(T, S), g)[0] for _ in range(reps + 2)][2:]
    return {"T": T, "S": S, "pairs": T * S, "fwd_bwd_ms": 1e3 * statistics.median(ts), "iterations_last": plan.last_iterations}


#: SinkhornPlan variants: the library's warm-started Newton against the sweeps-first schedule it replaced
PLAN_VARIANTS = OrderedDict(newton_first={"newton_after": 0}, sweeps_first={"newton_after": 3})


def plan_variants(shapes, *, reps: int, tau: float = 0.1, seed: int = 0) -> list[dict]:
    """SinkhornPlan forward + backward for each of PLAN_VARIANTS, warm-started, the same logit nudges
    (1e-3 N(0, 1) per step) for all, interleaved."""
    out = []
    for T, S in shapes:
        plans, ts, its, errs = {}, {}, {}, {}
        for name, kw in PLAN_VARIANTS.items():
            torch.manual_seed(seed)
            plans[name] = SinkhornPlan(T, S, tau=tau, init=depth_prior(T, S), row_marginal=torch.full((T,), S / T), **kw)
            ts[name], its[name], errs[name] = [], [], []
        g = torch.randn(T, S, generator=torch.Generator().manual_seed(seed))
        for r in range(reps + 3):
            step = 1e-3 * torch.randn(T, S, generator=torch.Generator().manual_seed(seed + 1 + r))
            for name, plan in (plans.items() if r % 2 == 0 else reversed(list(plans.items()))):
                dt, lam = plan_step(plan, step, g)
                if r >= 3:
                    ts[name].append(dt)
                    its[name].append(plan.last_iterations)
                    errs[name].append(float((lam.sum(1) - plan.row_marginal).abs().max()))
        for name in plans:
            out.append({"T": T, "S": S, "variant": name, **PLAN_VARIANTS[name], "fwd_bwd_ms": 1e3 * statistics.median(ts[name]),
                        "iterations_median": statistics.median(its[name]), "max_row_error": max(errs[name])})
    return out


def fit_exponent(points: list[dict], key: str = "fwd_bwd_ms") -> float | None:
    xs = [math.log(p["pairs"]) for p in points]
    ys = [math.log(p[key]) for p in points]
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def scaling(sizes, full_sizes, *, batch: int, reps: int, full_reps: int, device: str) -> dict:
    shared, skip, full, plan = [], [], [], []
    # interleave: each size's shared and full measurements back to back
    for n in sizes:
        shared.append(bank_time(n, n, "shared", batch=batch, reps=reps, device=device))
        band = bank_time(n, n, "shared", batch=batch, reps=reps, device=device, active=band_mask(n, n))
        # skip_pairs_below: one full pass, then SKIP_FULL_EVERY - 1 steps on the band (amortised)
        amortised = {k: (shared[-1][k] + (SKIP_FULL_EVERY - 1) * band[k]) / SKIP_FULL_EVERY for k in ("fwd_bwd_ms", "fwd_ms")}
        skip.append({**band, **amortised, "band_fwd_bwd_ms": band["fwd_bwd_ms"], "full_pass_every": SKIP_FULL_EVERY})
        if n in full_sizes:
            full.append(bank_time(n, n, "full", batch=batch, reps=full_reps, device=device))
        plan.append(plan_time(n, n, reps=max(reps, 10)))
        print(f"  scaling T=S={n}: shared {shared[-1]['fwd_bwd_ms']:.1f} ms"
              + (f", full {full[-1]['fwd_bwd_ms']:.1f} ms" if n in full_sizes else "")
              + f", plan {plan[-1]['fwd_bwd_ms']:.2f} ms, skip (amortised) {skip[-1]['fwd_bwd_ms']:.1f} ms", flush=True)
    res = {
        "batch": batch,
        "shapes_cycle": [list(s) for s in SCALING_SHAPES],
        "student_shapes_offset": 1,
        "shared": shared,
        "skip": skip,
        "skip_rule": f"band of {SKIP_BAND} teacher layers per student layer active, full pass every {SKIP_FULL_EVERY} steps",
        "full": full,
        "plan": plan,
        "exponent_shared": fit_exponent(shared),
        "exponent_shared_fwd": fit_exponent(shared, "fwd_ms"),
        "exponent_skip": fit_exponent(skip),
        "exponent_full": fit_exponent(full),
        "exponent_plan": fit_exponent(plan),
        "plan_variants": plan_variants([(5, 5), (11, 10), (20, 20)], reps=max(reps, 10) * 3),
    }
    res["sublinear_shared"] = res["exponent_shared"] is not None and res["exponent_shared"] < 1
    return res


def plot_scaling(sc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for key, label, marker in (("shared", "MI bank, shared layout, all pairs", "o"),
                               ("skip", f"shared, skip_pairs_below ({SKIP_BAND}/column, full pass 1/{SKIP_FULL_EVERY})", "D"),
                               ("full", "MI bank, full layout (reference VID)", "s"),
                               ("plan", "SinkhornPlan fwd+bwd (warm)", "^")):
        pts = sc[key]
        if not pts:
            continue
        x = [p["pairs"] for p in pts]
        y = [p["fwd_bwd_ms"] for p in pts]
        k = sc[f"exponent_{key}"]
        ax.loglog(x, y, marker=marker, linestyle="none", label=f"{label}: slope {k:.2f}" if k is not None else label)
        if k is not None:
            mx, my = statistics.fmean(math.log(v) for v in x), statistics.fmean(math.log(v) for v in y)
            xx = [min(x), max(x)]
            ax.loglog(xx, [math.exp(my + k * (math.log(v) - mx)) for v in xx], linestyle="--", color=ax.lines[-1].get_color())
    x0 = sc["shared"][0]["pairs"]
    y0 = sc["shared"][0]["fwd_bwd_ms"]
    xs = [p["pairs"] for p in sc["shared"]]
    ax.loglog(xs, [y0 * v / x0 for v in xs], color="0.6", linewidth=0.8, label="linear in T x S (reference)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("T x S (teacher taps x student taps, T = S)")
    ax.set_ylabel("forward + backward time (ms)")
    ax.set_title(f"Cost growth with T x S (batch {sc['batch']}, 1 thread)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# reporting


def table(pair: str, spec: dict, timing: dict, memory: dict) -> str:
    info = timing["info"]
    lines = [
        f"\n== {pair}: teacher {spec['teacher'][0]} (T={info['T']} taps, {info['teacher_params']:,} params) -> "
        f"student {spec['student'][0]} (S={info['S']} taps, {info['student_params']:,} params); T x S = {info['T'] * info['S']}; "
        f"target sinkhorn <= {spec['target']}x hinton",
        f"{'strategy':<22} {'ms/step':>9} {'IQR ms':>15} {'x hinton':>9} {'ratio IQR':>13} {'mean x':>7} {'s/epoch*':>9} "
        f"{'bank params':>12} {'student':>9} {'bank/stud':>9} {'peak MiB':>9} {'pairs':>6}",
    ]
    for n, r in timing["rows"].items():
        mem = memory.get(n, {})
        peak = f"{mem['peak_delta_mib']:.0f}" if "peak_delta_mib" in mem else "-"
        iqr = f"{r['ms_per_step_iqr'][0]:.0f}-{r['ms_per_step_iqr'][2]:.0f}" if r["ms_per_step_iqr"] else "-"
        riqr = f"{r['ratio_to_hinton_iqr'][0]:.2f}-{r['ratio_to_hinton_iqr'][1]:.2f}"
        ratio = r["ratio_to_hinton_median"]
        lines.append(
            f"{n:<22} {r['ms_per_step_median']:>9.1f} {iqr:>15} {ratio:>9.2f} {riqr:>13} {r['ratio_of_means']:>7.2f} "
            f"{r['s_per_cifar_epoch_est']:>9.1f} "
            f"{r['bank_params']:>12,} {info['student_params']:>9,} {r['bank_params'] / info['student_params']:>9.2f} {peak:>9} "
            f"{r['pairs_evaluated']:>6.2f}"
        )
    lines.append("* s/epoch: ms/step x 391 steps (50k images at batch 128); peak MiB: peak RSS growth during the steps (fresh subprocess); "
                 "pairs: share of the T x S bounds evaluated per step; mean x: ratio of mean step times (the cost per step of "
                 f"rows with a plan update every few steps: {', '.join(AMORTISED)}, updates inside the timed steps)")
    return "\n".join(lines)


def breakdown_table(pair: str, bd: dict) -> str:
    names = list(bd)
    lines = [f"-- {pair}: median ms per phase (instrumented pass)", f"{'phase':<14}" + "".join(f"{n:>17}" for n in names)]
    for p in PHASES + ["total"]:
        lines.append(f"{p:<14}" + "".join(f"{bd[n][p + '_ms']:>17.2f}" for n in names))
    for n in ("sinkhorn",):
        if n in bd:
            s = bd[n]
            lines.append(f"plan projection (fwd + implicit bwd) = {100 * s['plan_fraction_median']:.2f}% of the {n} step "
                         f"(max {100 * s['plan_fraction_max']:.2f}%; {s['sinkhorn_iterations_median']:.0f} warm-start iterations, median)")
    lines.append("(backward includes plan_bwd; other = step total minus the timed phases: losses, running-buffer snapshot, "
                 "finiteness checks, zero_grad, scheduler)")
    return "\n".join(lines)


def ablation_table(pair: str, bp: dict) -> str:
    lines = [f"-- {pair}: MI bank alone (fwd+bwd, real features of one batch), ablations; default = library defaults "
             f"(shared, pool {bp['bank_pool']}, width {bp['bank_width']}; half_width = {bp['half_width']})",
             f"{'variant':<26} {'fwd ms':>8} {'fwd+bwd ms':>11} {'x default':>10} {'params':>10}"]
    for n, a in bp["ablations"].items():
        lines.append(f"{n:<26} {a['fwd_ms']:>8.1f} {a['fwd_bwd_ms']:>11.1f} {a['ratio_to_default']:>10.2f} {a['bank_params']:>10,}")
    lines.append("top ops of the default bank (share of self CPU time):")
    for o in bp["profile_top_ops"][:8]:
        lines.append(f"   {100 * o['share']:5.1f}%  {o['op']:<28} {o['input_shapes']}")
    return "\n".join(lines)


def versions() -> dict:
    """The shared provenance (align_kd._env.versions) plus a hash of every module of the package, so
    timings can be matched to the exact source they measured."""
    import hashlib

    import align_kd

    src = Path(align_kd.__file__).resolve().parent
    # every module of the package, subpackages included (align_kd/graph/, align_kd/zoo/), keyed by relative path
    hashes = {f.relative_to(src).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()[:12]
              for f in sorted(src.glob("**/*.py"))}
    return {"align_kd_source_sha256_12": hashes, **package_versions()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (few steps, small scaling grid)")
    ap.add_argument("--pairs", default=None, help=f"comma-separated subset of {list(PAIRS)} (default all; quick: cnn)")
    ap.add_argument("--steps", type=int, default=None, help="timed rounds per pair (default 25; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; quick 1)")
    ap.add_argument("--mem-steps", type=int, default=None, help="steps per memory subprocess (default 4; quick 2)")
    ap.add_argument("--strategies", nargs="+", default=None, metavar="ROW",
                    help=f"time only these rows (hinton and sinkhorn, the reference and the target, always run); "
                         f"rows: {list(STRATEGIES) + list(EXTRA)}")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="fit(amp=True): bfloat16 autocast, every strategy")
    ap.add_argument("--channels-last", action="store_true", help="fit(channels_last=True), every strategy")
    ap.add_argument("--compile", action="store_true", help="fit(compile=True): torch.compile, every strategy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default: $ALIGN_KD_DATA or ../shared/data/cifar10-jpeg.tar.gz)")
    ap.add_argument("--out", default=str(RESULTS / "overhead.json"))
    ap.add_argument("--plot", default=None,
                    help="scaling plot (default: results/overhead_scaling.png with the default --out, else OUT_scaling.png beside --out)")
    ap.add_argument("--_memory", nargs=3, metavar=("PAIR", "STRATEGY", "BATCHES"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plot is None:  # a quick or side run with its own --out leaves the committed plot alone
        out = Path(args.out)
        args.plot = str(RESULTS / "overhead_scaling.png" if out.resolve() == (RESULTS / "overhead.json").resolve()
                        else out.with_name(out.stem + "_scaling.png"))
    torch.set_num_threads(args.threads)
    q = args.quick
    steps = args.steps or (3 if q else 25)
    warmup = args.warmup if args.warmup is not None else (1 if q else 3)
    mem_steps = args.mem_steps or (2 if q else 4)
    gpu_opts = {k: True for k in GPU_FLAGS if getattr(args, k)}  # only the options asked for
    if args.compile:  # one compiled tap/bank per Distiller and strategy: lift dynamo's per-function limit (8)
        import torch._dynamo as dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 256)

    if args._memory:
        pair, name, path = args._memory
        print(json.dumps(memory_child(pair, name, path, mem_steps, args.device, args.seed, gpu_opts)))
        return

    pairs = [p.strip() for p in (args.pairs or ("cnn" if q else ",".join(PAIRS))).split(",") if p.strip()]
    for p in pairs:
        if p not in PAIRS:
            raise SystemExit(f"unknown pair {p!r}; choose from {list(PAIRS)}")
    unknown = sorted(set(args.strategies or ()) - set(STRATEGIES) - set(EXTRA))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {list(STRATEGIES) + list(EXTRA)}")
    t_start = time.perf_counter()
    root = args.data or default_root()
    n_batches = 2 if q else 4
    batches = fixed_batches(root, n_batches, seed=args.seed)
    print(f"align_kd overhead benchmark: torch {torch.__version__}, threads={torch.get_num_threads()}, device={args.device}, "
          f"{n_batches} fixed CIFAR-10 batches of 128, {warmup} warm-up + {steps} timed rounds (round-robin)", flush=True)

    result = {
        "benchmark": "overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": q,
        "config": {
            "batch_size": 128, "fixed_batches": n_batches, "data": root, "augment": "once (fixed batches)",
            "warmup_rounds": warmup, "timed_rounds": steps, "memory_steps": mem_steps, "device": args.device,
            "seed": args.seed, "torch_threads": torch.get_num_threads(), "gpu_opts": gpu_opts,
            "env_threads": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
            "fit_defaults": {k: getattr(FitConfig(), k) for k in ("beta", "kd_weight", "feature_weight", "tau", "pool", "width",
                                                                  "bank_layout", "lr", "optimizer", "amp")},
            "strategies": {**{k: v for k, v in STRATEGIES.items()}, **EXTRA},
            "timing_method": "time.perf_counter around align_kd.training.train_step (the step fit() runs, on a Distiller built as "
                             "fit() builds it; its finiteness checks of the input and the loss sync; device synchronised "
                             "before and after), round-robin with rotating order; "
                             "ratio = median over rounds of t_strategy / t_hinton in the same round",
            "memory_method": "fresh subprocess per strategy; see pairs.*.memory.*.method",
            "teacher_weights": "random init (timing/memory do not depend on the weights); teacher in eval mode, frozen",
        },
        "versions": versions(),
        "pairs": {},
    }
    texts = []
    for pair in pairs:
        spec = PAIRS[pair]
        names = list(STRATEGIES) + [n for n in spec["extra"] if not (q and n == "sinkhorn-full")]
        if args.strategies:
            names = [n for n in names if n in {"hinton", "sinkhorn", *args.strategies}]
        print(f"\n[{pair}] timing {names} ...", flush=True)
        timing = time_pair(pair, names, batches, warmup=warmup, steps=steps, device=args.device, seed=args.seed, gpu_opts=gpu_opts)
        print(f"[{pair}] phase breakdown ...", flush=True)
        bd_names = ["hinton", "sinkhorn"]
        bd = breakdown_pair(pair, bd_names, batches, warmup=1, steps=max(3, steps // 2), device=args.device, seed=args.seed,
                            gpu_opts=gpu_opts)
        print(f"[{pair}] bank profile and ablations ...", flush=True)
        bp = bank_profile_and_ablations(pair, batches, reps=3 if q else 8, device=args.device, seed=args.seed)
        memory = {}
        if not args.no_memory:
            print(f"[{pair}] memory (fresh subprocess per strategy) ...", flush=True)
            memory = measure_memory(pair, names, batches, steps=mem_steps, device=args.device, seed=args.seed, gpu_opts=gpu_opts)
        rs = timing["rows"]["sinkhorn"]["ratio_to_hinton_median"]
        result["pairs"][pair] = {
            "teacher": spec["teacher"][0], "student": spec["student"][0], "target_ratio": spec["target"],
            **timing, "breakdown": bd, "bank_alone": bp, "memory": memory,
            "sinkhorn_ratio_to_hinton": rs, "target_met": rs <= spec["target"],
            "plan_fraction": bd["sinkhorn"]["plan_fraction_median"], "plan_fraction_target_met": bd["sinkhorn"]["plan_fraction_median"] < 0.01,
        }
        txt = "\n".join([table(pair, spec, timing, memory), breakdown_table(pair, bd), ablation_table(pair, bp),
                         f"=> sinkhorn/hinton = {rs:.2f}x (target {spec['target']}x: {'MET' if rs <= spec['target'] else 'MISSED'}); "
                         f"plan projection {100 * bd['sinkhorn']['plan_fraction_median']:.2f}% of the step "
                         f"(target < 1%: {'MET' if bd['sinkhorn']['plan_fraction_median'] < 0.01 else 'MISSED'})"])
        print(txt, flush=True)
        texts.append(txt)

    if not args.no_scaling:
        print("\n[scaling] MI bank forward+backward vs T x S ...", flush=True)
        if q:
            sc = scaling([2, 4], [2], batch=16, reps=2, full_reps=1, device=args.device)
        else:
            sc = scaling([5, 10, 15, 20], [5, 10], batch=128, reps=5, full_reps=2, device=args.device)
        result["scaling"] = sc
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot_scaling(sc, Path(args.plot))
        lines = [f"{'T=S':>4} {'T*S':>5} {'shared ms':>10} {'shared fwd':>11} {'band ms':>8} {'skip ms':>8} {'full ms':>9} "
                 f"{'plan ms':>8} {'shared params':>14}"]
        fulls = {p["T"]: p for p in sc["full"]}
        for s, k, p in zip(sc["shared"], sc["skip"], sc["plan"]):
            f = fulls.get(s["T"])
            full_ms = f"{f['fwd_bwd_ms']:.1f}" if f else "-"
            lines.append(f"{s['T']:>4} {s['pairs']:>5} {s['fwd_bwd_ms']:>10.1f} {s['fwd_ms']:>11.1f} {k['band_fwd_bwd_ms']:>8.1f} "
                         f"{k['fwd_bwd_ms']:>8.1f} {full_ms:>9} {p['fwd_bwd_ms']:>8.2f} {s['bank_params']:>14,}")

        def verdict(k):
            return "n/a" if k is None else f"{k:.2f} ({'sub-linear' if k < 1 else 'NOT sub-linear'})"

        lines.append(f"fitted exponents (time ~ (T*S)^k): shared, all pairs k = {verdict(sc['exponent_shared'])}; "
                     f"skip_pairs_below ({sc['skip_rule']}; band ms = the band alone, skip ms = amortised) "
                     f"k = {verdict(sc['exponent_skip'])}; full k = {verdict(sc['exponent_full'])}; "
                     f"plan k = {verdict(sc['exponent_plan'])}; plot: {args.plot}")
        lines.append("SinkhornPlan fwd+bwd, warm-started (newton_first: the library, newton_after=0; sweeps_first: newton_after=3):")
        for v in sc["plan_variants"]:
            lines.append(f"   {v['T']:>2}x{v['S']:<2} {v['variant']:<13} {v['fwd_bwd_ms']:6.2f} ms  {v['iterations_median']:4.0f} iterations  "
                         f"max row error {v['max_row_error']:.1e}")
        txt = "\n".join(["\n== scaling (synthetic features)"] + lines)
        print(txt, flush=True)
        texts.append(txt)

    result["wall_s"] = time.perf_counter() - t_start
    result["report"] = "\n".join(texts)
    write_json(result, args.out)


if __name__ == "__main__":
    main()
