"""Property tests (hypothesis) for the plan solvers and the alignment graph at their public edge.

For any input, ``sinkhorn``, ``exact_plan`` and ``alignment_graph`` either return a correct answer
(finite, non-negative, columns summing to 1, rows to the row marginal; a graph with one node per
layer and one edge per entry above the threshold) or raise a ValueError/TypeError: never NaN
output, never a hang (a per-example deadline). Inputs: NaN/inf/huge entries, zero or negative
marginals, tau <= 0, NaN or inf tau, empty and 1 x 1 plans, name lists of the wrong length or
with duplicates, random shapes and values. Examples are derandomised so CI sees the same ones.
"""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch.set_num_threads(1)

from align_kd import alignment_graph, exact_plan, sinkhorn
from align_kd.exact import EXACT_METHODS

PROPS = settings(max_examples=50, deadline=10_000, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
REFUSED = (ValueError, TypeError)

tame = st.floats(-30, 30, width=32)
wild = st.one_of(tame, st.floats(width=32, allow_nan=True, allow_infinity=True))
# exact_plan: NaN/inf are refused, but finite scores beyond ~1e6 / tau defeat the conic solvers
# (a RuntimeError naming the solver; see test_exact_plan_huge_scores below)
moderate = st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf]))
dims = st.one_of(st.integers(1, 5), st.integers(1, 5), st.just(0))  # empty now and then


def matrices(elements, rows=dims, cols=dims, dtype=np.float32, clean=None):
    """(T, S) arrays; with ``clean``, half of them draw every entry from ``clean`` instead."""
    shapes = st.tuples(rows, cols)
    if clean is None:
        return shapes.flatmap(lambda s: hnp.arrays(dtype, s, elements=elements))
    return shapes.flatmap(lambda s: st.one_of(hnp.arrays(dtype, s, elements=clean), hnp.arrays(dtype, s, elements=elements)))


taus = st.one_of(st.floats(0.05, 10), st.floats(0.05, 10), st.sampled_from([0.0, -1.0, -1e-9, math.nan, math.inf, 1e-300]),
                 st.floats(-5, 5))


@st.composite
def marginals(draw, T: int, S: int):
    """None, a valid row marginal (positive, sums to S), or a broken one."""
    kind = draw(st.sampled_from(["none", "none", "valid", "valid", "valid", "zero", "negative", "nan", "wrong_sum", "wrong_len"]))
    if kind == "none" or T == 0:
        return None
    w = np.array(draw(st.lists(st.floats(0.05, 5), min_size=T, max_size=T)))
    r = w / w.sum() * S
    if kind == "zero":
        r[0] = 0.0
        r = r / max(r.sum(), 1e-12) * S
    elif kind == "negative":
        r[0] = -abs(r[0]) - 0.1
    elif kind == "nan":
        r[-1] = math.nan
    elif kind == "wrong_sum":
        r = r * 1.5 + 0.1
    elif kind == "wrong_len":
        r = np.append(r, 1.0)
    return r


def check_plan(P: np.ndarray, r, *, atol_col: float, atol_row: float) -> None:
    assert np.isfinite(P).all(), P
    assert (P >= -1e-9).all(), P
    np.testing.assert_allclose(P.sum(0), np.ones(P.shape[1]), atol=atol_col)
    if r is not None:
        np.testing.assert_allclose(P.sum(1), r, atol=atol_row)


# ----------------------------------------------------------------------------------------------
# sinkhorn


@PROPS
@given(data=st.data(), logits=matrices(wild, clean=tame), tau=taus)
def test_sinkhorn_any_input_gives_a_valid_plan_or_a_clear_error(data, logits, tau):
    T, S = logits.shape
    r = data.draw(marginals(T, S))
    r_t = None if r is None else torch.tensor(r, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            P = sinkhorn(torch.from_numpy(logits), r_t, tau=tau)
        except REFUSED as err:
            event(f"refused: {type(err).__name__}")
            return
    event("solved")
    unconverged = [w for w in caught if "did not converge" in str(w.message)]
    P = P.double().numpy()
    assert P.shape == (T, S)
    check_plan(P, None, atol_col=1e-5, atol_row=0)
    if r is not None and not unconverged:
        check_plan(P, r, atol_col=1e-5, atol_row=1e-4 * max(S, 1))
    # valid input at a moderate temperature must converge
    assert not (unconverged and tau >= 0.05 and np.abs(logits).max() <= 30), str(unconverged[0].message)


@PROPS
@given(logits=matrices(tame, rows=st.integers(1, 5), cols=st.integers(1, 5)), tau=st.floats(0.05, 10), data=st.data())
def test_sinkhorn_valid_input_meets_both_marginals(logits, tau, data):
    T, S = logits.shape
    w = np.array(data.draw(st.lists(st.floats(0.05, 5), min_size=T, max_size=T)))
    r = torch.tensor(w / w.sum() * S)
    P = sinkhorn(torch.from_numpy(logits).double(), r, tau=tau).numpy()
    check_plan(P, r.numpy(), atol_col=1e-9, atol_row=1e-5)


@pytest.mark.parametrize("r", [None, torch.ones(1)])
def test_sinkhorn_one_by_one_and_empty(r):
    assert sinkhorn(torch.tensor([[3.0]]), r, tau=0.1).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="non-empty"):
        sinkhorn(torch.zeros(0, 3), tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        sinkhorn(torch.zeros(2, 2), tau=0.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        sinkhorn(torch.tensor([[0.0, math.nan]]), tau=1.0)


# ----------------------------------------------------------------------------------------------
# exact_plan


@PROPS
@given(data=st.data(), tau=st.one_of(st.just(0.0), taus), method=st.sampled_from(EXACT_METHODS + EXACT_METHODS + ("bogus",)),
       scores=matrices(moderate, rows=st.one_of(st.integers(1, 4), st.just(0)), cols=st.one_of(st.integers(1, 4), st.just(0)),
                       dtype=np.float64, clean=st.floats(-1e3, 1e3)))
def test_exact_plan_any_input_gives_a_valid_plan_or_a_clear_error(data, scores, tau, method):
    T, S = scores.shape
    r = data.draw(marginals(T, S))
    try:
        P = exact_plan(scores, r, tau=tau, method=method)
    except REFUSED as err:
        event(f"refused: {type(err).__name__}")
        return
    event(f"solved ({method})")
    P = np.asarray(P, dtype=np.float64)
    assert P.shape == (T, S)
    check_plan(P, r, atol_col=1e-6, atol_row=1e-5)


@PROPS
@given(scores=matrices(st.floats(-3, 3), rows=st.integers(1, 4), cols=st.integers(1, 4), dtype=np.float64),
       tau=st.floats(0.2, 5), data=st.data())
def test_exact_plan_agrees_with_sinkhorn(scores, tau, data):
    """Two independent solvers of the same entropic problem (cvxpy/ECOS vs log-domain Sinkhorn)."""
    T, S = scores.shape
    w = np.array(data.draw(st.lists(st.floats(0.2, 5), min_size=T, max_size=T)))
    r = w / w.sum() * S
    P = np.asarray(exact_plan(scores, r, tau=tau, method="cvxpy"))
    Q = sinkhorn(torch.from_numpy(scores), torch.from_numpy(r), tau=tau).numpy()
    np.testing.assert_allclose(P, Q, atol=2e-4)


@pytest.mark.xfail(reason="known issue: exact_plan (cvxpy) fails on huge finite scores instead of shifting/scaling "
                          "them or refusing them with a ValueError", raises=RuntimeError, strict=False)
@pytest.mark.parametrize("scores,tau", [([[1.26e12]], 0.125), ([[1.2e11]], 2.0)])
def test_exact_plan_huge_scores(scores, tau):
    P = np.asarray(exact_plan(np.array(scores), tau=tau, method="cvxpy"))
    check_plan(P, None, atol_col=1e-6, atol_row=0)


@PROPS
@given(scores=matrices(st.floats(-1e3, 1e3), rows=st.integers(1, 4), cols=st.integers(1, 4), dtype=np.float64),
       method=st.sampled_from(["auto", "linprog", "cvxpy", "hungarian"]), data=st.data())
def test_exact_plan_lp_meets_the_marginals_and_beats_a_feasible_plan(scores, method, data):
    T, S = scores.shape
    if method == "hungarian":
        n = min(T, S)
        scores, T, S = scores[:n, :n], n, n
        r = np.ones(n)
    else:
        w = np.array(data.draw(st.lists(st.floats(0.0, 5), min_size=T, max_size=T)))
        r = np.full(T, S / T) if w.sum() == 0 else w / w.sum() * S  # zero masses allowed here
    P = np.asarray(exact_plan(scores, r, tau=0.0, method=method))
    check_plan(P, r, atol_col=1e-6, atol_row=1e-5)
    # optimality against an independent feasible candidate: every column equal to r / S
    assert (scores * P).sum() >= (scores * (r / S)[:, None]).sum() - 1e-6 * (1 + np.abs(scores).sum())


def test_exact_plan_one_by_one_and_empty():
    for method in ("auto", "linprog", "hungarian"):
        assert np.asarray(exact_plan(np.array([[2.0]]), np.ones(1), tau=0.0, method=method)).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="non-empty"):
        exact_plan(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="tau"):
        exact_plan(np.zeros((2, 2)), tau=-0.5)


# ----------------------------------------------------------------------------------------------
# alignment_graph


names = st.lists(st.text(alphabet="abcxyz.:0123", min_size=1, max_size=4), min_size=0, max_size=6)
unique_names = lambda n, alphabet: st.lists(st.text(alphabet, min_size=1, max_size=3), min_size=n, max_size=n, unique=True)


@PROPS
@given(plan=matrices(wild, clean=st.floats(0, 1, width=32)), data=st.data(),
       threshold=st.one_of(st.just(1e-3), st.just(1e-3), st.floats(0, 1), st.floats(-1, 0), st.just(math.nan)))
def test_alignment_graph_any_input_gives_a_consistent_graph_or_a_clear_error(plan, data, threshold):
    T, S = plan.shape
    # name lists: the right length most of the time, sometimes off by one or with duplicates
    tl = data.draw(st.one_of(unique_names(T, "abcdefg"), unique_names(T, "abcdefg"), names))
    sl = data.draw(st.one_of(unique_names(S, "tuvwxyz"), unique_names(S, "tuvwxyz"), names))
    try:
        G = alignment_graph(plan, tl, sl, threshold=threshold)
    except REFUSED as err:
        event(f"refused: {type(err).__name__}")
        return
    event("graph")
    assert len(tl) == T and len(sl) == S and len(set(tl)) == T and len(set(sl)) == S
    assert G.number_of_nodes() == T + S
    assert np.isfinite(plan).all() and (plan >= -1e-6).all()
    expected = int((plan > threshold).sum())
    assert G.number_of_edges() == expected
    for _, _, d in G.edges(data=True):
        assert math.isfinite(d["weight"]) and d["weight"] > threshold


@PROPS
@given(plan=matrices(st.floats(0, 1), rows=st.integers(1, 6), cols=st.integers(1, 6), dtype=np.float64), data=st.data(),
       threshold=st.floats(0, 0.5))
def test_alignment_graph_of_a_valid_plan_round_trips(plan, data, threshold):
    from align_kd.graph import graph_plan

    T, S = plan.shape
    tl, sl = data.draw(unique_names(T, "abcdefg")), data.draw(unique_names(S, "abcdefg"))  # names may overlap
    G = alignment_graph(plan, tl, sl, threshold=threshold)
    assert G.number_of_nodes() == T + S and G.number_of_edges() == int((plan > threshold).sum())
    np.testing.assert_array_equal(graph_plan(G), plan)


def test_alignment_graph_mismatched_and_one_by_one():
    G = alignment_graph(np.ones((1, 1)), ["t"], ["s"])
    assert G.number_of_nodes() == 2 and G.number_of_edges() == 1
    with pytest.raises(ValueError, match="shape"):
        alignment_graph(np.ones((2, 3)) / 2, ["a", "b"], ["x", "y"])
    with pytest.raises(ValueError, match="duplicates"):
        alignment_graph(np.ones((2, 1)) / 2, ["a", "a"], ["x"])
    with pytest.raises(ValueError, match="non-empty"):
        alignment_graph(np.ones((0, 1)), [], ["x"])
