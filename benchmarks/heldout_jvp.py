#!/usr/bin/env python
"""The held-out rule's J v: exact (double backward) against central differences, on a real pair.

`plan_objective="heldout"` needs every inner product <grad I(t_i; s_j), v> (v: the held-out
cross-entropy's gradient after the step; rows teacher layers, columns student layers) as one
Jacobian-vector product J v of theta -> MI matrix. `heldout_jvp="exact"` (the default) computes it
by the transpose trick, a forward and two backwards; `"finite_difference"` by two MI forwards at
theta +- h v / ||v|| (DistPro's form, no backward; float32 even under bf16 autocast). This script
asks, on a `real` setting's teacher and student (the shipped teacher, full batches of the
training set), how close the second is to the first at several h and what each costs:

- the student is trained `--warmup-steps` steps (the setting's options and step size, the
  `sinkhorn-heldout` row's plan held at its init), then at `--states` training states, each the
  step after the previous one plus `--spacing` steps, every variant is computed from the same
  state: restore, capture, the same training step, the hypergradient. The reference is the exact
  form in float32 (`exact-fp32`); `exact` is the form the setting runs (bf16 autocast where the
  setting uses it);
- per variant: relative error ||H - H_ref|| / ||H_ref||, Spearman and sign agreement with the
  reference, the share of student layers whose best teacher layer (lowest entry) agrees, and the
  hypergradient call's wall time (medians over states; variants interleaved, so load from
  other processes hits them alike).

    python benchmarks/heldout_jvp.py [--setting real-cnn] [--steps-h 0.001 0.01 0.1] [--states 6]

Output: `results/heldout_jvp.json` (configuration, versions, every state's numbers).
"""
import argparse
import copy
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import default_root, write_json
from horizon_check import compare, restore

from align_kd import Distiller, zoo
from align_kd.data import cifar10_loaders, split_heldout
from align_kd.distributed import DistContext
from align_kd.experiment import PLAN_VARIANTS, REAL_SETTINGS, versions
from align_kd.models import build_model
from align_kd.training import make_optimizer, make_scheduler, train_step

ROOT = Path(__file__).resolve().parent


def variants(cfg, steps_h) -> dict:
    """name -> the Distiller's config while it computes that variant's hypergradient."""
    out = {"exact-fp32": replace(cfg, heldout_jvp="exact", amp=False), "exact": replace(cfg, heldout_jvp="exact")}
    for h in steps_h:
        out[f"fd h={h:g}"] = replace(cfg, heldout_jvp="finite_difference", heldout_fd_step=h)
    return out


def hypergradient_at(distiller, optimizer, scheduler, snapshot, batch, held, cfg) -> tuple[torch.Tensor, float]:
    """From ``snapshot``: capture, the training step on ``batch``, then the hypergradient under ``cfg``
    ((T, S), and the call's seconds)."""
    restore(distiller, optimizer, snapshot)
    train_cfg = distiller.cfg
    distiller.capture_step_start()
    out = train_step(distiller, distiller, optimizer, scheduler, *batch, kd_scale=1.0, grad_clip=None, dist=DistContext())
    if isinstance(out, str):
        raise RuntimeError(f"the training step was skipped ({out})")
    distiller.cfg = cfg
    try:
        start = time.perf_counter()
        h = distiller.heldout_hypergradient(batch, held)
        return h, time.perf_counter() - start
    finally:
        distiller.cfg = train_cfg


def best_teacher_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of student layers (columns) whose lowest entry is on the same teacher layer in both."""
    return float((a.argmin(0) == b.argmin(0)).double().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="real-cnn", choices=sorted(REAL_SETTINGS))
    ap.add_argument("--steps-h", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1], help="finite-difference steps h")
    ap.add_argument("--warmup-steps", type=int, default=200, help="training steps before the first state")
    ap.add_argument("--states", type=int, default=6, help="training states compared")
    ap.add_argument("--spacing", type=int, default=20, help="training steps between states")
    ap.add_argument("--train-limit", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "results" / "heldout_jvp.json"))
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    if min(args.steps_h) <= 0 or args.warmup_steps < 0 or args.states < 1 or args.spacing < 0:
        ap.error(f"expected h > 0, warmup-steps >= 0, states >= 1, spacing >= 0; got {args.steps_h}, "
                 f"{args.warmup_steps}, {args.states}, {args.spacing}")
    torch.set_num_threads(args.threads)
    setting = REAL_SETTINGS[args.setting]
    strategy, row_options = PLAN_VARIANTS["sinkhorn-heldout"]
    options = {**setting.fit_options, **row_options}
    train, _ = cifar10_loaders(args.data or default_root(), batch_size=setting.batch_size, limit=args.train_limit,
                               augment=setting.augment, seed=args.seed)
    train, held_batches = split_heldout(train, 0.1, seed=args.seed)
    teacher, _ = zoo.load_teacher(setting.teacher_zoo)
    torch.manual_seed(args.seed)
    student = build_model(setting.student, **setting.student_kwargs)
    distiller = Distiller(teacher, student, next(iter(train))[0], strategy=strategy, **options)
    distiller.cfg = replace(distiller.cfg, lr=setting.lr)
    optimizer = make_optimizer(distiller, distiller.cfg)
    scheduler = make_scheduler(optimizer, replace(distiller.cfg, epochs=setting.epochs), len(train))
    distiller.train()

    batches = iter(_cycle(train))
    for _ in range(args.warmup_steps):  # the plan held at its init (no update_plan): the frozen control's path
        train_step(distiller, distiller, optimizer, scheduler, *next(batches), kd_scale=1.0, grad_clip=None, dist=DistContext())
    held = next(iter(held_batches))
    named = variants(distiller.cfg, args.steps_h)
    states = []
    for k in range(args.states):
        for _ in range(args.spacing if k else 0):
            train_step(distiller, distiller, optimizer, scheduler, *next(batches), kd_scale=1.0, grad_clip=None, dist=DistContext())
        batch = next(batches)
        snapshot = {"distiller": copy.deepcopy(distiller.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}
        sched_state = copy.deepcopy(scheduler.state_dict())
        order = list(named)[k % len(named):] + list(named)[: k % len(named)]  # rotated: no variant always first
        H, seconds = {}, {}
        for name in order:
            scheduler.load_state_dict(copy.deepcopy(sched_state))
            H[name], seconds[name] = hypergradient_at(distiller, optimizer, scheduler, snapshot, batch, held, named[name])
        # the state goes on from the reference's step (the same step every variant took)
        restore(distiller, optimizer, snapshot)
        scheduler.load_state_dict(sched_state)
        train_step(distiller, distiller, optimizer, scheduler, *batch, kd_scale=1.0, grad_clip=None, dist=DistContext())
        ref = H["exact-fp32"]
        row = {"state": k, "ref_norm": float(ref.norm()), "variants": {}}
        for name in named:
            row["variants"][name] = {"relative_error": float((H[name] - ref).norm() / ref.norm()),
                                     **compare(H[name], ref), "best_teacher_agreement": best_teacher_agreement(H[name], ref),
                                     "seconds": seconds[name]}
        states.append(row)
        print(f"state {k}: " + ", ".join(f"{n} err {v['relative_error']:.2e} ({v['seconds'] * 1e3:.0f} ms)"
                                         for n, v in row["variants"].items()), file=sys.stderr)

    summary = {}
    base = [s["variants"]["exact"]["seconds"] for s in states]
    for name in named:
        vs = [s["variants"][name] for s in states]
        summary[name] = {key: statistics.median(v[key] for v in vs)
                         for key in ("relative_error", "spearman", "sign_agreement", "best_teacher_agreement", "seconds")}
        summary[name]["max_relative_error"] = max(v["relative_error"] for v in vs)
        summary[name]["time_vs_exact"] = statistics.median(v["seconds"] / b for v, b in zip(vs, base))
    print(f"\n{setting.name}: T x S = {tuple(ref.shape)}, {args.states} states after {args.warmup_steps} steps "
          f"(every {args.spacing}); reference exact-fp32\n")
    print("| variant | rel. error (median / max) | Spearman | sign agreement | best teacher per column | ms | time / exact |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['relative_error']:.1e} / {s['max_relative_error']:.1e} | {s['spearman']:.4f} | "
              f"{s['sign_agreement']:.3f} | {s['best_teacher_agreement']:.2f} | {s['seconds'] * 1e3:.0f} | "
              f"{s['time_vs_exact']:.2f} |")
    config = {"setting": setting.name, "row": "sinkhorn-heldout", "fit_options": options, "lr": setting.lr,
              "batch_size": setting.batch_size, "steps_h": args.steps_h, "warmup_steps": args.warmup_steps,
              "states": args.states, "spacing": args.spacing, "train_limit": args.train_limit, "seed": args.seed,
              "threads": args.threads}
    write_json({"config": config, "versions": versions(), "summary": summary, "states": states}, args.out)
    return 0


def _cycle(loader):
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader
        epoch += 1


if __name__ == "__main__":
    sys.exit(main())
