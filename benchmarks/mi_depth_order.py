"""Does the MI rule's objective itself prefer the teacher's shallowest layers? (issue 13's diagnosis)

The MI rule (``plan_objective="mi"``) moves the plan towards the pairs with the highest estimate of
I(t_i; s_j) (rows teacher layers, columns student layers). The teacher's taps of a feed-forward net
form a Markov chain x -> t_1 -> t_2 -> ... -> t_T (each tap is a function of the one before), and
a student layer s is a function of the image x alone, so by the data-processing inequality
I(t_{k+1}; s) <= I(t_k; s) for every student layer: the true MI of every column is largest at the
shallowest tap, and sum(lambda * I) over column simplices is maximised by sending every student layer
to the teacher's first tap. Only the estimator's looseness (a Gaussian regressor of bounded
capacity, InfoNCE's cap at log B) and a row marginal keep the rule from that corner.

This script reads the final (T, S) MI estimates that every finished run with a feature term saved
(``result.json``'s ``mi``; every pair's estimator is trained on its own bound whatever the plan, so
the whole matrix is an estimate, though the student's gradient is weighted by the plan, so a run's
own pairs are estimated after the student learned them; no training here) and asks, per setting
and estimator (:func:`align_kd.experiment.mi_depth_order`):

- ``ordered``: the share of adjacent tap pairs (k, k + 1) over all columns whose estimates obey the
  inequality (the deeper one no larger);
- ``rho``: the Spearman correlation between a tap's depth and its estimate, per column, averaged over
  columns (-1: strictly decreasing with depth);
- ``argmax_depth``: where each column's highest estimate sits, as relative depth (0 = first tap,
  1 = last), averaged over columns, and the same for the last student column (the head) alone.

Output: ``results/mi_depth_order.json`` and ``.png`` (column-normalised estimates against relative
teacher depth, per setting and estimator).

    python benchmarks/mi_depth_order.py [--settings real-cnn real-vit ...]
"""
import argparse
from pathlib import Path

import numpy as np
from _common import finished_results, write_json

from align_kd.experiment import REAL_SETTINGS, mi_depth_order, versions
from align_kd.plans import DUSTBIN

ROOT = Path(__file__).resolve().parent


def finished_matrices(results: Path, setting) -> list[dict]:
    """(row, seed, estimator, mi) of every current finished run of ``setting`` that saved MI estimates."""
    runs = []
    for rec, result in finished_results(results, setting):
        if result.get("mi") is not None:
            taps = [k for k, name in enumerate(result["teacher_layers"]) if name != DUSTBIN]  # "no teacher" is no tap
            runs.append({"row": rec["strategy"], "seed": rec["seed"], "estimator": rec.get("mi_estimator", "vid"),
                         "mi": np.asarray(result["mi"], dtype=float)[taps],
                         "teacher_layers": [result["teacher_layers"][k] for k in taps],
                         "student_layers": result["student_layers"]})
    return runs


def plot(groups: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(groups):]:
        ax.axis("off")
    for ax, ((setting, estimator), g) in zip(axes.flat, groups.items()):
        mean = np.mean([r["mi"] for r in g["runs"]], axis=0)  # (T, S) over runs
        mean = mean / np.abs(mean).max(0, keepdims=True)  # each column scaled to largest magnitude 1
        depth = np.linspace(0, 1, mean.shape[0])
        for j, name in enumerate(g["runs"][0]["student_layers"]):
            ax.plot(depth, mean[:, j], marker=".", label=name.split(".")[-1])
        ax.set_title(f"{setting}\n{estimator}, {len(g['runs'])} runs, T = {mean.shape[0]}", fontsize=8)
        ax.set_xlabel("teacher tap depth (0 first, 1 last)", fontsize=7)
        ax.legend(fontsize=5, title="student layer", title_fontsize=5)
    for ax in axes[:, 0]:
        ax.set_ylabel("MI estimate / column max")
    fig.suptitle("Final MI estimates against teacher depth (the true MI can only fall with depth: data processing)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=sorted(REAL_SETTINGS), choices=sorted(REAL_SETTINGS))
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--out", default=str(ROOT / "results" / "mi_depth_order"))
    args = ap.parse_args()
    results = Path(args.results)

    groups: dict = {}
    for name in args.settings:
        for run in finished_matrices(results, REAL_SETTINGS[name]):
            groups.setdefault((name, run["estimator"]), {"runs": []})["runs"].append(run)
    if not groups:
        raise SystemExit(f"no finished run with MI estimates under {results} for settings {args.settings}: run "
                         "`python -m align_kd bench --protocol real` first")

    print("| setting | estimator | runs | T | adjacent taps ordered | Spearman(depth, MI) | argmax depth | head's argmax depth |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for (setting, estimator), g in sorted(groups.items()):
        per_run = [mi_depth_order(r["mi"]) for r in g["runs"]]
        summary = {k: float(np.nanmean([p[k] for p in per_run])) for k in per_run[0]}
        rows.append({"setting": setting, "estimator": estimator, "runs": len(per_run),
                     "teacher_layers": g["runs"][0]["teacher_layers"], **summary,
                     "per_run": [{"row": r["row"], "seed": r["seed"], **p} for r, p in zip(g["runs"], per_run)]})
        print(f"| {setting} | {estimator} | {len(per_run)} | {len(g['runs'][0]['teacher_layers'])} | "
              f"{summary['ordered']:.2f} | {summary['rho']:+.2f} | {summary['argmax_depth']:.2f} | "
              f"{summary['head_argmax_depth']:.2f} |")
    write_json({"config": vars(args), "versions": versions(), "groups": rows}, Path(args.out + ".json"))
    plot(dict(sorted(groups.items())), Path(args.out + ".png"))


if __name__ == "__main__":
    main()
