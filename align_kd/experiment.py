"""Strategy comparisons on CIFAR-10: the demo and the strategy benchmark share this code.

A :class:`Setting` names a teacher/student pair and a training budget. :func:`run_setting` trains
(or loads the cached) teacher once, then runs every strategy with every seed on an identical
budget, saves each run, and returns one record per run. :func:`summarise` turns records into the
table (mean +- std, share of the teacher-student gap closed), and the plot helpers draw the
accuracy curves and the alignment panels.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .data import cifar10_loaders
from .distributed import setup as setup_distributed
from .models import build_model, load_or_train_teacher
from .training import fit

__all__ = ["ALL_STRATEGIES", "SETTINGS", "Setting", "format_table", "plan_patterns", "plot_curves", "run_setting", "summarise",
           "versions", "write_outputs"]

#: "alone" is the student trained on labels only (beta = 1, no KD), same loop and budget
ALL_STRATEGIES = ("alone", "hinton", "pairwise", "uniform", "softmax", "sinkhorn", "exact")
LEARNED = ("softmax", "sinkhorn", "exact")


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


# Budgets are sized for a 2-core CPU: the demo in a few minutes, the benchmark (4 settings x 7
# strategies x 3 seeds) in about an hour. Every strategy of a setting gets the identical budget.
_BENCH = dict(teacher_epochs=6, epochs=3, train_limit=8192, test_limit=2000)
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("demo", "cnn", {"width": 32}, "cnn", {"width": 8}, teacher_epochs=4, epochs=2,
                train_limit=10000, test_limit=2000,
                description="the study's 3 conv + 2 linear family, teacher 4x wider than the student (demo budget)"),
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


def versions() -> dict:
    import numpy

    import align_kd

    return {"align_kd": align_kd.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def _fit_options(setting: Setting, strategy: str, seed: int, progress: bool) -> tuple[str, dict]:
    opts = {"epochs": setting.epochs, "lr": setting.lr, "seed": seed, "progress": progress, **setting.fit_options}
    if strategy == "alone":
        return "hinton", {**opts, "beta": 1.0, "kd_weight": 0.0}
    return strategy, opts


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
        train, test = cifar10_loaders(data_root, batch_size=setting.batch_size, limit=setting.train_limit,
                                      test_limit=setting.test_limit, seed=0)
        tag = f"cifar10-train{setting.train_limit or 'all'}-bs{setting.batch_size}-aug"
        teacher, tinfo = load_or_train_teacher(
            setting.teacher, setting.teacher_kwargs, train, test, epochs=setting.teacher_epochs,
            lr=setting.teacher_lr, data_tag=tag, progress=progress,
        )
    log(f"teacher {setting.teacher}{setting.teacher_kwargs}: test acc {tinfo['test_acc']:.4f} "
        f"({'cached' if tinfo['cached'] else 'trained'}: {tinfo['path']})")
    records = []
    for strategy in strategies:
        for seed in seeds:
            torch.manual_seed(seed)
            student = build_model(setting.student, **setting.student_kwargs)
            name, opts = _fit_options(setting, strategy, seed, progress)
            start = time.perf_counter()
            result = fit(teacher, student, (train, test), strategy=name, **opts)
            wall = time.perf_counter() - start
            run_dir = result.save(out / f"{strategy}-s{seed}") if dist.is_main else out / f"{strategy}-s{seed}"
            records.append({
                "dataset": "cifar10", "setting": setting.name, "strategy": strategy, "seed": seed,
                "test_acc": result.test_acc, "best_acc": result.best_acc, "epochs": setting.epochs,
                "teacher_acc": tinfo["test_acc"], "wall_s": wall, "run_dir": str(run_dir),
                "curve": [h["test_acc"] for h in result.history],
                "plan": result.plan.tolist(), "teacher_layers": result.teacher_layers,
                "student_layers": result.student_layers,
            })
            log(f"  {strategy:<9} seed {seed}: test acc {result.test_acc:.4f} (best {result.best_acc:.4f}, {wall:.0f} s)")
    return records, tinfo


def summarise(records: list[dict]) -> list[dict]:
    """Per strategy: mean/std of last-epoch and best-epoch accuracy, and the share of the gap closed.

    gap closed = (acc - student alone) / (teacher - student alone), from the means.
    """
    by = {}
    for r in records:
        by.setdefault(r["strategy"], []).append(r)
    teacher = records[0]["teacher_acc"] if records else None
    alone = statistics.mean(r["test_acc"] for r in by["alone"]) if "alone" in by else None
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
        })
    return rows


def format_table(rows: list[dict], teacher_acc: float, *, title: str = "") -> str:
    """Markdown table: teacher, then each strategy (last-epoch accuracy mean +- std, best epoch, gap)."""
    lines = [f"### {title}" if title else "", "",
             "| | runs | test acc (last epoch) | best-epoch acc | gap closed | wall s/run |",
             "|---|---|---|---|---|---|",
             f"| teacher | 1 | {teacher_acc:.4f} | | | |"]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        lines.append(f"| {r['strategy']} | {r['runs']} | {r['test_acc']:.4f} ± {r['test_std']:.4f} | "
                     f"{r['best_acc']:.4f} ± {r['best_std']:.4f} | {gap} | {r['wall_s']:.0f} |")
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
    depth); modal matching: per student layer the teacher layer its max-weight matching picks most
    often, with that frequency; fan-in: mean effective number of teacher layers per student layer.
    """
    from itertools import combinations

    from .graph import alignment_graph, compare, fan_in, stability, weighted_crossings

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
            "fan_in": statistics.mean(statistics.mean(fan_in(g).values()) for g in graphs),
            "modal_matching": {s: [t, f] for s, (t, f) in st["modal_matching"].items()},
        })
    return rows


def format_patterns(rows: list[dict]) -> str:
    """Markdown for :func:`plan_patterns`."""
    if not rows:
        return ""
    lines = ["", "Learned plans across seeds (std of lambda, mean total variation between seeds per column, "
             "weighted crossings normalised to [0, 1], mean fan-in; modal matching student <- teacher (frequency)):", "",
             "| strategy | std(lambda) | TV between seeds | crossings | fan-in | modal matching |", "|---|---|---|---|---|---|"]
    for r in rows:
        match = ", ".join(f"{s}<-{t} ({f:.0%})" for s, (t, f) in r["modal_matching"].items())
        lines.append(f"| {r['strategy']} | {r['lambda_std']:.3f} | {r['tv_between_seeds']:.3f} | "
                     f"{r['crossings']:.3f} | {r['fan_in']:.2f} | {match} |")
    return "\n".join(lines) + "\n"


def write_outputs(setting: Setting, records: list[dict], teacher_info: dict, out_dir, *, seeds, strategies) -> dict:
    """JSON (records + configuration + versions), markdown table, accuracy plot, alignment panels."""
    from .graph import draw_panels

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
    return {"table": table, "rows": rows, "dir": out}


def quick(setting: Setting) -> Setting:
    """A few hundred images, one epoch: for CI and smoke tests."""
    return replace(setting, teacher_epochs=1, epochs=1, train_limit=512, test_limit=256, batch_size=64)
