"""Logit distillation terms, as pure functions of (student logits, teacher logits[, labels]).

Every function returns a scalar: the batch mean of a per-sample divergence, scaled by
``temperature ** 2`` as in each paper, so that gradients keep their size when the temperature
changes. Logits are (B, K) tensors; labels (B,) class indices.

- :func:`hinton_kd`: Hinton et al. (2015), KL(p_t || p_s) of the softened softmaxes.
- :func:`dkd`: decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``, the target
  class's binary KL plus the KL among the non-target classes renormalised.
- :func:`ls_kd`: Hinton's KD on z-scored logits (logit standardisation, Sun et al., CVPR 2024).

``KD_LOSSES`` names them for ``fit(kd_loss=...)``; ``KD_PAPER_SETTINGS`` holds each paper's CIFAR
settings (cross-entropy weight, KD weight, temperature, warm-up), which the benchmark uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KD_LOSSES", "KD_PAPER_SETTINGS", "dkd", "hinton_kd", "kd_term", "ls_kd", "standardize"]


def _wide(x: Tensor) -> Tensor:
    """float16/bfloat16 logits (autocast) to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def hinton_kd(s_logits: Tensor, t_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean (at least float32)."""
    t = F.log_softmax(_wide(t_logits) / temperature, dim=1)  # (B, K)
    s = F.log_softmax(_wide(s_logits) / temperature, dim=1)  # (B, K)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row: (z - mean) / (std + eps), std with Bessel's correction as in the paper's code."""
    logits = _wide(logits)
    return (logits - logits.mean(dim=1, keepdim=True)) / (logits.std(dim=1, keepdim=True) + eps)


def ls_kd(s_logits: Tensor, t_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """Logit-standardised KD: :func:`hinton_kd` of the z-scored logits (base temperature ``temperature``)."""
    return hinton_kd(standardize(s_logits), standardize(t_logits), temperature)


def dkd(s_logits: Tensor, t_logits: Tensor, labels: Tensor, temperature: float = 4.0, alpha: float = 1.0,
        beta: float = 8.0) -> Tensor:
    """Decoupled KD: ``T^2 * (alpha * KL(b_t || b_s) + beta * KL(q_t || q_s))``, batch mean.

    ``b = (p_target, 1 - p_target)`` from the softened softmax ``p = softmax(z / T)``; ``q`` is the
    softmax of the non-target logits alone (the target class left out), i.e. ``p`` renormalised
    over the other K - 1 classes.
    """
    s, t = _wide(s_logits) / temperature, _wide(t_logits) / temperature  # (B, K)
    target = F.one_hot(labels.long(), s.shape[1]).bool()  # (B, K)
    # log p_target and log(1 - p_target) = logsumexp over the other classes - logsumexp over all
    big_negative = -1e4  # a large finite negative, never -inf (NaN gradients)
    s_other, t_other = s.masked_fill(target, big_negative), t.masked_fill(target, big_negative)  # (B, K)
    log_bs = torch.stack([(s * target).sum(1), torch.logsumexp(s_other, 1)], 1) - torch.logsumexp(s, 1, keepdim=True)  # (B, 2)
    log_bt = torch.stack([(t * target).sum(1), torch.logsumexp(t_other, 1)], 1) - torch.logsumexp(t, 1, keepdim=True)  # (B, 2)
    tckd = F.kl_div(log_bs, log_bt, log_target=True, reduction="batchmean")
    nckd = F.kl_div(F.log_softmax(s_other, 1), F.log_softmax(t_other, 1), log_target=True, reduction="batchmean")
    return (alpha * tckd + beta * nckd) * temperature**2


#: the names ``fit(kd_loss=...)`` accepts
KD_LOSSES = ("hinton", "dkd", "ls")

#: each paper's CIFAR settings: loss = ce_weight * CE + warm-up factor * kd_weight * term, where the
#: warm-up factor ramps linearly from 0 to 1 over ``warmup`` (a fraction of training: DKD's 20 of 240 epochs)
KD_PAPER_SETTINGS = {
    "hinton": {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0, "warmup": 0.0,
               "source": "Hinton et al. 2015: CE plus the T^2-scaled soft term, T 4 (CE weight 1: the step size of alone)"},
    "dkd": {"ce_weight": 1.0, "kd_weight": 1.0, "temperature": 4.0, "warmup": 20 / 240, "alpha": 1.0, "beta": 8.0,
            "source": "Zhao et al. CVPR 2022, CIFAR-100 (CE 1, alpha 1, beta 8, T 4, 20 of 240 epochs warm-up)"},
    "ls": {"ce_weight": 0.1, "kd_weight": 9.0, "temperature": 2.0, "warmup": 0.0,
           "source": "Sun et al. CVPR 2024, KD + logit standardisation on CIFAR-100 (CE 0.1, KD 9, base T 2)"},
}


def kd_term(name: str, s_logits: Tensor, t_logits: Tensor, labels: Tensor, temperature: float, *,
            dkd_alpha: float = 1.0, dkd_beta: float = 8.0) -> Tensor:
    """The logit term ``name`` (one of :data:`KD_LOSSES`) at ``temperature``."""
    if name == "hinton":
        return hinton_kd(s_logits, t_logits, temperature)
    if name == "ls":
        return ls_kd(s_logits, t_logits, temperature)
    if name == "dkd":
        return dkd(s_logits, t_logits, labels, temperature, dkd_alpha, dkd_beta)
    raise ValueError(f"Expected kd_loss to be one of {list(KD_LOSSES)} but got {name!r}.")
