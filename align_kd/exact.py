"""Exact layer-alignment plans: the problem :func:`align_kd.plans.sinkhorn` solves, solved exactly.

Convention: a plan ``P`` is (T, S), rows teacher layers, columns student layers, ``P >= 0`` and
every column sums to 1; with a teacher-row marginal ``r`` (``sum(r) == S``) rows also sum to ``r``.
:func:`exact_plan` maximises

    <scores, P> + tau * H(P),    H(P) = -sum P (log P - 1)

over that polytope, the same objective as ``sinkhorn(scores, r, tau=tau)``; ``tau = 0`` is the
linear program (optimal transport with cost ``-scores``). Methods:

- ``"cvxpy"``: tau > 0 with ``cp.entr`` through an exponential-cone solver (ECOS by default, which
  reaches about 1e-8 on the plan; where ECOS stalls, which happens on a few per cent of problems of
  32 x 32 and up at tau <= 0.1, Clarabel, about 1e-6); tau = 0 as an LP.
- ``"linprog"``: tau = 0 with ``scipy.optimize.linprog(method="highs")`` on a sparse constraint matrix.
- ``"hungarian"``: ``scipy.optimize.linear_sum_assignment``; the one-to-one case (T == S, unit row
  marginals, tau = 0), returning a 0/1 permutation plan.
- ``"auto"``: closed forms without a row marginal (per-column argmax one-hot for tau = 0, column
  softmax of ``scores / tau`` for tau > 0), else ``"linprog"`` (tau = 0) or ``"cvxpy"`` (tau > 0).

The solves are not differentiable: the result is a constant (use ``sinkhorn`` for gradients).
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from collections import OrderedDict

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment, linprog
from scipy.special import entr, softmax

__all__ = ["EXACT_METHODS", "exact_plan", "exact_plan_info"]

#: values accepted by ``exact_plan(method=...)``
EXACT_METHODS = ("auto", "cvxpy", "linprog", "hungarian")
#: ``solver=`` choices for ``method="linprog"`` (scipy's HiGHS variants)
LINPROG_SOLVERS = ("highs", "highs-ds", "highs-ipm")
#: cvxpy solvers tried in order when ``solver=None`` (ECOS is the most accurate on the entropic
#: problem but sometimes stalls; Clarabel is the fallback)
CVXPY_DEFAULTS = ("ECOS", "CLARABEL")

# A solver's plan may violate P >= 0 and the marginals by this much (absolute); within it we clip
# and re-normalise the columns, beyond it we raise instead of silently repairing a wrong answer.
_FEAS_TOL = 1e-6
_CLARABEL_TIGHT = {"tol_gap_abs": 1e-9, "tol_gap_rel": 1e-9, "tol_feas": 1e-9}
_CACHE_SIZE = 32
_problem_cache: OrderedDict = OrderedDict()


# ----------------------------------------------------------------------------------------------
# input checks


def _to_numpy_scores(scores) -> np.ndarray:
    """(..., T, S) float64 numpy copy of ``scores`` (torch tensor, numpy array or nested lists)."""
    if isinstance(scores, torch.Tensor):
        if scores.is_complex():
            raise TypeError(f"Expected real-valued `scores` but got a tensor of dtype {scores.dtype}.")
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(scores)
        except (TypeError, ValueError) as exc:  # ragged lists and the like
            raise TypeError(
                f"Expected `scores` as a torch.Tensor or numpy array of shape (..., T, S) but got "
                f"{type(scores).__name__} that numpy cannot convert ({exc})."
            ) from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(
                f"Expected real-valued `scores` of shape (..., T, S) but got a {type(scores).__name__} of dtype "
                f"{arr.dtype}."
            )
        arr = arr.astype(np.float64)
    if arr.ndim < 2:
        raise ValueError(
            f"Expected `scores` of shape (T, S) or batched (..., T, S) (rows teacher layers, columns student "
            f"layers) but got shape {tuple(arr.shape)}; reshape a single row with scores.reshape(1, -1)."
        )
    if arr.shape[-1] == 0 or arr.shape[-2] == 0 or arr.size == 0:
        raise ValueError(f"Expected a non-empty (T, S) plan but got `scores` of shape {tuple(arr.shape)}.")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ValueError(
            f"`scores` contain {bad} NaN or inf entries; an optimal plan is undefined. Check the MI estimates "
            "(replace missing pairs by a large finite negative score, not -inf)."
        )
    return arr


def _check_tau(tau) -> float:
    if isinstance(tau, torch.Tensor) and tau.numel() == 1:
        tau = tau.item()
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"Expected `tau` to be a real number >= 0 but got {type(tau).__name__} {tau!r}.")
    tau = float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise ValueError(
            f"Expected `tau` to be a finite number >= 0 (0 = the linear program, > 0 = entropic) but got {tau!r}."
        )
    return tau


def _check_marginal(row_marginal, shape: tuple[int, ...]) -> np.ndarray | None:
    """Validate ``row_marginal`` against scores of ``shape`` (..., T, S); returns (..., T) float64 or None."""
    if row_marginal is None:
        return None
    T, S = shape[-2:]
    if isinstance(row_marginal, torch.Tensor):
        r = row_marginal.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            r = np.asarray(row_marginal, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(
                f"Expected `row_marginal` as a tensor/array of shape (T,) = ({T},) but got "
                f"{type(row_marginal).__name__}."
            ) from None
    if r.ndim == 0 or r.shape[-1] != T:
        raise ValueError(
            f"Expected `row_marginal` of shape (T,) = ({T},) (one mass per teacher layer) or (..., {T}) but got "
            f"shape {tuple(r.shape)}."
        )
    try:
        r = np.broadcast_to(r, shape[:-1]).copy()  # (..., T)
    except ValueError:
        raise ValueError(
            f"`row_marginal` of shape {tuple(np.shape(row_marginal))} does not broadcast against the batch of "
            f"`scores` {tuple(shape)}; expected (T,) or {tuple(shape[:-1])}."
        ) from None
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError(
            f"Expected a finite, non-negative `row_marginal` but got {r.tolist()}; every teacher layer needs a "
            "mass >= 0."
        )
    total = r.sum(-1)
    if np.abs(total - S).max() > 1e-6 * S:
        raise ValueError(
            f"`row_marginal` must sum to S={S} (the number of student layers, since every column sums to 1) but "
            f"sums to {np.round(total, 8).tolist()}; e.g. use np.full(T, S / T)."
        )
    # within tolerance, but the equality constraints need sum(r) == S exactly (columns sum to exactly
    # 1) or the problem is infeasible; a float32 marginal cast to float64 misses by ~1e-7
    return r * (S / total[..., None])


def _check_method(method, solver, tau: float, r: np.ndarray | None, shape: tuple[int, ...]) -> str:
    """Resolve ``method`` to one of "argmax", "softmax", "cvxpy", "linprog", "hungarian"."""
    if method not in EXACT_METHODS:
        raise ValueError(f"Expected argument `method` to be one of {list(EXACT_METHODS)} but got {method!r}.")
    if solver is not None and not isinstance(solver, str):
        raise TypeError(f"Expected `solver` to be None or a solver name (str) but got {type(solver).__name__}.")
    T, S = shape[-2:]
    if method == "auto":
        if r is None:
            resolved = "argmax" if tau == 0 else "softmax"
        elif tau > 0:
            resolved = "cvxpy"
            if solver is not None and solver.lower() in LINPROG_SOLVERS:
                raise ValueError(
                    f"`solver` {solver!r} is a linprog method, which solves tau=0 only, but got tau={tau}; pass a "
                    f"cvxpy solver from {_installed_cvxpy()} or leave `solver` as None."
                )
        else:  # the LP: HiGHS, unless a cvxpy solver was named
            resolved = "linprog" if solver is None or solver.lower() in LINPROG_SOLVERS else "cvxpy"
        # the closed forms take no solver, but a misspelt name should still be reported
        if (solver is not None and resolved in ("argmax", "softmax")
                and solver.lower() not in LINPROG_SOLVERS and solver.upper() not in _installed_cvxpy()):
            raise ValueError(
                f"Unknown `solver` {solver!r}: expected a cvxpy solver from {_installed_cvxpy()} or a linprog "
                f"method from {list(LINPROG_SOLVERS)}."
            )
        return resolved
    if method == "linprog" and tau > 0:
        raise ValueError(
            f"method='linprog' solves the linear program only (tau=0) but got tau={tau}; use method='cvxpy' "
            "(or 'auto') for tau > 0, or sinkhorn() for a differentiable plan."
        )
    if method == "hungarian":
        if tau > 0:
            raise ValueError(
                f"method='hungarian' solves the one-to-one assignment (tau=0) only but got tau={tau}; use "
                "method='cvxpy' for tau > 0."
            )
        if T != S:
            raise ValueError(
                f"method='hungarian' needs a square plan (T == S, one teacher layer per student layer) but got "
                f"(T, S) = ({T}, {S}); use method='linprog' with a row marginal for T != S."
            )
        if r is not None and np.abs(r - 1.0).max() > 1e-6:
            raise ValueError(
                "method='hungarian' needs unit row marginals (every teacher layer used exactly once) but got "
                f"{np.round(r, 6).tolist()}; use method='linprog' for general row marginals."
            )
        if solver is not None:
            raise ValueError(f"method='hungarian' takes no `solver` (it uses linear_sum_assignment) but got {solver!r}.")
    return method


def _installed_cvxpy() -> list[str]:
    import cvxpy as cp

    return list(cp.installed_solvers())


def _cvxpy_attempts(solver: str | None) -> list[tuple[str, dict]]:
    """(solver name, options) to try in order: the named solver only, or the default chain.

    The default is ECOS (about 1e-8 on the plan) but ECOS's exponential-cone iteration stalls with
    "numerical problems" on a few per cent of N(0, 1) problems of 32 x 32 and up at tau <= 0.1, so
    Clarabel follows: first with tightened tolerances (about 1e-6), then with its defaults (1e-5).
    """
    installed = _installed_cvxpy()
    if solver is not None:
        if solver.upper() not in installed:
            raise ValueError(
                f"cvxpy solver {solver!r} is not installed; installed solvers: {installed}. Pass one of them as "
                "`solver=`, or install it (e.g. `pip install ecos`)."
            )
        return [(solver.upper(), {})]
    chain = []
    if "ECOS" in installed:
        chain.append(("ECOS", {}))
    if "CLARABEL" in installed:
        chain += [("CLARABEL", _CLARABEL_TIGHT), ("CLARABEL", {})]
    if not chain:
        raise RuntimeError(
            f"No exponential-cone solver for cvxpy found (looked for {list(CVXPY_DEFAULTS)}, installed: {installed}); "
            "`pip install ecos` or `pip install clarabel`, or name one with `solver=`."
        )
    return chain


# ----------------------------------------------------------------------------------------------
# solvers (each takes one (T, S) problem, or a batch it loops over with a shared construction)


def _argmax_plan(C: np.ndarray) -> np.ndarray:
    """(..., T, S) one-hot columns at the per-column argmax (first index on ties)."""
    P = np.zeros_like(C)
    np.put_along_axis(P, C.argmax(-2)[..., None, :], 1.0, axis=-2)
    return P


def _cvxpy_problem(T: int, S: int, with_marginal: bool, entropic: bool):
    """Cached parametrised problem (DPP): re-solving with new scores skips the canonicalisation."""
    key = (T, S, with_marginal, entropic)
    if key in _problem_cache:
        _problem_cache.move_to_end(key)
        return _problem_cache[key]
    import cvxpy as cp

    P = cp.Variable((T, S), nonneg=True)
    C = cp.Parameter((T, S))
    objective = cp.sum(cp.multiply(C, P))  # <scores, P>
    params = {"C": C}
    if entropic:
        tau = cp.Parameter(nonneg=True)
        # tau * H(P) = tau * sum(entr(P)) + tau * sum(P), entr(p) = -p log p
        objective = objective + tau * cp.sum(cp.entr(P)) + tau * cp.sum(P)
        params["tau"] = tau
    constraints = [cp.sum(P, axis=0) == 1]  # (S,) every column sums to 1
    if with_marginal:
        r = cp.Parameter(T, nonneg=True)
        constraints.append(cp.sum(P, axis=1) == r)  # (T,) rows sum to r
        params["r"] = r
    entry = (cp.Problem(cp.Maximize(objective), constraints), P, params)
    _problem_cache[key] = entry
    if len(_problem_cache) > _CACHE_SIZE:
        _problem_cache.popitem(last=False)
    return entry


def _solve_cvxpy(C: np.ndarray, r: np.ndarray | None, tau: float, solver: str | None) -> tuple[np.ndarray, str]:
    """Solve each (T, S) problem of the batch; returns the plan and a description of the solver(s) used."""
    import cvxpy as cp

    T, S = C.shape[-2:]
    attempts = _cvxpy_attempts(solver)
    problem, P, params = _cvxpy_problem(T, S, r is not None, tau > 0)
    flat_C = C.reshape(-1, T, S)
    flat_r = None if r is None else r.reshape(-1, T)
    out = np.empty_like(flat_C)
    used: dict[str, int] = {}
    kind = f"the entropic problem (tau={tau})" if tau > 0 else "the LP (tau=0)"
    for b in range(flat_C.shape[0]):
        params["C"].value = flat_C[b]
        if tau > 0:
            params["tau"].value = tau
        if flat_r is not None:
            params["r"].value = flat_r[b]
        failures = []
        for name, opts in attempts:
            try:
                status = _run_cvxpy(problem, name, opts)
            except cp.error.SolverError as exc:
                failures.append(f"{name} failed ({str(exc).rstrip('.')})")
                continue
            if status == cp.OPTIMAL and P.value is not None:
                used[name] = used.get(name, 0) + 1
                out[b] = P.value
                break
            failures.append(f"{name} returned status {status!r} (expected 'optimal')")
        else:
            where = f" (batch element {b})" if flat_C.shape[0] > 1 else ""
            raise RuntimeError(
                f"cvxpy could not solve {kind} for a ({T}, {S}) plan{where}: {'; '.join(failures)}. Try another "
                f"solver (installed: {_installed_cvxpy()}), a larger tau (the entropic problem is better "
                "conditioned), or method='linprog' for tau=0."
            )
    first = attempts[0][0]
    desc = first
    n_fallback = flat_C.shape[0] - used.get(first, 0)
    if n_fallback:
        others = "/".join(sorted(set(used) - {first}))
        desc = f"{first} ({others} fallback on {n_fallback} of {flat_C.shape[0]})"
    return _repair(out.reshape(C.shape), r, f"cvxpy solver {desc}"), desc


def _run_cvxpy(problem, solver: str, opts: dict) -> str:
    """Solve and return ``problem.status`` (a seam the tests use to simulate a failing solver)."""
    with warnings.catch_warnings():
        # the status is checked (and a fallback tried) by the caller; cvxpy's own warning would leak
        # out even when the next solver succeeds
        warnings.filterwarnings("ignore", message="Solution may be inaccurate", category=UserWarning)
        problem.solve(solver=solver, **opts)
    return problem.status


def _linprog_matrix(T: int, S: int, with_marginal: bool) -> sp.csr_matrix:
    """Sparse equality matrix on P.ravel() (row-major, index i*S + j): (S [+ T], T*S)."""
    cols = sp.kron(sp.csr_matrix(np.ones((1, T))), sp.identity(S, format="csr"))  # (S, T*S): sum_i P_ij
    if not with_marginal:
        return cols.tocsr()
    rows = sp.kron(sp.identity(T, format="csr"), sp.csr_matrix(np.ones((1, S))))  # (T, T*S): sum_j P_ij
    return sp.vstack([cols, rows]).tocsr()


def _solve_linprog(C: np.ndarray, r: np.ndarray | None, solver: str) -> tuple[np.ndarray, str]:
    T, S = C.shape[-2:]
    A = _linprog_matrix(T, S, r is not None)
    flat_C = C.reshape(-1, T * S)
    flat_r = None if r is None else r.reshape(-1, T)
    out = np.empty_like(flat_C)
    for b in range(flat_C.shape[0]):
        b_eq = np.ones(S) if flat_r is None else np.concatenate([np.ones(S), flat_r[b]])
        res = linprog(-flat_C[b], A_eq=A, b_eq=b_eq, bounds=(0, None), method=solver)
        if res.status != 0 or res.x is None:
            raise RuntimeError(
                f"scipy linprog (method={solver!r}) failed with status {res.status} ({res.message}) for a ({T}, {S}) "
                "plan. Try method='cvxpy', another `solver` from "
                f"{list(LINPROG_SOLVERS)}, or check that the row marginal sums to S."
            )
        out[b] = res.x
    return _repair(out.reshape(C.shape), r, f"scipy linprog ({solver})"), "optimal"


def _solve_hungarian(C: np.ndarray) -> np.ndarray:
    T = C.shape[-1]
    flat = C.reshape(-1, T, T)
    out = np.zeros_like(flat)
    for b in range(flat.shape[0]):
        rows, cols = linear_sum_assignment(flat[b], maximize=True)
        out[b, rows, cols] = 1.0
    return out.reshape(C.shape)


def _repair(P: np.ndarray, r: np.ndarray | None, who: str) -> np.ndarray:
    """Clip tiny negatives and re-normalise columns, but only if the plan is feasible to _FEAS_TOL."""
    col_err = float(np.abs(P.sum(-2) - 1.0).max())
    neg = float(max(0.0, -P.min()))
    row_err = 0.0 if r is None else float(np.abs(P.sum(-1) - r).max())
    if max(col_err, neg, row_err) > _FEAS_TOL:
        raise RuntimeError(
            f"{who} returned a plan that violates the constraints beyond tolerance {_FEAS_TOL:g} (column-sum error "
            f"{col_err:.1e}, row-sum error {row_err:.1e}, most negative entry {-neg:.1e}). Try another solver "
            "(solver='ECOS' is the most accurate for tau > 0) or a larger tau."
        )
    P = np.clip(P, 0.0, None)
    return P / P.sum(-2, keepdims=True)


def _objective(C: np.ndarray, P: np.ndarray, tau: float) -> np.ndarray:
    """<C, P> + tau * H(P) per batch element: (...,)."""
    value = (C * P).sum((-2, -1))
    if tau > 0:
        value = value + tau * (entr(P) + P).sum((-2, -1))
    return value


# ----------------------------------------------------------------------------------------------
# public API


def exact_plan_info(scores, row_marginal=None, *, tau: float = 0.0, method: str = "auto", solver: str | None = None):
    """:func:`exact_plan` plus a record of the solve, for logging.

    Returns:
        ``(plan, info)``: ``plan`` as in :func:`exact_plan`; ``info`` a dict with ``"method"`` (the method
        actually used: "argmax" or "softmax" for the closed forms, else "cvxpy", "linprog", "hungarian"),
        ``"solver"`` (e.g. "ECOS", "ECOS (CLARABEL fallback on 2 of 64)", "highs", "linear_sum_assignment";
        None for closed forms), ``"status"``
        ("optimal"), ``"seconds"`` (wall time of the whole call) and ``"objective"`` (``<scores, P> + tau
        H(P)``, a float, or a list over the batch).
    """
    start = time.perf_counter()
    C = _to_numpy_scores(scores)  # (..., T, S) float64
    tau = _check_tau(tau)
    r = _check_marginal(row_marginal, C.shape)  # (..., T) or None
    resolved = _check_method(method, solver, tau, r, C.shape)

    if resolved == "argmax":
        P, used, status = _argmax_plan(C), None, "optimal"
    elif resolved == "softmax":
        P, used, status = softmax(C / tau, axis=-2), None, "optimal"
    elif resolved == "cvxpy":
        P, used = _solve_cvxpy(C, r, tau, solver)
        status = "optimal"
    elif resolved == "linprog":
        used = "highs" if solver is None else solver.lower()
        if used not in LINPROG_SOLVERS:
            raise ValueError(f"Expected `solver` for method='linprog' to be one of {list(LINPROG_SOLVERS)} but got {solver!r}.")
        P, status = _solve_linprog(C, r, used)
    else:  # hungarian
        P, used, status = _solve_hungarian(C), "linear_sum_assignment", "optimal"

    if isinstance(scores, torch.Tensor):
        dtype = scores.dtype if scores.is_floating_point() else torch.float64
        plan = torch.from_numpy(P).to(device=scores.device, dtype=dtype)
    else:
        plan = torch.from_numpy(P)
    value = _objective(C, P, tau)
    info = {
        "method": resolved,
        "solver": used,
        "status": status,
        "seconds": time.perf_counter() - start,
        "objective": float(value) if value.ndim == 0 else value.tolist(),
    }
    return plan, info


def exact_plan(scores, row_marginal=None, *, tau: float = 0.0, method: str = "auto", solver: str | None = None):
    """The plan maximising ``<scores, P> + tau * H(P)`` exactly (no gradient).

    The polytope is the one :func:`align_kd.plans.sinkhorn` uses: ``P >= 0``, every column sums to 1
    and, when ``row_marginal`` is given, rows sum to it. ``H(P) = -sum P (log P - 1)``.

    Args:
        scores: (T, S) or batched (..., T, S) torch tensor or numpy array (e.g. MI estimates), finite.
        row_marginal: None, or (T,) / (..., T) non-negative teacher-row masses summing to S.
        tau: entropic temperature >= 0; 0 is the linear program.
        method: one of ``"auto"`` (closed forms without a row marginal, else "linprog" for tau=0 and
            "cvxpy" for tau>0), ``"cvxpy"``, ``"linprog"`` (tau=0), ``"hungarian"`` (T == S, unit row
            marginals (None is read as unit marginals here), tau=0).
        solver: for "cvxpy" a cvxpy solver name, used alone; the default (None) tries ECOS, then
            Clarabel where ECOS fails (``exact_plan_info`` reports which); for "linprog" one of
            "highs", "highs-ds", "highs-ipm" (default "highs"). With "auto", a cvxpy solver name
            sends tau = 0 problems with a row marginal to cvxpy instead of linprog.

    Returns:
        (..., T, S) float plan: dtype and device of ``scores`` when it is a floating torch tensor,
        else float64 on the CPU.

    Raises:
        ValueError / TypeError on invalid input (the message says what was expected and received);
        RuntimeError when a solver fails or does not report "optimal", naming the solver and status.
    """
    return exact_plan_info(scores, row_marginal, tau=tau, method=method, solver=solver)[0]
