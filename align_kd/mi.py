"""Variational Gaussian mutual-information bounds for every (teacher layer, student layer) pair.

For teacher feature t_i (standardised per channel with running, non-learned statistics) and
student feature s_j, q(t_i | s_j) is Gaussian with mean mu_ij(s_j) from a small regressor and
per-channel variance var_c = softplus(alpha_c) + eps. Per element (nats):

    mi_ij = H_gauss(t) + E[log q(t | s)]
          = 0.5 - 0.5 * log var_c - 0.5 * (t - mu)^2 / var_c          (t standardised: H = 0.5 log 2 pi e)

which equals -0.5 log(1 - rho^2) at the optimum for jointly Gaussian t, s with correlation rho.
Standardising makes pairs comparable (the dropped entropy H(t_i) is the same for every layer),
so a learned plan does not drift towards teacher layers of small scale.

Shapes: maps (B, C, H, W), tokens (B, N, D) (laid out as a (D, h, w) grid when N or N - 1 is a
square, else averaged over tokens) and vectors (B, D) are all viewed as maps (B, C, H, W); a pair
is compared at the common resolution min(H_i, H_j) x min(W_i, W_j), further capped at ``pool``
(a pooled target still gives a valid lower bound on the MI, by data processing).

Two regressor layouts:

* ``"shared"`` (default, cheap): per student layer one trunk (two 1x1 linear maps, width
  ``width``, ReLU), per teacher layer one decoder (width -> C_i), and per pair only a width x width
  map; all pairs of one teacher layer at the same resolution run as one batched op.
* ``"full"``: the reference VID regressor per pair (three 1x1 convolutions, middle width C_i) at
  the full common resolution; expensive, kept as the baseline the shared bank is measured against.

A second estimator, ``estimator="infonce"`` (the contrastive bound behind CRD, Tian et al. 2020),
gives the same (T, S) matrix from in-batch negatives. Each tap, pooled to at most ``pool`` x ``pool``
and flattened (teacher taps standardised as above), is embedded by a two-layer head of width
``width``; pair (i, j) maps the student embedding by its own width x width matrix and scores
sample b against sample c by the cosine of the two embeddings times a learned scale (at most 100):
score (B, B), rows student samples, columns teacher samples. With B samples,

    mi_ij = log B - 0.5 * (CE(score, diag) + CE(score^T, diag))              (nats per sample)

Each cross-entropy term gives the InfoNCE bound I(t; s) >= log B - CE for any critic, so their
mean is one too; the estimate never exceeds log B. Under data parallelism the negatives are the
rank's own batch (the bound uses that B).

In-batch negatives saturate: any layer tells B images apart, so many pairs sit near log B.
``memory=K`` keeps the last K training samples of each teacher tap (pooled, before
standardisation: the teacher is frozen, so they are exact draws from p(t)) and scores each student
sample against the batch's teacher samples and the n <= K remembered ones, standardised and
embedded with the current statistics and head (a valid bound, not a stale one):

    mi_ij = log(B + n) - CE(score (B, B + n), diag)                         (at most log(B + n))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import data_parallel, mean_over_ranks

__all__ = ["BANK_LAYOUTS", "MI_ESTIMATORS", "MIBank", "as_map"]

BANK_LAYOUTS = ("shared", "full")
#: the two lower bounds on I(t_i; s_j): the variational Gaussian (VID) and the contrastive (InfoNCE) one
MI_ESTIMATORS = ("vid", "infonce")
MAX_INFONCE_SCALE = 100.0  # cap on the InfoNCE critic's learned scale (inverse temperature), as in CLIP


def as_map(x: Tensor) -> Tensor:
    """View any feature as a map (B, C, H, W): tokens (B, N, D) -> (B, D, h, w), vectors -> (B, D, 1, 1)."""
    if x.dim() == 4:
        return x
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:  # tokens (B, N, D)
        B, N, D = x.shape
        for drop in (0, 1):  # all tokens on a square grid, or a class token then a square grid
            side = math.isqrt(N - drop)
            if N - drop > 1 and side * side == N - drop:
                return x[:, drop:, :].transpose(1, 2).reshape(B, D, side, side)
        return x.mean(1)[:, :, None, None]
    return x.reshape(x.shape[0], -1, 1, 1)


def _pool(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a map (B, C, H, W) to ``size``; a no-op when it already has that size."""
    return x if tuple(x.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(x, size)


def map_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) that :func:`as_map` gives for a per-sample feature shape."""
    return tuple(as_map(torch.empty(1, *shape, device="meta")).shape[1:])


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient of group g by scale[g]: x (G, ...)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        (scale,) = ctx.saved_tensors
        return g * scale.to(g.dtype).view(-1, *([1] * (g.dim() - 1))), None


class RunningStandardizer(nn.Module):
    """Per-channel standardisation with running (EMA) statistics; nothing learned.

    Input (B, P, C); statistics over B and P. In training mode the statistics are updated from the
    batch first (the first batch sets them), then applied; in eval mode they are only applied.
    Channels whose variance is negligible are flagged dead and left out of the MI.
    """

    def __init__(self, channels: int, momentum: float = 0.1):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("live", torch.ones(channels, dtype=torch.bool))
        self.register_buffer("initialised", torch.tensor(False))

    @torch.no_grad()
    def update(self, t: Tensor) -> None:
        t = t.float().flatten(0, 1)  # (B*P, C)
        if data_parallel():
            # every rank's rows: counts, sums and sums of squares added up in one all-reduce
            stats = torch.cat([t.new_tensor([t.shape[0]]), t.sum(0), (t * t).sum(0)])
            torch.distributed.all_reduce(stats)
            n, c = stats[0], t.shape[1]
            mean = stats[1:1 + c] / n
            var = (stats[1 + c:] / n - mean * mean).clamp_min(0.0)
        else:
            mean, var = t.mean(0), t.var(0, unbiased=False)
        # the first batch sets the statistics; chosen with torch.where, not a Python branch on the
        # flag, so there is no host sync and no graph break under fit(compile=True)
        self.mean.copy_(torch.where(self.initialised, self.mean.lerp(mean, self.momentum), mean))
        self.var.copy_(torch.where(self.initialised, self.var.lerp(var, self.momentum), var))
        self.initialised.fill_(True)
        self.live.copy_(self.var > 1e-6 * self.var.mean().clamp_min(1e-12))

    def standardise(self, t: Tensor) -> Tensor:
        """The current statistics applied, nothing updated."""
        return (t.float() - self.mean) * torch.rsqrt(self.var + 1e-5)

    def forward(self, t: Tensor) -> Tensor:
        if self.training:
            self.update(t)
        return self.standardise(t)


@dataclass
class _Pair:
    i: int
    j: int
    size: tuple[int, int]  # common (h, w)


class MIBank(nn.Module):
    """All T x S variational MI bounds.

    Args:
        teacher_shapes: per-sample shapes of the T teacher taps, e.g. [(64, 16, 16), (197, 768), (10,)].
        student_shapes: the same for the S student taps.
        layout: "shared" (cheap, default) or "full" (reference VID regressor per pair).
        estimator: "vid" (variational Gaussian bound, nats per element; default) or "infonce"
            (contrastive bound with in-batch negatives, nats per sample, at most log B; shared
            layout only).
        memory: "infonce" only: remembered teacher samples per tap used as extra negatives (0: in-batch only).
        pool: cap on the common resolution (None: no cap; "full" layout defaults to None).
        width: hidden width of the shared trunk and per-pair maps (None: the median student
            channel count rounded up to a power of two, clamped to [16, 64], so that the bank
            stays about the student's size).
        eps: variance floor, var = softplus(alpha) + eps.
        init_var: initial variance (targets are standardised, so 1.0 is neutral).

    ``forward(teacher_feats, student_feats, student_grad_weight=None, active=None)`` returns the
    (T, S) MI estimate (nats per element for "vid", per sample for "infonce"). ``student_grad_weight`` (T, S), typically the plan,
    scales the gradient that pair (i, j) sends into the student (and its shared trunk); the pair's
    own regressor and variance always get the full gradient, so every bound stays tight, also for
    pairs the plan has switched off. ``active`` (T, S) bool evaluates only those pairs (and only
    the trunks, targets and decoders they need); the others return their last training-mode
    estimate as a constant (buffer ``last_mi``, 0 before the first: MI >= 0 is always a valid
    lower bound), so the cost follows the number of active pairs, not T x S.
    """

    def __init__(
        self,
        teacher_shapes,
        student_shapes,
        *,
        layout: str = "shared",
        estimator: str = "vid",
        memory: int = 0,
        pool: int | None = 2,
        width: int | None = None,
        eps: float = 1e-4,
        init_var: float = 1.0,
        momentum: float = 0.1,
    ):
        super().__init__()
        if layout not in BANK_LAYOUTS:
            raise ValueError(f"Expected argument `bank_layout` to be one of {list(BANK_LAYOUTS)} but got {layout!r}.")
        if estimator not in MI_ESTIMATORS:
            raise ValueError(f"Expected argument `mi_estimator` to be one of {list(MI_ESTIMATORS)} but got {estimator!r}.")
        if not isinstance(memory, int) or isinstance(memory, bool) or memory < 0:
            raise ValueError(f"Expected `infonce_memory` to be an int >= 0 (teacher samples kept as negatives) but got {memory!r}.")
        if memory and estimator != "infonce":
            raise ValueError(f"infonce_memory={memory} keeps negatives for the contrastive bound; it needs "
                             f"mi_estimator='infonce', not {estimator!r}.")
        if estimator == "infonce" and layout != "shared":
            raise ValueError(f"bank_layout={layout!r} is a layout of the VID regressors; mi_estimator='infonce' has its "
                             f"own heads. Use bank_layout='shared' (the default) with it.")
        if pool is not None and (not isinstance(pool, int) or pool < 1):
            raise ValueError(f"Expected `pool` to be a positive int or None but got {pool!r}.")
        if not (eps > 0 and init_var > eps):
            raise ValueError(f"Expected 0 < eps < init_var but got eps={eps}, init_var={init_var}.")
        self.teacher_maps = [map_shape(tuple(s)) for s in teacher_shapes]  # (C, H, W) per teacher tap
        self.student_maps = [map_shape(tuple(s)) for s in student_shapes]
        if width is None:
            median = sorted(c for c, _, _ in self.student_maps)[len(self.student_maps) // 2]
            width = min(64, max(16, 1 << (median - 1).bit_length()))
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"Expected `width` to be a positive int or None but got {width!r}.")
        self.layout, self.estimator, self.pool, self.width, self.eps = layout, estimator, pool, width, eps
        self.memory = memory
        T, S = len(self.teacher_maps), len(self.student_maps)
        self.T, self.S = T, S
        cap = (lambda n: n) if pool is None else (lambda n: min(n, pool))
        self.student_sizes = [(cap(h), cap(w)) for _, h, w in self.student_maps]
        # VID compares a pair position by position at the common resolution; InfoNCE embeds each
        # teacher tap once, at its own capped resolution
        self.pairs = [
            _Pair(i, j, (cap(th), cap(tw)) if estimator == "infonce" else (min(cap(th), sh), min(cap(tw), sw)))
            for i, (_, th, tw) in enumerate(self.teacher_maps)
            for j, (sh, sw) in enumerate(self.student_sizes)
        ]
        self.register_buffer("last_mi", torch.zeros(T, S))  # (T, S) last estimate per pair, reused when inactive
        self.standardizers = nn.ModuleDict()
        for p in self.pairs:
            key = self._target_key(p.i, p.size)
            if key not in self.standardizers:
                self.standardizers[key] = RunningStandardizer(self.teacher_maps[p.i][0], momentum)

        if estimator == "infonce":
            self._build_infonce()
            return
        alpha0 = math.log(math.expm1(init_var - eps))  # softplus^-1
        # alpha[i]: (S, C_i), one variance per teacher channel per pair; never weight-decayed
        self.alpha = nn.ParameterList([nn.Parameter(torch.full((S, c), alpha0)) for c, _, _ in self.teacher_maps])
        if layout == "shared":
            self.trunks = nn.ModuleList(
                nn.Sequential(nn.Linear(c, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
                for c, _, _ in self.student_maps
            )
            # per pair a (width x width) map, initialised at the identity plus noise
            self.pair_maps = nn.Parameter(torch.eye(width).repeat(T, S, 1, 1) + torch.randn(T, S, width, width) / width)
            self.decoders = nn.ModuleList(nn.Linear(width, c) for c, _, _ in self.teacher_maps)
        else:
            self.regressors = nn.ModuleList(
                nn.Sequential(
                    nn.Conv2d(self.student_maps[p.j][0], ct, 1, bias=False), nn.ReLU(),
                    nn.Conv2d(ct, ct, 1, bias=False), nn.ReLU(),
                    nn.Conv2d(ct, ct, 1, bias=False),
                )
                for p in self.pairs
                for ct in [self.teacher_maps[p.i][0]]
            )

    def _build_infonce(self) -> None:
        """Heads of the contrastive critic: one per tap (on the flattened, capped map), one map per pair."""
        w = self.width

        def head(n_in: int) -> nn.Module:
            return nn.Sequential(nn.Linear(n_in, w), nn.ReLU(), nn.Linear(w, w))

        self.trunks = nn.ModuleList(head(c * h * ww) for (c, _, _), (h, ww) in zip(self.student_maps, self.student_sizes))
        teacher_sizes = {p.i: p.size for p in self.pairs}
        self.teacher_heads = nn.ModuleList(head(c * teacher_sizes[i][0] * teacher_sizes[i][1])
                                           for i, (c, _, _) in enumerate(self.teacher_maps))
        # per pair a (width x width) map on the student embedding, initialised at the identity plus noise
        self.pair_maps = nn.Parameter(torch.eye(w).repeat(self.T, self.S, 1, 1) + torch.randn(self.T, self.S, w, w) / w)
        # (T, S) log of the critic's scale (inverse temperature), from 1 / 0.1; never weight-decayed
        self.log_scale = nn.Parameter(torch.full((self.T, self.S), math.log(10.0)))
        if self.memory:  # per teacher tap a ring of its last K samples (K, P * C_i), raw; how many are filled; next slot
            for i, (c, _, _) in enumerate(self.teacher_maps):
                h, w = teacher_sizes[i]
                self.register_buffer(f"negatives_{i}", torch.zeros(self.memory, c * h * w))
            self.register_buffer("negatives_filled", torch.zeros(self.T, dtype=torch.long))
            self.register_buffer("negatives_next", torch.zeros(self.T, dtype=torch.long))

    @staticmethod
    def _target_key(i: int, size: tuple[int, int]) -> str:
        return f"t{i}_{size[0]}x{size[1]}"

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters that must not get weight decay (VID: the log-variances; InfoNCE: the log-scales)."""
        return [self.log_scale] if self.estimator == "infonce" else list(self.alpha)

    def variances(self) -> list[Tensor]:
        """Per teacher layer i, the (S, C_i) variances softplus(alpha) + eps (VID only: InfoNCE has none)."""
        return [] if self.estimator == "infonce" else [F.softplus(a.float()) + self.eps for a in self.alpha]

    def _targets(self, teacher_feats: list[Tensor], pairs: list[_Pair]) -> dict[str, Tensor]:
        """Standardised, pooled teacher targets (B, P, C_i), computed once per (layer, size) of ``pairs``."""
        out = {}
        maps = [as_map(t.detach()) for t in teacher_feats]
        for p in pairs:
            key = self._target_key(p.i, p.size)
            if key not in out:
                t = _pool(maps[p.i].float(), p.size).flatten(2).transpose(1, 2)  # (B, P, C_i)
                out[key] = self.standardizers[key](t)
        return out

    @staticmethod
    def _mi(t: Tensor, mu: Tensor, var: Tensor, live: Tensor) -> Tensor:
        """Per-element MI bound, averaged over batch, positions and live channels.

        t: (B, P, C) standardised target; mu: (G, B, P, C); var: (G, C); live: (C,) -> (G,)
        """
        sq = (t.float() - mu.float()).square().mean((1, 2))  # (G, C) mean squared error per channel
        ll = 0.5 - 0.5 * torch.log(var) - 0.5 * sq / var  # (G, C); the per-element terms, averaged
        w = live.float()
        return (ll * w).sum(-1) / w.sum().clamp_min(1.0)

    def _check(self, teacher_feats, student_feats) -> None:
        if len(teacher_feats) != self.T or len(student_feats) != self.S:
            raise ValueError(
                f"MIBank was built for T={self.T} teacher and S={self.S} student features "
                f"but got {len(teacher_feats)} and {len(student_feats)}."
            )
        for side, feats, maps in (("teacher", teacher_feats, self.teacher_maps), ("student", student_feats, self.student_maps)):
            for k, (f, expect) in enumerate(zip(feats, maps)):
                got = tuple(as_map(f).shape[1:])
                if got != expect:
                    raise ValueError(f"{side} feature {k} has map shape {got} but the bank was built for {expect}.")

    def forward(self, teacher_feats: list[Tensor], student_feats: list[Tensor], student_grad_weight: Tensor | None = None,
                active: Tensor | None = None) -> Tensor:
        """(T, S) MI estimates, nats per element (VID) or per sample (InfoNCE); differentiable in the active pairs."""
        self._check(teacher_feats, student_feats)
        if active is not None and (not isinstance(active, Tensor) or active.shape != (self.T, self.S) or active.dtype != torch.bool):
            got = f"{tuple(active.shape)} {active.dtype}" if isinstance(active, Tensor) else type(active).__name__
            raise ValueError(f"Expected `active` as a bool tensor of shape (T, S) = ({self.T}, {self.S}) but got {got}.")
        weight = None if student_grad_weight is None else student_grad_weight.detach().float()  # (T, S)
        on = None if active is None else active.tolist()  # one host sync
        pairs = self.pairs if on is None else [p for p in self.pairs if on[p.i][p.j]]
        targets = self._targets(teacher_feats, pairs)
        variances = self.variances()
        mi = [[None] * self.S for _ in range(self.T)]
        if self.estimator == "infonce":
            self._forward_infonce(teacher_feats, student_feats, targets, weight, mi, pairs)
        elif self.layout == "shared":
            self._forward_shared(student_feats, targets, variances, weight, mi, pairs)
        else:
            self._forward_full(student_feats, targets, variances, weight, mi, pairs)
        if on is not None:  # inactive pairs: their last estimate, a constant
            mi = [[v if v is not None else self.last_mi[i, j] for j, v in enumerate(row)] for i, row in enumerate(mi)]
        out = torch.stack([torch.stack(row) for row in mi])  # (T, S)
        if self.training:
            with torch.no_grad():
                # data parallel: the global batch's estimate, the same buffer on every rank
                self.last_mi.copy_(mean_over_ranks(out.detach().float()))
        return out

    @staticmethod
    def _groups(pairs: list[_Pair]) -> dict[tuple[int, tuple[int, int]], list[int]]:
        """Active pairs grouped by (teacher layer, resolution): their student layers, in order."""
        groups: dict[tuple[int, tuple[int, int]], list[int]] = {}
        for p in pairs:
            groups.setdefault((p.i, p.size), []).append(p.j)
        return groups

    @staticmethod
    def _infonce_rows(score: Tensor) -> Tensor:
        """InfoNCE bound over rows, scores (G, B, N): row b's positive is column b, the other N - 1 its
        negatives; log N - CE, averaged over rows -> (G,)."""
        G, B, N = score.shape
        labels = torch.arange(B, device=score.device).repeat(G)  # (G * B,)
        return math.log(N) - F.cross_entropy(score.flatten(0, 1), labels, reduction="none").view(G, B).mean(1)

    @classmethod
    def _infonce(cls, score: Tensor) -> Tensor:
        """Symmetric in-batch bound from scores (G, B, B), rows student samples, columns teacher samples
        -> (G,): the row bound averaged with the column bound."""
        return 0.5 * (cls._infonce_rows(score) + cls._infonce_rows(score.transpose(1, 2)))

    def _remembered(self, i: int, key: str) -> Tensor:
        """Teacher tap i's remembered samples (n, P, C_i), standardised with the current statistics."""
        n = int(self.negatives_filled[i])
        ring = getattr(self, f"negatives_{i}")  # (K, P * C_i), stored position-major like the targets
        C = self.teacher_maps[i][0]
        return self.standardizers[key].standardise(ring[:n].view(n, ring.shape[1] // C, C))

    @torch.no_grad()
    def _remember(self, i: int, raw: Tensor) -> None:
        """Write a batch of raw teacher samples (B, P * C_i) into tap i's ring, oldest first out."""
        ring, K = getattr(self, f"negatives_{i}"), self.memory
        raw = raw[-K:]
        slots = (self.negatives_next[i] + torch.arange(raw.shape[0], device=ring.device)) % K
        ring[slots] = raw.to(ring.dtype)
        self.negatives_next[i] = (self.negatives_next[i] + raw.shape[0]) % K
        self.negatives_filled[i] = torch.clamp(self.negatives_filled[i] + raw.shape[0], max=K)

    def _forward_infonce(self, teacher_feats, student_feats, targets, weight, mi, pairs) -> None:
        z = {}  # per student layer with an active pair: its embedding (B, width)
        for j in sorted({p.j for p in pairs}):
            z[j] = self.trunks[j](_pool(as_map(student_feats[j]), self.student_sizes[j]).flatten(1))
        for (i, size), js in self._groups(pairs).items():
            key = self._target_key(i, size)
            live = self.standardizers[key].live
            t = targets[key] * live  # (B, P, C_i); dead channels carry nothing
            B = t.shape[0]
            if self.memory:  # candidates: the batch's teacher samples, then the remembered ones
                t = torch.cat([t, self._remembered(i, key) * live])  # (B + n, P, C_i)
            u = F.normalize(self.teacher_heads[i](t.flatten(1)).float(), dim=-1)  # (B [+ n], width)
            zs = torch.stack([z[j] for j in js])  # (G, B, width)
            if weight is not None:
                zs = _ScaleGrad.apply(zs, weight[i, js])
            v = F.normalize(torch.einsum("gbw,gvw->gbv", zs, self.pair_maps[i, js]).float(), dim=-1)  # (G, B, width)
            scale = self.log_scale[i, js].float().exp().clamp(max=MAX_INFONCE_SCALE)  # (G,)
            score = scale[:, None, None] * torch.einsum("gbw,cw->gbc", v, u)  # (G, B, B [+ n])
            for j, val in zip(js, self._infonce(score) if not self.memory else self._infonce_rows(score)):
                mi[i][j] = val
            if self.memory and self.training:  # after its use: a sample is never its own negative
                raw = _pool(as_map(teacher_feats[i].detach()).float(), size).flatten(2).transpose(1, 2)  # (B, P, C_i)
                self._remember(i, raw.reshape(B, -1))

    def _forward_shared(self, student_feats, targets, variances, weight, mi, pairs) -> None:
        groups = self._groups(pairs)
        z = {}  # per student layer with an active pair: trunk output (B, width, h_j, w_j)
        for j in sorted({p.j for p in pairs}):
            x = _pool(as_map(student_feats[j]), self.student_sizes[j])  # (B, C_j, h_j, w_j)
            h = self.trunks[j](x.flatten(2).transpose(1, 2))  # (B, P_j, width)
            z[j] = h.transpose(1, 2).reshape(x.shape[0], self.width, *self.student_sizes[j])
        for (i, size), js in groups.items():
            key = self._target_key(i, size)
            # the group's student layers, as a slice when contiguous (cheaper than an index list)
            js = slice(js[0], js[-1] + 1) if js == list(range(js[0], js[-1] + 1)) else js
            js_list = list(range(self.S))[js] if isinstance(js, slice) else js
            zs = torch.stack([_pool(z[j], size).flatten(2).transpose(1, 2) for j in js_list])  # (G, B, P, w)
            if weight is not None:
                zs = _ScaleGrad.apply(zs, weight[i, js])
            y = torch.einsum("gbpw,gvw->gbpv", zs, self.pair_maps[i, js])  # (G, B, P, width)
            mu = self.decoders[i](y)  # (G, B, P, C_i)
            vals = self._mi(targets[key], mu, variances[i][js], self.standardizers[key].live)  # (G,)
            for g, j in enumerate(js_list):
                mi[i][j] = vals[g]

    def _forward_full(self, student_feats, targets, variances, weight, mi, pairs) -> None:
        maps = [as_map(s) for s in student_feats]
        for p in pairs:
            k = p.i * self.S + p.j  # index of the pair's regressor (pairs are built row-major)
            key = self._target_key(p.i, p.size)
            x = _pool(maps[p.j], p.size)  # (B, C_j, h, w)
            if weight is not None:
                x = _ScaleGrad.apply(x[None], weight[p.i, p.j].reshape(1))[0]
            mu = self.regressors[k](x).flatten(2).transpose(1, 2)  # (B, P, C_i)
            mi[p.i][p.j] = self._mi(targets[key], mu[None], variances[p.i][p.j : p.j + 1], self.standardizers[key].live)[0]
