#!/usr/bin/env python
"""What a training step of the `real` protocol's ViT setting (iii) costs, by patch size and memory format.

Setting (iii) distils the shipped `fastcnn` teacher into a small ViT (``tiny_vit``: dim 64, MLP 128,
4 layers). At 4x4 patches (64 tokens) a run of 16 epochs took 2493 s (`alone`) and 3092 s (`hinton`)
here, so its 27-run table would take about 21 hours. This script times the step ``fit()`` runs
(``overhead.py``'s harness: the Distiller built as ``fit()`` builds it, ``train_step``, strategies
round-robin on fixed real CIFAR-10 batches, warm-up rounds left out) for each ViT patch size with
and without channels_last (which converts the CNN teacher's convolutions; the ViT has one, its patch
embedding), in float32 as the setting runs, and prints ms per step, the ratio to the first
configuration and the estimated seconds per 16-epoch run at batch 256.

    python benchmarks/vit_sizing.py [--patches 4 8] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402
from _common import default_root, write_json  # noqa: E402

from align_kd.experiment import REAL_SETTINGS  # noqa: E402
from align_kd.models import build_model  # noqa: E402
from align_kd.zoo import load_teacher  # noqa: E402

SETTING = REAL_SETTINGS["real-vit"]  # its teacher, student (other than the patch size), batch and budget
VIT = {k: v for k, v in SETTING.student_kwargs.items() if k != "patch_size"}
STEPS_PER_RUN = SETTING.epochs * math.ceil(50_000 / SETTING.batch_size)  # all 50,000 training images


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--strategies", nargs="+", default=["alone", "hinton", "sinkhorn"])
    ap.add_argument("--steps", type=int, default=5, help="timed rounds per configuration (after 2 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=default_root())
    ap.add_argument("--out", default=str(overhead.RESULTS / "vit_sizing.json"))
    args = ap.parse_args(argv)
    if args.data is None:
        ap.error("no CIFAR-10 archive found: pass --data PATH (the shared cifar10-jpeg.tar.gz) or set ALIGN_KD_DATA")
    torch.set_num_threads(args.threads)
    batches = overhead.fixed_batches(args.data, 4, batch_size=SETTING.batch_size)
    rows = []
    for patch in args.patches:
        pair = f"fastcnn-vit{patch}"
        overhead.PAIRS[pair] = dict(teacher=(f"zoo {SETTING.teacher_zoo}", lambda: load_teacher(SETTING.teacher_zoo)[0]),
                                    student=(f"{SETTING.student}(patch_size={patch}, {VIT})",
                                             lambda p=patch: build_model(SETTING.student, patch_size=p, **VIT)),
                                    target=None, extra=[])
        for channels_last in (False, True):
            timing = overhead.time_pair(pair, args.strategies, batches, warmup=2, steps=args.steps, device="cpu", seed=0,
                                        gpu_opts={"channels_last": channels_last})
            rows.append({"patch_size": patch, "channels_last": channels_last,
                         "tokens": (32 // patch) ** 2 + 1, "student_shapes": timing["info"]["student_shapes"],
                         "ms_per_step": {n: r["ms_per_step_mean"] for n, r in timing["rows"].items()},
                         "samples_ms": {n: r["samples_ms"] for n, r in timing["rows"].items()}})
    base = rows[0]["ms_per_step"]
    print(f"{'patch':>5} {'channels_last':>13} " + " ".join(f"{n:>22}" for n in args.strategies))
    for r in rows:
        cells = [f"{r['ms_per_step'][n]:6.0f} ms {base[n] / r['ms_per_step'][n]:4.2f}x {r['ms_per_step'][n] * STEPS_PER_RUN / 1e3:5.0f} s"
                 for n in args.strategies]
        print(f"{r['patch_size']:>5} {str(r['channels_last']):>13} " + " ".join(f"{c:>22}" for c in cells))
    print(f"(ms per step; speed-up against the first row; estimated s per run of {STEPS_PER_RUN} steps, evaluation not included)")
    payload = {"config": {"setting": SETTING.name, "batch_size": SETTING.batch_size, "threads": args.threads, "steps": args.steps, "warmup": 2,
                          "strategies": args.strategies, "vit": VIT, "float32": True, "seed": 0,
                          "steps_per_run": STEPS_PER_RUN},
               "rows": rows, "versions": overhead.versions()}
    write_json(payload, args.out)
    return payload


if __name__ == "__main__":
    main()
