"""The text report of a run's alignment graph (with its figures and GraphML) and the ``python -m align_kd
graph`` subcommand."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx

from ..result import FitResult
from .analysis import alignment_graph, crossings, depth_correlation, load_run, max_matching, summary, weighted_crossings
from .analysis import compare as _compare  # report() has a parameter named `compare`
from .drawing import _check_out_path, draw_alignment, draw_plan_evolution, draw_plan_heatmap

__all__ = ["format_table", "report", "add_cli"]


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """Plain-text table of ``rows`` (dicts); ``columns`` is ``[(key, header), ...]`` (default: all keys).

    Floats get 3 decimals, None shows as "-", numbers are right-aligned.
    """
    if columns is None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        columns = [(k, k) for k in keys]
    cells = [[_fmt_cell(r.get(k)) for k, _ in columns] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) or r.get(k) is None
                   for r in rows) for k, _ in columns]
    widths = [max([len(h)] + [len(c[x]) for c in cells]) for x, (_, h) in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line([h for _, h in columns]), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _display_name(x: Any, r: FitResult, k: int | None = None) -> str:
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if r.name:
        return r.name
    return f"run {k}" if k is not None else "run"


def report(run: Any, *, compare: Sequence[Any] = (), out_dir: str | os.PathLike | None = None,
           threshold: float = 1e-3, fmt: str = "png") -> str:
    """Build the alignment graph of ``run``, write its figures and GraphML, return a text report.

    Writes into ``out_dir`` (default: the run directory when ``run`` is a path, else the current
    directory): ``alignment.<fmt>``, ``plan_heatmap.<fmt>``, ``plan_evolution.<fmt>`` (only when
    the history holds plans) and ``alignment.graphml``. Returns (does not print) a plain-text
    report: per student layer (dominant teacher, its lambda, fan-in, matched teacher), per teacher
    layer (usage, matched student), crossings, weighted crossings and the depth correlation, and
    :func:`compare` numbers against each run in ``compare`` (paths, dicts or objects).
    """
    r = load_run(run)
    fmt = str(fmt).lower().lstrip(".")
    out = Path(out_dir) if out_dir is not None else (r.path if r.path is not None else Path.cwd())
    out.mkdir(parents=True, exist_ok=True)
    _check_out_path(out / f"alignment.{fmt}")  # validates fmt before doing work
    G = alignment_graph(r, threshold=threshold)
    files = [
        draw_alignment(G, out / f"alignment.{fmt}"),
        draw_plan_heatmap(G, out / f"plan_heatmap.{fmt}"),
    ]
    if r.history_plans():
        files.append(draw_plan_evolution(r, out / f"plan_evolution.{fmt}"))
    gml = out / "alignment.graphml"
    nx.write_graphml(G, gml)
    files.append(gml)

    rows = summary(G)
    T, S = r.T, r.S
    name = _display_name(run, r)
    lines = [f"Alignment report: {name}" + (f"  (strategy: {r.strategy})" if r.strategy else "")]
    acc = r.final_test_acc
    lines.append(f"T={T} teacher layers, S={S} student layers, {G.number_of_edges()} edges with λ > {threshold:g}"
                 + (f", final test acc {acc:.4g}" if acc is not None else ""))
    lines += ["", "Student layers"]
    lines.append(format_table([x for x in rows if x["side"] == "student"], [
        ("layer", "student layer"), ("shape", "shape"), ("dominant_teacher", "dominant teacher"),
        ("dominant_lambda", "λ"), ("fan_in", "fan-in"), ("matched_teacher", "matched teacher")]))
    lines += ["", "Teacher layers"]
    lines.append(format_table([x for x in rows if x["side"] == "teacher"], [
        ("layer", "teacher layer"), ("shape", "shape"), ("usage", "usage (row sum)"), ("degree", "edges"),
        ("matched_student", "matched student")]))
    E = G.number_of_edges()
    nc = crossings(G)
    wc = weighted_crossings(G)
    wcn = weighted_crossings(G, normalized=True)
    match = max_matching(G)
    lines += ["", f"Crossings: {nc} of {E * (E - 1) // 2} edge pairs; weighted {wc:.4f} "
                  f"(normalised {wcn:.4f}; 0 = depth-monotone, 1 = fully reversed one-to-one)",
              f"Depth correlation: {depth_correlation(G):+.3f} (+1 = in depth order, -1 = reversed, 0 = no depth pattern)",
              f"Max matching: {len(match)} of {S} student layers matched"
              + ("" if len(match) == S else " (unmatched student layers shown as '-')")]
    for k, other in enumerate(compare, start=1):
        ro = load_run(other)
        c = _compare(r, ro, threshold=threshold)
        lines += ["", f"Compare with {_display_name(other, ro, k)}" + (f" (strategy: {ro.strategy})" if ro.strategy else ""),
                  f"  TV per column: mean {c['tv_mean']:.4f}, max {c['tv_max']:.4f}; "
                  f"matching agreement {c['matching_agreement']:.3f} ({c['n_agree']}/{c['S']})"]
        crow = [{"layer": s, "tv": c["tv_per_column"][s], "a": c["matching_a"].get(s), "b": c["matching_b"].get(s)}
                for s in r.student_layers]
        lines.append("\n".join("  " + ln for ln in format_table(crow, [
            ("layer", "student layer"), ("tv", "TV"), ("a", "matched (this)"), ("b", "matched (other)")]).splitlines()))
    lines += ["", "Files:"] + [f"  {f}" for f in files]
    return "\n".join(lines) + "\n"


def _cli_graph(args) -> int:
    text = report(args.run, compare=args.compare or (), out_dir=args.out, threshold=args.threshold, fmt=args.format)
    print(text, end="")
    return 0


def add_cli(subparsers) -> Any:
    """Register the ``graph`` subcommand on an argparse ``subparsers`` object; returns the parser.

    The parser's ``func`` default is a function taking the parsed args that prints :func:`report`.
    """
    import argparse

    p = subparsers.add_parser(
        "graph",
        help="analyse and draw a run's layer-alignment plan as a bipartite graph",
        description=(
            "Build the teacher/student alignment graph of a run's plan lambda (T teacher layers x S student\n"
            "layers, columns sum to 1), write alignment.<fmt>, plan_heatmap.<fmt>, plan_evolution.<fmt> (when\n"
            "the history has per-epoch plans) and alignment.graphml, and print a table: per student layer the\n"
            "dominant teacher, its lambda, the fan-in (exp of column entropy) and the max-weight matched teacher;\n"
            "per teacher layer the usage (row sum); edge crossings; and distances to --compare runs."
        ),
        epilog=(
            "examples:\n"
            "  python -m align_kd graph runs/sinkhorn_seed0\n"
            "  python -m align_kd graph runs/a/result.json --compare runs/b runs/c --out figs --format pdf"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR_OR_RESULT", help="run directory containing result.json, or a result .json file")
    p.add_argument("--compare", nargs="+", action="extend", default=[], metavar="OTHER",
                   help="other run(s) to compare with: total variation per student column and max-matching agreement "
                        "(plans must have the same T x S); may be repeated")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory for figures and GraphML (default: the run directory)")
    p.add_argument("--threshold", type=float, default=1e-3, metavar="X",
                   help="keep an edge only when lambda > X (default: %(default)g)")
    p.add_argument("--format", default="png", choices=["png", "svg", "pdf"],
                   help="figure format (default: %(default)s)")
    p.set_defaults(func=_cli_graph)
    return p
