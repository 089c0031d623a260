"""Can held-out accuracy of truncated runs choose the plan? (issue 13: lambda as a hyperparameter)

The one-step held-out hypergradient does not choose good plans (`heldout_signal.py`). This script
tests a zeroth-order rule instead, `align_kd.select_strategy`. For each seed of a `real` setting:

1. every candidate row (`pairwise`, `uniform`, `softmax`, `sinkhorn` by default, with the row's own fit()
   options) trains the seed's student for the first `--search-epochs` of the setting's epochs on 90% of
   the training images;
2. the candidate with the best accuracy on the other 10% (never trained on, never the test set) is
   the choice;
3. the choice trained on all the data with that seed is, by construction, the chosen row's own run
   in the benchmark (same options, student initialisation and data order). Its committed record is
   read back: `bench --protocol real --settings S --strategies <row>` reruns it.

The `select` row's test accuracy is then compared, paired over seeds, with `hinton`, the best fixed
plan (`pairwise`) and the oracle (the candidate with the best test accuracy on that seed, which no
rule can know).

`--schedule truncated` (default) stops each candidate after the first `--search-epochs` of the
setting's cosine schedule, mid-decay; `--schedule short` gives each a whole cosine schedule of
`--search-epochs` epochs instead (annealed to the end, as a short run of its own), and the choice is
then trained with the setting's full budget.

Each candidate's run is written the moment it finishes
(`results/<setting>/select-<schedule><search epochs>-s<seed>/<row>.json`, e.g. `select-short4-s0`); rerunning
skips finished ones, and a search of another length or schedule writes its own folder and JSON.

    python benchmarks/select_strategy.py --setting real-vit --seeds 0 1 2 [--search-epochs 6] [--threads 2]
    python benchmarks/select_strategy.py --pool results/select_strategy_real-vit_short4.json results/select_strategy_real-resnet-vit_short4.json

`--pool` trains nothing: it compares the rule with each single fixed row over every (setting, seed) pair of
the given result files (what a user who commits to one row for every pair would get instead).
"""
import argparse
import json
import time
from pathlib import Path

import torch
from _common import default_root, mean_std, write_json

from align_kd.experiment import DIVERGED_FILE, REAL_SETTINGS, _current_record, paired_interval, search_label, select_for_setting, versions
from align_kd.experiment import _diff as format_diff

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


DEFAULT_CANDIDATES = ["pairwise", "uniform", "softmax", "sinkhorn"]


def _pairs(a: list, b: list) -> tuple[list[float], list[float]]:
    """The seeds on which both rows finished (None: that row's full run diverged on the seed)."""
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    return [x for x, _ in both], [y for _, y in both]


def _interval(a: list, b: list) -> dict | None:
    """paired_interval(a, b) over the seeds on which both finished (None if none did)."""
    x, y = _pairs(a, b)
    return paired_interval(x, y) if x else None


def _diff(a: list, b: list) -> str:
    """Paired difference a - b in points with its 95% interval, as the benchmark tables print it, over the seeds
    on which both finished (their count named when a seed is left out)."""
    p = _interval(a, b)
    return format_diff(p) + (f" ({p['n']} of {len(a)} seeds)" if p and p["n"] < len(a) else "")


def _fallback_label(fallback: str | None, alpha: float) -> str:
    """``fallback-hinton`` (level 0.05), ``fallback-hinton-a0.01``; "" without a fallback."""
    return "" if fallback is None else f"fallback-{fallback}" + ("" if alpha == 0.05 else f"-a{alpha:g}")


def _result_stem(settings: list[str], labels: set[str], candidate_lists: set[tuple], fallbacks: set[str] = frozenset({""})) -> str:
    """What a result file is named after: ``<settings joined by +>_<search labels>[_<candidates>][_<fallback>]`` (the
    default candidate list and no fallback left out), so that searches of other settings, lengths, candidates or
    fallback rules never overwrite each other."""
    chosen = "" if candidate_lists == {tuple(DEFAULT_CANDIDATES)} else \
        "_" + ("-".join(next(iter(candidate_lists))) if len(candidate_lists) == 1 else "mixed")
    rule = "" if fallbacks == {""} else "_" + (next(iter(fallbacks)) if len(fallbacks) == 1 else "mixed-fallbacks")
    return "+".join(settings) + "_" + "-".join(sorted(labels)) + chosen + rule


def _final_record(out: Path, setting, row: str, seed: int):
    """The row's committed full run on ``seed``: its record, "diverged" if fit() gave up on it, None if not run."""
    record = _current_record(out, setting, row, seed)
    if record is None and _current_record(out, setting, row, seed, DIVERGED_FILE) is not None:
        return "diverged"
    return record


def pool(files: list[str]) -> None:
    """Train nothing: the rule against each fixed row over every (setting, seed) of the given result files.

    A user who cannot run the search commits to one row for every pair; this asks which single row the
    rule beats across settings. Pairs where either run diverged are left out (and counted)."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    rows = [r for r in dict.fromkeys(["hinton", *runs[0]["candidates"]]) if all(r in run["per_seed"][0]["test_acc"] for run in runs)]
    pairs = [(run["setting"], s) for run in runs for s in run["per_seed"]]
    labels = {search_label(run["schedule"], run["search_epochs"]) for run in runs}
    print(f"### select ({', '.join(sorted(labels))} search) against one fixed row everywhere: "
          f"{len(pairs)} (setting, seed) pairs from {', '.join(run['setting'] for run in runs)}\n")
    print("| fixed row | select - row (points, 95% CI over pairs) | " + " | ".join(f"{run['setting']}" for run in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    summary = {}
    for r in rows:
        per = [_interval([s["select"] for s in run["per_seed"]], [s["test_acc"][r] for s in run["per_seed"]]) for run in runs]
        summary[r] = _interval([s["select"] for _, s in pairs], [s["test_acc"][r] for _, s in pairs])
        n = summary[r]["n"] if summary[r] else 0
        print(f"| {r} | {format_diff(summary[r])}{f' ({n} pairs; {len(pairs) - n} diverged)' if n < len(pairs) else ''} | "
              + " | ".join(f"{100 * p['mean']:+.2f} ({p['n']})" if p else "" for p in per) + " |")
    stem = _result_stem([run["setting"] for run in runs], labels, {tuple(run["candidates"]) for run in runs},
                        {_fallback_label(run.get("fallback"), run.get("alpha", 0.05)) for run in runs})
    write_json({"files": files, "pairs": [[name, s["seed"]] for name, s in pairs], "vs_row": summary, "versions": versions()},
               RESULTS / f"select_strategy_pooled_{stem}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="real-vit", choices=sorted(REAL_SETTINGS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES,
                    help="benchmark rows to choose between (hinton: the logit-KD fallback); other lists than the default "
                         "write their own JSON, named after them")
    ap.add_argument("--search-epochs", type=int, default=6)
    ap.add_argument("--schedule", choices=["truncated", "short"], default="truncated",
                    help="truncated: the first search epochs of the full schedule; short: a full schedule of search epochs")
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--fallback", default=None, metavar="ROW",
                    help="a candidate (e.g. hinton) the best one replaces only if it gets significantly more held-out images "
                         "right (exact one-sided McNemar test at --alpha); writes its own JSON, named after it")
    ap.add_argument("--alpha", type=float, default=0.05, help="the fallback test's level")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--pool", nargs="+", metavar="JSON", default=None,
                    help="train nothing: compare the rule with each fixed row over every (setting, seed) of these result files")
    args = ap.parse_args()
    if args.pool:
        return pool(args.pool)
    torch.set_num_threads(args.threads)
    setting = REAL_SETTINGS[args.setting]
    out = Path(args.results) / setting.name

    per_seed = []
    for seed in args.seeds:
        start = time.perf_counter()
        sel, tinfo = select_for_setting(setting, seed, args.candidates, search_epochs=args.search_epochs, schedule=args.schedule,
                                        heldout_fraction=args.heldout_fraction, fallback=args.fallback, alpha=args.alpha,
                                        out_dir=args.results, data_root=default_root(),
                                        progress=args.progress)
        final = {row: _final_record(out, setting, row, seed) for row in dict.fromkeys(["hinton", "pairwise", *args.candidates])}
        missing = sorted(row for row, rec in final.items() if rec is None)
        print(f"seed {seed}: held-out after {args.search_epochs} epochs "
              + ", ".join([f"{r} {sel.scores[r]:.4f}" for r in sel.ranking()] + [f"{r} diverged" for r in sel.diverged])
              + f" -> {sel.choice}" + (f" (read back: {', '.join(sel.cached)})" if sel.cached else "")
              + (f"; {sel.fallback_summary()}" if sel.mcnemar else "")
              + f" [{time.perf_counter() - start:.0f} s]")
        if missing:
            print(f"  no current record for {missing} on seed {seed} in {out}: run "
                  f"`python -m align_kd bench --protocol real --settings {setting.name} --strategies {' '.join(missing)} "
                  f"--seeds {seed + 1}` first; this seed is left out of the comparison")
            continue
        test_acc = {row: None if rec == "diverged" else rec["test_acc"] for row, rec in final.items()}
        oracle = max((r for r in args.candidates if test_acc[r] is not None), key=lambda r: test_acc[r])
        if test_acc[sel.choice] is None:
            print(f"  the choice, {sel.choice}, diverged in its full run on seed {seed}: the select row has no result there")
        per_seed.append({"seed": seed, "choice": sel.choice, "best": sel.best, "mcnemar": sel.mcnemar, "oracle": oracle, "heldout": sel.scores,
                         "heldout_curves": sel.curves, "search_diverged": sel.diverged, "search_seconds": sel.seconds,
                         "test_acc": test_acc, "select": test_acc[sel.choice], "oracle_acc": test_acc[oracle],
                         "heldout_images": sel.heldout_images, "train_images": sel.train_images})

    rows = list(dict.fromkeys(["select", "oracle", "hinton", *args.candidates]))
    acc = {"select": [s["select"] for s in per_seed], "oracle": [s["oracle_acc"] for s in per_seed],
           **{r: [s["test_acc"][r] for s in per_seed] for r in dict.fromkeys(["hinton", *args.candidates])}}
    rule = f", {args.fallback} unless the best beats it at p < {args.alpha}" if args.fallback else ""
    print(f"\n### {setting.name}: strategy chosen by held-out accuracy after {args.search_epochs} of "
          f"{setting.epochs} epochs ({args.schedule} schedule{rule}, {len(per_seed)} seeds)\n")
    print("| row | test acc (mean ± std) | vs hinton (points, 95% CI) | vs pairwise | vs select |")
    print("|---|---|---|---|---|")
    rows = [r for r in rows if any(a is not None for a in acc[r])]
    for r in rows:
        finished = [a for a in acc[r] if a is not None]
        m, s = mean_std(finished)
        lost = len(acc[r]) - len(finished)
        print(f"| {r} | {m:.4f} ± {s:.4f}{f' ({lost} diverged)' if lost else ''} | {_diff(acc[r], acc['hinton']) if r != 'hinton' else ''} | "
              f"{_diff(acc[r], acc['pairwise']) if r != 'pairwise' else ''} | {_diff(acc[r], acc['select']) if r != 'select' else ''} |")
    # the choice had the search stopped earlier: read from the same held-out curves (no extra training)
    for s in per_seed:
        by_k = [max(s["heldout_curves"], key=lambda r: (s["heldout_curves"][r][k], -args.candidates.index(r)))
                for k in range(args.search_epochs)]
        s["choice_by_search_epochs"] = by_k
        print(f"seed {s['seed']}: choice after 1..{args.search_epochs} search epochs: {' '.join(by_k)}")
    print("\nchoices: " + ", ".join(f"seed {s['seed']} {s['choice']} (oracle {s['oracle']})" for s in per_seed))
    search = [sum(s["search_seconds"].values()) for s in per_seed]
    if search:
        print(f"search: {mean_std(search)[0]:.0f} s per seed ({len(args.candidates)} candidates x {args.search_epochs} epochs "
              f"on {per_seed[0]['train_images']} images, as first trained)")
    write_json({"setting": setting.name, "protocol": setting.protocol, "candidates": args.candidates,
                "search_epochs": args.search_epochs, "schedule": args.schedule, "epochs": setting.epochs, "heldout_fraction": args.heldout_fraction,
                "fallback": args.fallback, "alpha": args.alpha,
                "seeds": args.seeds, "threads": args.threads, "teacher": tinfo["path"], "teacher_acc": tinfo["test_acc"],
                "per_seed": per_seed, "versions": versions(),
                "summary": {r: {**dict(zip(("mean", "std"), mean_std(a for a in acc[r] if a is not None))),
                                "diverged": sum(a is None for a in acc[r]),
                                **{f"vs_{ref}": _interval(acc[r], acc[ref]) if r != ref else None for ref in ("hinton", "pairwise")}}
                            for r in rows}},
               RESULTS / f"select_strategy_{_result_stem([setting.name], {search_label(args.schedule, args.search_epochs)}, {tuple(args.candidates)}, {_fallback_label(args.fallback, args.alpha)})}.json")


if __name__ == "__main__":
    main()
