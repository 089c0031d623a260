"""align_kd: knowledge distillation between heterogeneous networks with a learned layer-alignment plan.

The public verbs: ``fit`` (distil), ``Distiller`` (the objective as a module for your own loop), ``discover_layers`` (default taps), ``sinkhorn`` / ``exact_plan``
(plans), ``alignment_graph`` with its analyses (``max_matching``, ``crossings``, ``depth_correlation``, ``fan_in``,
``compare``, ``stability``) and drawings (``draw_alignment``, ``draw_plan_heatmap``). Submodules:
``align_kd.zoo`` (shipped teachers), ``align_kd.losses`` (logit terms: Hinton, DKD, logit
standardisation).
"""
from . import losses, zoo
from .exact import exact_plan
from .graph import (
    alignment_graph,
    compare,
    crossings,
    depth_correlation,
    dominant_teacher,
    draw_alignment,
    draw_panels,
    draw_plan_evolution,
    draw_plan_heatmap,
    fan_in,
    max_matching,
    stability,
    usage,
    weighted_crossings,
)
from .distiller import Distiller, DistillerOutput
from .evaluation import evaluate
from .mi import MIBank
from .plans import PLAN_STRATEGIES, PLANS, register_plan, sinkhorn, sinkhorn_solve
from .taps import FeatureTap, describe_layers, discover_layers
from .result import FitResult
from .training import FitConfig, TrainingDiverged, fit
from .selection import Selection, select_strategy

__version__ = "0.1.0"

__all__ = [
    "Distiller",
    "DistillerOutput",
    "FeatureTap",
    "FitConfig",
    "FitResult",
    "MIBank",
    "PLANS",
    "PLAN_STRATEGIES",
    "Selection",
    "TrainingDiverged",
    "alignment_graph",
    "compare",
    "crossings",
    "depth_correlation",
    "describe_layers",
    "discover_layers",
    "dominant_teacher",
    "draw_alignment",
    "draw_panels",
    "draw_plan_evolution",
    "draw_plan_heatmap",
    "evaluate",
    "exact_plan",
    "fan_in",
    "fit",
    "max_matching",
    "register_plan",
    "select_strategy",
    "sinkhorn",
    "sinkhorn_solve",
    "stability",
    "usage",
    "weighted_crossings",
]
