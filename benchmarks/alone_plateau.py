"""How long must the `real` protocol train a student? The `alone` row at several budgets (issue 12).

For each budget E the student of a `real` setting is trained from scratch for E epochs (cosine
schedule to zero, the protocol's optimiser and data), on labels only (`alone`) and, with
``--strategies alone hinton``, beside other rows of the protocol at the same budgets, so that one
can see whether what distillation adds depends on the budget. The table shows how far each
budget's final test accuracy is from the longest budget of the same row, and each row's difference
to `alone` at the same budget and seed. Runs are resumable (run_setting skips finished ones).
Output: benchmarks/results/alone_plateau.json for `real-cnn`, alone_plateau_<setting>.json for
any other setting (or --out).

    python benchmarks/alone_plateau.py [--setting real-cnn] [--budgets 4 8 16 24] [--seeds 1]
                                       [--strategies alone hinton] [--out FILE]
"""
import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from _common import default_root, write_json

from align_kd.experiment import ALL_STRATEGIES, REAL_SETTINGS, run_setting, versions

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="real-cnn", choices=sorted(REAL_SETTINGS))
    ap.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 24])
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--strategies", nargs="+", default=["alone"], choices=sorted(ALL_STRATEGIES),
                    help="rows to train at every budget (default: alone)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON to write (default: results/alone_plateau.json for real-cnn, "
                         "results/alone_plateau_<setting>.json otherwise)")
    args = ap.parse_args(argv)
    out = args.out or ROOT / "results" / ("alone_plateau.json" if args.setting == "real-cnn"
                                          else f"alone_plateau_{args.setting}.json")
    torch.set_num_threads(args.threads)
    base = REAL_SETTINGS[args.setting]
    rows = []
    for epochs in args.budgets:
        setting = replace(base, name=f"{base.name}-alone-e{epochs}", epochs=epochs)
        for strategy in args.strategies:
            records, _ = run_setting(setting, [strategy], list(range(args.seeds)), ROOT / "results" / "alone_plateau",
                                     data_root=args.data or default_root(), progress=False)
            accs = [r["test_acc"] for r in records]
            rows.append({"strategy": strategy, "epochs": epochs, "test_acc": sum(accs) / len(accs), "runs": len(accs),
                         "accs": accs, "wall_s": sum(r["wall_s"] for r in records) / len(records),
                         "curve": records[0]["curve"]})
    longest = {r["strategy"]: r["test_acc"] for r in rows if r["epochs"] == args.budgets[-1]}
    alone = {r["epochs"]: r["accs"] for r in rows if r["strategy"] == "alone"}
    print(f"\n{base.name} ({base.student}{base.student_kwargs}), {args.seeds} seed(s):\n")
    print("| row | epochs | test acc | below the longest budget (points) | vs alone, same budget (points) | wall s/run |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        paired = (f"{100 * sum(a - b for a, b in zip(r['accs'], alone[r['epochs']])) / r['runs']:+.2f}"
                  if r["strategy"] != "alone" and r["epochs"] in alone else "")
        print(f"| {r['strategy']} | {r['epochs']} | {r['test_acc']:.4f} | {100 * (longest[r['strategy']] - r['test_acc']):.2f} "
              f"| {paired} | {r['wall_s']:.0f} |")
    write_json({"setting": asdict(base), "budgets": args.budgets, "seeds": args.seeds,
                "strategies": args.strategies, "rows": rows,
                "versions": versions()}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
