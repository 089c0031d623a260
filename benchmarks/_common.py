"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def default_root() -> str | None:
    """CIFAR-10 source: $ALIGN_KD_DATA, else the shared JPEG archive beside the checkout, else None."""
    env = os.environ.get("ALIGN_KD_DATA")
    if env:
        return env
    cand = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
    return str(cand) if cand.exists() else None


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def finished_results(results, setting, rows=None):
    """(record, result.json) of every finished run of ``setting`` under ``results`` that the report
    counts (made with today's options, as ``bench --report`` reads them); ``rows``: only those rows."""
    from align_kd.experiment import collect_records, run_folder

    for rec in collect_records(results, setting):
        if rows is None or rec["strategy"] in rows:
            run = run_folder(Path(results) / setting.name, rec["strategy"], rec["seed"])
            yield rec, json.loads((run / "result.json").read_text())


def write_json(payload, out) -> Path:
    """Write ``payload`` as indented JSON to ``out`` (parents created) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
    return out
