"""The layer-alignment plan as a bipartite graph: analyses, pictures and a text report.

A plan ``lambda`` is a (T, S) array: rows are teacher layers and columns are student layers, both
in depth (forward) order, and every column sums to 1 (``lambda[i, j]`` is how much student layer
``j`` learns from teacher layer ``i``). This module turns a plan (or a whole training run) into a
:class:`networkx.Graph` and answers questions about it:

* :func:`alignment_graph` -- one node per layer, one edge per pair with ``lambda > threshold``.
* :func:`max_matching` -- the best one-to-one student -> teacher assignment.
* :func:`crossings` / :func:`weighted_crossings` -- how far the plan is from depth-monotone.
* :func:`fan_in`, :func:`dominant_teacher`, :func:`usage`, :func:`summary` -- per-layer numbers.
* :func:`compare`, :func:`stability` -- distances between runs and spread over several runs.
* :func:`draw_alignment`, :func:`draw_plan_heatmap`, :func:`draw_plan_evolution`,
  :func:`draw_panels` -- figures (matplotlib, Agg canvas; pyplot is never touched).
* :func:`report` / :func:`add_cli` -- the ``python -m align_kd graph`` subcommand.

Runs are accepted in three forms, normalised by :func:`load_run`: a result object with attributes
(``plan``, ``teacher_layers``, ``student_layers``, ...), a dict with the same keys, or a path to a
run directory (containing ``result.json``) or to the ``result.json`` file itself.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

__all__ = [
    "RunData",
    "load_run",
    "alignment_graph",
    "graph_plan",
    "max_matching",
    "crossings",
    "weighted_crossings",
    "fan_in",
    "dominant_teacher",
    "usage",
    "summary",
    "format_table",
    "compare",
    "stability",
    "draw_alignment",
    "draw_plan_heatmap",
    "draw_plan_evolution",
    "draw_panels",
    "report",
    "add_cli",
]

TEACHER_COLOR = "#1f77b4"  # blue
STUDENT_COLOR = "#d95f02"  # orange
EDGE_COLOR = "#3a3a3a"
_NEG_TOL = 1e-9  # entries in [-_NEG_TOL, 0) are treated as round-off and clipped to 0


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


@dataclass
class RunData:
    """A training run reduced to what the graph tools need (see :func:`load_run`).

    plan: (T, S) float64 array, validated (finite, non-negative, matching the name lists).
    teacher_layers / student_layers: unique layer names in depth order.
    teacher_shapes / student_shapes: per-layer feature-shape strings like ``"64x16x16"`` ("" if unknown).
    mi: (T, S) mutual-information estimates (nats per element) or None.
    history: per-epoch dicts (``epoch``, ``plan``, ``test_acc``, ...), possibly empty.
    config: the run's config dict (``strategy`` etc.), possibly empty.
    path: the run directory when loaded from disk, else None.
    name: a short display name (run directory name, ``config["name"]`` or the strategy), may be "".
    """

    plan: np.ndarray
    teacher_layers: list[str]
    student_layers: list[str]
    teacher_shapes: list[str]
    student_shapes: list[str]
    mi: np.ndarray | None = None
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    path: Path | None = None
    name: str = ""

    @property
    def T(self) -> int:
        return int(self.plan.shape[0])

    @property
    def S(self) -> int:
        return int(self.plan.shape[1])

    @property
    def strategy(self) -> str:
        s = self.config.get("strategy") if isinstance(self.config, Mapping) else None
        return "" if s is None else str(s)

    @property
    def final_test_acc(self) -> float | None:
        """``test_acc`` of the last history entry that has one (None if none does)."""
        for h in reversed(self.history):
            acc = h.get("test_acc") if isinstance(h, Mapping) else None
            if acc is not None and isinstance(acc, (int, float)) and math.isfinite(float(acc)):
                return float(acc)
        return None

    def history_plans(self) -> list[tuple[int, np.ndarray, float | None]]:
        """``(epoch, plan, test_acc)`` for every history entry that stores a plan of shape (T, S)."""
        out = []
        for k, h in enumerate(self.history):
            if not isinstance(h, Mapping) or h.get("plan") is None:
                continue
            p = _to_array(h["plan"], f"history[{k}]['plan']")
            if p.shape != self.plan.shape:
                raise ValueError(
                    f"Expected history[{k}]['plan'] to have the run's plan shape (T, S) = {self.plan.shape} "
                    f"but got shape {p.shape}."
                )
            acc = h.get("test_acc")
            acc = float(acc) if isinstance(acc, (int, float)) else None
            out.append((int(h.get("epoch", k)), p, acc))
        return out


def _to_array(x: Any, what: str = "plan") -> np.ndarray:
    """A float64 numpy copy of a tensor / array / nested list."""
    if hasattr(x, "detach") and callable(x.detach):  # torch.Tensor without importing torch
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


def _check_shapes(shapes: Any, n: int, what: str) -> list[str]:
    if shapes is None:
        return [""] * n
    shapes = list(shapes)
    if len(shapes) != n:
        raise ValueError(f"Expected `{what}` to have one shape per layer ({n}) but got {len(shapes)}.")
    return [_shape_str(s) for s in shapes]


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _is_run_like(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Mapping, RunData)) or (
        hasattr(x, "plan") and not isinstance(x, nx.Graph)
    )


def load_run(path_or_obj: Any) -> RunData:
    """Normalise a run into :class:`RunData`.

    Accepts a :class:`RunData` (returned as is), a path to a run directory holding ``result.json``
    or to a JSON file, a dict, or any object with the attributes ``plan``, ``teacher_layers``,
    ``student_layers`` and optionally ``teacher_shapes``, ``student_shapes``, ``mi``, ``history``,
    ``config``. If ``plan`` is missing the last plan in ``history`` is used; if layer names are
    missing they default to ``T0..`` / ``S0..``. Raises ValueError on an invalid plan or names and
    FileNotFoundError for a path without a result file.
    """
    if isinstance(path_or_obj, RunData):
        return path_or_obj
    run_dir: Path | None = None
    name = ""
    obj = path_or_obj
    if isinstance(path_or_obj, (str, os.PathLike)):
        p = Path(path_or_obj)
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
        run_dir = f.parent.resolve()
        name = run_dir.name
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
    tl = _get(obj, "teacher_layers")
    sl = _get(obj, "student_layers")
    tl = _check_names(tl, "teacher_layers") if tl is not None else [f"T{i}" for i in range(T)]
    sl = _check_names(sl, "student_layers") if sl is not None else [f"S{j}" for j in range(S)]
    p = _validate_plan(p, len(tl), len(sl))
    mi = _get(obj, "mi")
    if mi is not None:
        mi = _to_array(mi, "mi")
        if mi.shape != p.shape:
            raise ValueError(f"Expected `mi` to have the plan's shape (T, S) = {p.shape} but got {mi.shape}.")
    if not name:
        name = str(config.get("name") or config.get("strategy") or "")
    return RunData(
        plan=p,
        teacher_layers=tl,
        student_layers=sl,
        teacher_shapes=_check_shapes(_get(obj, "teacher_shapes"), T, "teacher_shapes"),
        student_shapes=_check_shapes(_get(obj, "student_shapes"), S, "student_shapes"),
        mi=mi,
        history=list(history),
        config=config,
        path=run_dir,
        name=name,
    )


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

    ``plan`` is a (T, S) array/tensor/nested list, or a run (object, dict or path; see
    :func:`load_run`) whose names and shapes are used unless given explicitly.

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
    run: RunData | None = None
    if _is_run_like(plan):
        run = load_run(plan)
        p = run.plan
        tl = _check_names(teacher_layers, "teacher_layers") if teacher_layers is not None else run.teacher_layers
        sl = _check_names(student_layers, "student_layers") if student_layers is not None else run.student_layers
        ts = teacher_shapes if teacher_shapes is not None else (run.teacher_shapes if teacher_layers is None else None)
        ss = student_shapes if student_shapes is not None else (run.student_shapes if student_layers is None else None)
    else:
        if teacher_layers is None or student_layers is None:
            p0 = _to_array(plan)
            if p0.ndim == 2:
                teacher_layers = teacher_layers if teacher_layers is not None else [f"T{i}" for i in range(p0.shape[0])]
                student_layers = student_layers if student_layers is not None else [f"S{j}" for j in range(p0.shape[1])]
        tl = _check_names(teacher_layers, "teacher_layers")
        sl = _check_names(student_layers, "student_layers")
        p, ts, ss = plan, teacher_shapes, student_shapes
    p = _validate_plan(p, len(tl), len(sl))
    T, S = p.shape
    ts = _check_shapes(ts, T, "teacher_shapes")
    ss = _check_shapes(ss, S, "student_shapes")

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
    mi = run.mi if run is not None else None
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
        return r.plan, r.teacher_layers, r.student_layers
    p = _to_array(x)
    if p.ndim == 2:
        teacher_layers = teacher_layers if teacher_layers is not None else [f"T{i}" for i in range(p.shape[0])]
        student_layers = student_layers if student_layers is not None else [f"S{j}" for j in range(p.shape[1])]
    tl = _check_names(teacher_layers, "teacher_layers")
    sl = _check_names(student_layers, "student_layers")
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


def _fmt_cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else f"{v:.3f}"
    return str(v)


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """Plain-text table of ``rows`` (dicts); ``columns`` is ``[(key, header), ...]`` (default: all keys).

    Floats get 3 decimals, None shows as "-", numbers are right-aligned.
    """
    if columns is None:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        columns = [(k, k) for k in keys]
    cells = [[_fmt_cell(r.get(k)) for k, _ in columns] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) or r.get(k) is None
                   for r in rows) for k, _ in columns]
    widths = [max([len(h)] + [len(c[x]) for c in cells]) for x, (_, h) in enumerate(columns)]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = [line([h for _, h in columns]), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells]
    return "\n".join(out)


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


_compare = compare  # report() has a parameter named `compare`


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
    (most frequent teacher or None if never matched, its frequency)}``, ``n_runs``, and the names.
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
    return {"n_runs": n, "teacher_layers": tl, "student_layers": sl, "mean": mean, "std": std,
            "matching_frequency": freq, "modal_matching": modal}


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _new_figure(figsize, dpi, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, **kw)
    FigureCanvasAgg(fig)
    return fig


def _check_out_path(path: Any) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = Path(path)
    ext = p.suffix.lower().lstrip(".")
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if ext not in supported:
        raise ValueError(
            f"Expected an output path ending in an image format suffix ({', '.join(sorted(supported))}; "
            f"e.g. .png, .svg, .pdf) but got {str(path)!r}."
        )
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format=path.suffix.lower().lstrip("."), dpi=fig.dpi)
    return path


def _graph_title(G: nx.Graph) -> str:
    parts = []
    strategy, name = G.graph.get("strategy", ""), G.graph.get("name", "")
    if strategy:
        parts.append(str(strategy))
    if name and name != strategy:
        parts.append(str(name))
    t = " / ".join(parts)
    acc = G.graph.get("test_acc")
    if isinstance(acc, (int, float)) and math.isfinite(acc):
        t += f" (test acc {acc:.4g})" if t else f"test acc {acc:.4g}"
    return t


def _alignment_size(G: nx.Graph) -> tuple[float, float]:
    n = max(G.graph.get("T", 1), G.graph.get("S", 1), len(_sides(G)[0]), len(_sides(G)[1]))
    return 6.4, float(np.clip(0.3 * n + 1.6, 3.2, 16.0))


def _draw_alignment_into(fig, rect, G: nx.Graph, *, title: str | None, show_shapes: bool | str = "auto",
                         lw_max: float | None = None) -> Any:
    """Draw the two-column alignment picture of ``G`` inside ``rect`` (figure fraction x0, y0, w, h)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    t, s = _sides(G)
    T, S = len(t), len(s)
    W, H = fig.get_size_inches()
    x0, y0, rw, rh = rect
    cell_w, cell_h = rw * W, rh * H  # inches
    top_in = 0.55 + (0.3 if title else 0.0)  # headers (+ title) above the first node
    bot_in = 0.15
    ax_h_in = max(cell_h - top_in - bot_in, 0.5)
    ax = fig.add_axes((x0, y0 + bot_in / H, rw, ax_h_in / H))
    ax.set_axis_off()

    def ypos(k, n):
        return 0.5 if n == 1 else k / (n - 1)

    yt = [ypos(i, T) for i in range(T)]
    ys = [ypos(j, S) for j in range(S)]
    spacing_pt = ax_h_in * 72.0 / max(T - 1, S - 1, 1)  # tightest vertical gap between nodes (points)
    fs = float(np.clip(0.62 * spacing_pt, 5.0, 10.5))
    if lw_max is None:
        lw_max = float(np.clip(0.45 * spacing_pt, 1.5, 7.0))
    msize = float(np.clip(0.55 * spacing_pt, 4.0, 9.0))
    if show_shapes == "auto":
        show_shapes = max(T, S) <= 16
    pad = 0.02

    # edges: width and opacity proportional to lambda, heaviest on top
    segs, lws, cols = [], [], []
    edges = []
    for u, v, d in G.edges(data=True):
        if G.nodes[u].get("side") == "student":
            u, v = v, u
        edges.append((float(d.get("weight", 1.0)), int(G.nodes[u]["depth"]), int(G.nodes[v]["depth"])))
    for w, i, j in sorted(edges):
        wc = min(max(w, 0.0), 1.0)
        segs.append([(0.0, yt[i]), (1.0, ys[j])])
        lws.append(lw_max * wc)
        cols.append(to_rgba(EDGE_COLOR, 0.25 + 0.7 * wc))
    if segs:
        ax.add_collection(LineCollection(segs, linewidths=lws, colors=cols, capstyle="round", zorder=1))
    ax.plot([0.0] * T, yt, "o", ms=msize, color=TEACHER_COLOR, mec="white", mew=0.8, zorder=3, clip_on=False)
    ax.plot([1.0] * S, ys, "o", ms=msize, color=STUDENT_COLOR, mec="white", mew=0.8, zorder=3, clip_on=False)
    ax.set_xlim(-pad, 1 + pad)
    ax.set_ylim(1 + pad, -pad)  # depth grows downwards

    def text_for(n):
        lab = _label(G, n)
        shp = G.nodes[n].get("shape", "")
        return f"{lab}  ({shp.replace('x', '×')})" if show_shapes and shp else lab

    off = msize * 0.5 + 4
    texts = []
    for n, y in zip(t, yt):
        texts.append(ax.annotate(text_for(n), (0.0, y), xytext=(-off, 0), textcoords="offset points",
                                 ha="right", va="center", fontsize=fs, color="#111111", annotation_clip=False))
    for n, y in zip(s, ys):
        texts.append(ax.annotate(text_for(n), (1.0, y), xytext=(off, 0), textcoords="offset points",
                                 ha="left", va="center", fontsize=fs, color="#111111", annotation_clip=False))
    hfs = fs + 1.0
    texts.append(ax.annotate(f"Teacher (T={T})", (0.0, 0.0), xytext=(0, 0.32 * 72), textcoords="offset points",
                             ha="center", va="bottom", fontsize=hfs, fontweight="bold", color=TEACHER_COLOR,
                             annotation_clip=False))
    texts.append(ax.annotate(f"Student (S={S})", (1.0, 0.0), xytext=(0, 0.32 * 72), textcoords="offset points",
                             ha="center", va="bottom", fontsize=hfs, fontweight="bold", color=STUDENT_COLOR,
                             annotation_clip=False))
    if title:
        ax.set_title(title, fontsize=hfs + 1.0, pad=0.62 * 72)

    # fit the labels horizontally: measure them and shrink the node columns' axes to leave room
    renderer = fig.canvas.get_renderer()
    dpi = fig.dpi
    for _ in range(4):
        lt = max(tx.get_window_extent(renderer).width for tx in texts[:T]) / dpi + (off + 6) / 72
        ls = max(tx.get_window_extent(renderer).width for tx in texts[T:T + S]) / dpi + (off + 6) / 72
        head = max(tx.get_window_extent(renderer).width for tx in texts[T + S:T + S + 2]) / dpi / 2 + 0.05
        lt, ls = max(lt, head), max(ls, head)
        if lt + ls <= 0.62 * cell_w:
            break
        scale = 0.62 * cell_w / (lt + ls)
        for tx in texts[:T + S]:
            tx.set_fontsize(max(tx.get_fontsize() * scale, 3.0))
    ax_w = max(cell_w - lt - ls, 0.3 * cell_w)
    # the two column headers are centred on the columns: shrink them if they would touch
    heads = texts[T + S:T + S + 2]
    hw = sum(tx.get_window_extent(renderer).width for tx in heads) / dpi / 2 + 0.3
    if hw > ax_w:
        for tx in heads:
            tx.set_fontsize(max(tx.get_fontsize() * ax_w / hw, 4.0))
    ax.set_position((x0 + lt / W, y0 + bot_in / H, ax_w / W, ax_h_in / H))
    return ax, lw_max


def _lw_legend(fig, lw_max: float, fs: float = 8.5) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=EDGE_COLOR, alpha=0.25 + 0.7 * v, lw=lw_max * v, solid_capstyle="round")
               for v in (0.1, 0.5, 1.0)]
    fig.legend(handles, ["λ = 0.1", "λ = 0.5", "λ = 1"], loc="lower center", ncol=3, frameon=False,
               fontsize=fs, handlelength=2.5, title="line width ∝ λ", title_fontsize=fs,
               bbox_to_anchor=(0.5, 0.0))


def draw_alignment(graph_or_run: Any, path: str | os.PathLike, *, title: str | None = None,
                   figsize: tuple[float, float] | None = None, dpi: int = 200, threshold: float = 1e-3,
                   show_shapes: bool | str = "auto", legend: bool = True) -> Path:
    """Bipartite alignment picture: teacher layers in the left column, student layers in the right.

    Depth runs top to bottom and both columns span the same height; each edge (``lambda >
    threshold``) is a line whose width (and opacity) is proportional to lambda; teacher nodes are
    blue, student nodes orange, each labelled with its layer name (and feature shape when
    ``show_shapes`` -- "auto" shows them for up to 16 layers per side). A line-width key sits at
    the bottom when ``legend``. The image is exactly ``figsize * dpi`` pixels (no tight bbox); the
    format comes from the suffix of ``path`` (png, svg, pdf, ...). Default title: the run's strategy
    / name and final test accuracy when known. Returns ``path``.
    """
    p = _check_out_path(path)
    G = _as_graph(graph_or_run, threshold)
    if figsize is None:
        figsize = _alignment_size(G)
    fig = _new_figure(figsize, dpi)
    if title is None:
        title = _graph_title(G) or None
    leg_in = 0.55 if legend else 0.0
    H = figsize[1]
    rect = (0.02, leg_in / H, 0.96, 1.0 - (leg_in + 0.1) / H)
    _, lw_max = _draw_alignment_into(fig, rect, G, title=title, show_shapes=show_shapes)
    if legend:
        _lw_legend(fig, lw_max)
    return _save(fig, p)


def draw_panels(runs: Sequence[Any], path: str | os.PathLike, titles: Sequence[str] | None = None, *,
                ncols: int | None = None, figsize: tuple[float, float] | None = None, dpi: int = 200,
                threshold: float = 1e-3, show_shapes: bool | str = False, legend: bool = True) -> Path:
    """Several alignment pictures side by side (e.g. the best run of each strategy), one figure.

    ``runs`` are graphs, runs (object/dict/path) or plans; ``titles`` default to each run's
    strategy / name (or "run k"). Panels are laid out in ``ncols`` columns (default: all in one row
    up to 4, then rows of 4). Returns ``path``.
    """
    p = _check_out_path(path)
    graphs = [_as_graph(r, threshold) for r in runs]
    if not graphs:
        raise ValueError("Expected at least one run for draw_panels() but got none.")
    if titles is not None and len(titles) != len(graphs):
        raise ValueError(f"Expected {len(graphs)} titles (one per run) but got {len(titles)}.")
    n = len(graphs)
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    if figsize is None:
        h = max(_alignment_size(g)[1] for g in graphs)
        figsize = (4.6 * ncols, h * nrows + (0.55 if legend else 0.0))
    fig = _new_figure(figsize, dpi)
    W, H = figsize
    leg = (0.55 if legend else 0.0) / H
    cw, ch = 1.0 / ncols, (1.0 - leg - 0.05 / H) / nrows
    # one line-width scale for all panels, so widths are comparable across panels
    n_max = max(max(len(_sides(g)[0]), len(_sides(g)[1])) for g in graphs)
    lw_max = float(np.clip(0.45 * max(ch * H - 1.0, 0.5) * 72 / max(n_max - 1, 1), 1.5, 7.0))
    for k, G in enumerate(graphs):
        r, c = divmod(k, ncols)
        ttl = titles[k] if titles is not None else (_graph_title(G) or f"run {k + 1}")
        rect = (c * cw + 0.01, leg + (nrows - 1 - r) * ch, cw - 0.02, ch)
        _draw_alignment_into(fig, rect, G, title=ttl, show_shapes=show_shapes, lw_max=lw_max)
    if legend:
        _lw_legend(fig, lw_max)
    return _save(fig, p)


def _heatmap_ax(ax, p: np.ndarray, tl, sl, *, vmax: float, annotate: bool, cmap: str, fs: float,
                xticks: bool = True, yticks: bool = True):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    norm = Normalize(0.0, vmax)
    im = ax.imshow(p, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    T, S = p.shape
    ax.set_xticks(range(S))
    ax.set_yticks(range(T))
    if xticks:
        rot = 45 if max(len(x) for x in sl) > 3 else 0
        ax.set_xticklabels(sl, rotation=rot, ha="right" if rot else "center", rotation_mode="anchor", fontsize=fs)
    else:
        ax.set_xticklabels([])
    ax.set_yticklabels(tl if yticks else [], fontsize=fs)
    ax.tick_params(length=2)
    if annotate:
        cm = colormaps[cmap]
        for i in range(T):
            for j in range(S):
                r, g, b, _ = cm(norm(p[i, j]))
                lum = 0.299 * r + 0.587 * g + 0.114 * b
                ax.text(j, i, f"{p[i, j]:.2f}", ha="center", va="center", fontsize=max(fs - 1.5, 4.5),
                        color="white" if lum < 0.5 else "black")
    return im


def draw_plan_heatmap(plan_or_run: Any, path: str | os.PathLike, *, teacher_layers=None, student_layers=None,
                      title: str | None = None, figsize: tuple[float, float] | None = None, dpi: int = 200,
                      annotate: bool | None = None, cmap: str = "viridis") -> Path:
    """The (T, S) plan as a heat-map: rows teacher layers (top = shallowest), columns student layers.

    Tick labels are the layer names; colour scale is lambda in [0, max(1, max lambda)] with a
    colour bar. Values are printed in the cells when ``annotate`` (default: when T*S <= 150).
    Accepts a plan (+ optional names), a graph or a run. Returns ``path``.
    """
    p_out = _check_out_path(path)
    p, tl, sl = _resolve(plan_or_run, teacher_layers, student_layers)
    T, S = p.shape
    if annotate is None:
        annotate = T * S <= 150
    if title is None:
        if isinstance(plan_or_run, nx.Graph):
            title = _graph_title(plan_or_run)
        elif _is_run_like(plan_or_run):
            title = _graph_title(alignment_graph(plan_or_run))
        title = ("plan λ: " + title) if title else "plan λ (columns sum to 1)"
    if figsize is None:
        lw = 0.075 * max(len(x) for x in tl)
        figsize = (float(np.clip(2.0 + lw + 0.5 * S, 4.0, 16.0)), float(np.clip(1.6 + 0.38 * T, 3.0, 16.0)))
    fig = _new_figure(figsize, dpi, layout="constrained")
    ax = fig.add_subplot()
    fs = float(np.clip(figsize[1] * 72 / max(T, 1) * 0.45, 5.0, 9.5))
    im = _heatmap_ax(ax, p, tl, sl, vmax=max(1.0, float(p.max())), annotate=annotate, cmap=cmap, fs=fs)
    ax.set_xlabel("student layer")
    ax.set_ylabel("teacher layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="λ", shrink=0.9)
    return _save(fig, p_out)


def draw_plan_evolution(run: Any, path: str | os.PathLike, *, mode: str = "heatmaps", max_panels: int = 6,
                        figsize: tuple[float, float] | None = None, dpi: int = 200, cmap: str = "viridis") -> Path:
    """How the plan changed during training, from the run's ``history`` (entries with a ``plan``).

    ``mode="heatmaps"``: small multiples of the plan heat-map at up to ``max_panels`` epochs evenly
    spread over the history (first and last included), titled with epoch and test accuracy, one
    shared colour bar. ``mode="lines"``: one small panel per student layer showing lambda[i, j]
    over epochs for every teacher layer i (colour = teacher depth). Raises ValueError if the
    history holds no plans. Returns ``path``.
    """
    p_out = _check_out_path(path)
    r = load_run(run)
    hp = r.history_plans()
    if not hp:
        raise ValueError("Expected the run's history to contain per-epoch 'plan' entries but found none.")
    if mode not in ("heatmaps", "lines"):
        raise ValueError(f"Expected mode 'heatmaps' or 'lines' but got {mode!r}.")
    T, S = r.plan.shape
    tl, sl = r.teacher_layers, r.student_layers
    head = _graph_title(alignment_graph(r))
    if mode == "heatmaps":
        k = min(max_panels, len(hp))
        idx = sorted(set(int(round(v)) for v in np.linspace(0, len(hp) - 1, k)))
        k = len(idx)
        ncols = k if k <= 4 else math.ceil(k / 2)
        nrows = math.ceil(k / ncols)
        if figsize is None:
            lw = 0.075 * max(len(x) for x in tl)
            pw, ph = float(np.clip(0.8 + 0.32 * S, 1.8, 5.0)), float(np.clip(0.9 + 0.26 * T, 1.8, 6.0))
            figsize = (min(lw + 1.2 + ncols * pw, 20.0), min(0.6 + nrows * ph, 16.0))
        fig = _new_figure(figsize, dpi, layout="constrained")
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        vmax = max(1.0, max(float(hp[q][1].max()) for q in idx))
        fs = float(np.clip(figsize[1] / nrows * 72 / max(T, 1) * 0.42, 4.5, 8.5))
        annotate = T * S <= 40 and k <= 4
        im = None
        for a, q in enumerate(idx):
            ax = axes[a]
            ep, pl, acc = hp[q]
            im = _heatmap_ax(ax, pl, tl, sl, vmax=vmax, annotate=annotate, cmap=cmap, fs=fs,
                             xticks=a >= (nrows - 1) * ncols or a + ncols >= k, yticks=a % ncols == 0)
            ax.set_title(f"epoch {ep}" + (f"  acc {acc:.4g}" if acc is not None else ""), fontsize=fs + 1.5)
        for ax in axes[k:]:
            ax.set_axis_off()
        fig.colorbar(im, ax=list(axes[:k]), label="λ", shrink=0.9)
        fig.suptitle(("plan evolution: " + head) if head else "plan evolution", fontsize=10)
    else:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        nrows = math.ceil(S / 4)
        ncols = math.ceil(S / nrows)
        if figsize is None:
            figsize = (min(1.4 + 3.0 * ncols, 16.0), min(0.8 + 2.2 * nrows, 16.0))
        fig = _new_figure(figsize, dpi, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        epochs = [e for e, _, _ in hp]
        stack = np.stack([pl for _, pl, _ in hp])  # (E, T, S)
        cm = colormaps[cmap]
        norm = Normalize(0, max(T - 1, 1))
        for j in range(S):
            ax = axes[j]
            for i in range(T):
                ax.plot(epochs, stack[:, i, j], color=cm(norm(i)), lw=1.3, marker="o" if len(epochs) <= 12 else None,
                        ms=2.5)
            ax.set_title(f"student {sl[j]}", fontsize=9)
            ax.set_ylim(-0.03, max(1.0, float(stack.max())) + 0.03)
            ax.grid(alpha=0.3, lw=0.5)
            ax.tick_params(labelsize=7.5)
            if j % ncols == 0:
                ax.set_ylabel("λ", fontsize=9)
            ax.set_xlim(min(epochs) - 0.3, max(epochs) + 0.3)
            if j + ncols >= S:
                ax.set_xlabel("epoch", fontsize=9)
            else:
                ax.tick_params(labelbottom=False)
            if j % ncols:
                ax.tick_params(labelleft=False)
        for ax in axes[S:]:
            ax.set_axis_off()
        sm = ScalarMappable(norm=norm, cmap=cm)
        cb = fig.colorbar(sm, ax=list(axes[:S]), shrink=0.9, label="teacher layer")
        step = max(1, math.ceil(T / 12))
        cb.set_ticks(list(range(0, T, step)))
        cb.set_ticklabels(tl[::step], fontsize=7)
        fig.suptitle(("λ per student layer over epochs: " + head) if head else "λ per student layer over epochs",
                     fontsize=10)
    return _save(fig, p_out)


# --------------------------------------------------------------------------------------------
# Report and CLI
# --------------------------------------------------------------------------------------------


def _display_name(x: Any, r: RunData, k: int | None = None) -> str:
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    if r.name:
        return r.name
    return f"run {k}" if k is not None else "run"


def report(run: Any, *, compare: Sequence[Any] = (), out_dir: str | os.PathLike | None = None,
           threshold: float = 1e-3, fmt: str = "png") -> str:
    """Build the alignment graph of ``run``, write its figures and GraphML, return a text report.

    Writes into ``out_dir`` (default: the run directory when ``run`` is a path, else the current
    directory): ``alignment.<fmt>``, ``plan_heatmap.<fmt>``, ``plan_evolution.<fmt>`` (only when
    the history holds plans) and ``alignment.graphml``. Returns (does not print) a plain-text
    report: per student layer (dominant teacher, its lambda, fan-in, matched teacher), per teacher
    layer (usage, matched student), crossings and weighted crossings, and :func:`compare` numbers
    against each run in ``compare`` (paths, dicts or objects).
    """
    r = load_run(run)
    fmt = str(fmt).lower().lstrip(".")
    out = Path(out_dir) if out_dir is not None else (r.path if r.path is not None else Path.cwd())
    out.mkdir(parents=True, exist_ok=True)
    _check_out_path(out / f"alignment.{fmt}")  # validates fmt before doing work
    G = alignment_graph(r, threshold=threshold)
    files = [
        draw_alignment(G, out / f"alignment.{fmt}"),
        draw_plan_heatmap(G, out / f"plan_heatmap.{fmt}"),
    ]
    if r.history_plans():
        files.append(draw_plan_evolution(r, out / f"plan_evolution.{fmt}"))
    gml = out / "alignment.graphml"
    nx.write_graphml(G, gml)
    files.append(gml)

    rows = summary(G)
    T, S = r.T, r.S
    name = _display_name(run, r)
    lines = [f"Alignment report: {name}" + (f"  (strategy: {r.strategy})" if r.strategy else "")]
    acc = r.final_test_acc
    lines.append(f"T={T} teacher layers, S={S} student layers, {G.number_of_edges()} edges with λ > {threshold:g}"
                 + (f", final test acc {acc:.4g}" if acc is not None else ""))
    lines += ["", "Student layers"]
    lines.append(format_table([x for x in rows if x["side"] == "student"], [
        ("layer", "student layer"), ("shape", "shape"), ("dominant_teacher", "dominant teacher"),
        ("dominant_lambda", "λ"), ("fan_in", "fan-in"), ("matched_teacher", "matched teacher")]))
    lines += ["", "Teacher layers"]
    lines.append(format_table([x for x in rows if x["side"] == "teacher"], [
        ("layer", "teacher layer"), ("shape", "shape"), ("usage", "usage (row sum)"), ("degree", "edges"),
        ("matched_student", "matched student")]))
    E = G.number_of_edges()
    nc = crossings(G)
    wc = weighted_crossings(G)
    wcn = weighted_crossings(G, normalized=True)
    match = max_matching(G)
    lines += ["", f"Crossings: {nc} of {E * (E - 1) // 2} edge pairs; weighted {wc:.4f} "
                  f"(normalised {wcn:.4f}; 0 = depth-monotone, 1 = fully reversed one-to-one)",
              f"Max matching: {len(match)} of {S} student layers matched"
              + ("" if len(match) == S else " (unmatched student layers shown as '-')")]
    for k, other in enumerate(compare, start=1):
        ro = load_run(other)
        c = _compare(r, ro, threshold=threshold)
        lines += ["", f"Compare with {_display_name(other, ro, k)}" + (f" (strategy: {ro.strategy})" if ro.strategy else ""),
                  f"  TV per column: mean {c['tv_mean']:.4f}, max {c['tv_max']:.4f}; "
                  f"matching agreement {c['matching_agreement']:.3f} ({c['n_agree']}/{c['S']})"]
        crow = [{"layer": s, "tv": c["tv_per_column"][s], "a": c["matching_a"].get(s), "b": c["matching_b"].get(s)}
                for s in r.student_layers]
        lines.append("\n".join("  " + ln for ln in format_table(crow, [
            ("layer", "student layer"), ("tv", "TV"), ("a", "matched (this)"), ("b", "matched (other)")]).splitlines()))
    lines += ["", "Files:"] + [f"  {f}" for f in files]
    return "\n".join(lines) + "\n"


def _cli_graph(args) -> int:
    text = report(args.run, compare=args.compare or (), out_dir=args.out, threshold=args.threshold, fmt=args.format)
    print(text, end="")
    return 0


def add_cli(subparsers) -> Any:
    """Register the ``graph`` subcommand on an argparse ``subparsers`` object; returns the parser.

    The parser's ``func`` default is a function taking the parsed args that prints :func:`report`.
    """
    import argparse

    p = subparsers.add_parser(
        "graph",
        help="analyse and draw a run's layer-alignment plan as a bipartite graph",
        description=(
            "Build the teacher/student alignment graph of a run's plan lambda (T teacher layers x S student\n"
            "layers, columns sum to 1), write alignment.<fmt>, plan_heatmap.<fmt>, plan_evolution.<fmt> (when\n"
            "the history has per-epoch plans) and alignment.graphml, and print a table: per student layer the\n"
            "dominant teacher, its lambda, the fan-in (exp of column entropy) and the max-weight matched teacher;\n"
            "per teacher layer the usage (row sum); edge crossings; and distances to --compare runs."
        ),
        epilog=(
            "examples:\n"
            "  python -m align_kd graph runs/sinkhorn_seed0\n"
            "  python -m align_kd graph runs/a/result.json --compare runs/b runs/c --out figs --format pdf"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN_DIR_OR_RESULT", help="run directory containing result.json, or a result .json file")
    p.add_argument("--compare", nargs="+", action="extend", default=[], metavar="OTHER",
                   help="other run(s) to compare with: total variation per student column and max-matching agreement "
                        "(plans must have the same T x S); may be repeated")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory for figures and GraphML (default: the run directory)")
    p.add_argument("--threshold", type=float, default=1e-3, metavar="X",
                   help="keep an edge only when lambda > X (default: %(default)g)")
    p.add_argument("--format", default="png", choices=["png", "svg", "pdf"],
                   help="figure format (default: %(default)s)")
    p.set_defaults(func=_cli_graph)
    return p
