#!/usr/bin/env python
"""Accuracy must not pay for speed: the "shared" MI bank against the "full" reference bank on CIFAR-10.

Setup (issue 7): teacher SmallCNN(width=32) from ``load_or_train_teacher("cnn", {"width": 32}, ...,
epochs=4)`` (cached under the align_kd cache directory, trained on the same training subset),
student SmallCNN(width=8), ``fit(strategy="sinkhorn")`` with ``bank_layout="shared"`` (pool 2,
width chosen by the library: the default) and with ``bank_layout="full"`` (the reference VID regressor per pair at
full resolution), same budget, same seeds. Every other fit option is the default. For context,
"hinton" (logit KD only) and "alone" (beta=1, kd_weight=0: the student on its own) run on the same
budget and seeds.

Budget (default): the first 8192 CIFAR-10 training images (fixed pseudo-random subset holding
every class), augmentation on, batch 128, 3 epochs (192 steps), test accuracy on the first 2000
test images, seeds 0, 1, 2 (student init, data order, bank init); about 7 minutes on one thread
of an unloaded machine, most of it in the full-bank runs.

Reported: final-epoch test accuracy mean +- std (sample std over seeds) per layout, best-epoch
accuracy, the paired per-seed difference shared - full, wall time per run and per step.
Written to ``results/bank_accuracy.json``.

Usage:
    python benchmarks/bank_accuracy.py            # ~7-10 minutes on one core
    python benchmarks/bank_accuracy.py --quick    # smoke run
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from align_kd import fit  # noqa: E402
from align_kd._env import versions  # noqa: E402
from align_kd.data import cifar10_loaders  # noqa: E402
from _common import default_root, mean_std, write_json  # noqa: E402
from align_kd.models import SmallCNN, load_or_train_teacher  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

RUNS = {
    "shared": dict(strategy="sinkhorn", bank_layout="shared"),
    "full": dict(strategy="sinkhorn", bank_layout="full"),
    "skip": dict(strategy="sinkhorn", bank_layout="shared", skip_pairs_below=0.05),
    "pool4": dict(strategy="sinkhorn", bank_layout="shared", pool=4),  # the default before 2026-11-29
    "hinton": dict(strategy="hinton"),
    "alone": dict(strategy="hinton", beta=1.0, kd_weight=0.0),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 512 images, 1 epoch, 1 seed")
    ap.add_argument("--limit", type=int, default=None, help="training images (default 8192; quick 512)")
    ap.add_argument("--test-limit", type=int, default=None, help="test images (default 2000; quick 256)")
    ap.add_argument("--epochs", type=int, default=None, help="distillation epochs (default 3; quick 1)")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; quick 0)")
    ap.add_argument("--runs", default="shared,full,hinton,alone", help=f"subset of {list(RUNS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default=None, help="CIFAR-10 source (default: $ALIGN_KD_DATA or ../shared/data/cifar10-jpeg.tar.gz)")
    ap.add_argument("--cache-dir", default=None, help="align_kd cache (teachers); default $ALIGN_KD_CACHE or ~/.cache/align_kd")
    ap.add_argument("--out", default=str(RESULTS / "bank_accuracy.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    limit = args.limit or (512 if q else 8192)
    test_limit = args.test_limit or (256 if q else 2000)
    epochs = args.epochs or (1 if q else 3)
    seeds = [int(s) for s in (args.seeds or ("0" if q else "0,1,2")).split(",")]
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    for r in runs:
        if r not in RUNS:
            raise SystemExit(f"unknown run {r!r}; choose from {list(RUNS)}")
    root = args.data or default_root()
    t_start = time.perf_counter()

    train0, test = cifar10_loaders(root, batch_size=128, limit=limit, test_limit=test_limit, augment=True, seed=0,
                                   cache_dir=args.cache_dir)
    t0 = time.perf_counter()
    teacher, tinfo = load_or_train_teacher("cnn", {"width": 32}, train0, test, epochs=args.teacher_epochs, seed=0,
                                           cache_dir=args.cache_dir, progress=False, device="cpu")
    teacher_s = time.perf_counter() - t0
    print(f"bank accuracy: torch {torch.__version__}, threads={torch.get_num_threads()}; CIFAR-10 train limit {limit}, "
          f"test limit {test_limit}, batch 128, {epochs} epoch(s) ({epochs * len(train0)} steps), seeds {seeds}")
    print(f"teacher SmallCNN(32): test acc {tinfo['test_acc']:.4f} ({'cached' if tinfo['cached'] else 'trained'}, "
          f"{teacher_s:.1f} s, key {tinfo['key']})", flush=True)

    records = []
    # seed-major order, layouts interleaved, so that machine load hits every layout alike
    for seed in seeds:
        for name in runs:
            train, _ = cifar10_loaders(root, batch_size=128, limit=limit, test_limit=test_limit, augment=True, seed=seed,
                                       cache_dir=args.cache_dir)
            torch.manual_seed(seed)
            student = SmallCNN(8)
            t0 = time.perf_counter()
            res = fit(teacher, student, (train, test), epochs=epochs, seed=seed, device="cpu", progress=False, **RUNS[name])
            wall = time.perf_counter() - t0
            steps = res.history[-1]["step"]
            train_s = sum(h["wall_s"] for h in res.history)
            rec = {
                "run": name, "seed": seed, "test_acc": res.test_acc, "best_acc": res.best_acc,
                "test_acc_per_epoch": [h["test_acc"] for h in res.history],
                "wall_s": wall, "train_s": train_s, "ms_per_step": 1e3 * train_s / steps, "steps": steps,
                "plan": res.plan.tolist(), "mi": None if res.mi is None else res.mi.tolist(),
                "skipped_steps": sum(h["skipped_steps"] for h in res.history),
                "pairs_evaluated": statistics.fmean(h["pairs_evaluated"] for h in res.history),
                "teacher_layers": res.teacher_layers, "teacher_shapes": res.teacher_shapes,
                "student_layers": res.student_layers, "student_shapes": res.student_shapes,
            }
            records.append(rec)
            print(f"  {name:<7} seed {seed}: test acc {rec['test_acc']:.4f} (best {rec['best_acc']:.4f}), "
                  f"{wall:.1f} s wall, {rec['ms_per_step']:.0f} ms/step", flush=True)

    # the shared bank's width as the library chooses it by default (width=None) for these taps
    from align_kd.mi import MIBank

    ref = next((r for r in records if r["run"] in ("shared", "full")), None)
    bank_width = MIBank(ref["teacher_shapes"], ref["student_shapes"]).width if ref else None

    summary = {}
    for name in runs:
        rs = [r for r in records if r["run"] == name]
        m, s = mean_std(r["test_acc"] for r in rs)
        bm, bs = mean_std(r["best_acc"] for r in rs)
        wm, ws = mean_std(r["wall_s"] for r in rs)
        summary[name] = {"test_acc_mean": m, "test_acc_std": s, "best_acc_mean": bm, "best_acc_std": bs,
                         "wall_s_mean": wm, "wall_s_std": ws, "ms_per_step_mean": statistics.fmean(r["ms_per_step"] for r in rs),
                         "pairs_evaluated": statistics.fmean(r["pairs_evaluated"] for r in rs), "n": len(rs)}
    verdict = None
    if "shared" in summary and "full" in summary:
        by = {(r["run"], r["seed"]): r["test_acc"] for r in records}
        diffs = [by[("shared", s)] - by[("full", s)] for s in seeds]
        dm, ds = mean_std(diffs)
        se = ds / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        # "no accuracy cost": shared is not worse than full by more than max(1 point, 2 standard errors)
        margin = max(0.01, 2 * se) if not math.isnan(se) else 0.01
        verdict = {
            "paired_diff_shared_minus_full": diffs, "diff_mean": dm, "diff_std": ds, "diff_se": se,
            "margin": margin, "shared_not_worse": dm >= -margin,
            "speedup_full_over_shared": summary["full"]["ms_per_step_mean"] / summary["shared"]["ms_per_step_mean"],
            "rule": "shared_not_worse = mean(shared - full) >= -max(0.01, 2 * SE of the paired differences)",
        }

    if "shared" in summary and "skip" in summary:  # skipping small-lambda pairs against evaluating them all
        by = {(r["run"], r["seed"]): r for r in records}
        diffs = [by[("skip", s)]["test_acc"] - by[("shared", s)]["test_acc"] for s in seeds]
        dm, ds = mean_std(diffs)
        summary["skip"]["paired_diff_skip_minus_shared"] = {"per_seed": diffs, "mean": dm, "std": ds}
        summary["skip"]["step_time_ratio_to_shared"] = statistics.fmean(
            by[("skip", s)]["ms_per_step"] / by[("shared", s)]["ms_per_step"] for s in seeds)

    lines = [f"\n{'run':<8} {'test acc (mean +- std)':>24} {'best acc':>18} {'wall s/run':>12} {'ms/step':>9} {'pairs':>6}  n"]
    for name, s in summary.items():
        lines.append(f"{name:<8} {100 * s['test_acc_mean']:>15.2f} +- {100 * s['test_acc_std']:<5.2f} "
                     f"{100 * s['best_acc_mean']:>10.2f} +- {100 * s['best_acc_std']:<5.2f} "
                     f"{s['wall_s_mean']:>12.1f} {s['ms_per_step_mean']:>9.0f} {s['pairs_evaluated']:>6.2f}  {s['n']}")
    if "paired_diff_skip_minus_shared" in summary.get("skip", {}):
        d = summary["skip"]["paired_diff_skip_minus_shared"]
        lines.append(f"skip - shared (paired by seed): {100 * d['mean']:+.2f} +- {100 * d['std']:.2f} points "
                     f"(per seed {[round(100 * v, 2) for v in d['per_seed']]}); step time skip / shared "
                     f"{summary['skip']['step_time_ratio_to_shared']:.2f}")
    if verdict:
        lines.append(f"shared - full (paired by seed): {100 * verdict['diff_mean']:+.2f} +- {100 * verdict['diff_std']:.2f} points "
                     f"(per seed {[round(100 * d, 2) for d in verdict['paired_diff_shared_minus_full']]}); "
                     f"full bank is {verdict['speedup_full_over_shared']:.1f}x slower per step; "
                     f"shared not worse (margin {100 * verdict['margin']:.1f} points): {verdict['shared_not_worse']}")
    text = "\n".join(lines)
    print(text)

    out = {
        "benchmark": "bank_accuracy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": q,
        "config": {
            "data": root, "train_limit": limit, "test_limit": test_limit, "batch_size": 128, "augment": True,
            "epochs": epochs, "steps_per_run": epochs * len(train0), "seeds": seeds, "torch_threads": torch.get_num_threads(),
            "teacher": {"model": "SmallCNN(width=32)", "epochs": args.teacher_epochs, "train_data": train0.data_tag,
                        "test_acc": tinfo["test_acc"], "cached": tinfo["cached"], "key": tinfo["key"], "path": tinfo["path"]},
            "student": "SmallCNN(width=8)", "shared_bank_width": bank_width,
            "runs": RUNS, "fit_options": "library defaults except those in runs (lr 0.05 SGD nesterov, beta 0.5, tau 0.1, pool 2, width None = auto)",
            "seed_meaning": "torch.manual_seed(seed) before the student is built, fit(seed=seed), loader seed (order, augmentation)",
        },
        "versions": versions(),
        "records": records,
        "summary": summary,
        "verdict": verdict,
        "report": text,
        "wall_s": time.perf_counter() - t_start,
    }
    write_json(out, args.out)


if __name__ == "__main__":
    main()
