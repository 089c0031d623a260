"""Layer-alignment plans (lambda) and the log-domain Sinkhorn projection.

Convention everywhere: a plan is a (T, S) tensor, rows are teacher layers, columns are student
layers, and every column sums to 1 (student layer j spreads one unit of attention over the
teacher layers). With a teacher-row marginal ``r`` (``sum(r) == S``) rows also sum to ``r``.

``sinkhorn(logits, r, tau=tau)`` is the maximiser of ``<logits, P> + tau * H(P)`` over that
polytope, ``H(P) = -sum P (log P - 1)``. With no row marginal this is a column softmax of
``logits / tau`` (exact, no iterations). With one, we run log-domain Sinkhorn sweeps (ending on
the column update, so columns are exact) and, when they stall (small tau), damped Newton steps on
the concave semi-dual in the T row potentials. Gradients are exact at convergence by implicit
differentiation of the fixed point (float64 solve with a tiny ridge), or unrolled on request.

``row_marginal_mode="at_most"`` reads ``r`` as capacities (``sum(r) >= S``): rows sum to at most
``r``, an unbalanced plan in which a teacher layer may serve fewer student layers than its share
(or none) and a column may be one-hot, as in the fixed pairing. Its dual is the same semi-dual
with the row potentials held ``<= 0`` (a potential below 0 marks a row at its capacity), solved
by the Sinkhorn sweeps with the row update clipped at 0 (block coordinate ascent on the
constrained dual), then projected Newton steps; the implicit gradient leaves the rows below
capacity free.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SinkhornResult", "sinkhorn", "sinkhorn_solve"]

GRAD_MODES = ("implicit", "unrolled")
#: how a row marginal r binds: rows sum to exactly r (sum(r) == S), or to at most r (sum(r) >= S)
ROW_MARGINAL_MODES = ("equal", "at_most")


@dataclass
class SinkhornResult:
    """What :func:`sinkhorn_solve` returns.

    plan: (..., T, S) transport plan, columns sum to 1 exactly.
    row_potential: (..., T) log-domain row potential ``a`` with ``P = colsoftmax(logits/tau + a)``;
        pass it back as ``init`` to warm-start the next solve.
    iterations: Sinkhorn sweeps plus Newton steps used.
    marginal_error: max over the batch of ``|row sums - r|`` (0.0 without a row marginal); with
        ``row_marginal_mode="at_most"`` the violation of the optimality conditions: a row above its
        capacity, or a row whose potential is below 0 (at capacity) but whose sum is not.
    converged: whether ``marginal_error <= tol``.
    """

    plan: Tensor
    row_potential: Tensor | None
    iterations: int
    marginal_error: float
    converged: bool


def _check_inputs(logits: Tensor, row_marginal: Tensor | None, tau: float, row_marginal_mode: str = "equal") -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"Expected `logits` to be a torch.Tensor of shape (..., T, S) but got {type(logits).__name__}.")
    if logits.dim() < 2:
        raise ValueError(
            f"Expected `logits` of shape (..., T, S) with at least 2 dimensions but got shape {tuple(logits.shape)}."
        )
    if logits.shape[-1] == 0 or logits.shape[-2] == 0:
        raise ValueError(f"Expected a non-empty (T, S) plan but got logits of shape {tuple(logits.shape)}.")
    if not logits.is_floating_point():
        raise TypeError(f"Expected floating-point `logits` but got dtype {logits.dtype}; call .float() first.")
    if not torch.isfinite(logits).all():
        raise ValueError("`logits` contain NaN or inf; a plan cannot be computed. Check the learning rate and tau.")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"Expected `tau` to be a finite number > 0 but got {tau!r}; use exact_plan(..., tau=0) for the LP.")
    L = logits.detach().double()
    span = float((L.amax(-2) - L.amin(-2)).max()) if logits.numel() else 0.0  # largest within-column gap
    if not math.isfinite(span / tau):
        raise ValueError(
            f"`tau`={tau!r} is too small for logits whose columns span {span:.3g}: logits / tau overflows float64. "
            "Raise `tau` or rescale the logits."
        )
    if row_marginal is not None:
        T, S = logits.shape[-2:]
        if not isinstance(row_marginal, Tensor):
            raise TypeError(f"Expected `row_marginal` to be a tensor of shape (T,) = ({T},) but got {type(row_marginal).__name__}.")
        if row_marginal.shape[-1:] != (T,) or row_marginal.dim() > logits.dim() - 1:
            raise ValueError(
                f"Expected `row_marginal` of shape (..., T) with T={T} (one entry per teacher layer) "
                f"but got shape {tuple(row_marginal.shape)}."
            )
        try:
            torch.broadcast_shapes(row_marginal.shape, logits.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"Expected `row_marginal` of shape (T,) = ({T},) or {tuple(logits.shape[:-1])} (one per batch element) "
                f"but got shape {tuple(row_marginal.shape)}, which does not broadcast against logits {tuple(logits.shape)}."
            ) from None
        check_row_masses(row_marginal, S, row_marginal_mode)


def check_row_masses(row_marginal: Tensor, S: int, row_marginal_mode: str = "equal") -> None:
    """The rule on a teacher-row marginal's values (..., T) for S student layers, whatever its caller
    (the projection, or the Distiller before any work): finite and strictly positive, summing to S
    (``"equal"``) or to at least S (``"at_most"``: capacities)."""
    if not torch.isfinite(row_marginal).all() or (row_marginal <= 0).any():
        raise ValueError(
            f"Expected a strictly positive, finite `row_marginal` but got {row_marginal.tolist()}; "
            "drop teacher layers you want unused instead of giving them zero mass."
        )
    if row_marginal_mode not in ROW_MARGINAL_MODES:
        raise ValueError(
            f"Expected `row_marginal_mode` to be one of {list(ROW_MARGINAL_MODES)} but got {row_marginal_mode!r}."
        )
    total = row_marginal.double().sum(-1)
    if row_marginal_mode == "at_most":
        if (total < S * (1 - 1e-6)).any():
            raise ValueError(
                f"With row_marginal_mode='at_most' the teacher-row capacities must sum to at least S={S} (every "
                f"column sums to 1, so the rows carry S in all) but they sum to {total.tolist()}; raise them, "
                f"e.g. torch.ones(T) when T >= S."
            )
    elif (total - S).abs().max() > 1e-6 * S:
        raise ValueError(
            f"`row_marginal` must sum to S={S} (the number of student layers, since every column sums to 1) "
            f"but sums to {total.tolist()}; e.g. use torch.full((T,), S / T)."
        )


def _col_softmax_log(K: Tensor, a: Tensor) -> Tensor:
    """log P for P = column softmax of K + a[:, None]: (..., T, S)."""
    # log_softmax subtracts the column maximum before the log-sum: Z - logsumexp(Z) loses the
    # column normalisation when the potentials are large (huge logits / tau)
    return torch.log_softmax(K + a.unsqueeze(-1), dim=-2)


@dataclass
class _DualState:
    """Everything the solver needs at a row potential ``a``, from one pass over K."""

    P: Tensor  # (..., T, S) column-stochastic plan colsoftmax(K + a)
    phi: Tensor  # (...,) concave semi-dual <r, a> - sum_j LSE_i(K_ij + a_i)
    err: Tensor  # (...,) max_i |row sum_i - r_i| (at_most: the KKT residual, see :func:`_dual_state`)


def _dual_state(K: Tensor, a: Tensor, r: Tensor, at_most: bool = False) -> _DualState:
    Z = K + a.unsqueeze(-1)  # (..., T, S)
    top = Z.amax(-2, keepdim=True)  # (..., 1, S); written out rather than log_softmax + logsumexp:
    E = (Z - top).exp()  # a third of the kernel calls, which is what a 5 x 5 solve costs
    col = E.sum(-2, keepdim=True)  # (..., 1, S), >= 1
    P = E / col
    phi = (r * a).sum(-1) - (top + col.log()).sum((-2, -1))
    gap = P.sum(-1) - r  # (..., T)
    if at_most:  # KKT residual of the dual with a <= 0: no row above capacity, and rows at a < 0 at it
        gap = torch.where(a < 0, gap.abs(), gap.clamp_min(0))
    return _DualState(P, phi, gap.abs().amax(-1))


def _row_update(K: Tensor, b: Tensor, log_r: Tensor, at_most: bool) -> Tensor:
    """The row potentials (..., T) that maximise the dual at column potentials b (..., S): rows
    summing to r, or (``at_most``) the same potentials clipped at 0, the maximiser over a <= 0."""
    a = log_r - torch.logsumexp(K + b.unsqueeze(-2), dim=-1)
    return a.clamp_max(0.0) if at_most else a


def _newton_step(K: Tensor, a: Tensor, r: Tensor, state: _DualState, at_most: bool = False
                 ) -> tuple[Tensor, _DualState, bool]:
    """One damped Newton step on the concave semi-dual phi (see :class:`_DualState`) from ``a``.

    Returns the new potential, its state, and whether any batch element moved (False: stalled).
    A step is accepted when it increases phi (Armijo) or shrinks the row-marginal error without
    lowering phi beyond round-off; from a warm start the full step passes at once, so a step costs
    one solve and one state evaluation. ``at_most``: a projected Newton step (Bertsekas) on the dual
    with a <= 0: rows at a = 0 whose gradient points out of the box stay there, Newton runs on the
    others, and every trial point is clipped back to a <= 0.
    """
    P = state.P
    R = P.sum(-1)  # (..., T)
    grad = r - R  # (..., T), gradient of phi
    T = a.shape[-1]
    H = torch.diag_embed(R) - P @ P.transpose(-1, -2)  # (..., T, T), minus the Hessian; null vector 1
    # The ridge keeps rows with R_i ~ 0 solvable far from the solution; it shrinks with the gradient
    # (Levenberg-Marquardt style) so that near it Newton stays quadratic. A fixed 1e-8 ridge made
    # convergence linear (rate ~0.96 per step) once the smallest Hessian eigenvalue fell below it,
    # which happens at small tau: 1000+ steps to reach tol=1e-12 on 32 x 32 at tau=0.03.
    ridge = (1e-3 * state.err).clamp(1e-15, 1e-8) * R.amax(-1).clamp_min(1.0)  # (...,)
    H.diagonal(dim1=-2, dim2=-1).add_(ridge.unsqueeze(-1))
    if at_most:
        moving = (a < 0) | (grad <= 0)  # (..., T); the others sit at a = 0 below capacity
        H = torch.where(moving.unsqueeze(-1) & moving.unsqueeze(-2), H, torch.zeros_like(H))
        H = H + torch.diag_embed((~moving).to(H.dtype))  # a zero step on the rows that stay
        H = H + moving.all(-1).to(H.dtype)[..., None, None] / T  # all moving: pin the direction 1
        rhs = torch.where(moving, grad, torch.zeros_like(grad))
    else:
        H, rhs = H + 1.0 / T, grad
    step, info = torch.linalg.solve_ex(H, rhs.unsqueeze(-1))
    # (..., T); gradient step if singular. Both sum to 0 like grad (H 1 = 0 and the 1/T term pins
    # the shift along 1, to which phi is invariant), so no re-centring is needed
    step = torch.where((info == 0)[..., None], step.squeeze(-1), rhs)
    slope = (grad * step).sum(-1)
    t = torch.ones_like(state.phi)

    def trial_point(t):
        moved = a + t.unsqueeze(-1) * step
        return moved.clamp_max(0.0) if at_most else moved

    for _ in range(40):  # backtracking per batch element
        a_t = trial_point(t)
        trial = _dual_state(K, a_t, r, at_most)
        # near the solution phi moves at round-off level, so a smaller row error also counts,
        # but only if phi did not fall beyond round-off: far from it the error can shrink while
        # the potentials run off (seen at tau=0.0625 after epsilon scaling: row sums [3, 0, 0, 0])
        slack = 1e-12 * (1.0 + state.phi.abs())
        # the Armijo slope along the step taken: the clipped step under capacities; t * slope (the same
        # quantity) for equality marginals, written as before so that their trajectories stay bitwise
        rise = (grad * (a_t - a)).sum(-1) if at_most else t * slope
        ok = (trial.phi >= state.phi + 1e-4 * rise) | ((trial.err < state.err) & (trial.phi >= state.phi - slack))
        if ok.all():
            return a_t, trial, True
        t = torch.where(ok, t, t / 2)
    t = torch.where(ok, t, torch.zeros_like(t))  # elements with no acceptable step stay put
    a = trial_point(t)
    return a, _dual_state(K, a, r, at_most), bool(ok.any())


def _solve_stage(
    K: Tensor, r: Tensor, a: Tensor, tol: float, budget: int, check_every: int, newton_after: int,
    at_most: bool = False,
) -> tuple[Tensor, Tensor, int, float]:
    """Row potential a with rows of colsoftmax(K + a) summing to r (``at_most``: at most r, a <= 0),
    the plan there, iterations and max row error (float64, no grad)."""
    log_r = r.log()
    if at_most:
        a = a.clamp_max(0.0)
    it, sweeps = 0, 0
    state = _dual_state(K, a, r, at_most)
    err = float(state.err.max())
    while err > tol and it < budget:
        if sweeps < newton_after:
            # checks after 1, 2, 4, ... sweeps up to every `check_every`: a warm start usually
            # needs only a couple of sweeps
            for _ in range(min(check_every, 1 << sweeps.bit_length(), budget - it)):
                b = -torch.logsumexp(K + a.unsqueeze(-1), dim=-2)  # (..., S) column update
                a = _row_update(K, b, log_r, at_most)  # (..., T) row update
                it, sweeps = it + 1, sweeps + 1
            state = _dual_state(K, a, r, at_most)
        elif a.dim() == 1:  # one plan (SinkhornPlan's per-step solve): no batch to gather and scatter
            a, state, moved = _newton_step(K, a, r, state, at_most)
            it += 1
            if not moved:
                break
        else:
            # Newton only on the batch elements not yet within tol: converged ones can never pass
            # the line search at round-off level, and the work should not scale with the batch
            # times the slowest element
            shape, (T, S) = a.shape, K.shape[-2:]
            active = (state.err > tol).reshape(-1).nonzero().squeeze(-1)  # (n_active,)
            sub = _DualState(state.P.reshape(-1, T, S)[active], state.phi.reshape(-1)[active],
                             state.err.reshape(-1)[active])
            a_act, sub, moved = _newton_step(K.reshape(-1, T, S)[active], a.reshape(-1, T)[active],
                                             r.reshape(-1, T)[active], sub, at_most)
            a = a.reshape(-1, T).index_copy(0, active, a_act).reshape(shape)
            state = _DualState(state.P.reshape(-1, T, S).index_copy(0, active, sub.P).reshape(state.P.shape),
                               state.phi.reshape(-1).index_copy(0, active, sub.phi).reshape(state.phi.shape),
                               state.err.reshape(-1).index_copy(0, active, sub.err).reshape(state.err.shape))
            it += 1
            if not moved:
                break
        err = float(state.err.max())
    return a, state.P, it, err


def _solve_potential(
    L: Tensor, r: Tensor, tau: float, a: Tensor | None, tol: float, max_iter: int, check_every: int, newton_after: int,
    at_most: bool = False,
) -> tuple[Tensor, Tensor, int, float]:
    """Solve for the row potential of logits L (float64) at temperature tau; returns it as
    :func:`_solve_stage` does.

    A cold start at small tau first solves at a larger temperature and halves it (epsilon
    scaling), rescaling the potential between stages, so that Newton always starts close.
    """
    if a is not None:
        return _solve_stage(L / tau, r, a, tol, max_iter, check_every, newton_after, at_most)
    span = float((L.amax(-2) - L.amin(-2)).max())  # largest within-column logit gap
    start = span / 8
    if tau >= start:
        a = torch.zeros(L.shape[:-1], dtype=L.dtype, device=L.device)
        return _solve_stage(L / tau, r, a, tol, max_iter, check_every, newton_after, at_most)
    temps = []
    t = start
    while t > tau:
        temps.append(t)
        t /= 4
    temps.append(tau)
    a = torch.zeros(L.shape[:-1], dtype=L.dtype, device=L.device)
    used, err, prev = 0, math.inf, temps[0]
    for k, t in enumerate(temps):
        a = a * (prev / t)  # same potential in logit units
        last = k == len(temps) - 1
        a, P, it, err = _solve_stage(L / t, r, a, tol if last else max(tol, 1e-6), max_iter - used, check_every,
                                     newton_after if k == 0 else 0, at_most)
        used, prev = used + it, t
    return a, P, used, err


class _ImplicitSinkhorn(torch.autograd.Function):
    """The solved plan P = colsoftmax(logits / tau + a*(logits)) (float64, computed by the solver),
    returned in the logits' dtype, with the exact implicit gradient with respect to the logits.
    ``free``: None (every row held at its marginal), or (..., T) True where a row is below its
    capacity (``row_marginal_mode="at_most"``, potential 0): such a row's sum is not held."""

    @staticmethod
    def forward(ctx, logits: Tensor, P: Tensor, tau: float, free: Tensor | None = None) -> Tensor:
        ctx.save_for_backward(P, free)
        ctx.tau = tau
        return P.to(logits.dtype)

    @staticmethod
    def backward(ctx, G: Tensor):
        # dL/dK = P * (G - alpha_i - beta_j) with alpha, beta such that the result has zero row and
        # column sums (the tangent space of the polytope). Eliminating beta:
        #   (diag(r) - P P^T) alpha = rowsum(P*G) - P (colsum(P*G))
        # Rows below capacity are not held: alpha_i = 0 there, and the system keeps only the held rows
        # (strictly diagonally dominant then, so no pin is needed unless every row is held)
        P, free = ctx.saved_tensors  # float64
        G64 = G.double()
        PG = P * G64  # (..., T, S)
        g_col = PG.sum(-2)  # (..., S)
        rhs = PG.sum(-1) - (P * g_col.unsqueeze(-2)).sum(-1)  # (..., T)
        T = P.shape[-2]
        A = torch.diag_embed(P.sum(-1) + 1e-12) - P @ P.transpose(-1, -2)  # (..., T, T)
        if free is None:
            A = A + 1.0 / T  # pin the null direction 1
        else:
            held = ~free
            A = torch.where(held.unsqueeze(-1) & held.unsqueeze(-2), A, torch.zeros_like(A))
            A = A + torch.diag_embed(free.to(A.dtype))  # alpha_i = 0 on free rows
            A = A + held.all(-1).to(A.dtype)[..., None, None] / T  # every row held: pin the null direction 1
            rhs = torch.where(held, rhs, torch.zeros_like(rhs))
        alpha = torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1)  # (..., T)
        beta = g_col - (P * alpha.unsqueeze(-1)).sum(-2)  # (..., S)
        dK = P * (G64 - alpha.unsqueeze(-1) - beta.unsqueeze(-2))
        return (dK / ctx.tau).to(G.dtype), None, None, None


def sinkhorn_solve(
    logits: Tensor,
    row_marginal: Tensor | None = None,
    *,
    tau: float = 1.0,
    tol: float = 1e-6,
    max_iter: int = 2000,
    check_every: int = 10,
    newton_after: int = 10,
    init: Tensor | None = None,
    grad: str = "implicit",
    warn: bool = True,
    row_marginal_mode: str = "equal",
) -> SinkhornResult:
    """Project ``logits`` onto the plan polytope; see :func:`sinkhorn` for the maths.

    Args:
        logits: (..., T, S) scores, rows teacher layers, columns student layers.
        row_marginal: (T,) or (..., T) positive teacher-row masses summing to S, or None.
        tau: entropic temperature > 0 (smaller is sharper and harder to solve).
        tol: target max row-marginal error; columns are always exact.
        max_iter: budget of Sinkhorn sweeps plus Newton steps.
        check_every: sweeps between marginal-error checks.
        newton_after: sweeps after which damped Newton steps on the semi-dual take over
            (set to ``max_iter`` for pure Sinkhorn).
        init: (..., T) row potential from a previous solve (warm start).
        grad: "implicit" (exact at convergence, O(T^3) backward) or "unrolled" (autograd through
            the Sinkhorn sweeps; no Newton steps).
        warn: emit a warning naming ``max_iter``/``tau`` when unconverged.
        row_marginal_mode: "equal" (rows sum to ``row_marginal``) or "at_most" (rows sum to at most
            it, ``sum(row_marginal) >= S``: capacities).
    """
    _check_inputs(logits, row_marginal, tau, row_marginal_mode)
    if grad not in GRAD_MODES:
        raise ValueError(f"Expected argument `grad` to be one of {list(GRAD_MODES)} but got {grad!r}.")
    if init is not None and init.shape != logits.shape[:-1]:
        raise ValueError(f"Expected `init` of shape {tuple(logits.shape[:-1])} but got {tuple(init.shape)}.")
    res = _project(logits, row_marginal, tau, tol, max_iter, check_every, newton_after, init, grad,
                   row_marginal_mode)
    if warn and not res.converged:
        warnings.warn(
            f"sinkhorn did not converge: row-marginal error {res.marginal_error:.2e} > tol={tol:.0e} after "
            f"{res.iterations} iterations (tau={tau}). Raise `max_iter`, raise `tau`, or loosen `tol`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return res


def _project(
    logits: Tensor, row_marginal: Tensor | None, tau: float, tol: float, max_iter: int, check_every: int,
    newton_after: int, init: Tensor | None, grad: str, row_marginal_mode: str = "equal",
) -> SinkhornResult:
    """:func:`sinkhorn_solve` on inputs already checked (the per-step path of :class:`SinkhornPlan`)."""
    # a plan does not change when a column's logits are shifted by a constant: subtract each column's
    # maximum, so that logits / tau never overflows and huge logits do not swamp the potentials
    L = logits.detach().double()
    shift = L.amax(-2, keepdim=True)  # (..., 1, S)
    if row_marginal is None:
        K = logits / tau  # (..., T, S)
        if not torch.isfinite(K).all():  # overflow (huge logits, or tau below the dtype's range)
            return SinkhornResult(torch.softmax((L - shift) / tau, dim=-2).to(logits.dtype), None, 0, 0.0, True)
        return SinkhornResult(torch.softmax(K, dim=-2), None, 0, 0.0, True)
    r = row_marginal.to(device=logits.device, dtype=torch.float64).expand(logits.shape[:-1])  # (..., T)
    a0 = None if init is None else init.detach().to(torch.float64)
    at_most = row_marginal_mode == "at_most"

    if grad == "unrolled" and logits.requires_grad:
        K = (logits - shift.to(logits.dtype)) / tau  # (..., T, S), <= 0
        a = torch.zeros(K.shape[:-1], dtype=K.dtype, device=K.device) if a0 is None else a0.to(K.dtype)
        log_r = r.to(K.dtype).log()
        it, err = 0, math.inf
        if at_most:
            a = a.clamp_max(0.0)
        while it < max_iter:
            b = -torch.logsumexp(K + a.unsqueeze(-1), dim=-2)
            a = _row_update(K, b, log_r, at_most)
            it += 1
            if it % check_every == 0 or it == max_iter:
                with torch.no_grad():
                    err = float(_dual_state(K, a, r.to(K.dtype), at_most).err.max())
                if err <= tol:
                    break
        plan = _col_softmax_log(K, a).exp()
        a_out = a.detach()
    else:
        with torch.no_grad():
            a_out, P, it, err = _solve_potential(L - shift, r, tau, a0, tol, max_iter, check_every, newton_after,
                                                 at_most)
        # the plan is evaluated in float64 and cast once: at small tau, K = logits / tau is large and
        # a float32 softmax leaves column/row errors ~1e-5; this keeps them at float32 rounding
        plan = _ImplicitSinkhorn.apply(logits, P, tau, (a_out == 0) if at_most else None)
    return SinkhornResult(plan, a_out.to(logits.dtype), it, err, err <= tol)


def sinkhorn(logits: Tensor, row_marginal: Tensor | None = None, *, tau: float = 1.0, **kwargs) -> Tensor:
    """Entropic transport plan ``P = diag(u) exp(logits / tau) diag(v)``.

    Every column of ``P`` sums to 1; with ``row_marginal`` r (``sum(r) == S``) rows sum to r; with
    ``row_marginal_mode="at_most"`` (``sum(r) >= S``) rows sum to at most r.
    ``P`` maximises ``<logits, P> + tau * H(P)`` over that polytope; with no row marginal it is the
    column softmax of ``logits / tau``. Batched over leading dimensions, differentiable, computed
    in the log domain (finite down to tau = 1e-3).

    Args:
        logits: (..., T, S).
        row_marginal: (T,) or (..., T), or None.
        tau: temperature > 0.
        **kwargs: ``tol``, ``max_iter``, ``check_every``, ``newton_after``, ``init``, ``grad``,
            ``warn``, ``row_marginal_mode`` as in :func:`sinkhorn_solve`.

    Returns:
        (..., T, S) plan with the dtype of ``logits``.
    """
    return sinkhorn_solve(logits, row_marginal, tau=tau, **kwargs).plan
