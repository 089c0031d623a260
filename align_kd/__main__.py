"""Command line: ``python -m align_kd {demo,fit,select,bench,graph,zoo} --help``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


def _strategy_help() -> str:
    from .experiment import ALL_STRATEGIES, PLAN_FROM_ROW, PLAN_VARIANTS

    plans = [s for s in ALL_STRATEGIES if s not in ("alone", "hinton", "dkd", "ls", *PLAN_VARIANTS, *PLAN_FROM_ROW)]
    return ("one of: alone (labels only), hinton, dkd, ls (logit baselines at their papers' settings), "
            + ", ".join(plans) + " (the registered plans), sinkhorn-heldout (sinkhorn with plan_objective='heldout'), "
            "sinkhorn-heldout-dustbin (the same with dustbin=True, the dustbin's mass fixed), softmax-heldout-dustbin "
            "(the column-softmax plan with a dustbin whose mass it chooses), sinkhorn-heldout-late (its plan held for the "
            "first half of training), sinkhorn-heldout-slow, sinkhorn-heldout-every40, sinkhorn-heldout-split20 (a 10x smaller "
            "plan step, an update every 40 steps, a 20% split), softmax-heldout (the column-softmax plan with "
            "plan_objective='heldout'), sinkhorn-capped (sinkhorn with row_marginal_mode='at_most': teacher rows "
            "capped at max(1, S/T), so columns may be one-hot), sinkhorn-heldout-frozen (the held-out split with the plan never updated: the "
            "control), pairwise-dkd, sinkhorn-dkd (the depth pairing and the learned plan with DKD as their logit term), "
            "pairwise-infonce, sinkhorn-infonce, softmax-infonce, sinkhorn-infonce-memory (MI by the contrastive InfoNCE bound instead of "
            "VID; the last with 4096 remembered negatives), softmax-vid-floor (softmax with the VID variance floor vid_eps=1e-2 "
            "instead of 1e-4), sinkhorn-heldout-retrain (sinkhorn-heldout's "
            "final plan of the same seed, fixed, on all the training data), sinkhorn-heldout-mean-retrain (per student layer "
            "the teacher layer with the lowest hypergradient averaged over that run's updates, fixed, on all the data), "
            "sinkhorn-heldout-signal-retrain (sinkhorn-heldout's plan update replayed on the mean hypergradient of each quarter "
            "of that run, fixed, on all the data), softmax-retrain (softmax's final plan of the "
            "same seed, fixed from step 0: learning the plan against the plan it finds)")


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _setting_from_args(args):
    from .experiment import SETTINGS, Setting, quick

    if getattr(args, "setting", None):
        setting = SETTINGS[args.setting]
    else:
        setting = Setting("cli", args.teacher, json.loads(args.teacher_kwargs), args.student, json.loads(args.student_kwargs))
    overrides = {k: getattr(args, k) for k in ("epochs", "teacher_epochs", "train_limit", "test_limit", "batch_size", "lr")
                 if getattr(args, k, None) is not None}
    setting = replace(setting, **overrides)
    return quick(setting) if getattr(args, "quick", False) else setting


def _run_and_report(setting, strategies, seeds, out, args, *, fit_options=None) -> dict:
    from .distributed import is_main
    from .experiment import run_setting, write_outputs

    if fit_options:
        setting = replace(setting, fit_options={**setting.fit_options, **fit_options})
    start = time.perf_counter()
    records, tinfo = run_setting(setting, strategies, seeds, out, data_root=args.data, progress=not args.no_progress)
    if not is_main():  # under torchrun only rank 0 writes and prints the outputs
        return {}
    summary = write_outputs(setting, records, tinfo, out, seeds=seeds, strategies=strategies)
    print()
    print(summary["table"])
    print(f"wall time {time.perf_counter() - start:.0f} s; outputs in {summary['dir']}/ "
          "(table.md, results.json, accuracy.png, alignment.png, one folder per run)")
    return summary


def cmd_demo(args) -> int:
    from .experiment import SETTINGS, quick

    setting = quick(SETTINGS["demo"]) if args.quick else SETTINGS["demo"]
    teacher = f"shipped teacher {setting.teacher_zoo}" if setting.teacher_zoo else f"teacher {setting.teacher}{setting.teacher_kwargs}"
    print(f"align_kd demo: {setting.description}\n"
          f"{teacher} -> student {setting.student}{setting.student_kwargs}, "
          f"{setting.train_limit or 50000} training images, {setting.epochs} distillation epochs per strategy")
    _run_and_report(setting, args.strategies, [args.seed], args.out, args)
    return 0


def _fit_options_from_args(args) -> dict:
    """The FitConfig options that ``fit``'s flags set (flags left out keep the setting's values)."""
    opts = {k: getattr(args, k) for k in ("beta", "tau", "kd_weight", "checkpoint_dir", "skip_pairs_below") if getattr(args, k) is not None}
    opts.update({k: True for k in ("amp", "channels_last", "compile", "resume") if getattr(args, k)})
    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("--resume needs --checkpoint-dir (the folder the interrupted run saved to).")
    return opts


def cmd_fit(args) -> int:
    setting = _setting_from_args(args)
    _run_and_report(setting, [args.strategy], [args.seed], args.out, args, fit_options=_fit_options_from_args(args))
    return 0


def cmd_select(args) -> int:
    from ._env import versions
    from ._io import atomic_write_text
    from .experiment import select_for_setting, selection_folder

    setting = _setting_from_args(args)
    start = time.perf_counter()
    sel, tinfo = select_for_setting(setting, args.seed, args.candidates, search_epochs=args.search_epochs,
                                    schedule=args.schedule, heldout_fraction=args.heldout_fraction, fallback=args.fallback,
                                    alpha=args.alpha, out_dir=args.out, data_root=args.data, progress=not args.no_progress)
    folder = selection_folder(args.out, setting, args.seed, args.schedule, args.search_epochs)
    length = args.search_epochs if args.schedule == "short" else f"the first {args.search_epochs} of {setting.epochs}"
    print(f"\n{setting.name}, seed {args.seed}: held-out accuracy ({sel.heldout_images} images kept aside, "
          f"{sel.train_images} trained on) after each of {length} epochs\n")
    print("| candidate | held-out acc by epoch | final | seconds |")
    print("|---|---|---|---|")
    for name in [*sel.ranking(), *sel.diverged]:
        curve = " ".join(f"{a:.4f}" for a in sel.curves[name]) if name in sel.curves else "diverged"
        final = f"**{sel.scores[name]:.4f}**" if name == sel.choice else f"{sel.scores[name]:.4f}" if name in sel.scores else ""
        print(f"| {name} | {curve} | {final} | {sel.seconds[name]:.0f}{' (read back)' if name in sel.cached else ''} |")
    for name, message in sel.diverged.items():
        print(f"{name} diverged: {message}")
    if sel.mcnemar:
        print(f"\n{sel.fallback_summary()}")
    print(f"\nchoice: {sel.choice} ({time.perf_counter() - start:.0f} s; each candidate's result in {folder}/)")
    atomic_write_text(folder / "selection.json", json.dumps({
        "setting": setting.name, "seed": args.seed, "schedule": args.schedule, "search_epochs": args.search_epochs,
        "epochs": setting.epochs, "heldout_fraction": args.heldout_fraction, "teacher": tinfo["path"],
        "teacher_acc": tinfo["test_acc"], "choice": sel.choice, "best": sel.best, "fallback": sel.fallback,
        "alpha": sel.alpha, "mcnemar": sel.mcnemar, "ranking": sel.ranking(), "scores": sel.scores,
        "curves": sel.curves, "diverged": sel.diverged, "seconds": sel.seconds, "heldout_images": sel.heldout_images,
        "train_images": sel.train_images, "versions": versions()}, indent=1))
    if args.fit:
        print(f"\ntraining the choice, {sel.choice}, on all the training data:")
        _run_and_report(setting, [sel.choice], [args.seed], args.out, args)
    else:
        print("to train it on all the training data, rerun this command with --fit (the candidates are read back)")
    return 0


def cmd_bench(args) -> int:
    from pathlib import Path

    from .experiment import ALL_STRATEGIES, REAL_TABLE, SETTINGS, format_status, quick, report, report_settings, run_states

    names = args.settings or (list(REAL_TABLE) if args.protocol == "real" else
                              [n for n, s in SETTINGS.items() if s.protocol == "toy"])
    if (args.report or args.status) and not args.settings and args.protocol == "real":  # also the diagnostics with runs
        names = [s.name for s in report_settings(args.out)]
    settings = [quick(SETTINGS[n]) if args.quick else SETTINGS[n] for n in names]
    if args.status:
        seeds = [0] if args.quick else list(range(args.seeds))
        for setting in settings:
            print(format_status(setting, run_states(args.out, setting, args.strategies, seeds)))
        return 0
    args.strategies = args.strategies or list(ALL_STRATEGIES)
    readme = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"
    readme = readme if (not args.quick and Path(args.out).resolve() == (readme.parent / "results").resolve()) else None
    if not args.report:
        seeds = [0] if args.quick else list(range(args.seeds))
        for setting in settings:
            print(f"== {setting.name}: {setting.description}")
            _run_and_report(setting, args.strategies, seeds, args.out, args)
    if args.report or any(s.protocol == "real" for s in settings):
        print(report(settings, args.out, readme=readme))
        if readme is not None:
            print(f"tables regenerated from the record files into {readme}")
    return 0


def cmd_zoo(args) -> int:
    from . import zoo

    if args.action == "list":
        for name in zoo.RECIPES:
            shipped = name in zoo.list_teachers()
            card = zoo.load_teacher(name)[1] if shipped else None
            state = (f"test acc {card['test_acc']:.4f} (flip {card['test_acc_flip']:.4f}), {card['params']:,} parameters, "
                     f"trained in {card['train_seconds']:.0f} s on {card['threads']} threads") if card else "not shipped"
            print(f"{name:10s} {state}\n           {zoo.RECIPES[name].description}")
        return 0
    if args.resume and not args.checkpoint_dir:
        raise SystemExit("zoo train --resume needs --checkpoint-dir (the folder of the interrupted run's checkpoints).")
    for name in args.names:
        checkpoints = Path(args.checkpoint_dir) / name if args.checkpoint_dir else None
        model, card = zoo.train_teacher(name, data_root=args.data, seed=args.seed, weights_dir=args.weights_dir,
                                        train_limit=args.train_limit, epochs=args.epochs, progress=not args.no_progress,
                                        checkpoint_dir=checkpoints, resume=args.resume, from_teacher=args.from_teacher)
        print(f"{name}: test acc {card['test_acc']:.4f} (with test-time flips {card['test_acc_flip']:.4f}) on "
              f"{card['test_images']} test images; {card['params']:,} parameters; trained in {card['train_seconds']:.0f} s "
              f"on {card['threads']} threads; sha256 {card['sha256'][:16]}...")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="CIFAR-10 location (cifar-10-batches-py folder or the JPEG .tar.gz); "
                                                "default: $ALIGN_KD_DATA, then the cache directory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _pair_args(p: argparse.ArgumentParser, *, out: str) -> None:
    """The teacher-student pair and its budget: a named setting, or models with overrides (fit, select)."""
    from .experiment import SETTINGS

    p.add_argument("--setting", choices=sorted(SETTINGS), default=None, help="a named pair and budget (overrides --teacher/--student)")
    p.add_argument("--teacher", default="cnn", help="teacher model: cnn, resnet, mlp, vit (default cnn)")
    p.add_argument("--teacher-kwargs", default='{"width": 32}', help="JSON keyword arguments of the teacher")
    p.add_argument("--student", default="cnn", help="student model: cnn, resnet, mlp, vit (default cnn)")
    p.add_argument("--student-kwargs", default='{"width": 8}', help="JSON keyword arguments of the student")
    p.add_argument("--epochs", type=int, default=None, help="distillation epochs")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher training epochs (when not cached)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--test-limit", type=int, default=None, help="use only this many test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few hundred images and one epoch")
    p.add_argument("--out", default=out, help=f"output directory (default: {out})")


def build_parser() -> argparse.ArgumentParser:
    from .experiment import ALL_STRATEGIES, PLAN_FROM_ROW, SETTINGS

    parser = argparse.ArgumentParser(prog="python -m align_kd", description="align_kd: layer-aligned knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job: teacher, then several strategies side by side on CIFAR-10",
                       description="Train (or load the cached) teacher, distil the student with several lambda strategies "
                                   "on the same budget, print the accuracy table and save the accuracy plot and the "
                                   "alignment pictures.")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--strategies", nargs="+", default=["alone", "hinton", "sinkhorn"], choices=ALL_STRATEGIES,
                   help="strategies to compare (default: alone hinton sinkhorn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a few hundred images and one epoch (smoke test)")
    _common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("fit", help="distil one student with one strategy",
                       description="Distil a reference student from a reference teacher with one strategy; results "
                                   "(result.json, student.pt, plots) go to the output directory.")
    _pair_args(p, out="runs/fit")
    p.add_argument("--strategy", default="sinkhorn", choices=ALL_STRATEGIES, help=_strategy_help())
    p.add_argument("--beta", type=float, default=None, help="weight of cross-entropy in [0, 1]")
    p.add_argument("--tau", type=float, default=None, help="plan temperature")
    p.add_argument("--kd-weight", type=float, default=None, help="weight of Hinton's logit KD term")
    p.add_argument("--checkpoint-dir", default=None, help="save a checkpoint after every epoch into this folder")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --checkpoint-dir")
    p.add_argument("--skip-pairs-below", type=float, default=None, metavar="LAMBDA",
                   help="evaluate only pairs with plan weight >= LAMBDA between full passes (e.g. 0.05; default all pairs)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (the MI likelihood stays float32)")
    p.add_argument("--channels-last", action="store_true", help="models and image batches in channels_last memory format")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the teacher, student and MI bank forwards (the first steps pay for compilation)")
    _common(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("select", help="choose the strategy for a pair by held-out accuracy of short runs",
                       description="Train every candidate strategy for a few epochs on the training images less a held-out "
                                   "share (--heldout-fraction, default 10%; the same student initialisation and data order), "
                                   "score each on the held-out images and print the ranking; --fit then trains the choice on all the training data. The test set plays no "
                                   "part in the choice. Each candidate's result is kept, so a rerun skips finished ones.")
    _pair_args(p, out="runs/select")
    p.add_argument("--candidates", nargs="+", default=["pairwise", "uniform", "softmax", "sinkhorn"],
                   choices=[s for s in ALL_STRATEGIES if s not in PLAN_FROM_ROW], metavar="STRATEGY",
                   help="strategies to choose between (default: pairwise uniform softmax sinkhorn; add hinton for the "
                        "logit-KD fallback); any strategy `fit --strategy` takes except the *-retrain rows")
    p.add_argument("--search-epochs", type=int, required=True, help="epochs each candidate trains before it is scored")
    p.add_argument("--schedule", choices=["truncated", "short"], default="short",
                   help="short (default): a whole schedule of --search-epochs epochs per candidate; truncated: the first "
                        "--search-epochs epochs of the full schedule")
    p.add_argument("--heldout-fraction", type=float, default=0.1, help="share of the training images that scores the candidates")
    p.add_argument("--fallback", default=None, metavar="STRATEGY",
                   help="a candidate (e.g. hinton) kept unless the best candidate gets significantly more held-out images "
                        "right (exact one-sided McNemar test at --alpha)")
    p.add_argument("--alpha", type=float, default=0.05, help="the fallback test's level (default 0.05)")
    p.add_argument("--fit", action="store_true", help="then train the choice on all the training data (as `fit --strategy CHOICE`)")
    _common(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("bench", help="the strategy benchmark (all settings x strategies x seeds)",
                       description="Reproduce and extend the originating study's table: every named setting, every "
                                   "strategy, several seeds, identical budgets; writes JSON, markdown tables and plots.")
    p.add_argument("--protocol", choices=["toy", "real"], default="toy",
                   help="toy: the small-budget settings; real: shipped teachers, full CIFAR-10 (resumable: finished runs are skipped, a run cut off mid-way continues from its last finished epoch)")
    p.add_argument("--settings", nargs="+", default=None, choices=sorted(s for s in SETTINGS if s != "demo"),
                   help="settings to run (default: every setting of --protocol)")
    p.add_argument("--strategies", nargs="+", default=None, choices=ALL_STRATEGIES, help="rows to run (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: rebuild the tables from the finished runs' record files (and benchmarks/README.md)")
    p.add_argument("--status", action="store_true",
                   help="train nothing: show which runs are finished, cut off (and after which epoch) or still to run, "
                        "and the hours left estimated from the finished runs")
    p.add_argument("--quick", action="store_true", help="a few hundred images, one epoch, one seed (CI)")
    p.add_argument("--out", default="benchmarks/results", help="output directory (default: benchmarks/results)")
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("zoo", help="the shipped teachers: list them, or retrain one from scratch",
                       description="`zoo list` prints every shipped teacher's card; `zoo train NAME` retrains NAME with "
                                   "its recipe on the full CIFAR-10 training set and writes its weights and card.")
    p.add_argument("action", choices=["list", "train"])
    p.add_argument("names", nargs="*", default=[], help="teachers to train (see `zoo list`)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="shorten the recipe (smoke runs)")
    p.add_argument("--train-limit", type=int, default=None, help="train on this many images only (smoke runs)")
    p.add_argument("--weights-dir", default=None, help="where to write weights and card (default: the package's zoo folder)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="write a checkpoint after every epoch to DIR/NAME/ (long recipes over several sittings)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--from-teacher", default=None, metavar="FIRST",
                   help="a recipe with an SWA stage: start that stage from teacher FIRST (shipped, or in --weights-dir), "
                        "which must have been trained by the recipe's first stage (checked against its card)")
    _common(p)
    p.set_defaults(func=cmd_zoo)

    from .graph.reporting import add_cli

    add_cli(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _threads(getattr(args, "threads", None))
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
