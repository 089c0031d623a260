#!/usr/bin/env python
"""Plan solvers side by side: sinkhorn (cold, warm), cvxpy, linprog, Hungarian; and sinkhorn's gradient.

For each plan shape T x S and temperature tau, a batch of N(0, 1) score matrices with the uniform
row marginal r = S / T is solved by every method that applies:

- ``sinkhorn cold``: ``sinkhorn_solve`` on the whole batch at once, no initial potential (tau > 0).
- ``sinkhorn warm``: the same, warm-started from the potentials of a perturbed problem
  (scores - 0.01 * noise), as in a training step where the logits move a little (tau > 0).
- ``sinkhorn 1-prob``: ``sinkhorn_solve`` on a single problem (per-problem latency, tau > 0).
- ``cvxpy``: ``exact_plan(method="cvxpy")`` looped over the batch (ECOS; the entropic problem for
  tau > 0, the LP for tau = 0).
- ``linprog``: ``exact_plan(method="linprog")`` (HiGHS), tau = 0.
- ``hungarian``: ``exact_plan(method="hungarian")``, square shapes (r = 1), tau = 0.

Timings: wall clock (``time.perf_counter``), one warm-up call excluded (for the looped exact
solvers the warm-up solves the first problem of the batch, which builds and caches the cvxpy
problem), then the median of up to ``--repeats`` calls (fewer once a method has used
``--budget`` seconds). Accuracy: for tau > 0 the max |P - P_ref| over the batch against cvxpy/ECOS
(its own accuracy is checked against sinkhorn at tol=1e-12, column ``ref_check``); for tau = 0 the
largest objective shortfall <scores, P_ref - P> against linprog (LP optima can tie, so plans are
not compared). Single-threaded (torch, BLAS).

Usage:
    python benchmarks/plan_solvers.py            # full grid (about 5 minutes on one core)
    python benchmarks/plan_solvers.py --quick    # tiny grid, seconds
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import datetime
import statistics
import sys
import time
import warnings

import cvxpy
import numpy as np
import scipy
import torch

from align_kd._env import versions
from align_kd.exact import exact_plan, exact_plan_info
from align_kd.plans import sinkhorn_solve
from _common import write_json

torch.set_num_threads(1)

FULL = {
    "sizes": [(4, 4), (8, 8), (16, 16), (32, 32), (64, 64), (12, 24)],
    "taus": [1.0, 0.1, 0.03, 0.0],
    "batch": 64,
    "repeats": 3,
    "grad_taus": [1.0, 0.1],
    "grad_batch": 64,
}
QUICK = {
    "sizes": [(4, 4), (12, 24)],
    "taus": [1.0, 0.03, 0.0],
    "batch": 8,
    "repeats": 2,
    "grad_taus": [1.0],
    "grad_batch": 8,
}
WARM_NOISE = 0.01  # logits change per simulated training step
UNROLLED_MAX_ITER = 200  # cap on unrolled sweeps in the gradient benchmark (memory grows per sweep)

METHODS = ["sinkhorn cold", "sinkhorn warm", "sinkhorn 1-prob", "cvxpy", "linprog", "hungarian"]
REFERENCE = "cvxpy"  # ratio column: the only method that applies at every tau


FAST_S = 0.5  # fast methods repeat (up to MAX_REPEATS calls) until they have used this long
MAX_REPEATS = 25


def timed(fn, repeats: int, budget_s: float, warmup=None):
    """(median seconds, all timed seconds, last result).

    One warm-up call, then `repeats` timed calls, stopping early once `budget_s` is spent; fast
    methods go on (up to MAX_REPEATS calls) until FAST_S seconds are spent, to damp timer noise.
    """
    (warmup or fn)()
    times, out = [], None
    while len(times) < MAX_REPEATS:
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        spent = sum(times)
        if spent > budget_s or (len(times) >= repeats and spent > FAST_S):
            break
    return statistics.median(times), times, out


def marginal_error(P: np.ndarray, r: np.ndarray) -> float:
    """max(|column sums - 1|, |row sums - r|) over the batch."""
    return float(max(np.abs(P.sum(-2) - 1).max(), np.abs(P.sum(-1) - r).max()))


def objective(C: np.ndarray, P: np.ndarray) -> np.ndarray:
    return (C * P).sum((-2, -1))  # (B,)


def bench_solvers(T: int, S: int, tau: float, B: int, seed: int, repeats: int, budget: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, T, S, generator=g, dtype=torch.float64)  # (B, T, S) scores
    noise = torch.randn(B, T, S, generator=g, dtype=torch.float64)
    r = torch.full((T,), S / T, dtype=torch.float64)  # (T,)
    C, r_np = L.numpy(), r.numpy()
    rows: dict[str, dict] = {}

    def record(name, times, P=None, **extra):
        med = statistics.median(times)
        row = {"seconds": med, "per_problem_ms": 1e3 * med / (1 if name == "sinkhorn 1-prob" else B),
               "times": times, **extra}
        if P is not None:
            row["marginal_error"] = marginal_error(P, r_np)
        rows[name] = row
        return row

    if tau > 0:
        # reference: cvxpy/ECOS, looped over the batch
        _, times, (P_ref, info) = timed(lambda: exact_plan_info(C, r_np, tau=tau, method="cvxpy"), repeats, budget,
                                        warmup=lambda: exact_plan(C[:1], r_np, tau=tau, method="cvxpy"))
        P_ref = P_ref.numpy()
        record("cvxpy", times, P_ref, max_dev=0.0, solver=info["solver"])
        tight = sinkhorn_solve(L, r, tau=tau, tol=1e-12, max_iter=50_000, warn=False).plan.numpy()
        rows["cvxpy"]["ref_check"] = float(np.abs(tight - P_ref).max())

        _, times, res = timed(lambda: sinkhorn_solve(L, r, tau=tau), repeats, budget)
        record("sinkhorn cold", times, res.plan.numpy(), max_dev=float(np.abs(res.plan.numpy() - P_ref).max()),
               iterations=res.iterations, converged=res.converged)

        prev = sinkhorn_solve(L - WARM_NOISE * noise, r, tau=tau)  # last step's problem
        _, times, res = timed(lambda: sinkhorn_solve(L, r, tau=tau, init=prev.row_potential), repeats, budget)
        record("sinkhorn warm", times, res.plan.numpy(), max_dev=float(np.abs(res.plan.numpy() - P_ref).max()),
               iterations=res.iterations, converged=res.converged)

        _, times, res = timed(lambda: sinkhorn_solve(L[0], r, tau=tau), max(repeats, 5), budget)
        record("sinkhorn 1-prob", times, res.plan.numpy(), max_dev=float(np.abs(res.plan.numpy() - P_ref[0]).max()),
               iterations=res.iterations, converged=res.converged)
    else:
        _, times, P_lp = timed(lambda: exact_plan(C, r_np, method="linprog"), repeats, budget,
                               warmup=lambda: exact_plan(C[:1], r_np, method="linprog"))
        P_lp = P_lp.numpy()
        ref_obj = objective(C, P_lp)
        record("linprog", times, P_lp, objective_gap=0.0)

        _, times, (P, info) = timed(lambda: exact_plan_info(C, r_np, method="cvxpy"), repeats, budget,
                                    warmup=lambda: exact_plan(C[:1], r_np, method="cvxpy"))
        P = P.numpy()
        record("cvxpy", times, P, objective_gap=float((ref_obj - objective(C, P)).max()), solver=info["solver"])
        if T == S:
            _, times, P = timed(lambda: exact_plan(C, r_np, method="hungarian"), repeats, budget,
                                warmup=lambda: exact_plan(C[:1], r_np, method="hungarian"))
            P = P.numpy()
            record("hungarian", times, P, objective_gap=float((ref_obj - objective(C, P)).max()))
    return {"T": T, "S": S, "tau": tau, "batch": B, "seed": seed, "methods": rows}


def bench_gradients(T: int, S: int, tau: float, B: int, seed: int, repeats: int, budget: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(B, T, S, generator=g, dtype=torch.float64)
    G = torch.randn(B, T, S, generator=g, dtype=torch.float64)  # upstream gradient dLoss/dP
    r = torch.full((T,), S / T, dtype=torch.float64)
    out = {"T": T, "S": S, "tau": tau, "batch": B, "seed": seed}
    grads = {}
    for mode in ("implicit", "unrolled"):
        kwargs = {"grad": mode, "warn": False}
        if mode == "unrolled":
            kwargs["max_iter"] = UNROLLED_MAX_ITER
        fwd, bwd, state = [], [], {}

        def step(kwargs=kwargs, state=state):
            L = L0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            res = sinkhorn_solve(L, r, tau=tau, **kwargs)
            t1 = time.perf_counter()
            (dL,) = torch.autograd.grad((G * res.plan).sum(), L)
            t2 = time.perf_counter()
            state.update(res=res, grad=dL)
            return t1 - t0, t2 - t1

        step()  # warm-up
        for _ in range(repeats):
            f, b = step()
            fwd.append(f)
            bwd.append(b)
            if sum(fwd) + sum(bwd) > budget:
                break
        grads[mode] = state["grad"]
        out[mode] = {
            "forward_s": statistics.median(fwd),
            "backward_s": statistics.median(bwd),
            "total_s": statistics.median([f + b for f, b in zip(fwd, bwd)]),
            "iterations": state["res"].iterations,
            "converged": state["res"].converged,
            "marginal_error": state["res"].marginal_error,
        }
    scale = float(grads["implicit"].abs().max())
    out["unrolled_rel_grad_diff"] = float((grads["unrolled"] - grads["implicit"]).abs().max()) / scale
    out["faster"] = min(("implicit", "unrolled"), key=lambda m: out[m]["total_s"])
    return out


def _fmt_ms(row):
    return "-" if row is None else f"{1e3 * row['seconds']:.3g}"


def print_tables(results: list[dict], grads: list[dict], B: int) -> None:
    cols = METHODS
    head = f"{'T x S':>7} {'tau':>5} | " + " | ".join(f"{c:>22}" for c in cols)
    print(f"\nWall time, ms per batch of {B} ('1-prob': ms for one problem); (x per-problem time / {REFERENCE}'s)")
    print(head)
    print("-" * len(head))
    for res in results:
        m = res["methods"]
        ref = m[REFERENCE]["per_problem_ms"]
        cells = []
        for c in cols:
            row = m.get(c)
            cells.append("-" if row is None else f"{_fmt_ms(row)} (x{row['per_problem_ms'] / ref:.3g})")
        print(f"{res['T']:>3}x{res['S']:<3} {res['tau']:>5} | " + " | ".join(f"{c:>22}" for c in cells))

    print("\nAccuracy: tau>0 max|P - P_ecos| (ref_check: ECOS vs sinkhorn tol=1e-12); tau=0 objective gap vs "
          "linprog; [max marginal error]")
    print(head)
    print("-" * len(head))
    for res in results:
        m = res["methods"]
        cells = []
        for c in cols:
            row = m.get(c)
            if row is None:
                cells.append("-")
                continue
            if res["tau"] > 0:
                val = row["ref_check"] if c == REFERENCE else row["max_dev"]
                tag = "ref " if c == REFERENCE else ""
            else:
                val, tag = row["objective_gap"], "gap "
            cells.append(f"{tag}{val:.1e} [{row['marginal_error']:.0e}]")
        print(f"{res['T']:>3}x{res['S']:<3} {res['tau']:>5} | " + " | ".join(f"{c:>22}" for c in cells))

    fallbacks = [f"{r['T']}x{r['S']} tau={r['tau']}: {r['methods']['cvxpy']['solver']}" for r in results
                 if r["methods"]["cvxpy"]["solver"] != "ECOS"]
    if fallbacks:
        print("cvxpy solver where ECOS alone did not do: " + "; ".join(fallbacks))
    print("\nsinkhorn iterations (cold / warm / 1-prob):")
    for res in results:
        if res["tau"] > 0:
            m = res["methods"]
            print(f"  {res['T']:>3}x{res['S']:<3} tau={res['tau']:<5} {m['sinkhorn cold']['iterations']:>4} / "
                  f"{m['sinkhorn warm']['iterations']:>4} / {m['sinkhorn 1-prob']['iterations']:>4}")

    if grads:
        print(f"\nGradient of sinkhorn (forward + backward, ms per batch; unrolled capped at {UNROLLED_MAX_ITER} sweeps)")
        h = (f"{'T x S':>7} {'tau':>5} | {'implicit fwd+bwd':>18} | {'unrolled fwd+bwd':>18} | {'unrolled/implicit':>17} "
             f"| {'unrolled conv.':>14} | {'rel grad diff':>13}")
        print(h)
        print("-" * len(h))
        for gr in grads:
            i, u = gr["implicit"], gr["unrolled"]
            print(f"{gr['T']:>3}x{gr['S']:<3} {gr['tau']:>5} | "
                  f"{1e3 * i['forward_s']:>8.3g}+{1e3 * i['backward_s']:<9.3g} | "
                  f"{1e3 * u['forward_s']:>8.3g}+{1e3 * u['backward_s']:<9.3g} | {u['total_s'] / i['total_s']:>17.3g} | "
                  f"{str(u['converged']) + ' (' + str(u['iterations']) + ')':>14} | {gr['unrolled_rel_grad_diff']:>13.1e}")


def crossovers(results: list[dict]) -> list[str]:
    """Plain-language comparison of sinkhorn against the exact solvers per shape and tau."""
    lines = []
    lp = {(r["T"], r["S"]): r["methods"] for r in results if r["tau"] == 0}
    for res in results:
        if res["tau"] == 0:
            continue
        m, key = res["methods"], (res["T"], res["S"])
        cold, one, cvx = (m[k]["per_problem_ms"] for k in ("sinkhorn cold", "sinkhorn 1-prob", "cvxpy"))
        line = (f"{res['T']}x{res['S']} tau={res['tau']}: per problem, sinkhorn batched {cold:.3g} ms, single "
                f"{one:.3g} ms, cvxpy {cvx:.3g} ms -> batched sinkhorn x{cvx / cold:.3g} faster than cvxpy, single "
                f"x{cvx / one:.3g}")
        if key in lp:
            lin = lp[key]["linprog"]["per_problem_ms"]
            line += f"; linprog (tau=0) {lin:.3g} ms: batched sinkhorn x{lin / cold:.3g}, single x{lin / one:.3g}"
            if "hungarian" in lp[key]:
                hun = lp[key]["hungarian"]["per_problem_ms"]
                line += f"; hungarian {hun:.3g} ms: batched sinkhorn x{hun / cold:.3g}"
        lines.append(line + " (x>1: sinkhorn faster)")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny grid (seconds), for smoke tests")
    ap.add_argument("--out", default="benchmarks/results/plan_solvers.json", help="JSON output path")
    ap.add_argument("--seed", type=int, default=0, help="base seed (config k uses seed + k)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method (after one warm-up)")
    ap.add_argument("--budget", type=float, default=10.0, help="seconds per method before repeats stop early")
    ap.add_argument("--no-grad", action="store_true", help="skip the gradient timing")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    warnings.simplefilter("ignore", FutureWarning)  # cvxpy notices about default solvers

    start = time.perf_counter()
    seeds = iter(range(args.seed, args.seed + 10_000))  # config k uses seed + k, solvers first, then gradients

    def grid(bench, taus, batch, label):
        out = []
        for T, S in cfg["sizes"]:
            for tau in cfg[taus]:
                t0 = time.perf_counter()
                out.append(bench(T, S, tau, cfg[batch], next(seeds), cfg["repeats"], args.budget))
                print(f"  {label}{T}x{S} tau={tau}: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        return out

    results = grid(bench_solvers, "taus", "batch", "")
    grads = [] if args.no_grad else grid(bench_gradients, "grad_taus", "grad_batch", "grad ")

    print_tables(results, grads, cfg["batch"])
    summary = crossovers(results)
    print("\nCrossovers:")
    for line in summary:
        print("  " + line)
    if grads:
        faster = [g["faster"] for g in grads]
        print(f"\nGradient: implicit faster in {faster.count('implicit')}/{len(faster)} configurations "
              f"(unrolled faster in {faster.count('unrolled')}).")
    total = time.perf_counter() - start
    print(f"\nTotal {total:.0f}s")

    payload = {
        "benchmark": "plan_solvers",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {**cfg, "quick": args.quick, "seed": args.seed, "budget_s": args.budget,
                   "warm_noise": WARM_NOISE, "unrolled_max_iter": UNROLLED_MAX_ITER,
                   "scores": "N(0, 1) float64", "row_marginal": "S / T (uniform)",
                   "sinkhorn_tol": 1e-6, "torch_threads": torch.get_num_threads(),
                   "reference": {"tau>0": "cvxpy ECOS, Clarabel where ECOS fails (see methods.cvxpy.solver; checked against sinkhorn tol=1e-12: ref_check)",
                                 "tau=0": "scipy linprog HiGHS, objective gap"},
                   "timing": "median of timed calls after one warm-up call (first problem only for looped "
                             "exact solvers); time.perf_counter"},
        "versions": {**versions(), "scipy": scipy.__version__, "cvxpy": cvxpy.__version__,
                     "cvxpy_solvers": cvxpy.installed_solvers()},
        "results": results,
        "gradients": grads,
        "crossovers": summary,
        "total_seconds": total,
    }
    write_json(payload, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
