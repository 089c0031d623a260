"""The alignment graph and its analyses: loading and validating runs, building the networkx graph of a
plan, and the numbers read off it (matching, crossings, fan-in, usage, comparisons across runs).

Runs are read as the library's one run record, :class:`~align_kd.result.FitResult`: :func:`load_run`
normalises a FitResult, a run directory or ``result.json`` path, a dict or an object with the
attributes into one.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from ..plans import DUSTBIN
from ..result import FitResult

__all__ = [
    "load_run",
    "alignment_graph",
    "graph_plan",
    "max_matching",
    "crossings",
    "weighted_crossings",
    "depth_correlation",
    "fan_in",
    "dominant_teacher",
    "usage",
    "summary",
    "compare",
    "stability",
]

_NEG_TOL = 1e-9  # entries in [-_NEG_TOL, 0) are treated as round-off and clipped to 0


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _to_array(x: Any, what: str = "plan") -> np.ndarray:
    """A float64 numpy copy of a tensor / array / nested list."""
    if hasattr(x, "detach") and callable(x.detach):  # torch.Tensor
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"Expected `{what}` to be a (T, S) array of numbers (tensor, ndarray or nested list) "
            f"but could not convert a {type(x).__name__}: {e}"
        ) from None
    return arr


def _check_names(names: Any, what: str) -> list[str]:
    if names is None or isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise ValueError(f"Expected `{what}` to be a non-empty list of layer names (str) but got {names!r}.")
    out = [str(n) for n in names]
    if not out:
        raise ValueError(f"Expected `{what}` to be a non-empty list of layer names but got an empty list.")
    seen: dict[str, int] = {}
    dups = []
    for k, n in enumerate(out):
        if n in seen:
            dups.append(f"{n!r} (positions {seen[n]} and {k})")
        else:
            seen[n] = k
    if dups:
        raise ValueError(f"Expected unique names in `{what}` but got duplicates: {', '.join(dups)}.")
    return out


def _validate_plan(plan: Any, T: int | None = None, S: int | None = None) -> np.ndarray:
    p = _to_array(plan, "plan")
    if p.ndim != 2:
        exp = f"(T, S) = ({T}, {S})" if T is not None else "(T, S)"
        raise ValueError(f"Expected `plan` to be a 2-D array of shape {exp} but got {p.ndim}-D shape {p.shape}.")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"Expected a non-empty (T, S) plan but got shape {p.shape}.")
    if T is not None and S is not None and p.shape != (T, S):
        raise ValueError(
            f"Expected `plan` of shape (len(teacher_layers), len(student_layers)) = ({T}, {S}) -- rows are "
            f"teacher layers, columns student layers -- but got shape {p.shape}"
            + (" (transposed?)." if p.shape == (S, T) else ".")
        )
    bad = ~np.isfinite(p)
    if bad.any():
        idx = tuple(int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"Expected a finite `plan` but got {int(bad.sum())} NaN/inf entries (first at (teacher, student) = {idx})."
        )
    if (p < -_NEG_TOL).any():
        idx = tuple(int(v) for v in np.unravel_index(np.argmin(p), p.shape))
        raise ValueError(
            f"Expected a non-negative `plan` but got minimum {p.min():.3g} at (teacher, student) = {idx}."
        )
    return np.clip(p, 0.0, None)


def _shape_str(shape: Any) -> str:
    """A feature shape for display: ``[64, 16, 16]`` -> ``"64x16x16"`` (``""`` when unknown)."""
    if shape is None:
        return ""
    if isinstance(shape, str):
        return shape
    if isinstance(shape, (int, np.integer)):
        return str(int(shape))
    try:
        dims = [int(d) for d in shape]
    except (TypeError, ValueError):
        return str(shape)
    return "x".join(str(d) for d in dims)


def _shape_dims(shape: Any) -> Any:
    """A feature shape as :class:`FitResult` holds it: a list of ints, ``[]`` when unknown.

    Shape strings like ``"64x16x16"`` are parsed; anything that is not a shape is kept as given
    (and shown as ``str(shape)``).
    """
    if shape is None:
        return []
    if isinstance(shape, (int, np.integer)):
        return [int(shape)]
    parts = (shape.split("x") if shape else []) if isinstance(shape, str) else shape
    try:
        return [int(d) for d in parts]
    except (TypeError, ValueError):
        return shape


def _check_shapes(shapes: Any, n: int, what: str) -> list:
    """One shape per layer, each as :func:`_shape_dims` gives it (all ``[]`` when ``shapes`` is None)."""
    if shapes is None:
        return [[] for _ in range(n)]
    shapes = list(shapes)
    if len(shapes) != n:
        raise ValueError(f"Expected `{what}` to have one shape per layer ({n}) but got {len(shapes)}.")
    return [_shape_dims(s) for s in shapes]


def _plan_names(plan: Any, teacher_layers: Any, student_layers: Any) -> tuple[list[str], list[str]]:
    """Checked layer names for a bare plan; a missing list defaults to ``T0..`` / ``S0..`` (2-D plans)."""
    if teacher_layers is None or student_layers is None:
        p0 = _to_array(plan)
        if p0.ndim == 2:
            teacher_layers = teacher_layers if teacher_layers is not None else [f"T{i}" for i in range(p0.shape[0])]
            student_layers = student_layers if student_layers is not None else [f"S{j}" for j in range(p0.shape[1])]
    return _check_names(teacher_layers, "teacher_layers"), _check_names(student_layers, "student_layers")


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _is_run_like(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Mapping, FitResult)) or (
        hasattr(x, "plan") and not isinstance(x, nx.Graph)
    )


def _read_result_json(path: str | os.PathLike) -> tuple[Mapping, Path]:
    """(the JSON object, the run directory) of a run directory holding ``result.json`` or of a .json file."""
    p = Path(path)
    f = p / "result.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(
            f"Expected a run directory containing result.json or a result .json file but {str(f)!r} does not exist."
        )
    with open(f) as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"Could not parse {str(f)!r} as JSON: {e}") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"Expected {str(f)!r} to hold a JSON object (dict) but got {type(obj).__name__}.")
    return obj, f.parent.resolve()


def _run_fields(obj: Any) -> dict:
    """The :class:`FitResult` fields (but ``student``) of a run dict or object, validated and normalised."""
    history = _get(obj, "history") or []
    history = [dict(h) if isinstance(h, Mapping) else h for h in history]
    config = _get(obj, "config") or {}
    config = dict(config) if isinstance(config, Mapping) else {}
    plan = _get(obj, "plan")
    if plan is None:
        hist_plans = [h["plan"] for h in history if isinstance(h, Mapping) and h.get("plan") is not None]
        if not hist_plans:
            raise ValueError("Expected the run to have a `plan` (or a history with plans) but found none.")
        plan = hist_plans[-1]
    p = _to_array(plan)
    if p.ndim != 2:
        raise ValueError(f"Expected the run's `plan` to be a 2-D (T, S) array but got shape {p.shape}.")
    T, S = p.shape
    tl, sl = _plan_names(p, _get(obj, "teacher_layers"), _get(obj, "student_layers"))
    p = _validate_plan(p, len(tl), len(sl))
    mi = _get(obj, "mi")
    if mi is not None:
        mi = _to_array(mi, "mi")
        if mi.shape != p.shape:
            raise ValueError(f"Expected `mi` to have the plan's shape (T, S) = {p.shape} but got {mi.shape}.")
    solves = _get(obj, "solves") or []
    return dict(
        plan=torch.from_numpy(p),
        mi=None if mi is None else torch.from_numpy(mi),
        teacher_layers=tl,
        student_layers=sl,
        teacher_shapes=_check_shapes(_get(obj, "teacher_shapes"), T, "teacher_shapes"),
        student_shapes=_check_shapes(_get(obj, "student_shapes"), S, "student_shapes"),
        history=list(history),
        solves=list(solves) if isinstance(solves, Sequence) and not isinstance(solves, (str, bytes)) else [],
        config=config,
    )


def load_run(path_or_obj: Any) -> FitResult:
    """Normalise a run into the library's run record, :class:`~align_kd.result.FitResult`.

    Accepts a :class:`FitResult` (checked like any run, then returned as is), a path to a run
    directory holding ``result.json`` or to a JSON file, a dict, or any object with the attributes
    ``plan``, ``teacher_layers``, ``student_layers`` and optionally ``teacher_shapes``,
    ``student_shapes``, ``mi``, ``history``, ``solves``, ``config``. If ``plan`` is missing the last
    plan in ``history`` is used; if layer names are missing they default to ``T0..`` / ``S0..``.
    Raises ValueError on an invalid plan or names and FileNotFoundError for a path without a result
    file.

    A new record has ``student=None``, ``plan`` (validated: finite, non-negative, matching the name
    lists) and ``mi`` as float64 tensors, shapes as lists of ints (``[]`` when unknown; strings like
    ``"64x16x16"`` are parsed) and, when read from disk, ``path`` (the run directory) and
    ``display_name`` (its folder name).
    """
    run_dir: Path | None = None
    obj = path_or_obj
    if isinstance(path_or_obj, (str, os.PathLike)):
        obj, run_dir = _read_result_json(path_or_obj)
    fields = _run_fields(obj)  # raises on an invalid run, a FitResult included
    if isinstance(obj, FitResult) and all(
        getattr(obj, k) is not None for k in ("plan", "teacher_layers", "student_layers")
    ):
        return obj
    return FitResult(student=None, **fields, path=run_dir, display_name=run_dir.name if run_dir is not None else "")


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


def alignment_graph(
    plan: Any,
    teacher_layers: Sequence[str] | None = None,
    student_layers: Sequence[str] | None = None,
    *,
    threshold: float = 1e-3,
    teacher_shapes: Sequence | None = None,
    student_shapes: Sequence | None = None,
) -> nx.Graph:
    """The plan as an undirected bipartite graph.

    ``plan`` is a (T, S) array/tensor/nested list, or a run (FitResult, object, dict or path;
    see :func:`load_run`) whose names and shapes are used unless given explicitly.

    Nodes: one per layer, named by the layer name. If any teacher name equals a student name, *every*
    node id is prefixed (``"teacher:<name>"`` / ``"student:<name>"``) so ids stay unique and uniform;
    otherwise ids are the plain names. Node attributes: ``label`` (original name), ``side``
    ("teacher"/"student"), ``depth`` (0-based index in depth order), ``shape`` (e.g. "64x16x16",
    "" if unknown) and ``bipartite`` (0 teacher, 1 student).

    Edges: one per (teacher, student) pair with ``lambda > threshold``; ``weight = lambda`` (float)
    and ``mi`` (float) when the run has finite MI estimates.

    Graph attributes: ``T``, ``S`` (int), ``threshold`` (float), ``plan`` (the full plan as a JSON
    string, so analyses that need sub-threshold mass work after a GraphML round trip), and when
    known ``name``, ``strategy`` (str) and ``test_acc`` (float). All attributes are plain
    str/int/float/bool, so :func:`networkx.write_graphml` works.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"Expected `threshold` to be a finite number >= 0 but got {threshold!r}.")
    run: FitResult | None = None
    if _is_run_like(plan):
        run = load_run(plan)
        p = run.plan
        tl = _check_names(teacher_layers, "teacher_layers") if teacher_layers is not None else run.teacher_layers
        sl = _check_names(student_layers, "student_layers") if student_layers is not None else run.student_layers
        ts = teacher_shapes if teacher_shapes is not None else (run.teacher_shapes if teacher_layers is None else None)
        ss = student_shapes if student_shapes is not None else (run.student_shapes if student_layers is None else None)
    else:
        tl, sl = _plan_names(plan, teacher_layers, student_layers)
        p, ts, ss = plan, teacher_shapes, student_shapes
    p = _validate_plan(p, len(tl), len(sl))
    T, S = p.shape
    ts = [_shape_str(x) for x in _check_shapes(ts, T, "teacher_shapes")]
    ss = [_shape_str(x) for x in _check_shapes(ss, S, "student_shapes")]

    prefix = bool(set(tl) & set(sl))
    tid = [f"teacher:{n}" if prefix else n for n in tl]
    sid = [f"student:{n}" if prefix else n for n in sl]

    G = nx.Graph()
    G.graph.update(T=int(T), S=int(S), threshold=float(threshold), plan=json.dumps(p.tolist()))
    if run is not None:
        if run.name:
            G.graph["name"] = run.name
        if run.strategy:
            G.graph["strategy"] = run.strategy
        acc = run.final_test_acc
        if acc is not None:
            G.graph["test_acc"] = acc
    for i, (node, lab) in enumerate(zip(tid, tl)):
        G.add_node(node, label=lab, side="teacher", depth=int(i), shape=ts[i], bipartite=0)
    for j, (node, lab) in enumerate(zip(sid, sl)):
        G.add_node(node, label=lab, side="student", depth=int(j), shape=ss[j], bipartite=1)
    mi = _to_array(run.mi, "mi") if run is not None and run.mi is not None else None
    for i in range(T):
        for j in range(S):
            w = float(p[i, j])
            if w > threshold:
                attrs = {"weight": w}
                if mi is not None and math.isfinite(mi[i, j]):
                    attrs["mi"] = float(mi[i, j])
                G.add_edge(tid[i], sid[j], **attrs)
    return G


def _sides(G: nx.Graph) -> tuple[list, list]:
    """(teacher node ids, student node ids), each sorted by depth."""
    t = [n for n, d in G.nodes(data=True) if d.get("side") == "teacher"]
    s = [n for n, d in G.nodes(data=True) if d.get("side") == "student"]
    if not t or not s:
        raise ValueError(
            "Expected an alignment graph with nodes whose `side` attribute is 'teacher' or 'student' "
            f"(made by alignment_graph) but found {len(t)} teacher and {len(s)} student nodes."
        )
    key = lambda n: int(G.nodes[n].get("depth", 0))  # noqa: E731
    return sorted(t, key=key), sorted(s, key=key)


def _label(G: nx.Graph, n) -> str:
    return str(G.nodes[n].get("label", n))


def _edge_arrays(G: nx.Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(teacher depth, student depth, weight) per edge."""
    ii, jj, ww = [], [], []
    for u, v, d in G.edges(data=True):
        su, sv = G.nodes[u].get("side"), G.nodes[v].get("side")
        if su == "student" and sv == "teacher":
            u, v = v, u
        elif not (su == "teacher" and sv == "student"):
            continue
        ii.append(int(G.nodes[u]["depth"]))
        jj.append(int(G.nodes[v]["depth"]))
        ww.append(float(d.get("weight", 1.0)))
    return np.asarray(ii, dtype=np.int64), np.asarray(jj, dtype=np.int64), np.asarray(ww, dtype=np.float64)


def graph_plan(G: nx.Graph) -> np.ndarray:
    """The (T, S) plan behind an alignment graph.

    Uses the exact plan stored in ``G.graph["plan"]`` (JSON) when present; otherwise rebuilds it
    from the edge weights (entries at or below the threshold are then 0).
    """
    t, s = _sides(G)
    T, S = len(t), len(s)
    raw = G.graph.get("plan")
    if isinstance(raw, str):
        p = np.asarray(json.loads(raw), dtype=np.float64)
        if p.shape == (T, S):
            return p
    p = np.zeros((T, S))
    ii, jj, ww = _edge_arrays(G)
    p[ii, jj] = ww
    return p


def _resolve(x: Any, teacher_layers=None, student_layers=None) -> tuple[np.ndarray, list[str], list[str]]:
    """(plan, teacher names, student names) from a graph, a run or a plan (+ optional names)."""
    if isinstance(x, nx.Graph):
        t, s = _sides(x)
        return graph_plan(x), [_label(x, n) for n in t], [_label(x, n) for n in s]
    if _is_run_like(x):
        r = load_run(x)
        return _validate_plan(r.plan, len(r.teacher_layers), len(r.student_layers)), r.teacher_layers, r.student_layers
    p = _to_array(x)
    tl, sl = _plan_names(p, teacher_layers, student_layers)
    return _validate_plan(p, len(tl), len(sl)), tl, sl


def _as_graph(x: Any, threshold: float = 1e-3, teacher_layers=None, student_layers=None) -> nx.Graph:
    if isinstance(x, nx.Graph):
        return x
    if _is_run_like(x):
        return alignment_graph(x, threshold=threshold)
    return alignment_graph(x, teacher_layers, student_layers, threshold=threshold)


# --------------------------------------------------------------------------------------------
# Analyses
# --------------------------------------------------------------------------------------------


def max_matching(graph: Any, *, maxcardinality: bool = True, threshold: float = 1e-3) -> dict[str, str]:
    """Maximum-weight one-to-one matching of student layers to teacher layers.

    Solves :func:`networkx.max_weight_matching` on the graph's edges (``lambda > threshold``) and
    returns ``{student layer name: teacher layer name}`` in student depth order (original names,
    never the ``teacher:``/``student:`` prefixes). With ``maxcardinality=True`` (default) the
    matching first matches as many student layers as the thresholded edges allow and among those
    maximises the total lambda; with False it maximises total lambda only (a student layer may then
    be left out if matching it would displace a heavier edge).

    When S <= T and the thresholded graph allows it, every student layer is matched. When S > T at
    most T student layers can be matched: the others stay unmatched and are *absent* from the dict.

    ``graph`` may also be a run or a (T, S) plan (built with ``threshold``).
    """
    G = _as_graph(graph, threshold)
    m = nx.max_weight_matching(G, maxcardinality=maxcardinality, weight="weight")
    out = {}
    for u, v in m:
        if G.nodes[u].get("side") == "student":
            u, v = v, u
        out[G.nodes[v]["depth"], _label(G, v)] = _label(G, u)
    return {s: t for (_, s), t in sorted(out.items())}


def _crossing_sums(i: np.ndarray, j: np.ndarray, w: np.ndarray, block: int = 1024) -> tuple[int, float]:
    E = len(i)
    n, sw = 0, 0.0
    for a in range(0, E, block):
        b = min(E, a + block)
        m = (i[a:b, None] - i[None, :]) * (j[a:b, None] - j[None, :]) < 0
        n += int(m.sum())
        sw += float((w[a:b, None] * w[None, :] * m).sum())
    return n // 2, sw / 2.0


def crossings(graph: Any, *, threshold: float = 1e-3) -> int:
    """Number of crossing edge pairs in the depth-ordered two-column drawing.

    Counts unordered pairs of edges (i, j), (i', j') -- teacher depth i, student depth j -- with
    ``(i - i')(j - j') < 0``: one student layer learns from a deeper teacher layer than a deeper
    student layer does. 0 means the plan is depth-monotone; a fully reversed one-to-one plan
    (anti-diagonal, T == S) has T(T-1)/2. Edges sharing a layer never cross. Bounded by
    ``E(E-1)/2`` for E edges. ``graph`` may also be a run or a plan.
    """
    i, j, w = _edge_arrays(_as_graph(graph, threshold))
    return _crossing_sums(i, j, w)[0]


def weighted_crossings(graph: Any, *, normalized: bool = False, threshold: float = 1e-3) -> float:
    """Crossing pairs weighted by the product of their two lambdas.

    ``sum over crossing pairs of lambda[i, j] * lambda[i', j']`` (graph edges only). For a hard
    one-to-one plan (weights 1) this equals :func:`crossings`. Since each pair of crossing edges
    lies in two different student columns and each column sums to 1, the value is at most
    ``S(S-1)/2``, reached by a fully reversed one-to-one plan. With ``normalized=True`` the value
    is divided by ``S(S-1)/2`` (0 if S == 1), giving a number in [0, 1] for column-stochastic
    plans: 0 = depth-monotone, 1 = fully reversed one-to-one.
    """
    G = _as_graph(graph, threshold)
    i, j, w = _edge_arrays(G)
    val = _crossing_sums(i, j, w)[1]
    if normalized:
        S = len(_sides(G)[1])
        return 0.0 if S < 2 else val / (S * (S - 1) / 2.0)
    return val


def depth_correlation(graph_or_plan: Any, teacher_layers=None, student_layers=None) -> float:
    """How closely the plan follows depth order: the lambda-weighted correlation of teacher depth
    with student depth.

    Reads ``lambda / sum(lambda)`` as a joint distribution over (teacher layer i, student layer j),
    both in depth order, and returns Pearson's corr(i, j): +1 when every pair lies on one rising
    line (the depth pairing with T == S), -1 for the fully reversed plan, 0 for the uniform plan
    (depths independent). Unlike :func:`weighted_crossings` its sign says which way a plan leans:
    shallow student layers learning from deep teacher layers gives a negative value. A "no teacher"
    row (dustbin) has no depth and is left out. NaN when one side carries weight on a single layer.
    Uses the full plan (sub-threshold mass included) when given a graph from :func:`alignment_graph`.
    """
    p, tl, _ = _resolve(graph_or_plan, teacher_layers, student_layers)
    p = p[[k for k, name in enumerate(tl) if name != DUSTBIN]]  # (T, S), teacher rows only
    total = p.sum()
    if not total > 0:
        return float("nan")
    w = p / total  # (T, S) joint distribution of (teacher depth, student depth)
    i = np.arange(p.shape[0], dtype=np.float64)[:, None] - (w.sum(1) * np.arange(p.shape[0])).sum()  # (T, 1) centred
    j = np.arange(p.shape[1], dtype=np.float64)[None, :] - (w.sum(0) * np.arange(p.shape[1])).sum()  # (1, S) centred
    var_i, var_j = float((w * i**2).sum()), float((w * j**2).sum())
    if var_i <= 0 or var_j <= 0:
        return float("nan")
    return float((w * i * j).sum() / math.sqrt(var_i * var_j))


def _fan_in_array(p: np.ndarray) -> np.ndarray:
    col = p.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / col
        ent = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axis=0)
    out = np.exp(ent)
    out[col <= 0] = np.nan
    return np.clip(out, 1.0, p.shape[0])


def fan_in(graph_or_plan: Any, teacher_layers=None, student_layers=None) -> dict[str, float]:
    """Effective number of teacher layers each student layer learns from.

    ``exp(H(column))`` with ``H`` the Shannon entropy (nats) of the column renormalised to sum
    1: a one-hot column gives 1, a uniform column over T teacher layers gives T; always in [1, T]
    (NaN for an all-zero column). Returns ``{student name: fan-in}`` in depth order. Uses the full
    plan (sub-threshold mass included) when given a graph from :func:`alignment_graph`.
    """
    p, _, sl = _resolve(graph_or_plan, teacher_layers, student_layers)
    return dict(zip(sl, (float(v) for v in _fan_in_array(p))))


def dominant_teacher(graph_or_plan: Any, teacher_layers=None, student_layers=None) -> dict[str, str]:
    """For each student layer the teacher layer with the largest lambda in its column.

    Ties go to the shallowest teacher layer. Returns ``{student name: teacher name}`` in depth order.
    """
    p, tl, sl = _resolve(graph_or_plan, teacher_layers, student_layers)
    return {s: tl[int(k)] for s, k in zip(sl, p.argmax(axis=0))}


def usage(graph_or_plan: Any, teacher_layers=None, student_layers=None) -> dict[str, float]:
    """How much each teacher layer is used: its row sum of lambda.

    With column-stochastic plans the values sum to S; a teacher layer nobody learns from has 0.
    Returns ``{teacher name: row sum}`` in depth order.
    """
    p, tl, _ = _resolve(graph_or_plan, teacher_layers, student_layers)
    return {t: float(v) for t, v in zip(tl, p.sum(axis=1))}


def summary(graph: Any, *, threshold: float = 1e-3) -> list[dict]:
    """Per-layer table of the analyses, teacher layers first, then student layers (depth order).

    Every row has ``side``, ``layer``, ``depth``, ``shape``, ``degree`` (edges above threshold).
    Teacher rows add ``usage`` (row sum) and ``matched_student`` (or None). Student rows add
    ``dominant_teacher``, ``dominant_lambda``, ``fan_in`` and ``matched_teacher`` (None when unmatched).
    """
    G = _as_graph(graph, threshold)
    t, s = _sides(G)
    p = graph_plan(G)
    tl = [_label(G, n) for n in t]
    fi = _fan_in_array(p)
    use = p.sum(axis=1)
    match = max_matching(G)
    inv = {v: k for k, v in match.items()}
    rows = []
    for i, n in enumerate(t):
        rows.append(dict(side="teacher", layer=tl[i], depth=i, shape=G.nodes[n].get("shape", ""),
                         degree=int(G.degree(n)), usage=float(use[i]), matched_student=inv.get(tl[i])))
    for j, n in enumerate(s):
        k = int(p[:, j].argmax())
        rows.append(dict(side="student", layer=_label(G, n), depth=j, shape=G.nodes[n].get("shape", ""),
                         degree=int(G.degree(n)), dominant_teacher=tl[k], dominant_lambda=float(p[k, j]),
                         fan_in=float(fi[j]), matched_teacher=match.get(_label(G, n))))
    return rows


def compare(a: Any, b: Any, *, threshold: float = 1e-3) -> dict:
    """Distance between two plans (or graphs / runs) of the same (T, S) shape.

    Returns a dict with
      ``tv_per_column``: ``{student name: 0.5 * sum_i |a[i, j] - b[i, j]|}`` -- total variation
        between the two columns (0 = identical, 1 = disjoint supports);
      ``tv_mean`` / ``tv_max``: mean and max of those;
      ``matching_agreement``: fraction of student layers that :func:`max_matching` assigns to the
        same teacher layer in both (a layer unmatched in both counts as agreeing);
      ``matching_a`` / ``matching_b``: the two matchings; ``n_agree``, ``S``.
    Layers are compared by position (depth); names are taken from ``a``.
    """
    pa, tl, sl = _resolve(a)
    pb, _, _ = _resolve(b)
    if pa.shape != pb.shape:
        raise ValueError(f"Expected two plans of the same (T, S) shape but got {pa.shape} and {pb.shape}.")
    tv = 0.5 * np.abs(pa - pb).sum(axis=0)
    ma = _positional_matching(a, threshold)
    mb = _positional_matching(b, threshold)
    agree = sum(ma.get(j) == mb.get(j) for j in range(len(sl)))
    return {
        "tv_per_column": {s: float(v) for s, v in zip(sl, tv)},
        "tv_mean": float(tv.mean()),
        "tv_max": float(tv.max()),
        "matching_agreement": agree / len(sl),
        "n_agree": int(agree),
        "S": len(sl),
        "matching_a": {sl[j]: tl[i] for j, i in sorted(ma.items())},
        "matching_b": {sl[j]: tl[i] for j, i in sorted(mb.items())},
    }


def _positional_matching(x: Any, threshold: float) -> dict[int, int]:
    """max_matching as {student depth: teacher depth}."""
    G = _as_graph(x, threshold)
    t, s = _sides(G)
    tpos = {_label(G, n): k for k, n in enumerate(t)}
    spos = {_label(G, n): k for k, n in enumerate(s)}
    return {spos[sn]: tpos[tn] for sn, tn in max_matching(G).items()}


def stability(plans_or_graphs: Sequence[Any], *, threshold: float = 1e-3) -> dict:
    """Spread of the plan over several runs (same (T, S); names from the first).

    Returns ``mean`` and ``std`` ((T, S) arrays; population std, ddof=0, computed relative to the
    first run so identical runs give exactly 0), ``matching_frequency``: ``{(student, teacher):
    fraction of runs whose max_matching contains that pair}``, ``modal_matching``: ``{student:
    (most frequent teacher or None if never matched, its frequency)}``, ``modal_dominant``:
    ``{student: (the teacher with the largest lambda in that column in most runs, that share)}``
    (what a plan with several student layers on one teacher layer uses; ties go to the shallowest
    teacher layer), ``n_runs``, and the names.
    """
    items = list(plans_or_graphs)
    if not items:
        raise ValueError("Expected at least one plan, graph or run for stability() but got none.")
    resolved = [_resolve(x) for x in items]
    p0, tl, sl = resolved[0]
    for k, (p, _, _) in enumerate(resolved):
        if p.shape != p0.shape:
            raise ValueError(f"Expected all plans to have shape {p0.shape} but item {k} has shape {p.shape}.")
    X = np.stack([p for p, _, _ in resolved])
    d = X - X[0]
    mean = X[0] + d.mean(axis=0)
    std = d.std(axis=0)
    counts: dict[tuple[str, str], int] = {}
    for x in items:
        for j, i in _positional_matching(x, threshold).items():
            counts[(sl[j], tl[i])] = counts.get((sl[j], tl[i]), 0) + 1
    n = len(items)
    freq = {k: c / n for k, c in sorted(counts.items(), key=lambda kv: (sl.index(kv[0][0]), tl.index(kv[0][1])))}
    modal = {}
    for s in sl:
        cands = [(f, -tl.index(t), t) for (s2, t), f in freq.items() if s2 == s]
        if cands:
            f, _, t = max(cands)
            modal[s] = (t, f)
        else:
            modal[s] = (None, 0.0)
    dominant = (X.argmax(axis=1)[None] == np.arange(len(tl))[:, None, None]).mean(axis=1)  # (T, S): share of runs
    modal_dominant = {s: (tl[int(dominant[:, j].argmax())], float(dominant[:, j].max())) for j, s in enumerate(sl)}
    return {"n_runs": n, "teacher_layers": tl, "student_layers": sl, "mean": mean, "std": std,
            "matching_frequency": freq, "modal_matching": modal, "modal_dominant": modal_dominant}


