#!/usr/bin/env python
"""Run the data-parallel test worker (``tests/test_distributed.py``) again and again under torchrun.

A fresh-clone CI run once lost rank 1 to SIGABRT ("terminate called without an active exception")
right after the interrupted-then-resumed run of that worker (issue 14). This script runs the same
worker (2 Gloo processes, every case: sinkhorn with checkpoints, DataLoader with a NaN batch,
exact, Ctrl-C then resume, presharded, unequal shards) ``--runs`` times with
``TORCH_DISTRIBUTED_DEBUG`` set (default INFO), checks every run's outputs as the test does (both
ranks identical, resumed == uninterrupted), stops at the first failure and keeps its log.

``TORCH_DISTRIBUTED_DEBUG=DETAIL`` cannot be used with DistributedDataParallel in torch 2.14.1 on
Gloo/CPU here: both ranks die with SIGSEGV inside DDP's constructor
(``Logger.set_construction_data_and_log``) even for a plain ``nn.Sequential`` with no align_kd code
(``python benchmarks/ddp_stress.py --reproduce-detail-segfault`` shows it); INFO works.

    python benchmarks/ddp_stress.py --runs 30       # writes benchmarks/results/ddp_stress.json
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from align_kd._env import versions  # noqa: E402
from _common import write_json  # noqa: E402
from test_distributed import WORKER, load, same  # noqa: E402  (the test's own worker and oracle)


MINIMAL_DDP = """
import torch, torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
dist.init_process_group("gloo")
model = DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
model(torch.randn(8, 4)).sum().backward()
print("rank", dist.get_rank(), "ok", flush=True)
dist.destroy_process_group()
"""


def _env(level: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCH_DISTRIBUTED_DEBUG": level,
           "PYTHONWARNINGS": "ignore::DeprecationWarning",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # this checkout's align_kd
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]


def reproduce_detail_segfault() -> dict:
    """The minimal DDP script under each debug level: exit code and whether both ranks finished."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "minimal_ddp.py"
        script.write_text(MINIMAL_DDP)
        for level in ("OFF", "INFO", "DETAIL"):
            proc = subprocess.run([*TORCHRUN, str(script)], env=_env(level), capture_output=True, text=True, timeout=300)
            log = proc.stdout + proc.stderr
            out[level] = {"exit_code": proc.returncode, "ranks_ok": log.count(" ok"), "sigsegv": "SIGSEGV" in log}
            print(f"TORCH_DISTRIBUTED_DEBUG={level:<6} exit {proc.returncode}  ranks ok {log.count(' ok')}  "
                  f"SIGSEGV {'yes' if 'SIGSEGV' in log else 'no'}", flush=True)
    return out


def one_run(k: int, keep: Path, level: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        (out / "worker.py").write_text(WORKER)
        start = time.perf_counter()
        proc = subprocess.run([*TORCHRUN, str(out / "worker.py"), str(out)], env=_env(level), capture_output=True,
                              text=True, timeout=600)
        wall = time.perf_counter() - start
        log = proc.stdout + proc.stderr
        problem = None if proc.returncode == 0 else f"exit code {proc.returncode}"
        if problem is None:
            try:
                for name in ("tensor", "dataloader", "exact", "resumed", "presharded"):
                    same(load(out, name, 0), load(out, name, 1))
                same(load(out, "resumed", 0), load(out, "tensor", 0))
            except AssertionError as err:
                problem = f"outputs differ: {err!r}"
        aborts = log.count("terminate called") + log.count("SIGABRT")
        if problem is not None or aborts:
            (keep / f"ddp_stress-run{k}.log").write_text(log)
        return {"run": k, "ok": problem is None and not aborts, "problem": problem, "aborts_in_log": aborts,
                "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--debug-level", default="INFO", choices=["OFF", "INFO", "DETAIL"],
                    help="TORCH_DISTRIBUTED_DEBUG for the worker (DETAIL segfaults in DDP's constructor, see above)")
    ap.add_argument("--reproduce-detail-segfault", action="store_true",
                    help="first run a minimal DDP script (no align_kd) under OFF, INFO and DETAIL")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ddp_stress.json"))
    args = ap.parse_args()
    minimal = reproduce_detail_segfault() if args.reproduce_detail_segfault else None
    keep = Path(args.out).parent
    keep.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'run':>4} {'ok':>4} {'wall s':>7}  problem")
    for k in range(1, args.runs + 1):
        row = one_run(k, keep, args.debug_level)
        rows.append(row)
        print(f"{k:>4} {'yes' if row['ok'] else 'NO':>4} {row['wall_s']:>7.1f}  {row['problem'] or ''}", flush=True)
        if not row["ok"]:
            break
    passed = 0
    for row in rows:
        if not row["ok"]:
            break
        passed += 1
    print(f"=> {passed} consecutive passes of {args.runs} asked")
    write_json({"benchmark": "ddp_stress", "runs_asked": args.runs, "consecutive_passes": passed, "rows": rows,
                          "minimal_ddp_by_debug_level": minimal,
                          "config": {"world_size": 2, "backend": "gloo", "TORCH_DISTRIBUTED_DEBUG": args.debug_level,
                                     "threads_per_rank": 1, "worker": "tests/test_distributed.py::WORKER"},
                          "versions": versions()}, args.out)


if __name__ == "__main__":
    main()
