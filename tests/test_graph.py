"""Tests for align_kd.graph: alignment graph, analyses with planted answers, drawing, report, CLI."""
from __future__ import annotations

import argparse
import itertools
import json
import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import networkx as nx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from align_kd import graph as g  # noqa: E402
from align_kd.result import FitResult  # noqa: E402

torch.set_num_threads(1)

TEACHER10 = ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
             "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc"]
STUDENT5 = ["features.0", "features.3", "features.6", "classifier.1", "classifier.4"]


def names(prefix, n):
    return [f"{prefix}{k}" for k in range(n)]


def perm_plan(perm, T=None):
    """(T, S) one-hot plan with student j -> teacher perm[j]."""
    S = len(perm)
    T = T or S
    p = np.zeros((T, S))
    p[list(perm), range(S)] = 1.0
    return p


def col_normalise(p):
    return p / p.sum(axis=0, keepdims=True)


def make_run_dict(T=10, S=5, epochs=4, seed=0, strategy="sinkhorn"):
    rng = np.random.default_rng(seed)
    tl = TEACHER10[:T] if T <= 10 else names("t", T)
    sl = STUDENT5[:S] if S <= 5 else names("s", S)
    hist = []
    for e in range(epochs):
        q = col_normalise(rng.random((T, S)) + 0.05)
        hist.append({"epoch": e, "plan": q.tolist(), "test_acc": 0.4 + 0.1 * e, "loss": 1.0 / (e + 1)})
    hist.append({"epoch": epochs, "test_acc": None})  # an entry without a plan must be tolerated
    plan = col_normalise(rng.random((T, S)) ** 4 + 1e-4)
    return {
        "plan": plan.tolist(),
        "mi": rng.random((T, S)).tolist(),
        "teacher_layers": tl,
        "student_layers": sl,
        "teacher_shapes": [[64, 16, 16]] * (T - 1) + [[10]],
        "student_shapes": [[32, 8, 8]] * (S - 1) + [[10]],
        "history": hist,
        "config": {"strategy": strategy},
    }


# ------------------------------------------------------------------------------------------
# graph construction
# ------------------------------------------------------------------------------------------


def test_graph_nodes_edges_and_attributes():
    p = np.array([[0.7, 0.0, 0.2], [0.3, 0.0005, 0.0], [0.0, 0.9995, 0.8]])
    G = g.alignment_graph(p, ["a", "b", "c"], ["x", "y", "z"], teacher_shapes=[[64, 16, 16], [128, 8, 8], [10]],
                          student_shapes=None)
    assert G.graph["T"] == 3 and G.graph["S"] == 3
    assert isinstance(G.graph["T"], int)
    assert sorted(G.nodes) == ["a", "b", "c", "x", "y", "z"]  # no collision -> no prefix
    assert G.nodes["a"] == {"label": "a", "side": "teacher", "depth": 0, "shape": "64x16x16", "bipartite": 0}
    assert G.nodes["c"]["shape"] == "10"
    assert G.nodes["z"] == {"label": "z", "side": "student", "depth": 2, "shape": "", "bipartite": 1}
    # edges: lambda > 1e-3 only (0.0005 dropped), weight is a python float equal to lambda
    expected = {("a", "x"): 0.7, ("b", "x"): 0.3, ("c", "y"): 0.9995, ("a", "z"): 0.2, ("c", "z"): 0.8}
    got = {(u, v) if G.nodes[u]["side"] == "teacher" else (v, u): d["weight"] for u, v, d in G.edges(data=True)}
    assert got == expected
    assert all(type(w) is float for w in got.values())
    assert nx.is_bipartite(G)
    # a higher threshold removes more edges
    assert g.alignment_graph(p, ["a", "b", "c"], ["x", "y", "z"], threshold=0.5).number_of_edges() == 3


def test_colliding_names_get_prefixed_noncolliding_do_not():
    p = np.eye(3)
    G = g.alignment_graph(p, ["0", "3", "fc"], ["0", "1", "fc"])
    assert set(G.nodes) == {"teacher:0", "teacher:3", "teacher:fc", "student:0", "student:1", "student:fc"}
    assert G.nodes["teacher:fc"]["label"] == "fc" and G.nodes["student:fc"]["label"] == "fc"
    assert G.nodes["teacher:3"]["label"] == "3"
    assert G.number_of_nodes() == 6
    G2 = g.alignment_graph(p, ["layer1", "layer2", "fc"], ["conv1", "conv2", "linear"])
    assert set(G2.nodes) == {"layer1", "layer2", "fc", "conv1", "conv2", "linear"}
    assert not any(":" in n for n in G2.nodes)


def test_graph_from_run_object_dict_and_path(tmp_path):
    d = make_run_dict(T=4, S=3, epochs=2)
    obj = SimpleNamespace(**{**d, "plan": torch.tensor(d["plan"], dtype=torch.float32)})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps(d))
    graphs = [g.alignment_graph(x) for x in (d, obj, tmp_path / "run", str(tmp_path / "run" / "result.json"))]
    for G in graphs:
        assert [G.nodes[n]["label"] for n in G if G.nodes[n]["side"] == "teacher"] == d["teacher_layers"]
        assert G.graph["strategy"] == "sinkhorn"
        assert G.nodes["layer1.0"]["shape"] == "64x16x16"
        assert G.nodes["conv1"]["depth"] == 0
    assert graphs[2].graph["name"] == "run"
    # the float32 tensor round-trips to within float32 precision
    np.testing.assert_allclose(g.graph_plan(graphs[1]), np.array(d["plan"]), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(g.graph_plan(graphs[0]), np.array(d["plan"]))
    r = g.load_run(tmp_path / "run")
    assert isinstance(r, FitResult) and r.student is None
    assert r.path == (tmp_path / "run").resolve()
    assert r.T == 4 and r.S == 3 and r.strategy == "sinkhorn"
    assert r.final_test_acc == pytest.approx(0.5)
    assert [e for e, _, _ in r.history_plans()] == [0, 1]
    assert g.load_run(r) is r


def test_load_run_defaults_and_missing_plan():
    # no names -> T0.. / S0..; no plan -> last history plan
    r = g.load_run({"history": [{"epoch": 0, "plan": np.eye(2).tolist()}, {"epoch": 1, "plan": [[0.0, 1.0], [1.0, 0.0]]}]})
    assert r.teacher_layers == ["T0", "T1"] and r.student_layers == ["S0", "S1"]
    np.testing.assert_array_equal(r.plan, [[0.0, 1.0], [1.0, 0.0]])
    assert r.teacher_shapes == [[], []]  # FitResult shapes are lists of ints; [] = unknown
    with pytest.raises(ValueError, match="plan"):
        g.load_run({"teacher_layers": ["a"], "student_layers": ["b"]})
    with pytest.raises(FileNotFoundError, match="result.json"):
        g.load_run("/nonexistent/run_dir_xyz")


def fit_result(d, **kw):
    return FitResult(student=None, plan=torch.tensor(d["plan"], dtype=torch.float32),
                     mi=torch.tensor(d["mi"], dtype=torch.float32), teacher_layers=d["teacher_layers"],
                     student_layers=d["student_layers"], teacher_shapes=d["teacher_shapes"],
                     student_shapes=d["student_shapes"], history=d["history"], config=d["config"], **kw)


def test_load_run_of_saved_fit_result_round_trips(tmp_path):
    d = make_run_dict(T=4, S=3, epochs=2)
    res = fit_result(d, solves=[{"step": 0, "status": "optimal"}])
    path = res.save(tmp_path / "run")
    r = g.load_run(path)
    assert isinstance(r, FitResult) and r.student is None
    assert r.plan.dtype == torch.float64 and r.mi.dtype == torch.float64
    torch.testing.assert_close(r.plan, res.plan.double(), rtol=0, atol=0)
    torch.testing.assert_close(r.mi, res.mi.double(), rtol=0, atol=0)
    assert r.teacher_layers == d["teacher_layers"] and r.student_layers == d["student_layers"]
    assert r.teacher_shapes == d["teacher_shapes"] and r.student_shapes == d["student_shapes"]
    assert r.history == res.history and r.solves == res.solves and r.config == res.config
    assert r.to_dict() == res.to_dict()  # path / display_name stay out of result.json
    assert r.path == path.resolve() and r.name == "run" and res.name == "sinkhorn"
    assert r.T == res.T == 4 and r.S == res.S == 3 and r.strategy == res.strategy == "sinkhorn"
    assert r.final_test_acc == res.final_test_acc == pytest.approx(0.5)
    assert [(e, acc) for e, _, acc in r.history_plans()] == [(e, acc) for e, _, acc in res.history_plans()] == [
        (0, pytest.approx(0.4)), (1, pytest.approx(0.5))]
    for (_, a, _), h in zip(r.history_plans(), d["history"]):
        np.testing.assert_array_equal(a, np.array(h["plan"]))
    # a FitResult read back by FitResult.load is taken as is, and gives the same graph as the directory
    loaded = FitResult.load(path)
    assert g.load_run(loaded) is loaded and g.load_run(res) is res
    G, H = g.alignment_graph(path), loaded.graph()
    assert dict(G.nodes(data=True)) == dict(H.nodes(data=True))
    assert G.nodes["layer1.0"]["shape"] == "64x16x16" and G.nodes["features.3"]["shape"] == "32x8x8"
    assert {frozenset(e): dd for *e, dd in G.edges(data=True)} == {frozenset(e): dd for *e, dd in H.edges(data=True)}
    assert G.graph["name"] == "run" and H.graph["name"] == "sinkhorn" and H.graph["strategy"] == "sinkhorn"


def test_load_run_checks_a_fit_result_too():
    d = make_run_dict(T=2, S=2, epochs=0)
    bad = fit_result(d)
    bad.plan[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf.*\(0, 1\)"):
        g.load_run(bad)
    with pytest.raises(ValueError, match="mi"):
        g.load_run(fit_result({**d, "mi": np.eye(3).tolist()}))
    with pytest.raises(ValueError, match=r"history\[0\]\['plan'\].*\(2, 2\).*\(3, 3\)"):
        fit_result({**d, "history": [{"epoch": 0, "plan": np.eye(3).tolist()}]}).history_plans()


def test_package_layout():
    import importlib
    from pathlib import Path

    assert Path(g.__file__).name == "__init__.py" and not (Path(g.__file__).parent.parent / "graph.py").exists()
    assert not hasattr(g, "RunData")
    where = {"analysis": ["load_run", "alignment_graph", "graph_plan", "max_matching", "crossings",
                          "weighted_crossings", "fan_in", "dominant_teacher", "usage", "summary", "compare",
                          "stability", "depth_correlation"],
             "drawing": ["draw_alignment", "draw_plan_heatmap", "draw_plan_evolution", "draw_panels"],
             "reporting": ["report", "format_table", "add_cli", "_cli_graph"]}
    seen = []
    for mod, funcs in where.items():
        m = importlib.import_module(f"align_kd.graph.{mod}")
        assert set(m.__all__) == {name for name in funcs if not name.startswith("_")}
        for name in funcs:
            assert getattr(m, name).__module__ == f"align_kd.graph.{mod}", name
            if not name.startswith("_"):
                assert getattr(g, name) is getattr(m, name), name
                seen.append(name)
    assert sorted(seen) == sorted(g.__all__)
    assert g._alignment_size.__module__ == "align_kd.graph.drawing"


@pytest.mark.parametrize(
    "plan, tl, sl, pattern",
    [
        (np.ones((3, 2)), ["a", "b"], ["x", "y"], r"shape .*\(2, 2\).*got shape \(3, 2\)"),
        (np.ones((2, 3)), ["a", "b", "c"], ["x", "y"], r"\(3, 2\).*got shape \(2, 3\) \(transposed\?\)"),
        (np.ones(4), ["a"], ["x"], r"2-D"),
        (np.array([[0.5, np.nan], [0.5, 1.0]]), ["a", "b"], ["x", "y"], r"NaN/inf.*\(0, 1\)"),
        (np.array([[0.5, np.inf], [0.5, 1.0]]), ["a", "b"], ["x", "y"], r"finite"),
        (np.array([[1.5, 0.0], [-0.5, 1.0]]), ["a", "b"], ["x", "y"], r"non-negative.*-0.5.*\(1, 0\)"),
        (np.eye(2), ["a", "a"], ["x", "y"], r"unique.*teacher_layers.*'a'.*positions 0 and 1"),
        (np.eye(2), ["a", "b"], ["y", "y"], r"unique.*student_layers"),
        (np.ones((0, 2)), [], ["x", "y"], r"non-empty"),
        ([[1.0, 0.0], [0.0]], ["a", "b"], ["x", "y"], r"array of numbers"),
    ],
)
def test_bad_inputs_raise_informative_value_errors(plan, tl, sl, pattern):
    with pytest.raises(ValueError, match=pattern):
        g.alignment_graph(plan, tl, sl)


def test_bad_threshold_shapes_and_run_dict():
    with pytest.raises(ValueError, match="threshold"):
        g.alignment_graph(np.eye(2), ["a", "b"], ["x", "y"], threshold=-1)
    with pytest.raises(ValueError, match="teacher_shapes.*one shape per layer \\(2\\).*got 1"):
        g.alignment_graph(np.eye(2), ["a", "b"], ["x", "y"], teacher_shapes=[[3]])
    with pytest.raises(ValueError, match="duplicates"):
        g.alignment_graph({"plan": np.eye(2), "teacher_layers": ["a", "a"], "student_layers": ["x", "y"]})
    with pytest.raises(ValueError, match="mi"):
        g.load_run({"plan": np.eye(2), "mi": np.eye(3)})
    with pytest.raises(ValueError, match="teacher_layers"):
        g.alignment_graph(np.eye(2), "ab", ["x", "y"])


def test_graphml_round_trip(tmp_path):
    d = make_run_dict(T=6, S=4)
    d["teacher_layers"][-1] = "fc"
    d["student_layers"][-1] = "fc"  # collision -> prefixed ids must survive too
    G = g.alignment_graph(d)
    f = tmp_path / "a.graphml"
    nx.write_graphml(G, f)
    H = nx.read_graphml(f)
    assert set(H.nodes) == set(G.nodes)
    assert "teacher:fc" in H.nodes and "student:fc" in H.nodes
    for n in G.nodes:
        assert H.nodes[n] == G.nodes[n], n
        assert type(H.nodes[n]["depth"]) is int and type(H.nodes[n]["bipartite"]) is int
    assert {frozenset(e) for e in H.edges} == {frozenset(e) for e in G.edges}
    for u, v, dd in G.edges(data=True):
        assert H.edges[u, v]["weight"] == dd["weight"]
        assert H.edges[u, v]["mi"] == dd["mi"]
    assert H.graph["T"] == 6 and H.graph["S"] == 4 and H.graph["strategy"] == "sinkhorn"
    np.testing.assert_array_equal(g.graph_plan(H), np.array(d["plan"]))
    # analyses agree before and after the round trip
    assert g.max_matching(H) == g.max_matching(G)
    assert g.crossings(H) == g.crossings(G)
    assert g.weighted_crossings(H) == pytest.approx(g.weighted_crossings(G), rel=1e-12)
    assert g.fan_in(H) == g.fan_in(G)


def test_graph_plan_without_stored_plan_uses_edges():
    p = np.array([[0.9, 0.0005], [0.1, 0.9995]])
    G = g.alignment_graph(p, ["a", "b"], ["x", "y"])
    del G.graph["plan"]
    np.testing.assert_array_equal(g.graph_plan(G), [[0.9, 0.0], [0.1, 0.9995]])


# ------------------------------------------------------------------------------------------
# analyses with planted answers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 5, 9])
def test_identity_plan(T):
    lay = [str(k) for k in range(T)]  # same names on both sides -> prefixed ids, plain labels in results
    G = g.alignment_graph(np.eye(T), lay, lay)
    assert g.crossings(G) == 0
    assert g.weighted_crossings(G) == 0.0
    assert g.max_matching(G) == {s: s for s in lay}
    assert list(g.max_matching(G)) == lay  # student depth order
    assert g.fan_in(G) == {s: 1.0 for s in lay}
    assert g.dominant_teacher(G) == {s: s for s in lay}


@pytest.mark.parametrize("T", [2, 3, 6, 10])
def test_reversed_plan(T):
    p = np.eye(T)[::-1]
    tl, sl = names("t", T), names("s", T)
    G = g.alignment_graph(p, tl, sl)
    assert g.crossings(G) == T * (T - 1) // 2
    assert g.weighted_crossings(G) == T * (T - 1) / 2
    assert g.weighted_crossings(G, normalized=True) == 1.0
    assert g.max_matching(G) == {sl[j]: tl[T - 1 - j] for j in range(T)}
    # the analyses accept a bare plan too (default names T0.. / S0..)
    assert g.crossings(p) == T * (T - 1) // 2
    assert g.max_matching(p) == {f"S{j}": f"T{T - 1 - j}" for j in range(T)}


def test_crossings_small_planted_cases():
    # student 0 <- teacher 1 and student 1 <- teacher 0 cross once; the shared-node edge never crosses
    p = np.array([[0.0, 0.5, 0.0], [1.0, 0.5, 1.0]])
    G = g.alignment_graph(p, ["a", "b"], ["x", "y", "z"])
    # edges: (1,0) (0,1) (1,1) (1,2); crossing pairs: (1,0)-(0,1) only  [(0,1)-(1,2): (0-1)(1-2) > 0]
    assert g.crossings(G) == 1
    assert g.weighted_crossings(G) == pytest.approx(1.0 * 0.5)
    assert g.weighted_crossings(G, normalized=True) == pytest.approx(0.5 / 3)
    assert g.weighted_crossings(np.ones((3, 1)), normalized=True) == 0.0


@pytest.mark.parametrize("T, S, seed", [(8, 8, 0), (10, 5, 1), (12, 7, 2), (6, 6, 3)])
def test_planted_permutation_with_noise_is_recovered(T, S, seed):
    rng = np.random.default_rng(seed)
    assign = rng.permutation(T)[:S]  # injective map student j -> teacher assign[j]
    p = col_normalise(perm_plan(assign, T) + rng.uniform(0.02, 0.15, size=(T, S)))
    tl, sl = names("t", T), names("s", S)
    G = g.alignment_graph(p, tl, sl)
    assert G.number_of_edges() == T * S  # the noise keeps every pair above the threshold
    assert g.max_matching(G) == {sl[j]: tl[assign[j]] for j in range(S)}
    assert g.dominant_teacher(G) == {sl[j]: tl[assign[j]] for j in range(S)}


def test_matching_prefers_total_weight_over_column_argmax():
    # both students prefer teacher a, but the best one-to-one matching is x->b, y->a
    p = np.array([[0.6, 0.9], [0.4, 0.1]])
    m = g.max_matching(g.alignment_graph(p, ["a", "b"], ["x", "y"]))
    assert m == {"x": "b", "y": "a"}
    assert g.dominant_teacher(p, ["a", "b"], ["x", "y"]) == {"x": "a", "y": "a"}


def test_matching_with_more_students_than_teachers():
    # S = 4 > T = 2: only two student layers can be matched; the others are absent from the dict
    p = np.array([[0.9, 0.8, 0.3, 0.1], [0.1, 0.2, 0.7, 0.9]])
    m = g.max_matching(g.alignment_graph(p, ["a", "b"], ["w", "x", "y", "z"]))
    assert m == {"w": "a", "z": "b"}
    assert len(m) == 2 and "x" not in m and "y" not in m


def test_fan_in_dominant_usage():
    T, S = 5, 3
    p = np.zeros((T, S))
    p[:, 0] = 1.0 / T  # uniform -> fan-in T
    p[2, 1] = 1.0  # one-hot -> 1
    p[[0, 4], 2] = 0.5  # two equal -> 2
    tl, sl = names("t", T), names("s", S)
    fi = g.fan_in(p, tl, sl)
    assert list(fi) == sl
    assert fi["s0"] == pytest.approx(T, rel=1e-12)
    assert fi["s1"] == 1.0
    assert fi["s2"] == pytest.approx(2.0, rel=1e-12)
    assert g.dominant_teacher(p, tl, sl) == {"s0": "t0", "s1": "t2", "s2": "t0"}  # ties -> shallowest
    u = g.usage(p, tl, sl)
    assert list(u) == tl
    assert sum(u.values()) == pytest.approx(S)
    assert u == pytest.approx({"t0": 0.2 + 0.5, "t1": 0.2, "t2": 1.2, "t3": 0.2, "t4": 0.7})
    # graph input uses the stored full plan, even for sub-threshold entries
    G = g.alignment_graph(p, tl, sl, threshold=0.3)
    assert g.fan_in(G)["s0"] == pytest.approx(T)
    assert sum(g.usage(G).values()) == pytest.approx(S)


def test_usage_sums_to_S_for_random_plans():
    rng = np.random.default_rng(5)
    for T, S in [(3, 7), (10, 5), (4, 4)]:
        p = col_normalise(rng.random((T, S)))
        assert sum(g.usage(p).values()) == pytest.approx(S, rel=1e-12)


def test_summary_rows():
    p = np.array([[0.8, 0.0, 0.5], [0.2, 1.0, 0.5]])
    rows = g.summary(g.alignment_graph(p, ["a", "b"], ["x", "y", "z"], student_shapes=[[4], [5], [6]]))
    assert [(r["side"], r["layer"], r["depth"]) for r in rows] == [
        ("teacher", "a", 0), ("teacher", "b", 1), ("student", "x", 0), ("student", "y", 1), ("student", "z", 2)]
    ta, tb, sx, sy, sz = rows
    assert ta["usage"] == pytest.approx(1.3) and tb["usage"] == pytest.approx(1.7)
    assert ta["degree"] == 2 and tb["degree"] == 3
    assert sx["dominant_teacher"] == "a" and sx["dominant_lambda"] == 0.8 and sx["shape"] == "4"
    assert sy["dominant_teacher"] == "b" and sy["fan_in"] == 1.0
    assert sz["fan_in"] == pytest.approx(2.0)
    assert sx["matched_teacher"] == "a" and sy["matched_teacher"] == "b" and sz["matched_teacher"] is None
    assert ta["matched_student"] == "x" and tb["matched_student"] == "y"
    table = g.format_table(rows, [("layer", "layer"), ("usage", "usage")])
    lines = table.splitlines()
    assert lines[0].split() == ["layer", "usage"]
    assert lines[2].split() == ["a", "1.300"] and lines[4].split() == ["x", "-"]


def test_compare_self_and_permutations():
    S = 6
    a = perm_plan(range(S))
    assert g.compare(a, a) == {
        "tv_per_column": {f"S{j}": 0.0 for j in range(S)}, "tv_mean": 0.0, "tv_max": 0.0,
        "matching_agreement": 1.0, "n_agree": S, "S": S,
        "matching_a": {f"S{j}": f"T{j}" for j in range(S)}, "matching_b": {f"S{j}": f"T{j}" for j in range(S)},
    }
    b_perm = [1, 0, 2, 3, 5, 4]  # two swaps -> 4 columns differ completely
    c = g.compare(a, perm_plan(b_perm))
    assert c["tv_per_column"] == {"S0": 1.0, "S1": 1.0, "S2": 0.0, "S3": 0.0, "S4": 1.0, "S5": 1.0}
    assert c["tv_mean"] == pytest.approx(4 / 6)
    assert c["tv_max"] == 1.0
    assert c["matching_agreement"] == pytest.approx(2 / 6) and c["n_agree"] == 2
    assert c["matching_b"] == {f"S{j}": f"T{b_perm[j]}" for j in range(S)}
    # partial overlap: TV is half the L1 distance of the columns
    x = np.array([[0.5, 1.0], [0.5, 0.0]])
    y = np.array([[0.8, 1.0], [0.2, 0.0]])
    cc = g.compare(x, y)
    assert cc["tv_per_column"] == pytest.approx({"S0": 0.3, "S1": 0.0})
    assert cc["tv_mean"] == pytest.approx(0.15) and cc["tv_max"] == pytest.approx(0.3)
    # graphs and runs work too
    G = g.alignment_graph(a, names("t", S), names("s", S))
    assert g.compare(G, G)["tv_max"] == 0.0
    with pytest.raises(ValueError, match=r"same \(T, S\) shape.*\(6, 6\).*\(3, 3\)"):
        g.compare(a, np.eye(3))


def test_stability():
    rng = np.random.default_rng(0)
    p = col_normalise(rng.random((5, 3)))
    st_ = g.stability([p, p.copy(), p.copy()])
    assert st_["n_runs"] == 3
    np.testing.assert_array_equal(st_["std"], np.zeros((5, 3)))
    np.testing.assert_array_equal(st_["mean"], p)
    m = g.max_matching(p)
    assert st_["matching_frequency"] == {(s, t): 1.0 for s, t in m.items()}
    assert st_["modal_matching"] == {s: (t, 1.0) for s, t in m.items()}
    # two different one-to-one plans: std 0.5 where they differ, matching edges at frequency 1/2
    a, b = perm_plan([0, 1]), perm_plan([1, 0])
    s2 = g.stability([a, b, a, a])
    np.testing.assert_allclose(s2["mean"], [[0.75, 0.25], [0.25, 0.75]])
    np.testing.assert_allclose(s2["std"], np.full((2, 2), math.sqrt(0.75 * 0.25)))
    assert s2["matching_frequency"] == {("S0", "T0"): 0.75, ("S0", "T1"): 0.25, ("S1", "T0"): 0.25,
                                        ("S1", "T1"): 0.75}
    assert s2["modal_matching"] == {"S0": ("T0", 0.75), "S1": ("T1", 0.75)}
    with pytest.raises(ValueError, match="at least one"):
        g.stability([])
    with pytest.raises(ValueError, match="shape"):
        g.stability([np.eye(2), np.eye(3)])


# ------------------------------------------------------------------------------------------
# hypothesis properties
# ------------------------------------------------------------------------------------------


@st.composite
def plans(draw):
    T = draw(st.integers(1, 6))
    S = draw(st.integers(1, 6))
    vals = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=T * S, max_size=T * S))
    p = np.array(vals).reshape(T, S) ** 3  # cubing makes many near-zero, sub-threshold entries
    p[0, p.sum(axis=0) == 0] = 1.0  # no all-zero column
    return col_normalise(p)


def brute_crossings(G):
    e = []
    for u, v in G.edges:
        if G.nodes[u]["side"] == "student":
            u, v = v, u
        e.append((G.nodes[u]["depth"], G.nodes[v]["depth"]))
    return sum((i - k) * (j - m) < 0 for (i, j), (k, m) in itertools.combinations(e, 2))


@settings(max_examples=40, deadline=None)
@given(plans())
def test_property_crossings_bounds(p):
    G = g.alignment_graph(p, names("t", p.shape[0]), names("s", p.shape[1]))
    E = G.number_of_edges()
    c = g.crossings(G)
    assert 0 <= c <= E * (E - 1) // 2
    assert c == brute_crossings(G)
    wn = g.weighted_crossings(G, normalized=True)
    assert 0.0 <= wn <= 1.0 + 1e-9


@settings(max_examples=40, deadline=None)
@given(plans())
def test_property_fan_in_range_and_self_compare(p):
    T, S = p.shape
    fi = g.fan_in(p)
    assert len(fi) == S
    assert all(1.0 <= v <= T for v in fi.values())
    c = g.compare(p, p)
    assert c["tv_mean"] == 0.0 and c["tv_max"] == 0.0 and c["matching_agreement"] == 1.0
    assert sum(g.usage(p).values()) == pytest.approx(S)
    m = g.max_matching(p)
    assert len(m) <= min(T, S) and len(set(m.values())) == len(m)


# ------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------


def test_draw_alignment_png_size_and_svg(tmp_path):
    d = make_run_dict(T=10, S=5)
    out = g.draw_alignment(d, tmp_path / "align.png", figsize=(6.0, 4.5), dpi=60)
    assert out == tmp_path / "align.png"
    assert out.stat().st_size > 1000
    img = mpimg.imread(out)
    assert img.shape[:2] == (round(4.5 * 60), round(6.0 * 60))  # (height, width) = figsize * dpi
    assert img[..., :3].std() > 0.05  # not blank
    # default figure size is also honoured exactly (no tight bbox)
    G = g.alignment_graph(d)
    w, h = g._alignment_size(G)
    img2 = mpimg.imread(g.draw_alignment(G, tmp_path / "default.png", dpi=40))
    assert img2.shape[:2] == (round(h * 40), round(w * 40))
    svg = g.draw_alignment(G, tmp_path / "align.svg", title="custom title")
    text = svg.read_text()
    assert svg.stat().st_size > 1000 and "<svg" in text
    pdf = g.draw_alignment(np.eye(3), tmp_path / "eye.pdf", legend=False)
    assert pdf.read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match="suffix"):
        g.draw_alignment(G, tmp_path / "noext")


def test_draw_heatmap_evolution_panels(tmp_path):
    d = make_run_dict(T=6, S=4, epochs=5)
    h = g.draw_plan_heatmap(d, tmp_path / "heat.png", dpi=50)
    h2 = g.draw_plan_heatmap(np.eye(3), tmp_path / "heat2.svg", teacher_layers=["a", "b", "c"],
                             student_layers=["x", "y", "z"])
    e1 = g.draw_plan_evolution(d, tmp_path / "evo.png", dpi=50)
    e2 = g.draw_plan_evolution(d, tmp_path / "evo_lines.png", mode="lines", dpi=50)
    runs = [make_run_dict(T=6, S=4, seed=k, strategy=s) for k, s in enumerate(["hinton", "uniform", "sinkhorn"])]
    pn = g.draw_panels(runs + [np.eye(4)[:, :4]], tmp_path / "panels.png", figsize=(12, 4), dpi=40)
    for f in (h, h2, e1, e2, pn):
        assert f.exists() and f.stat().st_size > 1000, f
    assert "<svg" in h2.read_text()
    assert mpimg.imread(pn).shape[:2] == (160, 480)
    with pytest.raises(ValueError, match="history"):
        g.draw_plan_evolution({"plan": np.eye(2)}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="titles"):
        g.draw_panels(runs, tmp_path / "p.png", titles=["one"])


# ------------------------------------------------------------------------------------------
# report and CLI
# ------------------------------------------------------------------------------------------


def test_report_on_run_directory(tmp_path):
    run = tmp_path / "run_a"
    run.mkdir()
    d = make_run_dict(T=10, S=5, epochs=3)
    (run / "result.json").write_text(json.dumps(d))
    other = make_run_dict(T=10, S=5, seed=7, strategy="uniform")
    text = g.report(run, compare=[other, d])
    for name in ("alignment.png", "plan_heatmap.png", "plan_evolution.png", "alignment.graphml"):
        assert (run / name).exists() and (run / name).stat().st_size > 0, name
    for layer in d["teacher_layers"] + d["student_layers"]:
        assert layer in text
    assert "sinkhorn" in text and "Crossings:" in text and "fan-in" in text
    assert f"Crossings: {g.crossings(d)} of" in text
    assert text.count("Compare with") == 2
    assert "matching agreement 1.000 (5/5)" in text  # compared with itself
    H = nx.read_graphml(run / "alignment.graphml")
    assert H.graph["T"] == 10 and H.number_of_nodes() == 15


def test_report_out_dir_format_and_no_history(tmp_path):
    d = {"plan": np.eye(3)[::-1].tolist(), "teacher_layers": ["0", "1", "2"], "student_layers": ["0", "1", "2"]}
    f = tmp_path / "res.json"
    f.write_text(json.dumps(d))
    out = tmp_path / "figs"
    text = g.report(f, out_dir=out, fmt="svg", threshold=0.5)
    assert sorted(p.name for p in out.iterdir()) == ["alignment.graphml", "alignment.svg", "plan_heatmap.svg"]
    assert "Crossings: 3 of 3 edge pairs" in text
    assert "normalised 1.0000" in text
    assert "Depth correlation: -1.000 (" in text  # the reversed plan
    with pytest.raises(ValueError, match="suffix"):
        g.report(f, out_dir=out, fmt="docx")


def test_cli(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    (run / "result.json").write_text(json.dumps(make_run_dict(T=4, S=3, epochs=0)))
    parser = argparse.ArgumentParser(prog="align_kd")
    sub = parser.add_subparsers(dest="cmd")
    sp = g.add_cli(sub)
    assert "alignment" in sp.format_help() and "--compare" in sp.format_help()
    args = parser.parse_args(["graph", str(run), "--compare", str(run), "--compare", str(run / "result.json"),
                              "--out", str(tmp_path / "o"), "--threshold", "0.01", "--format", "png"])
    assert args.compare == [str(run), str(run / "result.json")]
    assert args.threshold == 0.01
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "Alignment report" in out and out.count("Compare with") == 2
    assert (tmp_path / "o" / "alignment.png").exists()
    assert not (tmp_path / "o" / "plan_evolution.png").exists()  # epochs=0 -> no history plans


def test_depth_correlation_closed_forms_and_numpy_oracle():
    # closed forms: the diagonal +1, the reversed plan -1, the uniform plan 0 (depths independent)
    assert g.depth_correlation(np.eye(5)) == pytest.approx(1.0)
    assert g.depth_correlation(np.eye(5)[::-1]) == pytest.approx(-1.0)
    assert g.depth_correlation(np.full((7, 4), 1 / 7)) == pytest.approx(0.0, abs=1e-12)
    # an independent oracle: numpy's weighted covariance over the (teacher depth, student depth) pairs
    rng = np.random.default_rng(0)
    p = col_normalise(rng.uniform(0, 1, size=(11, 5)) ** 4)
    ii, jj = np.meshgrid(np.arange(11), np.arange(5), indexing="ij")
    cov = np.cov(ii.ravel(), jj.ravel(), aweights=p.ravel())
    assert g.depth_correlation(p) == pytest.approx(cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1]), rel=1e-10)
    # invariances: the same from a graph as from the bare plan; flipping both depth orders keeps it,
    # flipping one negates it
    G = g.alignment_graph(p, names("t", 11), names("s", 5))
    assert g.depth_correlation(G) == pytest.approx(g.depth_correlation(p), rel=1e-12)
    assert g.depth_correlation(p[::-1, ::-1]) == pytest.approx(g.depth_correlation(p), rel=1e-10)
    assert g.depth_correlation(p[::-1]) == pytest.approx(-g.depth_correlation(p), rel=1e-10)
    # a dustbin row has no depth: the value is that of the teacher rows alone
    from align_kd.plans import DUSTBIN

    binned = np.vstack([p * 0.6, np.full((1, 5), 0.4)])
    assert g.depth_correlation(binned, names("t", 11) + [DUSTBIN], names("s", 5)) == pytest.approx(
        g.depth_correlation(p), rel=1e-10)
    # no spread on one side: undefined
    assert math.isnan(g.depth_correlation(np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])))
