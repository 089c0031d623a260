"""Does the MI bank's default pool 2 (was 4) cost accuracy? sinkhorn with pool 2 and pool 4 on every
setting of the strategy benchmark, same teachers, budget and seeds, paired by seed.

    python benchmarks/pool_check.py            # 4 settings x 2 pools x 3 seeds, about 12 minutes, 2 threads
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

import torch

from _common import mean_std, write_json
from align_kd.experiment import SETTINGS, run_setting, versions

POOLS = (2, 4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", nargs="+", default=["seed-size", "big-teacher", "resnet-mlp", "cnn-vit"], choices=sorted(SETTINGS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None, help="CIFAR-10 location (default: $ALIGN_KD_DATA, then the cache)")
    ap.add_argument("--out", default="benchmarks/results/pool_check.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    rows, records = [], []
    print(f"{'setting':<12} {'pool 2':>15} {'pool 4':>15} {'pool 2 - pool 4 (paired)':>26}")
    for name in args.settings:
        acc = {}
        for pool in POOLS:
            setting = replace(SETTINGS[name], fit_options={**SETTINGS[name].fit_options, "pool": pool})
            start = time.perf_counter()
            recs, tinfo = run_setting(setting, ["sinkhorn"], seeds, f"runs/pool_check/pool{pool}", data_root=args.data,
                                      progress=False, log=lambda *a: None)
            acc[pool] = [r["test_acc"] for r in recs]
            records += [{**{k: v for k, v in r.items() if k != "plan"}, "pool": pool, "wall_s_all_seeds": time.perf_counter() - start}
                        for r in recs]
        diffs = [a - b for a, b in zip(acc[2], acc[4])]
        (m2, s2), (m4, s4), (dm, ds) = mean_std(acc[2]), mean_std(acc[4]), mean_std(diffs)
        rows.append({"setting": name, "teacher_acc": tinfo["test_acc"], "pool2": acc[2], "pool4": acc[4],
                     "pool2_mean": m2, "pool2_std": s2, "pool4_mean": m4, "pool4_std": s4, "diff_per_seed": diffs,
                     "diff_mean": dm, "diff_std": ds})
        print(f"{name:<12} {100 * m2:>8.2f} ± {100 * s2:.2f} {100 * m4:>8.2f} ± {100 * s4:.2f} "
              f"{100 * dm:>+12.2f} ± {100 * ds:.2f} points {[round(100 * d, 2) for d in diffs]}", flush=True)
    write_json({"benchmark": "pool_check", "strategy": "sinkhorn", "pools": POOLS, "seeds": seeds,
                "settings": {n: asdict(SETTINGS[n]) for n in args.settings}, "versions": versions(),
                "rows": rows, "runs": records}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
