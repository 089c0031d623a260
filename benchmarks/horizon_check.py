"""Does the held-out rule's one-step hypergradient point where a longer horizon does? (issue 13)

`plan_objective="heldout"` moves the plan along H[i, j] = w <grad I(t_i; s_j), grad CE_heldout>
(:meth:`align_kd.Distiller.heldout_hypergradient`): to first order, the change of the held-out
cross-entropy one SGD step after raising lambda[i, j]. On every `real` setting measured, the plan it
learns is no better than the diagonal. This script asks whether the first-order, one-step signal is
the culprit. From one training state theta_0 (the setting's student after ``--warmup-epochs`` with
the pairwise plan, on the 90% split the held-out rule trains on), it measures the true derivative

    G_k[i, j] = (L_k(lambda_0 + delta E_ij) - L_k(lambda_0 - delta E_ij)) / (2 delta)

of the held-out cross-entropy L_k after k training steps (the same k batches, same order, for all
2 T S perturbed runs, so the differences are the plan's alone), for every pair and every horizon
in ``--horizons``, and compares it with H at theta_0:

- k = 1 checks the signal itself: G_1 = lr (1 + mu) H_1 (nesterov SGD, momentum mu; H_1 read after
  step 1 against the scoring images, as fit() reads it) for each variant of the rule in ``RULES``:
  MI gradients before the step (``heldout_grad_point="before_step"``, the default: exact, since
  the step is linear in lambda) or after it (first order in lr), with train-mode batch statistics
  (the step's own) or eval-mode running statistics (``heldout_grad_mode``);
- for k > 1, the rule's view is H averaged over its first ``--hyper-batches`` updates (one after
  each step, update k against held-out batch k, as fit() calls it with ``heldout_every=1``); the
  table gives the rank correlation with G_k, the share of pairs whose sign agrees, and how many
  student layers (columns) get the same best teacher layer (the lowest entry) from both.

If the horizon-k ranking departs from H's as k grows, a one-step rule is learning from a signal
the training it steers does not follow. That comparison only means something where G_k is a
derivative: the further ``--deltas`` measure G_k again with other perturbations, and a
derivative does not depend on the perturbation that measures it (k = 1 always is one: the step is
linear in lambda). Resumable (each perturbed run is saved as it finishes).
Output: benchmarks/results/horizon_check.json and horizon_check.png.

    python benchmarks/horizon_check.py [--setting real-cnn-noaug] [--horizons 1 4 16 64]
                                       [--deltas 0.1 0.02] [--warmup-epochs 1] [--seed 0] [--no-amp]
"""
import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import default_root, write_json
from scipy import stats
from tqdm import tqdm

from align_kd import Distiller, zoo
from align_kd.data import cifar10_loaders, split_heldout
from align_kd.distributed import DistContext
from align_kd.evaluation import preserve_mode
from align_kd.experiment import REAL_SETTINGS, versions
from align_kd.models import build_model
from align_kd.training import make_optimizer, train_step

ROOT = Path(__file__).resolve().parent
#: the rule's variants compared with G: name -> (heldout_grad_mode, heldout_grad_point)
RULES = {"train": ("train", "after_step"), "eval": ("eval", "after_step"), "before_step": ("train", "before_step")}


@torch.no_grad()
def heldout_ce(distiller: Distiller, held: tuple) -> float:
    """Mean cross-entropy of the student on the held-out images, in eval mode and float32."""
    x, y = held
    with preserve_mode(distiller.student, training=False):
        return float(F.cross_entropy(distiller.student(distiller.batch(x)).float(), y))


def constant_lr(optimizer):
    """The setting's learning rate, held constant (the step size lr (1 + mu) H assumes)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)


def restore(distiller, optimizer, snapshot) -> None:
    """Back to theta_0: the Distiller's state (student, bank, plan) and the optimiser's momentum."""
    distiller.load_state_dict(snapshot["distiller"])
    # a copy: Optimizer.load_state_dict keeps the given momentum tensors, which the steps then update in place
    optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))


def run_perturbed(distiller, optimizer, snapshot, plan: torch.Tensor, batches, held, horizons) -> list[float]:
    """Held-out CE after each horizon in ``horizons`` of training from ``snapshot`` with ``plan``."""
    restore(distiller, optimizer, snapshot)
    distiller.plan.value.copy_(plan)  # (T, S); off the simplex by +-delta: a derivative, not a plan to train with
    scheduler, losses, dist = constant_lr(optimizer), [], DistContext()
    for k, (x, y) in enumerate(batches[: max(horizons)], start=1):
        out = train_step(distiller, distiller, optimizer, scheduler, x, y, kd_scale=1.0, grad_clip=None, dist=dist)
        if isinstance(out, str):
            raise RuntimeError(f"training step {k} was skipped ({out}); the derivative would be meaningless")
        if k in horizons:
            losses.append(heldout_ce(distiller, held))
    return losses


def column_choice(m: torch.Tensor, names: list[str]) -> list[str]:
    """Per student layer (column), the teacher layer whose weight lowers held-out loss the most."""
    return [names[i] for i in m.argmin(0).tolist()]


def column_agreement(G: torch.Tensor, H: torch.Tensor) -> int:
    """Student layers (columns) whose best teacher layer (lowest entry) is the same in both."""
    return int((G.argmin(0) == H.argmin(0)).sum())


def compare(G: torch.Tensor, H: torch.Tensor) -> dict:
    """Rank correlation, Pearson correlation and sign agreement of two (T, S) matrices."""
    g, h = G.flatten().double(), H.flatten().double()
    return {"spearman": float(stats.spearmanr(g, h).statistic), "pearson": float(stats.pearsonr(g, h).statistic),
            "sign_agreement": float(((g > 0) == (h > 0)).double().mean())}


def draw(path, G: dict, H: torch.Tensor, t_names, s_names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rule's H (before the step, mean over updates)", H)] + [(f"G_{k}: {k} step(s)", m) for k, m in G.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        lim = float(m.abs().max()) or 1.0
        ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)  # red: raising the weight raises held-out loss
        for i, j in zip(*torch.nonzero(m == m.min(0, keepdim=True).values, as_tuple=True)):
            ax.text(int(j), int(i), "*", ha="center", va="center")  # the column's best teacher layer
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(s_names)), s_names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(t_names)), t_names, fontsize=6)
    axes[0][0].set_ylabel("teacher layer (rows)")
    fig.suptitle("d held-out CE / d lambda[i, j] (blue: the pair helps; * best per student layer)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="real-cnn-noaug", choices=sorted(REAL_SETTINGS))
    ap.add_argument("--horizons", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--deltas", type=float, nargs="+", default=[0.1, 0.02],
                    help="perturbations of one plan weight (the plan's columns sum to 1): the first gives G, the others "
                         "test whether G is a derivative (the same G at every delta)")
    ap.add_argument("--warmup-epochs", type=float, default=1.0, help="training with the pairwise plan before theta_0")
    ap.add_argument("--hyper-batches", type=int, default=8, help="(train, held-out) batch pairs averaged into the rule's H")
    ap.add_argument("--heldout-images", type=int, default=5000, help="held-out images scoring L_k (of the 10%% split)")
    ap.add_argument("--train-limit", type=int, default=None, help="training images (default: all; smaller for a smoke run)")
    ap.add_argument("--no-amp", action="store_true", help="train in float32 even where the setting uses bf16 autocast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "horizon_check.json"))
    ap.add_argument("--data", default=None)
    args = ap.parse_args(argv)
    horizons = sorted(set(args.horizons))
    if horizons[0] < 1 or min(args.deltas) <= 0 or args.warmup_epochs < 0 or args.hyper_batches < 1:
        ap.error(f"expected horizons >= 1, deltas > 0, warmup-epochs >= 0 and hyper-batches >= 1; got {horizons}, "
                 f"{args.deltas}, {args.warmup_epochs}, {args.hyper_batches}")
    torch.set_num_threads(args.threads)
    setting = REAL_SETTINGS[args.setting]
    root = args.data or default_root()
    config = {"setting": setting.name, "horizons": horizons, "deltas": args.deltas, "warmup_epochs": args.warmup_epochs,
              "hyper_batches": args.hyper_batches, "heldout_images": args.heldout_images,
              "train_limit": args.train_limit, "seed": args.seed, "lr": setting.lr, "batch_size": setting.batch_size,
              "fit_options": {**setting.fit_options, **({"amp": False} if args.no_amp else {})}}
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    # resumable: the finished perturbed runs of the same configuration (runs are keyed by their delta,
    # so a run made for another list of deltas is reused where its delta is asked for again)
    same = {k: v for k, v in saved.get("config", {}).items() if k != "deltas"} == {k: v for k, v in config.items() if k != "deltas"}
    wanted = {f"{d:g}" for d in args.deltas}

    train, _ = cifar10_loaders(root, batch_size=setting.batch_size, limit=args.train_limit, augment=setting.augment, seed=0)
    train, held_batches = split_heldout(train, 0.1, seed=args.seed)  # the held-out rule's split (fit's default)
    held = (torch.cat([x for x, _ in held_batches])[: args.heldout_images], torch.cat([y for _, y in held_batches])[: args.heldout_images])
    teacher, card = zoo.load_teacher(setting.teacher_zoo)
    torch.manual_seed(args.seed)
    student = build_model(setting.student, **setting.student_kwargs)
    example = next(iter(train))[0]
    distiller = Distiller(teacher, student, example, strategy="pairwise", **config["fit_options"])
    lam0 = distiller.plan.value.clone()  # (T, S), rows teacher layers: one-to-one by relative depth
    cfg = replace(distiller.cfg, lr=setting.lr)
    optimizer = make_optimizer(distiller, cfg)
    t_names, s_names = distiller.teacher_layers, distiller.student_layers
    T, S = lam0.shape

    # theta_0: the student after warm-up with the pairwise plan (constant lr)
    start = time.perf_counter()
    warm = int(args.warmup_epochs * len(train))
    batches, it = [], iter(train)
    constant = constant_lr(optimizer)
    for step in tqdm(range(warm + max(max(horizons), args.hyper_batches)), desc="warm-up", disable=not sys.stderr.isatty()):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(train)
            x, y = next(it)
        if step < warm:
            train_step(distiller, distiller, optimizer, constant, x, y, kd_scale=1.0, grad_clip=None, dist=DistContext())
        else:
            batches.append((x.clone(), y.clone()))  # the batches after theta_0: the horizons' and the rule's updates
    snapshot = copy.deepcopy({"distiller": distiller.state_dict(), "optimizer": optimizer.state_dict()})
    warm_s = time.perf_counter() - start
    L0 = heldout_ce(distiller, held)
    # the saved runs are reused only from the same theta_0 (its held-out CE to the bit): the warm-up is
    # not bitwise the same on another machine (measured: 1.3692 on the machine that made the first runs, 1.2585 on a later one)
    same = same and saved.get("heldout_ce_theta0") == L0
    runs = {k: v for k, v in saved.get("runs", {}).items() if k.split(",")[0] in wanted} if same else {}

    # the rule's signal as fit() computes it: after training step k on batch k (the unperturbed
    # trajectory from theta_0), against held-out batch k, in both modes of the MI gradients; H_1 is
    # after step 1 against the scoring images (G_1's first-order prediction, with lr (1 + mu))
    H = {}
    for rule, (mode, point) in RULES.items():
        distiller.cfg = replace(cfg, heldout_grad_mode=mode, heldout_grad_point=point)
        restore(distiller, optimizer, snapshot)
        per_step, dist = [], DistContext()
        for k, (x, y) in enumerate(batches[: args.hyper_batches]):
            distiller.capture_step_start()  # before_step: the MI gradients' point (a no-op for after_step)
            train_step(distiller, distiller, optimizer, constant_lr(optimizer), x, y, kd_scale=1.0, grad_clip=None, dist=dist)
            # update k against held-out batch k; the first against all the scoring images (G_1's prediction)
            per_step.append(distiller.heldout_hypergradient(train=(x, y), heldout=held if k == 0 else held_batches[k % len(held_batches)]))
        H[f"{rule}_1"] = per_step[0]  # (T, S)
        H[rule] = torch.stack(per_step).mean(0)  # (T, S)
    distiller.cfg = cfg
    mu = cfg.momentum
    step_factor = cfg.lr * (1 + mu)  # d theta_1 / d (w lam_ij grad I_ij) under nesterov SGD

    pairs = [(delta, i, j) for delta in args.deltas for i in range(T) for j in range(S)]
    start = time.perf_counter()
    for delta, i, j in tqdm(pairs, desc="perturbed runs", disable=not sys.stderr.isatty()):
        key = f"{delta:g},{i},{j}"
        if key in runs:
            continue
        E = torch.zeros(T, S)
        E[i, j] = delta
        plus = run_perturbed(distiller, optimizer, snapshot, lam0 + E, batches, held, horizons)
        minus = run_perturbed(distiller, optimizer, snapshot, lam0 - E, batches, held, horizons)
        runs[key] = {"plus": plus, "minus": minus}
        write_json({"config": config, "heldout_ce_theta0": L0, "runs": runs, "partial": True}, out)
    fd_s = time.perf_counter() - start

    by_delta = {d: {k: torch.zeros(T, S) for k in horizons} for d in args.deltas}  # (T, S) per delta and horizon
    for key, r in runs.items():
        d, i, j = key.split(",")
        for n, k in enumerate(horizons):
            by_delta[float(d)][k][int(i), int(j)] = (r["plus"][n] - r["minus"][n]) / (2 * float(d))
    G = by_delta[args.deltas[0]]
    # a derivative does not depend on the step that measures it: how far each other delta's G is from G
    linearity = [{"delta": d, "horizon": k, "relative_difference": float((by_delta[d][k] - G[k]).norm() / G[k].norm()),
                  "spearman": compare(by_delta[d][k], G[k])["spearman"]} for d in args.deltas[1:] for k in horizons]
    last = G[horizons[-1]]
    rows = []
    for k in horizons:
        rows.append({"horizon": k, **{f"vs_H_{r}": compare(G[k], H[r]) for r in RULES},
                     "vs_last_horizon": compare(G[k], last),
                     **{f"columns_agreeing_{r}": column_agreement(G[k], H[r]) for r in RULES},
                     "best_teacher_per_student_layer": column_choice(G[k], t_names)})
    first = {rule: compare(G[1], step_factor * H[f"{rule}_1"]) | {"relative_error": float(
        (G[1] - step_factor * H[f"{rule}_1"]).norm() / G[1].norm())} for rule in RULES} if 1 in G else None
    print(f"\n{setting.name}, seed {args.seed}: theta_0 after {args.warmup_epochs:g} epoch(s) of pairwise "
          f"(held-out CE {L0:.4f}); G from delta {args.deltas[0]:g}, lr {cfg.lr}, momentum {mu}; {len(held[1])} held-out images")
    if first:
        for rule, c in first.items():
            mode, point = RULES[rule]
            print(f"G_1 against lr (1 + mu) H_1 ({mode}-mode MI gradients {point.replace('_', ' ')} 1): relative error "
                  f"{c['relative_error']:.3f}, spearman {c['spearman']:+.3f}, signs agree {c['sign_agreement']:.2f}")
    if linearity:
        print(f"\nIs G a derivative? G_k at another delta against G_k at delta {args.deltas[0]:g}:\n")
        print("| delta | horizon k | relative difference | spearman |\n|---|---|---|---|")
        for r in linearity:
            print(f"| {r['delta']:g} | {r['horizon']} | {r['relative_difference']:.3f} | {r['spearman']:+.3f} |")
    print(f"\nspearman / sign agreement / columns whose best teacher layer agrees, G_k against the rule's H "
          f"(mean over {args.hyper_batches} updates), per variant of the rule (MI gradients' mode, point):\n")
    print("| horizon k | " + " | ".join(f"H {r}: spearman | signs | best agrees" for r in RULES)
          + f" | spearman(G_k, G_{horizons[-1]}) | best teacher layer per student layer ({', '.join(s_names)}) |")
    print("|---|" + "---|---|---|" * len(RULES) + "---|---|")
    for row in rows:
        cells = " | ".join(f"{row[f'vs_H_{r}']['spearman']:+.3f} | {row[f'vs_H_{r}']['sign_agreement']:.2f} | "
                           f"{row[f'columns_agreeing_{r}']}/{S}" for r in RULES)
        print(f"| {row['horizon']} | {cells} | {row['vs_last_horizon']['spearman']:+.3f} | "
              f"{', '.join(row['best_teacher_per_student_layer'])} |")
    for rule in RULES:
        print(f"| rule's H, {rule} |" + " | | |" * len(RULES)
              + f" {compare(H[rule], last)['spearman']:+.3f} | {', '.join(column_choice(H[rule], t_names))} |")
    payload = {"config": config, "versions": versions(), "teacher_card": {k: card[k] for k in ("test_acc", "sha256")},
               "teacher_layers": t_names, "student_layers": s_names, "heldout_ce_theta0": L0, "step_factor": step_factor,
               "first_step": first, "linearity": linearity, "H": {k: m.tolist() for k, m in H.items()},
               "G": {f"{d:g}": {str(k): m.tolist() for k, m in g.items()} for d, g in by_delta.items()}, "rows": rows, "runs": runs,
               "warmup_s": warm_s, "perturbed_runs_s": fd_s, "partial": False}
    write_json(payload, out)
    draw(out.with_suffix(".png"), G, H["before_step"], t_names, s_names)
    return 0


if __name__ == "__main__":
    sys.exit(main())
