"""exact_plan(): cvxpy vs sinkhorn vs linprog vs Hungarian vs brute force, closed forms, errors.

Each oracle is independent: cvxpy (ECOS, an interior-point exponential-cone solver) against the
log-domain Sinkhorn/Newton solver; HiGHS (simplex) against cvxpy's LP; Hungarian against brute
force over all permutations; the closed forms (argmax, softmax) against both solvers.
"""
import itertools
import math

import numpy as np
import pytest
import torch

import align_kd.exact as exact_mod
from align_kd.exact import EXACT_METHODS, exact_plan, exact_plan_info
from align_kd.plans import sinkhorn

torch.set_num_threads(1)


def _problem(T, S, seed=0, batch=()):
    """N(0, 1) scores (*batch, T, S) and a random positive row marginal (T,) summing to S (numpy)."""
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((*batch, T, S))
    r = rng.uniform(0.5, 1.5, T)
    return C, r * (S / r.sum())


def _obj(C, P):
    """<C, P> for numpy C and a torch/numpy plan."""
    return float((np.asarray(C) * np.asarray(P)).sum())


def _entropy(P):
    """H(P) = -sum P (log P - 1), 0 log 0 = 0."""
    P = np.asarray(P)
    return float(-(P * np.log(np.where(P > 0, P, 1.0))).sum() + P.sum())


def _check_feasible(P, r, atol):
    P = np.asarray(P)
    assert P.min() >= 0
    np.testing.assert_allclose(P.sum(-2), 1.0, atol=atol, rtol=0)
    if r is not None:
        np.testing.assert_allclose(P.sum(-1), np.broadcast_to(r, P.shape[:-1]), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# entropic problem: cvxpy vs sinkhorn


@pytest.mark.parametrize("T,S", [(3, 5), (6, 4), (8, 8)])
@pytest.mark.parametrize("tau", [1.0, 0.1])
@pytest.mark.parametrize("with_marginal", [True, False])
def test_cvxpy_matches_sinkhorn(T, S, tau, with_marginal):
    C, r = _problem(T, S, seed=T * 100 + S)
    marg = r if with_marginal else None
    P, info = exact_plan_info(C, marg, tau=tau, method="cvxpy")
    assert info["method"] == "cvxpy" and info["solver"] == "ECOS" and info["status"] == "optimal"
    ref = sinkhorn(torch.tensor(C), None if marg is None else torch.tensor(marg), tau=tau, tol=1e-12, max_iter=20_000)
    assert (P - ref).abs().max() < 1e-5
    _check_feasible(P, marg, 1e-7)
    # the reported objective is <C, P> + tau H(P)
    assert info["objective"] == pytest.approx(_obj(C, P) + tau * _entropy(P), abs=1e-9)


def test_cvxpy_clarabel_close_to_sinkhorn():
    C, r = _problem(5, 7, seed=1)
    P = exact_plan(C, r, tau=0.3, method="cvxpy", solver="clarabel")  # case-insensitive name
    ref = sinkhorn(torch.tensor(C), torch.tensor(r), tau=0.3, tol=1e-12)
    assert (P - ref).abs().max() < 1e-4  # Clarabel's default accuracy is ~1e-5 on the plan


def test_auto_without_marginal_is_softmax_closed_form():
    C, _ = _problem(4, 6, seed=2, batch=(3,))
    P, info = exact_plan_info(C, tau=0.25)
    assert info["method"] == "softmax" and info["solver"] is None
    torch.testing.assert_close(P, torch.softmax(torch.tensor(C) / 0.25, dim=-2), atol=1e-14, rtol=0)


def test_auto_with_marginal_dispatches_to_solvers():
    C, r = _problem(4, 6, seed=3)
    assert exact_plan_info(C, r, tau=0.5)[1]["method"] == "cvxpy"
    assert exact_plan_info(C, r, tau=0.0)[1]["method"] == "linprog"
    assert exact_plan_info(C, tau=0.0)[1]["method"] == "argmax"
    # a named solver picks the method that owns it
    assert exact_plan_info(C, r, tau=0.0, solver="ECOS")[1]["method"] == "cvxpy"
    assert exact_plan_info(C, r, tau=0.0, solver="highs-ds")[1]["solver"] == "highs-ds"
    with pytest.raises(ValueError, match="linprog method"):
        exact_plan(C, r, tau=0.5, solver="highs")


# ----------------------------------------------------------------------------------------------
# linear program: cvxpy vs linprog vs closed form vs Hungarian vs brute force


@pytest.mark.parametrize("T,S", [(3, 5), (5, 3), (6, 6), (12, 24)])
@pytest.mark.parametrize("seed", [0, 1])
def test_cvxpy_lp_agrees_with_linprog(T, S, seed):
    C, r = _problem(T, S, seed=seed)
    P_cvx, i_cvx = exact_plan_info(C, r, method="cvxpy")
    P_lp, i_lp = exact_plan_info(C, r, method="linprog")
    assert (i_cvx["method"], i_lp["method"], i_lp["solver"]) == ("cvxpy", "linprog", "highs")
    assert abs(_obj(C, P_cvx) - _obj(C, P_lp)) < 1e-7
    _check_feasible(P_cvx, r, 1e-7)
    _check_feasible(P_lp, r, 1e-7)


@pytest.mark.parametrize("T,S", [(3, 5), (5, 3), (6, 6)])
def test_unconstrained_lp_is_columnwise_argmax(T, S):
    C, _ = _problem(T, S, seed=4)
    P, info = exact_plan_info(C)  # auto: closed form
    assert info["method"] == "argmax"
    expected = np.zeros((T, S))
    expected[C.argmax(0), np.arange(S)] = 1.0
    np.testing.assert_array_equal(P.numpy(), expected)
    best = C.max(0).sum()
    for method in ("cvxpy", "linprog"):  # explicit methods really call the solver
        P_m, info_m = exact_plan_info(C, method=method)
        assert info_m["method"] == method and info_m["solver"] is not None
        assert abs(_obj(C, P_m) - best) < 1e-7
        _check_feasible(P_m, None, 1e-7)


def test_argmax_ties_take_first_index():
    C = np.array([[1.0, 0.0, 2.0], [1.0, 3.0, 2.0], [0.5, 3.0, 2.0]])
    P = exact_plan(C)
    np.testing.assert_array_equal(P.numpy(), [[1, 0, 1], [0, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 6])
def test_hungarian_is_best_permutation_by_brute_force(T):
    C, _ = _problem(T, T, seed=T)
    best = max(sum(C[perm[j], j] for j in range(T)) for perm in itertools.permutations(range(T)))
    for marg in (None, np.ones(T)):  # None is read as unit marginals by the Hungarian method
        P, info = exact_plan_info(C, marg, method="hungarian")
        assert info["solver"] == "linear_sum_assignment"
        assert set(np.unique(P.numpy())) <= {0.0, 1.0}
        _check_feasible(P, np.ones(T), 0)  # a permutation matrix
        assert _obj(C, P) == pytest.approx(best, abs=1e-12)
    # Birkhoff: the LP with unit marginals has the same optimum
    assert _obj(C, exact_plan(C, np.ones(T), method="linprog")) == pytest.approx(best, abs=1e-9)


def test_hungarian_planted_permutation():
    perm = np.random.default_rng(5).permutation(8)
    Pi = np.eye(8)[perm]
    P = exact_plan(Pi + 0.1 * np.random.default_rng(6).standard_normal((8, 8)), np.ones(8), method="hungarian")
    np.testing.assert_array_equal(P.numpy(), Pi)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linprog_beats_every_feasible_plan(seed):
    C, r = _problem(7, 10, seed=seed)
    lp = _obj(C, exact_plan(C, r, method="linprog"))
    rng = np.random.default_rng(seed + 10)
    feasible = [sinkhorn(torch.tensor(C), torch.tensor(r), tau=1.0)]
    feasible += [sinkhorn(torch.tensor(rng.standard_normal((7, 10))), torch.tensor(r), tau=0.2) for _ in range(10)]
    for P in feasible:
        _check_feasible(P, r, 1e-6)
        assert lp >= _obj(C, P) - 1e-9


@pytest.mark.parametrize("tau", [0.1, 0.03, 0.01])
@pytest.mark.parametrize("T,S", [(12, 24), (6, 4)])
def test_small_tau_sinkhorn_approaches_lp(tau, T, S):
    """0 <= LP - <C, P_tau> <= tau (H(P_tau) - H(P_LP)) <= tau * S log T.

    P_tau maximises <C, P> + tau H(P), so <C, P_tau> + tau H(P_tau) >= <C, P_LP> + tau H(P_LP).
    With columns summing to 1 every entry is <= 1, so S <= H(P) <= S log T + S.
    """
    C, r = _problem(T, S, seed=7)
    P_tau = sinkhorn(torch.tensor(C), torch.tensor(r), tau=tau, tol=1e-10, max_iter=20_000)
    P_lp = exact_plan(C, r, method="linprog")
    gap = _obj(C, P_lp) - _obj(C, P_tau)
    assert gap >= -1e-9
    assert gap <= tau * (_entropy(P_tau) - _entropy(P_lp)) + 1e-7
    assert gap <= tau * S * math.log(T) + 1e-7


# ----------------------------------------------------------------------------------------------
# batching, types, devices, info


@pytest.mark.parametrize(
    "method,tau", [("cvxpy", 0.5), ("cvxpy", 0.0), ("linprog", 0.0), ("hungarian", 0.0), ("auto", 0.0), ("auto", 0.5)]
)
def test_batched_equals_looped(method, tau):
    T = S = 4
    C, _ = _problem(T, S, seed=8, batch=(2, 3))
    r = np.ones((3, T)) if method == "hungarian" else np.stack([np.roll(np.linspace(0.5, 1.5, T), k) for k in range(3)])
    r = r * (S / r.sum(-1, keepdims=True))
    marg = None if method == "auto" else r  # (3, T) broadcasts against the batch (2, 3)
    P = exact_plan(C, marg, tau=tau, method=method)
    assert P.shape == (2, 3, T, S)
    for a in range(2):
        for b in range(3):
            Pi = exact_plan(C[a, b], None if marg is None else marg[b], tau=tau, method=method)
            torch.testing.assert_close(P[a, b], Pi, atol=1e-12, rtol=0)


def test_output_dtype_and_device_follow_input():
    C, r = _problem(3, 4, seed=9)
    t32 = torch.tensor(C, dtype=torch.float32, requires_grad=True)
    for method, tau in (("auto", 0.0), ("auto", 0.5), ("linprog", 0.0), ("cvxpy", 0.5)):
        P = exact_plan(t32, torch.tensor(r), tau=tau, method=method)
        assert P.dtype == torch.float32 and P.device == t32.device and not P.requires_grad
    P = exact_plan(C, r)  # numpy in: float64 torch out
    assert isinstance(P, torch.Tensor) and P.dtype == torch.float64
    assert exact_plan(C.tolist(), r.tolist()).dtype == torch.float64  # nested lists are arrays too
    assert exact_plan(torch.ones(2, 2, dtype=torch.int64)).dtype == torch.float64


def test_info_record():
    C, r = _problem(4, 5, seed=10)
    P, info = exact_plan_info(C, r, tau=0.2)
    assert set(info) >= {"method", "solver", "status", "seconds"}
    assert info["status"] == "optimal" and info["seconds"] >= 0
    torch.testing.assert_close(P, exact_plan(C, r, tau=0.2), atol=1e-12, rtol=0)
    _, info_b = exact_plan_info(np.stack([C, C]), r, tau=0.2)
    assert len(info_b["objective"]) == 2


def test_zero_row_mass_is_allowed():
    """Unlike sinkhorn (strictly positive r), the exact solvers accept an unused teacher layer."""
    C, _ = _problem(3, 4, seed=11)
    r = np.array([0.0, 2.0, 2.0])
    for method, tau in (("linprog", 0.0), ("cvxpy", 0.0), ("cvxpy", 0.5)):
        P = exact_plan(C, r, tau=tau, method=method)
        _check_feasible(P, r, 1e-7)
        assert P[0].abs().max() < 1e-7


@pytest.mark.parametrize("method,tau", [("linprog", 0.0), ("cvxpy", 0.0), ("cvxpy", 0.5), ("hungarian", 0.0)])
def test_marginal_off_by_rounding_is_rescaled(method, tau):
    """A float32 marginal misses sum(r) == S by ~1e-7; within 1e-6 * S it is rescaled, not infeasible."""
    C, _ = _problem(5, 5, seed=12)
    r = torch.ones(5, dtype=torch.float32) * (1 + 4e-7)  # sums to 5 * (1 + 4e-7)
    P = exact_plan(C, r, tau=tau, method=method)
    _check_feasible(P, np.ones(5), 1e-7)


def test_methods_constant():
    assert EXACT_METHODS == ("auto", "cvxpy", "linprog", "hungarian")


# ----------------------------------------------------------------------------------------------
# errors


C34 = np.random.default_rng(0).standard_normal((3, 4))
R34 = np.full(3, 4 / 3)


@pytest.mark.parametrize(
    "args,kwargs,exc,match",
    [
        ((np.zeros(4),), {}, ValueError, r"shape \(T, S\).*got shape \(4,\)"),
        ((np.float64(1.0),), {}, ValueError, "shape"),
        ((np.zeros((0, 4)),), {}, ValueError, "non-empty"),
        ((np.zeros((3, 0)),), {}, ValueError, "non-empty"),
        ((np.array([[0.0, np.nan], [1.0, 2.0]]),), {}, ValueError, "NaN or inf"),
        ((np.array([[0.0, -np.inf], [1.0, 2.0]]),), {"tau": 0.5}, ValueError, "NaN or inf"),
        ((np.array([["a", "b"]]),), {}, TypeError, "real-valued"),
        ((torch.ones(2, 2, dtype=torch.complex64),), {}, TypeError, "real-valued"),
        ((C34, [1.0, 1.0, 1.0, 1.0]), {}, ValueError, r"shape \(T,\) = \(3,\)"),
        ((C34, np.ones((2, 3)) * 4 / 3), {}, ValueError, "broadcast"),
        ((C34, [1.0, 1.0, 1.0]), {}, ValueError, "sum to S=4"),
        ((C34, [-1.0, 2.5, 2.5]), {}, ValueError, "non-negative"),
        ((C34, [np.nan, 2.0, 2.0]), {}, ValueError, "finite"),
        ((C34, [np.inf, 2.0, 2.0]), {}, ValueError, "finite"),
        ((C34, R34), {"tau": -0.1}, ValueError, "tau.*>= 0"),
        ((C34, R34), {"tau": float("nan")}, ValueError, "tau"),
        ((C34, R34), {"tau": float("inf")}, ValueError, "tau"),
        ((C34, R34), {"tau": "0.1"}, TypeError, "tau"),
        ((C34, R34), {"method": "sinkhorn"}, ValueError, r"one of \['auto', 'cvxpy', 'linprog', 'hungarian'\]"),
        ((C34, R34), {"method": "hungarian"}, ValueError, r"square.*\(3, 4\)"),
        ((np.eye(3), [0.5, 1.0, 1.5]), {"method": "hungarian"}, ValueError, "unit row marginals"),
        ((np.eye(3),), {"method": "hungarian", "tau": 0.1}, ValueError, "tau=0"),
        ((np.eye(3),), {"method": "hungarian", "solver": "ECOS"}, ValueError, "no `solver`"),
        ((C34, R34), {"method": "linprog", "tau": 0.1}, ValueError, "method='cvxpy'"),
        ((C34, R34), {"method": "linprog", "solver": "simplex"}, ValueError, "highs"),
        ((C34, R34), {"method": "cvxpy", "tau": 0.1, "solver": "NOT_A_SOLVER"}, ValueError, "not installed.*ECOS"),
        ((C34,), {"tau": 0.1, "solver": "NOT_A_SOLVER"}, ValueError, "Unknown `solver`"),
        ((C34, R34), {"solver": 3}, TypeError, "solver"),
    ],
)
def test_bad_input_raises_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        exact_plan(*args, **kwargs)


def test_solver_that_cannot_handle_the_cone_is_reported():
    # OSQP is a QP solver: it cannot take the exponential cone of the entropy term
    with pytest.raises(RuntimeError, match=r"OSQP.*Try another solver"):
        exact_plan(C34, R34, tau=0.5, method="cvxpy", solver="OSQP")


@pytest.mark.parametrize("status", ["infeasible", "optimal_inaccurate", "solver_error"])
def test_non_optimal_status_raises(monkeypatch, status):
    monkeypatch.setattr(exact_mod, "_run_cvxpy", lambda problem, solver, opts: status)
    with pytest.raises(RuntimeError, match=rf"ECOS returned status '{status}'.*CLARABEL returned.*another solver"):
        exact_plan(C34, R34, tau=0.5, method="cvxpy")  # default chain: every attempt is reported
    with pytest.raises(RuntimeError, match=rf"SCS returned status '{status}'.*larger tau"):
        exact_plan(C34, R34, tau=0.5, method="cvxpy", solver="SCS")  # a named solver has no fallback


def test_ecos_failure_falls_back_to_clarabel(monkeypatch):
    import cvxpy as cp

    real = exact_mod._run_cvxpy

    def flaky(problem, solver, opts):
        if solver == "ECOS":
            raise cp.error.SolverError("Solver 'ECOS' failed.")
        return real(problem, solver, opts)

    monkeypatch.setattr(exact_mod, "_run_cvxpy", flaky)
    C, r = _problem(4, 6, seed=30, batch=(2,))
    P, info = exact_plan_info(C, r, tau=0.5, method="cvxpy")
    assert info["solver"] == "ECOS (CLARABEL fallback on 2 of 2)" and info["status"] == "optimal"
    ref = sinkhorn(torch.tensor(C), torch.tensor(r), tau=0.5, tol=1e-12)
    assert (P - ref).abs().max() < 1e-5
    with pytest.raises(RuntimeError, match="ECOS failed"):
        exact_plan(C, r, tau=0.5, method="cvxpy", solver="ECOS")


def test_real_ecos_stall_is_rescued():
    """A 32 x 32 problem (tau=0.1) on which ECOS 2.0 stops with NUMERICAL PROBLEMS."""
    L = torch.randn(64, 32, 32, generator=torch.Generator().manual_seed(17), dtype=torch.float64)[21]
    r = torch.ones(32, dtype=torch.float64)
    P, info = exact_plan_info(L, r, tau=0.1, method="cvxpy")
    assert info["status"] == "optimal"
    assert (P - sinkhorn(L, r, tau=0.1, tol=1e-12)).abs().max() < 1e-5


def test_linprog_failure_raises(monkeypatch):
    class Failed:
        status, message, x = 2, "The problem is infeasible.", None

    monkeypatch.setattr(exact_mod, "linprog", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match=r"linprog.*status 2.*infeasible.*method='cvxpy'"):
        exact_plan(C34, R34, method="linprog")


def test_inaccurate_plan_is_not_silently_repaired():
    P = np.full((3, 4), 1 / 3)
    P[0, 0] += 1e-3  # a column 1e-3 off: beyond the solver tolerance
    with pytest.raises(RuntimeError, match="violates the constraints"):
        exact_mod._repair(P, None, "test solver")
    P[0, 0] = 1 / 3 + 1e-9  # within tolerance: repaired to exact columns
    np.testing.assert_allclose(exact_mod._repair(P, None, "test solver").sum(0), 1.0, atol=1e-15)
