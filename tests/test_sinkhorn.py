"""sinkhorn() / sinkhorn_solve(): marginals, closed form, small tau, batching, gradients, invariances.

Oracles: the column-softmax closed form, planted permutations, shift invariances, a looped solve,
float64 gradcheck. The comparison with an independent exact solver (cvxpy) is in test_exact.py.
"""
import warnings

import pytest
import torch

from align_kd.plans import sinkhorn, sinkhorn_solve

torch.set_num_threads(1)

TIGHT = {"tol": 1e-12, "max_iter": 20_000}  # converge to float64 precision for exact comparisons


def _problem(T, S, seed=0, dtype=torch.float64, batch=()):
    """N(0, 1) logits (*batch, T, S) and a random positive row marginal (T,) summing to S."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(*batch, T, S, generator=g, dtype=dtype)
    r = torch.rand(T, generator=g, dtype=dtype) + 0.5
    return L, r * (S / r.sum())


# ----------------------------------------------------------------------------------------------
# marginals and closed form


@pytest.mark.parametrize("T,S", [(3, 5), (5, 3), (4, 7), (7, 4), (6, 6), (1, 4), (4, 1)])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_columns_and_rows_sum_to_marginals(T, S, tau):
    L, r = _problem(T, S, seed=T * 10 + S)
    P = sinkhorn(L, r, tau=tau)  # (T, S)
    assert P.shape == (T, S)
    assert (P >= 0).all()
    torch.testing.assert_close(P.sum(0), torch.ones(S, dtype=P.dtype), atol=1e-12, rtol=0)
    torch.testing.assert_close(P.sum(1), r, atol=1e-6, rtol=0)  # default tol=1e-6


@pytest.mark.parametrize("T,S", [(3, 5), (12, 24)])
def test_float32_marginals(T, S):
    L, r = _problem(T, S, dtype=torch.float32)
    for tau in (1.0, 0.1, 0.01):
        P = sinkhorn(L, r, tau=tau)
        assert P.dtype == torch.float32
        # the plan is evaluated in float64 and cast once: errors stay at float32 rounding + tol
        torch.testing.assert_close(P.sum(0), torch.ones(S), atol=1e-6, rtol=0)
        torch.testing.assert_close(P.sum(1), r, atol=2e-6, rtol=0)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("tau", [1.0, 0.2, 0.01])
def test_no_marginal_is_column_softmax(batch, tau):
    L, _ = _problem(4, 6, batch=batch)
    res = sinkhorn_solve(L, tau=tau)
    torch.testing.assert_close(res.plan, torch.softmax(L / tau, dim=-2), atol=0, rtol=0)
    assert res.converged and res.iterations == 0 and res.row_potential is None


def test_plan_has_gibbs_form():
    """P = diag(u) exp(L / tau) diag(v): log P - L / tau is a_i + b_j (double centring removes it)."""
    L, r = _problem(5, 8)
    tau = 0.3
    D = sinkhorn(L, r, tau=tau, **TIGHT).log() - L / tau  # (T, S)
    resid = D - D.mean(0, keepdim=True) - D.mean(1, keepdim=True) + D.mean()
    assert resid.abs().max() < 1e-10


@pytest.mark.parametrize("tau", [0.1, 0.03, 0.01, 3e-3, 1e-3])
def test_small_tau_finite_and_marginals_met(tau):
    L, r = _problem(12, 24, seed=1)
    r = torch.full((12,), 2.0, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no non-convergence warning allowed
        res = sinkhorn_solve(L, r, tau=tau)
    P = res.plan
    assert torch.isfinite(P).all() and res.converged
    torch.testing.assert_close(P.sum(0), torch.ones(24, dtype=P.dtype), atol=1e-12, rtol=0)
    assert (P.sum(1) - r).abs().max() <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P32 = sinkhorn(L.float(), r.float(), tau=tau)
    assert torch.isfinite(P32).all()
    assert (P32.sum(0) - 1).abs().max() < 1e-6 and (P32.sum(1) - r.float()).abs().max() < 2e-6


@pytest.mark.parametrize("tau", [0.03, 0.01])
def test_tight_tolerance_converges_in_few_newton_steps(tau):
    """Newton stays quadratic near the solution: tol=1e-12 costs a few steps more than tol=1e-6."""
    L = torch.randn(8, 32, 32, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    r = torch.ones(32, dtype=torch.float64)
    loose = sinkhorn_solve(L, r, tau=tau, tol=1e-6)
    tight = sinkhorn_solve(L, r, tau=tau, tol=1e-12, max_iter=2000)
    assert loose.converged and tight.converged and tight.marginal_error <= 1e-12
    assert tight.iterations <= loose.iterations + 20


def test_batched_equals_looped():
    L, r = _problem(5, 7, batch=(4,))
    rb = torch.stack([r.roll(k) for k in range(4)])  # (4, T) a different marginal per element
    for marg in (r, rb):
        Pb = sinkhorn(L, marg, tau=0.2, **TIGHT)  # (4, T, S)
        for b in range(4):
            Pi = sinkhorn(L[b], marg if marg.dim() == 1 else marg[b], tau=0.2, **TIGHT)
            torch.testing.assert_close(Pb[b], Pi, atol=1e-10, rtol=0)


def test_batched_small_tau_equals_looped():
    L, r = _problem(6, 9, batch=(4,), seed=3)
    Pb = sinkhorn(L, r, tau=0.02, **TIGHT)
    for b in range(4):
        torch.testing.assert_close(Pb[b], sinkhorn(L[b], r, tau=0.02, **TIGHT), atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("tau", [1.0, 0.3])
@pytest.mark.parametrize("with_marginal", [True, False])
def test_gradcheck_implicit(tau, with_marginal):
    L, r = _problem(3, 4, seed=5)
    L.requires_grad_(True)
    marg = r if with_marginal else None
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, marg, tau=tau, **TIGHT), (L,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_gradcheck_unrolled(tau):
    L, r = _problem(3, 4, seed=6)
    L.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sinkhorn(x, r, tau=tau, grad="unrolled", **TIGHT), (L,), eps=1e-6, atol=1e-7
    )


def test_gradcheck_implicit_batched_and_nonsquare():
    L, r = _problem(4, 2, batch=(2,), seed=7)
    L.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, r, tau=0.5, **TIGHT), (L,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_gradient_row_and_column_sums_vanish(grad, tau):
    """With both marginals fixed, dL/dlogits lies in the tangent space: zero row and column sums."""
    L, r = _problem(5, 8, seed=8)
    L.requires_grad_(True)
    P = sinkhorn(L, r, tau=tau, grad=grad, **TIGHT)
    G = torch.randn(5, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)  # upstream
    (dL,) = torch.autograd.grad((G * P).sum(), L)
    scale = dL.abs().max()
    assert scale > 1e-6  # not trivially zero
    assert dL.sum(0).abs().max() < 1e-8 * max(1.0, scale)
    assert dL.sum(1).abs().max() < 1e-8 * max(1.0, scale)


def test_implicit_and_unrolled_gradients_agree():
    L, r = _problem(4, 6, seed=10)
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    grads = []
    for mode in ("implicit", "unrolled"):
        x = L.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((G * sinkhorn(x, r, tau=0.5, grad=mode, **TIGHT)).sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-9, rtol=0)


def test_no_marginal_gradient_column_sums_vanish():
    L, _ = _problem(4, 6, seed=12)
    L.requires_grad_(True)
    G = torch.randn(4, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    (dL,) = torch.autograd.grad((G * sinkhorn(L, tau=0.7)).sum(), L)
    assert dL.sum(0).abs().max() < 1e-12


def test_float32_gradient_is_finite_at_small_tau():
    L, r = _problem(12, 24, dtype=torch.float32, seed=14)
    L.requires_grad_(True)
    P = sinkhorn(L, r, tau=0.01)
    (dL,) = torch.autograd.grad((P * torch.randn_like(P)).sum(), L)
    assert dL.dtype == torch.float32 and torch.isfinite(dL).all()


# ----------------------------------------------------------------------------------------------
# invariances and planted answers


def test_row_and_column_shifts_leave_plan_unchanged():
    L, r = _problem(5, 7, seed=15)
    P = sinkhorn(L, r, tau=0.2, **TIGHT)
    g = torch.Generator().manual_seed(16)
    col_shift = 10 * torch.randn(1, 7, generator=g, dtype=torch.float64)
    row_shift = 10 * torch.randn(5, 1, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(L + col_shift, r, tau=0.2, **TIGHT), P, atol=1e-10, rtol=0)
    torch.testing.assert_close(sinkhorn(L + row_shift, r, tau=0.2, **TIGHT), P, atol=1e-10, rtol=0)
    torch.testing.assert_close(sinkhorn(L + row_shift + col_shift + 3.0, r, tau=0.2, **TIGHT), P, atol=1e-10, rtol=0)
    # without a row marginal only column shifts are free (rows are not constrained)
    torch.testing.assert_close(sinkhorn(L + col_shift, tau=0.2), sinkhorn(L, tau=0.2), atol=1e-12, rtol=0)


def test_transpose_invariance_square_unit_marginals():
    L, _ = _problem(6, 6, seed=17)
    ones = torch.ones(6, dtype=torch.float64)
    torch.testing.assert_close(sinkhorn(L.T, ones, tau=0.3, **TIGHT), sinkhorn(L, ones, tau=0.3, **TIGHT).T,
                               atol=1e-10, rtol=0)


def test_permuting_layers_permutes_plan():
    L, r = _problem(5, 6, seed=18)
    pi_t, pi_s = torch.randperm(5, generator=torch.Generator().manual_seed(1)), torch.randperm(6)
    P = sinkhorn(L, r, tau=0.3, **TIGHT)
    Pp = sinkhorn(L[pi_t][:, pi_s], r[pi_t], tau=0.3, **TIGHT)
    torch.testing.assert_close(Pp, P[pi_t][:, pi_s], atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", [0.05, 0.01])
def test_planted_permutation_is_recovered(tau):
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(19))
    Pi = torch.eye(7, dtype=torch.float64)[perm]  # (7, 7) permutation matrix
    noise = 0.1 * torch.randn(7, 7, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    P = sinkhorn(5.0 * Pi + noise, torch.ones(7, dtype=torch.float64), tau=tau)
    assert (P - Pi).abs().max() < 1e-6


def test_planted_many_to_one_assignment():
    """T=3 teacher layers, S=6 student layers, r=2: the planted 2-per-row assignment is recovered."""
    A = torch.zeros(3, 6, dtype=torch.float64)
    A[[0, 0, 1, 1, 2, 2], [4, 1, 0, 5, 3, 2]] = 1.0
    P = sinkhorn(4.0 * A, torch.full((3,), 2.0, dtype=torch.float64), tau=0.02)
    assert (P - A).abs().max() < 1e-6


# ----------------------------------------------------------------------------------------------
# warm start and convergence reporting


@pytest.mark.parametrize("tau", [0.5, 0.05, 0.01])
def test_warm_start_same_plan_and_not_more_iterations(tau):
    L, r = _problem(8, 12, seed=21)
    cold = sinkhorn_solve(L, r, tau=tau, tol=1e-10)
    again = sinkhorn_solve(L, r, tau=tau, tol=1e-10, init=cold.row_potential)
    torch.testing.assert_close(again.plan, cold.plan, atol=1e-8, rtol=0)
    assert again.iterations <= 1
    # a training step: logits move a little; warm start from the last potentials
    L2 = L + 0.01 * torch.randn(8, 12, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    cold2 = sinkhorn_solve(L2, r, tau=tau, tol=1e-10)
    warm2 = sinkhorn_solve(L2, r, tau=tau, tol=1e-10, init=cold.row_potential)
    assert cold2.converged and warm2.converged
    torch.testing.assert_close(warm2.plan, cold2.plan, atol=1e-8, rtol=0)
    assert warm2.iterations <= cold2.iterations


def test_unconverged_warns_and_names_max_iter():
    L, r = _problem(12, 24, seed=23)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        res = sinkhorn_solve(L, r, tau=0.01, max_iter=1)
    assert not res.converged and res.marginal_error > 1e-6
    assert torch.isfinite(res.plan).all()
    with pytest.warns(RuntimeWarning, match="tau"):
        sinkhorn(L, r, tau=0.01, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(L, r, tau=0.01, max_iter=1, warn=False)  # silenced on request


def test_unrolled_unconverged_warns():
    L, r = _problem(6, 9, seed=24)
    L.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        sinkhorn(L, r, tau=0.05, grad="unrolled", max_iter=2)


def test_one_by_one_plan():
    for r in (None, torch.ones(1)):
        L = torch.tensor([[0.7]], requires_grad=True)
        P = sinkhorn(L, r, tau=0.1)
        torch.testing.assert_close(P, torch.ones(1, 1))
        (g,) = torch.autograd.grad(P.sum(), L)
        assert g.abs().max() < 1e-6


def test_result_fields():
    L, r = _problem(4, 6, seed=25)
    res = sinkhorn_solve(L, r, tau=0.3)
    assert res.row_potential.shape == (4,) and res.row_potential.dtype == L.dtype
    assert res.converged and res.iterations > 0 and 0 <= res.marginal_error <= 1e-6


# ----------------------------------------------------------------------------------------------
# bad input


def _L(T=3, S=4):
    return torch.randn(T, S, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "logits,kwargs,exc,match",
    [
        (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), {}, ValueError, "NaN or inf"),
        (torch.tensor([[0.0, float("inf")], [1.0, 2.0]]), {}, ValueError, "NaN or inf"),
        (torch.tensor([[0.0, -float("inf")], [1.0, 2.0]]), {"row_marginal": torch.ones(2)}, ValueError, "NaN or inf"),
        (_L(), {"tau": 0.0}, ValueError, "tau.*> 0"),
        (_L(), {"tau": -1.0}, ValueError, "tau.*> 0"),
        (_L(), {"tau": float("nan")}, ValueError, "tau"),
        (_L(), {"tau": float("inf")}, ValueError, "tau"),
        (_L(), {"row_marginal": torch.ones(4)}, ValueError, "shape.*T=3"),
        (_L(), {"row_marginal": torch.ones(3, 2)}, ValueError, "shape"),
        (_L(), {"row_marginal": torch.ones(3)}, ValueError, "sum to S=4"),
        (_L(), {"row_marginal": torch.tensor([0.0, 2.0, 2.0])}, ValueError, "strictly positive"),
        (_L(), {"row_marginal": torch.tensor([-1.0, 3.0, 2.0])}, ValueError, "strictly positive"),
        (_L(), {"row_marginal": torch.tensor([float("nan"), 2.0, 2.0])}, ValueError, "finite"),
        (_L(), {"row_marginal": [1.0, 1.5, 1.5]}, TypeError, "row_marginal"),
        (torch.randn(2, 3, 4), {"row_marginal": torch.full((5, 3), 4 / 3)}, ValueError, "broadcast"),
        (torch.randn(4), {}, ValueError, "at least 2 dimensions"),
        (torch.randn(()), {}, ValueError, "at least 2 dimensions"),
        (torch.randn(0, 4), {}, ValueError, "non-empty"),
        (torch.randn(3, 0), {}, ValueError, "non-empty"),
        (torch.ones(3, 4, dtype=torch.int64), {}, TypeError, "floating-point"),
        ([[0.0, 1.0]], {}, TypeError, "torch.Tensor"),
        (_L(), {"row_marginal": torch.full((3,), 4 / 3), "grad": "backprop"}, ValueError, "one of"),
        (_L(), {"row_marginal": torch.full((3,), 4 / 3), "init": torch.zeros(4)}, ValueError, "init"),
    ],
)
def test_bad_input_raises_clear_error(logits, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sinkhorn(logits, **kwargs)


@pytest.mark.parametrize("tau", [0.0625, 0.05, 0.01])
def test_newton_does_not_accept_steps_that_lower_the_dual(tau):
    """Found by hypothesis: after the epsilon-scaling hand-off, steps that shrank the row error while
    the semi-dual fell were accepted and the potentials ran off (row sums [3, 0, 0, 0]). Oracle: the
    optimum of a concave problem is unique, so the solve must match a pure-Sinkhorn solve."""
    L = torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.0546875, 0.05, 0.0625], dtype=torch.float64)
    r = w / w.sum() * 3
    res = sinkhorn_solve(L, r, tau=tau)
    assert res.converged
    torch.testing.assert_close(res.plan.sum(1), r, atol=1e-6, rtol=0)
    ref = sinkhorn(L, r, tau=tau, newton_after=10**6, max_iter=10**6, tol=1e-9)
    torch.testing.assert_close(res.plan, ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# SinkhornPlan: the per-step path (checks once at construction, warm-started Newton)


def _learned_plan(T=5, S=4, tau=0.1, seed=0):
    from align_kd.plans import SinkhornPlan, depth_prior

    torch.manual_seed(seed)
    r = torch.rand(T) + 0.5
    return SinkhornPlan(T, S, tau=tau, init=depth_prior(T, S), row_marginal=r * (S / r.sum()))


def test_plan_module_matches_public_solver_along_a_trajectory():
    """Warm-started steps give the plan and gradient of a cold, tight public solve at every step."""
    plan = _learned_plan()
    # d loss / d lambda of the size fit() sees: -(1 - beta) * MI, MI about 0.01-0.3 nats per element
    g = 0.1 * torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(plan.parameters(), lr=0.05)  # the fit() default
    for step in range(12):
        lam = plan()
        (lam * g).sum().backward()
        Z = plan.logits.detach().clone().requires_grad_()
        r = plan.row_marginal.double()
        ref = sinkhorn(Z.double(), r * (4 / r.sum()), tau=plan.tau, **TIGHT).float()  # r32 sums to S +- 1e-7
        (ref * g).sum().backward()
        torch.testing.assert_close(lam, ref, atol=2e-5, rtol=0)  # tol=1e-5 on the rows
        torch.testing.assert_close(plan.logits.grad, Z.grad.float(), atol=5e-4, rtol=1e-3)
        assert (lam.sum(0) - 1).abs().max() < 1e-6
        assert (lam.sum(1) - plan.row_marginal).abs().max() <= plan.tol
        if step > 0:  # a small optimizer step from a warm start: one Newton step reaches tol
            assert plan.last_iterations <= 2, plan.last_iterations
        opt.step()
        opt.zero_grad()


def test_warm_newton_converges_quadratically():
    """From the solution of nearby logits, each Newton step squares the row error (up to a constant)."""
    from align_kd.plans import depth_prior
    from align_kd.plans.projection import _dual_state, _newton_step

    L, r = _problem(5, 4, seed=3)
    L = 0.1 * depth_prior(5, 4).double() + 0.05 * L
    a = sinkhorn_solve(L, r, tau=0.1, **TIGHT).row_potential
    L2 = L + 1e-3 * torch.randn(5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    K = (L2 - L2.amax(0)) / 0.1
    state = _dual_state(K, a, r)
    errs = [float(state.err)]
    for _ in range(4):
        a, state, moved = _newton_step(K, a, r, state)
        errs.append(float(state.err))
    assert 1e-4 < errs[0] < 1e-1, errs  # the perturbation is felt
    for before, after in zip(errs, errs[1:]):
        assert after <= max(10 * before**2, 1e-14), errs
    assert errs[3] < 1e-13, errs


def test_plan_module_checks_inputs_at_construction_and_nan_logits_at_forward():
    from align_kd.plans import SinkhornPlan

    with pytest.raises(ValueError, match="sum to S=4"):
        SinkhornPlan(3, 4, tau=0.1, init=torch.zeros(3, 4), row_marginal=torch.ones(3))
    with pytest.raises(ValueError, match="tau"):
        SinkhornPlan(3, 4, tau=0.0, init=torch.zeros(3, 4), row_marginal=torch.full((3,), 4 / 3))
    plan = _learned_plan()
    with torch.no_grad():
        plan.logits[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf.*plan_lr"):
        plan()
