"""align_kd: knowledge distillation between heterogeneous networks with a learned layer-alignment plan.

The public verbs: ``fit`` (distil), ``discover_layers`` (default taps), ``sinkhorn`` / ``exact_plan``
(plans), ``alignment_graph`` and its analyses and drawings.
"""
from .mi import MIBank
from .plans import PLAN_STRATEGIES, sinkhorn, sinkhorn_solve
from .taps import FeatureTap, describe_layers, discover_layers
from .training import FitConfig, FitResult, evaluate, fit

__version__ = "0.1.0"

__all__ = sorted([
    "FeatureTap",
    "FitConfig",
    "FitResult",
    "MIBank",
    "PLAN_STRATEGIES",
    "describe_layers",
    "discover_layers",
    "evaluate",
    "fit",
    "sinkhorn",
    "sinkhorn_solve",
])
