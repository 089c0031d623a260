"""What does the held-out rule's signal say over a whole run? (issue 13)

`plan_objective="heldout"` moves the plan along the hypergradient H[i, j] = w <grad I(t_i; s_j),
grad CE_heldout> (:meth:`align_kd.Distiller.heldout_hypergradient`): the change of held-out
cross-entropy one training step after raising lambda[i, j] (rows teacher layers, columns student
layers). Positive H means that raising the pair's weight raises held-out CE after the step. Every
update's H is saved in the run's ``result.json`` (``solves``), so this script reads the finished
runs of the held-out rows (no training) and asks, per quarter of training and seed:

- which pairs have a signal at all: the one-sample t statistic of H[i, j] over that quarter's
  updates (``scipy.stats.ttest_1samp``), and the share of pairs with t > 2 (raising the weight
  hurts) or t < -2 (it helps);
- how much of the mean signal a plan can act on. A column-simplex plan (``softmax``) cannot change a
  column's total, so a constant added to a column of H changes nothing; a Sinkhorn plan with row
  marginals also ignores a constant per row. The shares ``actionable_softmax`` (the column-centred
  part's norm over the whole) and ``actionable_sinkhorn`` (doubly centred) say how much is left;
- per student layer, the teacher layer with the lowest mean H (where the rule sends the column).

The runs read are those ``bench --report`` counts (made with each row's options of today:
MI gradients before the step, train mode). Output: ``results/heldout_signal_<setting>.json`` and ``.png`` (t statistics,
seeds in rows, quarters in columns).

    python benchmarks/heldout_signal.py [--setting real-cnn-noaug] [--rows sinkhorn-heldout ...] [--parts 4]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from _common import finished_results, write_json
from scipy import stats

from align_kd.experiment import PLAN_VARIANTS, REAL_SETTINGS, versions
from align_kd.plans.registry import DUSTBIN

ROOT = Path(__file__).resolve().parent


def load_runs(results: Path, setting, row: str) -> dict[int, dict]:
    """{seed: result.json} of one row's finished runs that the report counts."""
    return {rec["seed"]: result for rec, result in finished_results(results, setting, rows=(row,))}


def centred_share(m: np.ndarray, rows: bool) -> float:
    """||part of m a plan can act on|| / ||m||: m minus its column means (and its row means, for a
    plan with row marginals too; the dustbin row, H = 0, is not in m)."""
    d = m - m.mean(0, keepdims=True)
    if rows:
        d = d - d.mean(1, keepdims=True)
    total = np.linalg.norm(m)
    return float(np.linalg.norm(d) / total) if total > 0 else 0.0


def teacher_rows(result: dict) -> list[str]:
    """The run's teacher layers, the rows of H that carry a feature term (a dustbin run lists its
    "no teacher" row last; its H is 0 by construction)."""
    return [name for name in result["teacher_layers"] if name != DUSTBIN]


def signal_by_part(result: dict, parts: int) -> list[dict]:
    """Per part of training (by update order): t statistics, signed shares, actionable shares, choices."""
    ups = [u for u in result["solves"] if u.get("kind") == "heldout"]
    if len(ups) < 2 * parts:
        raise ValueError(f"expected at least {2 * parts} held-out updates to split into {parts} parts, got {len(ups)}")
    H = np.array([u["hypergrad"] for u in ups])  # (updates, T, S); (updates, T + 1, S) with a dustbin
    teachers = teacher_rows(result)
    H = H[:, :len(teachers)]  # (updates, T, S): the dustbin row left out
    out = []
    for k, idx in enumerate(np.array_split(np.arange(len(ups)), parts)):
        h = H[idx]
        mean = h.mean(0)
        t = stats.ttest_1samp(h, 0.0, axis=0).statistic  # (T, S)
        out.append({"part": k + 1, "steps": [ups[idx[0]]["step"], ups[idx[-1]]["step"]], "updates": int(len(idx)),
                    "mean": mean.tolist(), "t": t.tolist(),
                    "share_hurts": float((t > 2).mean()), "share_helps": float((t < -2).mean()),
                    "actionable_softmax": centred_share(mean, rows=False),
                    "actionable_sinkhorn": centred_share(mean, rows=True),
                    "lowest_row_per_column": [teachers[i] for i in mean.argmin(0)]})
    return out


def draw(path: Path, table: dict, t_names: list[str], s_names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(label, part) for label, seeds in table.items() for part in seeds]
    labels = list(dict.fromkeys(label for label, _ in cells))
    parts = max(len(table[label]) for label in labels)
    fig, axes = plt.subplots(len(labels), parts, figsize=(2.4 * parts + 1.5, 2.4 * len(labels)), squeeze=False,
                             layout="constrained")
    for r, label in enumerate(labels):
        for c, part in enumerate(table[label]):
            ax, t = axes[r][c], np.array(part["t"])
            im = ax.imshow(np.clip(t, -10, 10), cmap="RdBu_r", vmin=-10, vmax=10)
            for (i, j), v in np.ndenumerate(t):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(s_names)), s_names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(t_names)), t_names, fontsize=6)
            ax.set_title(f"steps {part['steps'][0]}-{part['steps'][1]}", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.6, label="t of H (red: raising the weight raises held-out CE)")
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long layer names and the colour bar label stay inside
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="real-cnn-noaug", choices=sorted(REAL_SETTINGS))
    ap.add_argument("--rows", nargs="+", default=["sinkhorn-heldout"], help="held-out rows of the setting to read")
    ap.add_argument("--parts", type=int, default=4, help="parts of training the updates are split into")
    ap.add_argument("--results", default=str(ROOT / "results"))
    args = ap.parse_args(argv)
    if args.parts < 1:
        ap.error(f"expected --parts >= 1, got {args.parts}")
    unknown = [row for row in args.rows if PLAN_VARIANTS.get(row, (None, {}))[1].get("plan_objective") != "heldout"]
    if unknown:
        ap.error(f"expected held-out rows (plan_objective='heldout' in align_kd.experiment.PLAN_VARIANTS), got {unknown}")
    results, setting = Path(args.results), REAL_SETTINGS[args.setting]
    table, names = {}, None
    for row in args.rows:
        for seed, result in sorted(load_runs(results, setting, row).items()):
            table[f"{row} s{seed}"] = signal_by_part(result, args.parts)
            names = names or (teacher_rows(result), result["student_layers"])
    if not table:
        print(f"no finished run of {args.rows} with today's row options in {results / setting.name}", file=sys.stderr)
        return 1
    print(f"{'run':<28} {'part':>4} {'steps':>11} {'t>2':>5} {'t<-2':>5} {'act.softmax':>11} {'act.sinkhorn':>12}  "
          "lowest mean H per student layer")
    for label, part_list in table.items():
        for p in part_list:
            print(f"{label:<28} {p['part']:>4} {p['steps'][0]:>5}-{p['steps'][1]:<5} {p['share_hurts']:>5.2f} "
                  f"{p['share_helps']:>5.2f} {p['actionable_softmax']:>11.2f} {p['actionable_sinkhorn']:>12.2f}  "
                  + ", ".join(f"{s}<-{t}" for s, t in zip(names[1], p["lowest_row_per_column"])))
    out = Path(args.results) / f"heldout_signal_{args.setting}.json"
    write_json({"config": {"setting": args.setting, "rows": {row: PLAN_VARIANTS[row][1] for row in args.rows},
                           "parts": args.parts},
                "versions": versions(), "teacher_layers": names[0], "student_layers": names[1], "runs": table}, out)
    draw(out.with_suffix(".png"), table, *names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
