"""The layer-alignment plan as a bipartite graph: analyses, pictures and a text report.

A plan ``lambda`` is a (T, S) array: rows are teacher layers and columns are student layers, both
in depth (forward) order, and every column sums to 1 (``lambda[i, j]`` is how much student layer
``j`` learns from teacher layer ``i``). This package turns a plan (or a whole training run) into a
:class:`networkx.Graph` and answers questions about it:

* :mod:`align_kd.graph.analysis` -- :func:`load_run`; :func:`alignment_graph` (one node per layer,
  one edge per pair with ``lambda > threshold``); :func:`max_matching` (the best one-to-one
  student -> teacher assignment); :func:`crossings` / :func:`weighted_crossings` (how far the plan
  is from depth-monotone); :func:`depth_correlation` (which way it leans: +1 depth order, -1
  reversed); :func:`fan_in`, :func:`dominant_teacher`, :func:`usage`, :func:`summary` (per-layer
  numbers); :func:`compare`, :func:`stability` (distances between runs
  and spread over several runs).
* :mod:`align_kd.graph.drawing` -- :func:`draw_alignment`, :func:`draw_plan_heatmap`,
  :func:`draw_plan_evolution`, :func:`draw_panels`: figures (matplotlib, Agg canvas; pyplot is
  never touched).
* :mod:`align_kd.graph.reporting` -- :func:`report`, :func:`format_table` and :func:`add_cli` (the
  ``python -m align_kd graph`` subcommand).

Runs are read as the library's one run record, :class:`~align_kd.result.FitResult`, and accepted in
the forms :func:`load_run` normalises: a FitResult, any object with the attributes (``plan``,
``teacher_layers``, ``student_layers``, ...), a dict with the same keys, or a path to a run
directory (containing ``result.json``) or to the ``result.json`` file itself.
"""
from .analysis import (
    alignment_graph,
    compare,
    crossings,
    depth_correlation,
    dominant_teacher,
    fan_in,
    graph_plan,
    load_run,
    max_matching,
    stability,
    summary,
    usage,
    weighted_crossings,
)
from .drawing import draw_alignment, draw_panels, draw_plan_evolution, draw_plan_heatmap
from .reporting import add_cli, format_table, report
from . import analysis, drawing, reporting

_alignment_size = drawing._alignment_size  # private; the tests reach it as align_kd.graph._alignment_size

__all__ = [*analysis.__all__, *drawing.__all__, *reporting.__all__]
