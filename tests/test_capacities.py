"""Teacher-row capacities: ``sinkhorn(..., row_marginal_mode="at_most")`` and the plan built on it.

Rows sum to at most r (``sum(r) >= S``), columns to 1, maximising ``<L, P> + tau * H(P)``.
Oracles: an independent convex solver (cvxpy) of the same problem; scipy's assignment solver for
the tau -> 0 limit with unit capacities; the two closed ends (capacities summing to S are the
equality plan; capacities no row can reach are the column softmax); the KKT conditions of the
dual (potentials <= 0, rows below 0 at capacity); float64 gradcheck of the implicit and the
unrolled gradient, and their agreement; a fit() run whose plan respects the capacities.
"""
import math

import cvxpy as cp
import numpy as np
import pytest
import scipy.optimize
import torch

from align_kd.plans import sinkhorn, sinkhorn_solve

torch.set_num_threads(1)

TIGHT = {"tol": 1e-12, "max_iter": 20_000, "row_marginal_mode": "at_most"}


def _problem(T, S, cap, seed=0, scale=2.0):
    """N(0, scale^2) logits (T, S) and capacities ``cap`` for every teacher row (T,)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, S, generator=g, dtype=torch.float64) * scale, torch.full((T,), float(cap), dtype=torch.float64)


def _cvxpy_plan(L, r, tau):
    """The same problem solved by an interior-point conic solver (entr(P) = -P log P; + tau * sum(P) makes it H)."""
    T, S = L.shape
    P = cp.Variable((T, S), nonneg=True)
    objective = cp.sum(cp.multiply(L.numpy(), P)) + tau * (cp.sum(cp.entr(P)) + cp.sum(P))
    problem = cp.Problem(cp.Maximize(objective), [cp.sum(P, axis=0) == 1, cp.sum(P, axis=1) <= r.numpy()])
    problem.solve(solver=cp.CLARABEL)
    assert problem.status == "optimal", problem.status
    return torch.from_numpy(P.value), problem.value


def _objective(L, P, tau):
    P = P.clamp_min(1e-300)
    return float((L * P).sum() - tau * (P * (P.log() - 1)).sum())


@pytest.mark.parametrize("T,S,tau,cap", [(11, 6, 0.1, 1.0), (11, 6, 0.03, 1.0), (5, 5, 0.3, 1.2), (4, 7, 0.2, 2.0),
                                         (6, 3, 0.5, 0.5), (32, 32, 0.05, 1.5)])
def test_matches_an_independent_convex_solver(T, S, tau, cap):
    L, r = _problem(T, S, cap, seed=T + S)
    res = sinkhorn_solve(L, r, tau=tau, **TIGHT)
    P = res.plan
    assert res.converged and res.marginal_error <= 1e-12
    ref, ref_value = _cvxpy_plan(L, r, tau)
    torch.testing.assert_close(P.sum(0), torch.ones(S, dtype=P.dtype), atol=1e-12, rtol=0)
    assert (P.sum(1) <= r + 1e-12).all()
    # the interior-point solution is accurate to ~1e-5; ours is the optimum to round-off, so its objective
    # is at least the conic solver's, and the two plans agree to the conic solver's accuracy
    assert _objective(L, P, tau) >= ref_value - 1e-7
    torch.testing.assert_close(P, ref, atol=1e-4, rtol=0)
    # the capacities bind somewhere (else these were plain column softmaxes), but not everywhere when sum(r) > S
    assert (P.sum(1) > r - 1e-9).any()
    if r.sum() > S + 1e-9:
        assert (P.sum(1) < r - 1e-3).any()


@pytest.mark.parametrize("T,S,tau,cap", [(11, 6, 0.1, 1.0), (6, 4, 0.03, 1.0), (7, 7, 0.2, 1.5)])
def test_dual_optimality_conditions(T, S, tau, cap):
    L, r = _problem(T, S, cap, seed=3 * T + S)
    res = sinkhorn_solve(L, r, tau=tau, **TIGHT)
    a, rows = res.row_potential, res.plan.sum(1)
    assert (a <= 0).all()
    held = a < 0
    torch.testing.assert_close(rows[held], r[held], atol=1e-11, rtol=0)  # below 0: at capacity
    assert (rows[~held] <= r[~held] + 1e-12).all()
    # P is the Gibbs form colsoftmax(L / tau + a)
    torch.testing.assert_close(res.plan, torch.softmax(L / tau + a[:, None], dim=0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.1, 0.02])
def test_capacities_summing_to_S_are_the_equality_plan(tau):
    L, _ = _problem(6, 4, 1.0, seed=7)
    r = torch.rand(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.2
    r = r * (4 / r.sum())
    at_most = sinkhorn(L, r, tau=tau, **TIGHT)
    equal = sinkhorn(L, r, tau=tau, tol=1e-12, max_iter=20_000)
    torch.testing.assert_close(at_most, equal, atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_capacities_no_row_reaches_give_the_column_softmax(tau):
    L, _ = _problem(5, 3, 1.0, seed=2)
    res = sinkhorn_solve(L, torch.full((5,), 3.5, dtype=torch.float64), tau=tau, **TIGHT)
    torch.testing.assert_close(res.plan, torch.softmax(L / tau, dim=0), atol=1e-14, rtol=0)
    assert (res.row_potential == 0).all()


@pytest.mark.parametrize("T,S", [(11, 6), (8, 8), (9, 4)])
def test_unit_capacities_at_small_tau_are_the_assignment(T, S):
    """tau -> 0 with unit capacities is the rectangular assignment problem: each student layer takes
    one teacher layer, each teacher layer serves at most one (scipy's solver, on the planted logits)."""
    L, r = _problem(T, S, 1.0, seed=T * S, scale=3.0)
    rows, cols = scipy.optimize.linear_sum_assignment(L.numpy(), maximize=True)
    assignment = torch.zeros(T, S, dtype=torch.float64)
    assignment[rows, cols] = 1.0
    P = sinkhorn(L, r, tau=0.002, **TIGHT)
    torch.testing.assert_close(P, assignment, atol=1e-3, rtol=0)
    # every column one-hot, where an equality marginal of S / T per row caps every entry at S / T
    assert P.amax(0).min() > 0.999 and sinkhorn(L, r * S / T, tau=0.002).amax() <= S / T + 1e-6


@pytest.mark.parametrize("T,S,tau,cap", [(5, 3, 0.3, 1.0), (4, 4, 0.5, 1.3), (6, 4, 0.2, 0.9)])
@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_gradcheck(T, S, tau, cap, grad):
    L, r = _problem(T, S, cap, seed=T + 2 * S, scale=1.0)
    assert (sinkhorn_solve(L, r, tau=tau, **TIGHT).row_potential < 0).any()  # some row at capacity
    L.requires_grad_(True)
    opts = {**TIGHT, "max_iter": 50_000, "grad": grad}
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, r, tau=tau, **opts), (L,), eps=1e-6, atol=1e-5)


def test_implicit_and_unrolled_gradients_agree():
    L, r = _problem(7, 4, 1.0, seed=5, scale=1.0)
    W = torch.randn(7, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    grads = []
    for grad in ("implicit", "unrolled"):
        x = L.clone().requires_grad_(True)
        (sinkhorn(x, r, tau=0.2, **TIGHT, grad=grad) * W).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-8, rtol=0)


def test_warm_start_from_the_last_potential_converges_at_once():
    """The learned plan's per-step solve: Newton from the last step's potentials (newton_after=0)."""
    L, r = _problem(11, 6, 1.0, seed=4)
    opts = {"tau": 0.1, "tol": 1e-10, "row_marginal_mode": "at_most", "newton_after": 0}
    first = sinkhorn_solve(L, r, **opts)
    step = 1e-3 * torch.randn(11, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    warm = sinkhorn_solve(L + step, r, init=first.row_potential, **opts)
    cold = sinkhorn_solve(L + step, r, **opts)
    assert warm.converged and warm.iterations <= 3 < cold.iterations
    torch.testing.assert_close(warm.plan, cold.plan, atol=1e-9, rtol=0)


@pytest.mark.parametrize("kwargs,match", [
    ({"row_marginal": torch.full((3,), 1.0), "row_marginal_mode": "at_most"}, "sum to at least S=4"),
    ({"row_marginal": torch.full((3,), 4 / 3), "row_marginal_mode": "below"}, "row_marginal_mode.*one of"),
    ({"row_marginal": torch.tensor([0.0, 2.0, 3.0]), "row_marginal_mode": "at_most"}, "strictly positive"),
])
def test_bad_input_raises_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn(torch.randn(3, 4), **kwargs)


# ----------------------------------------------------------------------------------------------
# the learned plan under capacities


def test_plan_options_are_checked_before_any_work():
    from align_kd.config import FitConfig

    with pytest.raises(ValueError, match="row_marginal_mode.*one of"):
        FitConfig(row_marginal_mode="below")
    with pytest.raises(ValueError, match="needs strategy 'sinkhorn' without a dustbin"):
        FitConfig(strategy="softmax", row_marginal_mode="at_most")
    with pytest.raises(ValueError, match="needs strategy 'sinkhorn' without a dustbin"):
        FitConfig(strategy="sinkhorn", dustbin=True, row_marginal_mode="at_most")


def test_fit_under_unit_capacities_keeps_every_row_within_one_student_layer():
    """5 teacher taps into 3 student taps: capacities 1 (sum 5 > 3). Under the equality marginal every
    teacher row would carry exactly 3/5; under capacities the rows differ and none exceeds 1."""
    from align_kd import Distiller, fit
    from align_kd.data import TensorLoader, load_cifar10
    from align_kd.models import SmallCNN
    from align_kd.zoo import load_teacher
    from shared_archive import ARCHIVE

    x, y = load_cifar10(ARCHIVE, split="train", limit=128)
    data = TensorLoader(x, y, batch_size=32)
    batch = next(iter(data))[0]
    teacher = load_teacher("fastcnn")[0]
    taps = {"student_layers": ["pool1", "pool3", "fc2"], "allow_few_taps": True, "width": 8}
    d = Distiller(teacher, SmallCNN(width=4), batch, strategy="sinkhorn", row_marginal_mode="at_most", **taps)
    T, S = d.plan().shape
    assert (T, S) == (5, 3)
    torch.testing.assert_close(d.plan.row_marginal, torch.ones(T))  # the default capacity, max(1, S / T)
    with pytest.raises(ValueError, match=f"must sum to at least S={S}"):
        Distiller(teacher, SmallCNN(width=4), batch, strategy="sinkhorn", row_marginal_mode="at_most",
                  row_marginal=[0.5] * T, **taps)
    torch.manual_seed(0)
    result = fit(teacher, SmallCNN(width=4), data, strategy="sinkhorn", row_marginal_mode="at_most", epochs=2,
                 lr=0.05, plan_lr=0.5, tau=0.05, progress=False, **taps)
    plan = torch.as_tensor(result.plan)
    rows = plan.sum(1)
    torch.testing.assert_close(plan.sum(0), torch.ones(S), atol=1e-5, rtol=0)
    assert (rows <= 1 + 1e-4).all() and (rows - S / T).abs().max() > 0.05, rows
    assert all(math.isfinite(epoch["loss"]) for epoch in result.history)
