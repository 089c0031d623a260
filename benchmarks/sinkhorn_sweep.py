"""What helps a learned plan: tau, row marginal, initialisation, KD weight, feature weight.

Runs ``strategy="sinkhorn"`` on one setting of the strategy benchmark with one option changed at a
time from the defaults (same teacher, budget and seeds as ``compare_strategies.py``), plus
``hinton`` as the reference, and prints mean +- std of the last-epoch test accuracy per variant.

    python benchmarks/sinkhorn_sweep.py --setting big-teacher --seeds 3
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, replace

import torch

from _common import write_json
from align_kd.experiment import SETTINGS, run_setting, versions

VARIANTS = {
    "hinton (reference)": ("hinton", {}),
    "sinkhorn (defaults: tau 0.1, depth init, kd 1, feature 1)": ("sinkhorn", {}),
    "tau 0.03": ("sinkhorn", {"tau": 0.03}),
    "tau 1.0": ("sinkhorn", {"tau": 1.0}),
    "zeros init": ("sinkhorn", {"plan_init": "zeros"}),
    "no KD term (kd_weight 0)": ("sinkhorn", {"kd_weight": 0.0}),
    "feature_weight 0.3": ("sinkhorn", {"feature_weight": 0.3}),
    "plan_lr 0.005 (slow plan)": ("sinkhorn", {"plan_lr": 0.005}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="big-teacher", choices=sorted(SETTINGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="CIFAR-10 location (default: $ALIGN_KD_DATA, then the cache)")
    ap.add_argument("--out", default="benchmarks/results/sinkhorn_sweep.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = SETTINGS[args.setting]
    seeds = list(range(args.seeds))
    rows, records = [], []
    for label, (strategy, opts) in VARIANTS.items():
        setting = replace(base, fit_options={**base.fit_options, **opts})
        start = time.perf_counter()
        recs, tinfo = run_setting(setting, [strategy], seeds, "runs/sweep/" + label.split(" (")[0].replace(" ", "_"),
                                  data_root=args.data, progress=False, log=lambda *a: None)
        accs = [r["test_acc"] for r in recs]
        rows.append({"variant": label, "strategy": strategy, "options": opts, "test_acc": statistics.mean(accs),
                     "test_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "accs": accs,
                     "wall_s": time.perf_counter() - start})
        records += [{**r, "variant": label} for r in recs]
        print(f"{label:<58} {rows[-1]['test_acc']:.4f} ± {rows[-1]['test_std']:.4f}  {accs}", flush=True)
    print(f"\nsetting {args.setting}: teacher {tinfo['test_acc']:.4f}; seeds {seeds}; last-epoch test accuracy")
    write_json({"setting": asdict(base), "seeds": seeds, "teacher_acc": tinfo["test_acc"], "versions": versions(),
                "variants": rows, "runs": records}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
