"""Layer-alignment plans (lambda): the log-domain Sinkhorn projection and the strategy registry.

* :mod:`align_kd.plans.projection` -- :func:`sinkhorn` / :func:`sinkhorn_solve`: the entropic
  transport plan onto the column simplex (optionally with teacher-row marginals), exact gradients.
* :mod:`align_kd.plans.registry` -- :class:`Plan` and one subclass per strategy, registered in
  :data:`PLANS` (``@register_plan("name")`` adds one); :func:`make_plan` builds one by name.

Exact (LP / entropic) plans from cvxpy and scipy live in :mod:`align_kd.exact`.
"""
from .projection import SinkhornResult, sinkhorn, sinkhorn_solve
from .registry import (
    DUSTBIN,
    PLAN_STRATEGIES,
    PLANS,
    ExactPlan,
    FixedPlan,
    HintonPlan,
    LearnedPlan,
    PairwisePlan,
    Plan,
    SinkhornPlan,
    SoftmaxPlan,
    UniformPlan,
    depth_prior,
    make_plan,
    pairwise_plan,
    register_plan,
    uniform_plan,
    validate_plan,
    with_dustbin,
)

__all__ = [
    "DUSTBIN",
    "PLANS",
    "PLAN_STRATEGIES",
    "ExactPlan",
    "FixedPlan",
    "HintonPlan",
    "LearnedPlan",
    "PairwisePlan",
    "Plan",
    "SinkhornPlan",
    "SinkhornResult",
    "SoftmaxPlan",
    "UniformPlan",
    "depth_prior",
    "make_plan",
    "pairwise_plan",
    "register_plan",
    "sinkhorn",
    "sinkhorn_solve",
    "uniform_plan",
    "validate_plan",
    "with_dustbin",
]
