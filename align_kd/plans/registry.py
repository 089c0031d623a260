"""The plan registry: one :class:`Plan` subclass per lambda strategy, registered by name in :data:`PLANS`.

Each plan owns its construction (:meth:`Plan.build` from the Distiller's options), its update rule
(gradient steps on its parameters, or :meth:`Plan.update` from data of its own) and its checkpoint
state (parameters, buffers, extra state). Plans are (T, S): rows teacher layers, columns student
layers, every column sums to 1.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .projection import _check_inputs, _project, sinkhorn

__all__ = ["DUSTBIN", "PLANS", "PLAN_STRATEGIES", "LearnedPlan", "Plan", "depth_prior", "make_plan", "pairwise_plan",
           "register_plan", "uniform_plan", "validate_plan", "with_dustbin"]


# ----------------------------------------------------------------------------------------------
# fixed plans


def uniform_plan(T: int, S: int) -> Tensor:
    """(T, S) plan with every entry 1/T: each student layer learns equally from all teacher layers."""
    return torch.full((T, S), 1.0 / T)


def pairwise_plan(T: int, S: int) -> Tensor:
    """(T, S) one-hot columns pairing student layer j with the teacher layer at the same relative depth."""
    plan = torch.zeros(T, S)
    for j in range(S):
        i = 0 if S == 1 else round(j * (T - 1) / (S - 1))
        plan[i, j] = 1.0
    return plan


def depth_prior(T: int, S: int, width: float = 0.25) -> Tensor:
    """(T, S) log-prior -(d_i - d_j)^2 / (2 width^2) on relative depths d in [0, 1]."""
    dt = torch.linspace(0, 1, T) if T > 1 else torch.zeros(1)
    ds = torch.linspace(0, 1, S) if S > 1 else torch.ones(1)
    return -((dt[:, None] - ds[None, :]) ** 2) / (2 * width**2)


def validate_plan(plan, T: int, S: int, atol: float = 1e-4) -> Tensor:
    """Check a user-given fixed plan: shape (T, S), finite, non-negative, columns summing to 1."""
    if not isinstance(plan, Tensor):
        raise TypeError(f"Expected a fixed plan as a torch.Tensor of shape (T, S) = ({T}, {S}) but got {type(plan).__name__}.")
    if tuple(plan.shape) != (T, S):
        raise ValueError(
            f"Expected a fixed plan of shape (T, S) = ({T}, {S}) (rows teacher layers, columns student layers) "
            f"but got {tuple(plan.shape)}."
        )
    plan = plan.detach().float()
    if not torch.isfinite(plan).all() or (plan < 0).any():
        raise ValueError("Expected a fixed plan with finite, non-negative entries.")
    colsum = plan.sum(0)
    if (colsum - 1).abs().max() > atol:
        raise ValueError(
            f"Every column of a fixed plan must sum to 1 (one unit per student layer) but the column sums are "
            f"{[round(c, 4) for c in colsum.tolist()]}; divide by plan.sum(0) to normalise."
        )
    return plan


class Plan(nn.Module):
    """A lambda strategy as a module: ``plan()`` returns the current (T, S) plan.

    Each strategy is one subclass registered under its name (:func:`register_plan`); it owns its
    construction (:meth:`build` from the Distiller's options), its update rule (gradient steps on
    its parameters, or :meth:`update` from data of its own when :attr:`data` is set) and its
    checkpoint state (its parameters, buffers and extra state in ``state_dict()``).
    """

    name = ""
    dustbin = False  # True: the last row is "no teacher" (T + 1 rows; the bank sees the first T)
    learned = False  # has parameters trained by the optimiser
    uses_features = True  # False: no feature term at all (logit KD only), so no MI bank is built
    data: str | None = None  # what update() learns from: None (nothing), "held" (a few held training batches) or "heldout" (held-out batches)

    def __init__(self, T: int, S: int):
        super().__init__()
        self.T, self.S = T, S

    @classmethod
    def build(cls, T: int, S: int, *, tau: float, row_marginal: Tensor, prior: Tensor, options: dict) -> "Plan":
        """The plan for a (T, S) problem. ``row_marginal``: (T,) teacher-row masses summing to S;
        ``prior``: (T, S) initial logits (``plan_init``); ``options``: the Distiller's options."""
        raise NotImplementedError

    def forward(self) -> Tensor:  # (T, S)
        raise NotImplementedError

    def update_due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether ``fit()`` calls :meth:`update` after training step ``step`` (counted from 1)."""
        return False

    def update(self, distiller, batches=None, *, train=None, heldout=None) -> dict | None:
        """Set the plan from data of its own (plans with :attr:`data`): ``batches`` (``exact``: held
        batches), or a ``train`` and a ``heldout`` batch (the held-out objective); returns a record."""
        raise TypeError(f"The {self.name!r} plan is not updated from data (its `data` is None).")


#: strategy name -> plan class, in the order tables and the CLI list them
PLANS: dict[str, type[Plan]] = {}


def register_plan(name: str):
    """Class decorator: register a :class:`Plan` subclass as ``strategy=name`` (for fit(), the
    Distiller, the CLI and the benchmarks)."""

    def decorate(cls):
        if name in PLANS:
            raise ValueError(f"A plan named {name!r} is already registered ({PLANS[name].__name__}).")
        cls.name = name
        PLANS[name] = cls
        return cls

    return decorate


class FixedPlan(Plan):
    """A constant plan: a user-given (T, S) tensor (strategy "fixed") and the base of the fixed strategies."""

    name = "fixed"

    def __init__(self, plan: Tensor):
        super().__init__(*plan.shape)
        self.register_buffer("value", plan.clone())

    def forward(self) -> Tensor:
        return self.value


@register_plan("hinton")
class HintonPlan(FixedPlan):
    """No feature term (logit KD only): an all-zero plan, no MI bank."""

    uses_features = False

    @classmethod
    def build(cls, T, S, **_):
        return cls(torch.zeros(T, S))


@register_plan("pairwise")
class PairwisePlan(FixedPlan):
    """One-to-one by relative depth (:func:`pairwise_plan`)."""

    @classmethod
    def build(cls, T, S, **_):
        return cls(pairwise_plan(T, S))


@register_plan("uniform")
class UniformPlan(FixedPlan):
    """1/T everywhere (:func:`uniform_plan`)."""

    @classmethod
    def build(cls, T, S, **_):
        return cls(uniform_plan(T, S))


#: the name of the "no teacher" row of a plan with a dustbin (graphs and reports show it as its own node)
DUSTBIN = "(no teacher)"


def with_dustbin(prior: Tensor, row_marginal: Tensor, mass: float) -> tuple[Tensor, Tensor]:
    """A (T + 1, S) prior and (T + 1,) row marginal with a dustbin row, as in SuperGlue's augmented
    Sinkhorn: the dustbin's row mass is fixed at ``mass`` (in student layers, 0 < mass < S) and the
    teacher rows keep their proportions on the remaining S - mass. Columns still sum to 1, so a
    student layer whose column puts weight w on the dustbin learns from the teachers with 1 - w.
    The dustbin starts at a prior logit of log(0.05): nearly closed (softmax) before learning."""
    T, S = prior.shape
    if not 0 < mass < S:
        raise ValueError(f"Expected `dustbin_mass` in (0, S) = (0, {S}) (student layers' worth of mass) but got {mass}.")
    prior = torch.cat([prior, torch.full((1, S), math.log(0.05))])
    row_marginal = torch.cat([row_marginal * ((S - mass) / S), torch.tensor([float(mass)])])
    return prior, row_marginal


class LearnedPlan(Plan):
    """A plan with learned logits Z (T, S) (with ``dustbin``: (T + 1, S), last row "no teacher"). ``objective="mi"``: Z is trained with the student by the
    gradient of sum(lam * mi) at fixed mi (ascending the MI it weights). ``objective="heldout"``: Z
    is left out of the student's optimiser and updated every ``every`` steps by :meth:`update`,
    which descends the hypergradient of held-out cross-entropy (see
    :meth:`align_kd.Distiller.heldout_hypergradient`) through the plan's projection (the first update
    after ``warmup`` steps; before it the plan stays at its init), with Adam
    (``optimizer="adam"``) or plain SGD (``"sgd"``) at step size ``lr``; the optimiser state and the
    update count are part of the plan's state_dict."""

    learned = True
    #: with ``dustbin``: whether the projection holds the dustbin's row mass fixed (a row marginal) or the
    #: plan chooses it (no row marginal)
    fixed_dustbin_mass = False

    def __init__(self, T: int, S: int, *, tau: float, init: Tensor, objective: str = "mi", lr: float = 0.01,
                 every: int = 10, optimizer: str = "adam", warmup: int = 0):
        super().__init__(T, S)
        self.tau = tau
        self.logits = nn.Parameter(init.clone() * tau)
        self.objective, self.lr, self.every, self.optimizer_name = objective, lr, every, optimizer
        self.warmup = warmup
        if objective == "heldout":  # instance attributes: not trained by the loss, updated from data
            self.learned, self.data = False, "heldout"
            self.logits.requires_grad_(False)  # no gradient from the loss (and none expected by DDP)
        self.updates = 0  # held-out updates so far (also picks the held-out batch in fit())
        self._optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def _objective_options(cls, options: dict) -> dict:
        return {"objective": options.get("plan_objective", "mi"), "lr": options.get("heldout_lr", 0.01),
                "every": options.get("heldout_every", 10), "optimizer": options.get("heldout_optimizer", "adam"),
                "warmup": options.get("heldout_warmup", 0)}

    @classmethod
    def _build_args(cls, T: int, S: int, prior: Tensor, row_marginal: Tensor, options: dict):
        """(rows, prior, row marginal, dustbin flag): T teacher rows, plus the dustbin when asked."""
        if not options.get("dustbin", False):
            return T, prior, row_marginal, False
        prior, row_marginal = with_dustbin(prior, row_marginal, options.get("dustbin_mass", 1.0))
        return T + 1, prior, row_marginal, True

    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            make = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
            self._optimizer = make([self.logits], lr=self.lr)
        return self._optimizer

    def update_due(self, step: int, steps_per_epoch: int) -> bool:
        return self.data == "heldout" and step > self.warmup and step % self.every == 0

    def update(self, distiller, batches=None, *, train=None, heldout=None) -> dict:
        """One optimiser step on the logits along d(held-out CE)/dZ, from the (T, S) hypergradient on the
        training batch ``train`` and the held-out batch ``heldout`` (each ``(x, y)``)."""
        if train is None or heldout is None:
            raise ValueError("The held-out plan is updated from a training batch and a held-out batch: "
                             "update_plan(train=(x, y), heldout=(x_heldout, y_heldout)).")
        g = distiller.heldout_hypergradient(train, heldout)  # (T, S), averaged over ranks
        if self.dustbin:  # the dustbin carries no feature term: its entries of the hypergradient are 0
            g = torch.cat([g, g.new_zeros(1, g.shape[1])])
        with torch.enable_grad():
            self.logits.requires_grad_(True)
            try:
                (grad,) = torch.autograd.grad((self() * g.to(self.logits)).sum(), self.logits)  # through the projection
            finally:
                self.logits.requires_grad_(False)
        opt = self.optimizer()
        self.logits.grad = grad
        opt.step()
        self.logits.grad = None
        self.updates += 1
        with torch.no_grad():
            lam = self().double().clamp_min(1e-300)
        return {"kind": "heldout", "hypergrad_norm": float(g.norm()), "logit_grad_norm": float(grad.norm()),
                "plan_entropy": float(-(lam * lam.log()).sum(0).mean()), "hypergrad": g.tolist()}

    def get_extra_state(self):
        return {"updates": self.updates, "optimizer": None if self._optimizer is None else self._optimizer.state_dict()}

    def set_extra_state(self, state) -> None:
        self.updates = int(state["updates"])
        if state["optimizer"] is not None:
            self.optimizer().load_state_dict(state["optimizer"])


@register_plan("softmax")
class SoftmaxPlan(LearnedPlan):
    """Learned logits Z (T, S), lambda = column softmax of Z / tau."""

    @classmethod
    def build(cls, T, S, *, tau, prior, row_marginal, options, **_):
        rows, prior, _, dustbin = cls._build_args(T, S, prior, row_marginal, options)
        plan = cls(rows, S, tau=tau, init=prior, **cls._objective_options(options))
        plan.dustbin = dustbin
        return plan

    def forward(self) -> Tensor:
        return torch.softmax(self.logits / self.tau, dim=0)


@register_plan("sinkhorn")
class SinkhornPlan(LearnedPlan):
    """Learned logits Z (T, S), lambda = sinkhorn(Z, r, tau), warm-started from the last potentials.
    ``row_marginal_mode="at_most"``: rows sum to at most r (capacities, by default max(1, S / T) each),
    so a column may be one-hot and a teacher layer unused, as in the fixed pairing."""

    fixed_dustbin_mass = True

    def __init__(self, T: int, S: int, *, tau: float, init: Tensor, row_marginal: Tensor, tol: float = 1e-5,
                 newton_after: int = 0, row_marginal_mode: str = "equal", **objective):
        super().__init__(T, S, tau=tau, init=init, **objective)
        # newton_after: Sinkhorn sweeps before Newton steps. 0: the logits moved by one optimizer
        # step, so from the warm start one Newton step usually reaches tol (benchmarks/overhead.py)
        self.tol, self.newton_after, self.row_marginal_mode = tol, newton_after, row_marginal_mode
        _check_inputs(self.logits, row_marginal, tau, row_marginal_mode)  # once: forward() skips the checks on every step
        self.register_buffer("row_marginal", row_marginal.float().clone())
        self.register_buffer("potential", torch.zeros(T))  # warm start, saved with checkpoints
        self.last_iterations = 0

    @classmethod
    def build(cls, T, S, *, tau, row_marginal, prior, options, **_):
        rows, prior, row_marginal, dustbin = cls._build_args(T, S, prior, row_marginal, options)
        plan = cls(rows, S, tau=tau, init=prior, row_marginal=row_marginal,
                   row_marginal_mode=options.get("row_marginal_mode", "equal"), **cls._objective_options(options))
        plan.dustbin = dustbin
        return plan

    def forward(self) -> Tensor:
        res = _project(self.logits, self.row_marginal, self.tau, self.tol, max_iter=2000, check_every=10,
                       newton_after=self.newton_after, init=self.potential, grad="implicit",
                       row_marginal_mode=self.row_marginal_mode)
        if not math.isfinite(res.marginal_error):
            raise FloatingPointError(
                "The plan logits became NaN or inf, so the Sinkhorn plan cannot be computed. "
                "Lower `plan_lr` or `lr`, or raise `tau`."
            )
        if not res.converged:
            warnings.warn(
                f"sinkhorn plan did not converge: row-marginal error {res.marginal_error:.2e} > tol={self.tol:.0e} "
                f"after {res.iterations} iterations (tau={self.tau}). Raise `tau` or lower `plan_lr`.",
                RuntimeWarning,
                stacklevel=2,
            )
        self.potential.copy_(res.row_potential.detach())
        self.last_iterations = res.iterations
        return res.plan


@register_plan("exact")
class ExactPlan(Plan):
    """lambda solved exactly (``align_kd.exact``) from MI estimates on batches of its own; held
    fixed between solves. First solve after ``exact_warmup`` steps, then every ``exact_every``
    steps (None: once per epoch)."""

    data = "held"

    def __init__(self, T: int, S: int, *, init: Tensor, row_marginal: Tensor, tau: float, method: str = "auto",
                 every: int | None = None, warmup: int = 50):
        super().__init__(T, S)
        self.register_buffer("value", init.clone())
        self.register_buffer("row_marginal", row_marginal.float().clone())
        self.tau, self.method, self.every, self.warmup = tau, method, every, warmup

    @classmethod
    def build(cls, T, S, *, tau, row_marginal, prior, options):
        exact_tau = options.get("exact_tau")
        return cls(T, S, init=sinkhorn(prior, row_marginal, tau=1.0), row_marginal=row_marginal,
                   tau=tau if exact_tau is None else exact_tau, method=options.get("exact_method", "auto"),
                   every=options.get("exact_every"), warmup=options.get("exact_warmup", 50))

    def forward(self) -> Tensor:
        return self.value

    def update_due(self, step: int, steps_per_epoch: int) -> bool:
        return step == self.warmup or step % (self.every or steps_per_epoch) == 0

    def update(self, distiller, batches=None, **_) -> dict:
        """Solve the plan from the (T, S) MI that ``distiller`` estimates on ``batches`` (averaged
        over ranks in a data-parallel run); returns the solve's record."""
        from ..exact import exact_plan_info

        mi = distiller.estimate_mi(batches)  # (T, S), eval mode
        # exact_plan rescales a float32 marginal that misses sum(r) = S by round-off
        plan, info = exact_plan_info(mi.double().cpu(), self.row_marginal.double().cpu(), tau=self.tau,
                                     method=self.method)
        self.value.copy_(plan.to(self.value))
        return {**info, "tau": self.tau, "mi": mi.tolist(), "plan": plan.tolist()}


#: the built-in strategies (``PLANS`` also holds those registered later); ``fit(strategy=...)`` and
#: ``Distiller(strategy=...)`` accept any name in ``PLANS`` (or a fixed (T, S) tensor)
PLAN_STRATEGIES = tuple(PLANS)


def make_plan(strategy, T: int, S: int, *, tau: float, row_marginal: Tensor | None, init: str = "depth",
              options: dict | None = None) -> Plan:
    """Build the plan module for ``strategy`` (a registered name or a fixed (T, S) tensor)."""
    if isinstance(strategy, Tensor):
        return FixedPlan(validate_plan(strategy, T, S))
    if strategy not in PLANS:
        raise ValueError(
            f"Expected argument `strategy` to be one of {list(PLANS)} or a (T, S) tensor but got {strategy!r}."
        )
    if init not in ("depth", "zeros"):
        raise ValueError(f"Expected argument `plan_init` to be one of ['depth', 'zeros'] but got {init!r}.")
    prior = depth_prior(T, S) if init == "depth" else torch.zeros(T, S)
    if row_marginal is None:  # each teacher layer's share; under capacities at least one student layer's worth
        at_most = (options or {}).get("row_marginal_mode", "equal") == "at_most"
        row_marginal = torch.full((T,), max(1.0, S / T) if at_most else S / T)
    return PLANS[strategy].build(T, S, tau=tau, row_marginal=row_marginal, prior=prior, options=options or {})
