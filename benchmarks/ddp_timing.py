#!/usr/bin/env python
"""Wall time of one fit() epoch on 1 vs N CPU processes (torchrun, Gloo), same data budget.

Setting: CIFAR-10 ``cifar10_loaders(limit=2048, test_limit=1024, batch_size=128)``, teacher
``cnn`` width 16 (random weights: timing does not depend on them), student ``cnn`` width 8,
strategy sinkhorn, 1 epoch, each process with OMP/MKL threads = 1. Every configuration runs
``--repeats`` times (each a fresh ``torchrun``); inside a run, a warm-up fit on 256 images comes
first and is kept out of the timing. Reported: fit() wall time on rank 0 (training + evaluation,
process start-up and imports excluded), its median over repeats, and the speed-up over 1 process.
With N processes each sees 2048 / N images per epoch (the global batch stays 128 x N: data
parallel semantics; per-rank batch 128).

Usage:
    python benchmarks/ddp_timing.py [--procs 1 2] [--repeats 3] [--out benchmarks/results/ddp_timing.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from _common import write_json
from align_kd._env import versions

WORKER = textwrap.dedent('''
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    import align_kd
    from align_kd.data import cifar10_loaders
    from align_kd.models import build_model

    data = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None
    train, test = cifar10_loaders(data, limit=2048, test_limit=1024, batch_size=128, seed=0)
    warm_train, warm_test = cifar10_loaders(data, limit=256, test_limit=128, batch_size=128, seed=0)

    def run(train, test):
        torch.manual_seed(0)
        teacher = build_model("cnn", width=16)
        student = build_model("cnn", width=8)
        start = time.perf_counter()
        res = align_kd.fit(teacher, student, (train, test), strategy="sinkhorn", epochs=1, device="cpu", progress=False)
        return time.perf_counter() - start, res

    run(warm_train, warm_test)  # warm-up: allocator, one-time initialisation; not timed
    wall, res = run(train, test)
    if int(os.environ.get("RANK", "0")) == 0:
        json.dump({"fit_s": wall, "train_s": res.history[-1]["wall_s"], "test_acc": res.test_acc,
                   "steps": res.history[-1]["step"]}, open(sys.argv[1], "w"))
''')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=None, help="CIFAR-10 location (default: $ALIGN_KD_DATA, then the cache)")
    p.add_argument("--out", default="benchmarks/results/ddp_timing.json")
    args = p.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        for rep in range(args.repeats):
            for n in args.procs:  # alternate configurations so that background load hits them alike
                result = Path(tmp) / f"r{n}-{rep}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                       f"--nproc_per_node={n}", str(script), str(result), args.data or ""]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    return proc.returncode
                rows.append({"procs": n, "repeat": rep, **json.loads(result.read_text())})
                print(f"procs {n} repeat {rep}: fit {rows[-1]['fit_s']:.2f} s", flush=True)

    summary = []
    base = None
    for n in args.procs:
        fits = [r["fit_s"] for r in rows if r["procs"] == n]
        med = statistics.median(fits)
        base = med if n == args.procs[0] else base
        summary.append({"procs": n, "median_fit_s": med, "min_fit_s": min(fits), "max_fit_s": max(fits),
                        "steps_per_rank": rows[[r["procs"] for r in rows].index(n)]["steps"],
                        "speedup": base / med})
    print("\n| processes | steps/rank | fit() wall s (median [min, max]) | speed-up |")
    print("|---|---|---|---|")
    for s in summary:
        print(f"| {s['procs']} | {s['steps_per_rank']} | {s['median_fit_s']:.2f} [{s['min_fit_s']:.2f}, {s['max_fit_s']:.2f}] "
              f"| {s['speedup']:.2f}x |")

    payload = {
        "config": {"limit": 2048, "test_limit": 1024, "batch_size": 128, "teacher": "cnn(width=16)",
                   "student": "cnn(width=8)", "strategy": "sinkhorn", "epochs": 1, "threads_per_proc": 1,
                   "backend": "gloo", "repeats": args.repeats},
        "versions": versions(),
        "machine": {"cpus": os.cpu_count()}, "runs": rows, "summary": summary,
    }
    write_json(payload, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
