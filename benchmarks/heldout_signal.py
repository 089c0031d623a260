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
- per student layer, the teacher layer with the lowest mean H (where the rule sends the column);
- how much of one update is signal: ``signal_share``, the part's mean signal's energy over one
  update's mean energy, both in the part the run's own plan acts on (column-centred for ``softmax``,
  doubly centred for ``sinkhorn``); the rest is the batch-to-batch noise of the one-step estimate.

Then, per run, it replays the plan's own update (:func:`align_kd.experiment.replay_heldout_plan`:
the run's projection, optimiser and step size) on the recorded hypergradients, which must reproduce
the run's final plan, and on two halves of them: the signal (each update replaced by its part's mean)
and the noise (each update minus its part's mean). How far each moves the plan from its init (mean
total variation per column), and how far the run's plan ends from the signal's, say whether the
plan a run learned is the signal's or the noise's.

The runs read are those ``bench --report`` counts (made with each row's options of today:
MI gradients before the step, train mode). Output: ``results/heldout_signal_<setting>.json`` and ``.png`` (t statistics,
seeds in rows, quarters in columns).

    python benchmarks/heldout_signal.py [--setting real-cnn-noaug] [--rows sinkhorn-heldout ...] [--parts 4]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from _common import finished_results, write_json
from scipy import stats

from align_kd.experiment import (PLAN_VARIANTS, REAL_SETTINGS, heldout_hypergradients, part_means, replay_heldout_plan,
                                 teacher_rows, versions)

ROOT = Path(__file__).resolve().parent


def load_runs(results: Path, setting, row: str) -> dict[int, dict]:
    """{seed: result.json} of one row's finished runs that the report counts."""
    return {rec["seed"]: result for rec, result in finished_results(results, setting, rows=(row,))}


def centred(h: np.ndarray, rows: bool) -> np.ndarray:
    """The part of (..., T, S) signals a plan acts on: minus column means, and row means too for a plan
    with row marginals."""
    h = h - h.mean(-2, keepdims=True)
    return h - h.mean(-1, keepdims=True) if rows else h


def centred_share(m: np.ndarray, rows: bool) -> float:
    """||part of m a plan can act on|| / ||m||: m minus its column means (and its row means, for a
    plan with row marginals too; the dustbin row, H = 0, is not in m)."""
    total = np.linalg.norm(m)
    return float(np.linalg.norm(centred(m, rows)) / total) if total > 0 else 0.0


def hypergradients(result: dict, parts: int) -> tuple[list[dict], np.ndarray, list[np.ndarray]]:
    """The run's held-out updates, their (updates, T, S) hypergradients without the dustbin row, and
    the update indices of each of ``parts`` parts of training (by update order)."""
    ups = [u for u in result["solves"] if u.get("kind") == "heldout"]
    if len(ups) < 2 * parts:
        raise ValueError(f"expected at least {2 * parts} held-out updates to split into {parts} parts, got {len(ups)}")
    H = np.array(heldout_hypergradients(result))  # (updates, T, S): the dustbin row left out
    return ups, H, np.array_split(np.arange(len(ups)), parts)


def signal_by_part(result: dict, parts: int) -> list[dict]:
    """Per part of training (by update order): t statistics, signed shares, actionable shares, choices,
    and the share of one update that is the part's mean signal."""
    ups, H, split = hypergradients(result, parts)
    teachers = teacher_rows(result)
    rows = result.get("config", {}).get("strategy") == "sinkhorn"  # the run's own plan has row marginals
    out = []
    for k, idx in enumerate(split):
        h = H[idx]
        mean = h.mean(0)
        t = stats.ttest_1samp(h, 0.0, axis=0).statistic  # (T, S)
        energy = float((centred(h, rows) ** 2).sum((1, 2)).mean())  # one update's, on average
        out.append({"part": k + 1, "steps": [ups[idx[0]]["step"], ups[idx[-1]]["step"]], "updates": int(len(idx)),
                    "mean": mean.tolist(), "t": t.tolist(),
                    "share_hurts": float((t > 2).mean()), "share_helps": float((t < -2).mean()),
                    "actionable_softmax": centred_share(mean, rows=False),
                    "actionable_sinkhorn": centred_share(mean, rows=True),
                    "signal_share": float((centred(mean, rows) ** 2).sum() / energy) if energy > 0 else 0.0,
                    "lowest_row_per_column": [teachers[i] for i in mean.argmin(0)]})
    return out


def total_variation(a, b) -> float:
    """Mean total variation per column (student layer) between two plans."""
    return float(0.5 * (torch.as_tensor(a) - torch.as_tensor(b)).abs().sum(0).mean())


def replay_decomposition(result: dict, parts: int) -> dict:
    """How far the run's own hypergradients, their signal (each update replaced by its part's mean)
    and their noise (each minus that mean) move the plan from its init, and how far the run's plan ends
    from the signal's. Raises if the replay does not reproduce the run's final plan."""
    H = np.array(heldout_hypergradients(result))  # (updates, T, S)
    signal = part_means(H, parts)
    init, as_run = replay_heldout_plan(result, H)
    error = total_variation(as_run, result["plan"])
    if error > 1e-3:
        raise ValueError(f"replaying the run's {len(H)} recorded hypergradients ends {error:.4f} (total variation) "
                         "from its recorded plan; the run was not made by today's plan update")
    plans = {"as_run": as_run, "signal": replay_heldout_plan(result, signal)[1],
             "noise": replay_heldout_plan(result, H - signal)[1]}
    return {"replay_error": error, "moved": {k: total_variation(p, init) for k, p in plans.items()},
            "as_run_to_signal": total_variation(plans["as_run"], plans["signal"]),
            "as_run_plan": plans["as_run"].tolist(), "signal_plan": plans["signal"].tolist()}


def between_seeds(replays: dict) -> dict:
    """Per row: the mean total variation between the seeds' final plans, as run and as the signal's
    replay (does the noise make the seeds disagree?)."""
    rows = {}
    for label, r in replays.items():
        rows.setdefault(label.rsplit(" s", 1)[0], []).append(r)
    out = {}
    for row, runs in rows.items():
        pairs = [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
        if pairs:
            out[row] = {kind: float(np.mean([total_variation(a[f"{kind}_plan"], b[f"{kind}_plan"]) for a, b in pairs]))
                        for kind in ("as_run", "signal")}
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
    torch.set_num_threads(1)  # the replays are (T, S) plans: a few milliseconds per update
    if args.parts < 1:
        ap.error(f"expected --parts >= 1, got {args.parts}")
    unknown = [row for row in args.rows if PLAN_VARIANTS.get(row, (None, {}))[1].get("plan_objective") != "heldout"]
    if unknown:
        ap.error(f"expected held-out rows (plan_objective='heldout' in align_kd.experiment.PLAN_VARIANTS), got {unknown}")
    results, setting = Path(args.results), REAL_SETTINGS[args.setting]
    table, replays, names = {}, {}, None
    for row in args.rows:
        for seed, result in sorted(load_runs(results, setting, row).items()):
            table[f"{row} s{seed}"] = signal_by_part(result, args.parts)
            replays[f"{row} s{seed}"] = replay_decomposition(result, args.parts)
            names = names or (teacher_rows(result), result["student_layers"])
    if not table:
        print(f"no finished run of {args.rows} with today's row options in {results / setting.name}", file=sys.stderr)
        return 1
    print(f"{'run':<28} {'part':>4} {'steps':>11} {'t>2':>5} {'t<-2':>5} {'act.softmax':>11} {'act.sinkhorn':>12} "
          f"{'signal':>6}  lowest mean H per student layer")
    for label, part_list in table.items():
        for p in part_list:
            print(f"{label:<28} {p['part']:>4} {p['steps'][0]:>5}-{p['steps'][1]:<5} {p['share_hurts']:>5.2f} "
                  f"{p['share_helps']:>5.2f} {p['actionable_softmax']:>11.2f} {p['actionable_sinkhorn']:>12.2f} "
                  f"{p['signal_share']:>6.2f}  " + ", ".join(f"{s}<-{t}" for s, t in zip(names[1], p["lowest_row_per_column"])))
    print(f"\nreplay of each run's plan update (mean total variation per column from the initial plan; parts as above)\n"
          f"{'run':<28} {'as run':>6} {'signal':>6} {'noise':>6} {'run to signal':>13}")
    for label, r in replays.items():
        print(f"{label:<28} {r['moved']['as_run']:>6.2f} {r['moved']['signal']:>6.2f} {r['moved']['noise']:>6.2f} "
              f"{r['as_run_to_signal']:>13.2f}")
    seeds = between_seeds(replays)
    for row, tv in seeds.items():
        print(f"{row}: total variation between seeds' final plans {tv['as_run']:.2f} as run, {tv['signal']:.2f} replayed on "
              "the signal")
    out = Path(args.results) / f"heldout_signal_{args.setting}.json"
    write_json({"config": {"setting": args.setting, "rows": {row: PLAN_VARIANTS[row][1] for row in args.rows},
                           "parts": args.parts},
                "versions": versions(), "teacher_layers": names[0], "student_layers": names[1], "runs": table,
                "replays": replays, "between_seeds": seeds}, out)
    draw(out.with_suffix(".png"), table, *names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
