"""Top-1 evaluation, and the one place that restores modules' training flags.

:func:`evaluate` is the library's only evaluation: ``fit()``, the teacher zoo, ``train_supervised``
and data-parallel runs all call it. Under ``torchrun`` (pass the run's
:class:`~align_kd.distributed.DistContext`) every rank scores a disjoint shard of the test set and
the correct/total counts are summed, so the accuracy is that of one process on the whole set.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["correct_mask", "count_correct", "evaluate", "preserve_buffers", "preserve_mode"]


@contextlib.contextmanager
def preserve_mode(*modules: nn.Module | None, training: bool | None = None):
    """Inside: ``modules`` set to ``train(training)`` (unchanged when None); on exit every submodule's
    own ``training`` flag is back as it was (a frozen BatchNorm inside a training model stays frozen)."""
    flags = [(m, m.training) for mod in modules if mod is not None for m in mod.modules()]
    try:
        if training is not None:
            for mod in modules:
                if mod is not None:
                    mod.train(training)
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def preserve_buffers(buffers: list[torch.Tensor]):
    """Inside: ``buffers`` (running statistics, or any tensors, parameters included) may change in
    place; on exit they hold their values from before again. Yields the saved copies (read them,
    do not change them)."""
    saved = [b.detach().clone() for b in buffers]
    try:
        yield saved
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)


def _resolve_device(model: nn.Module, loader, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if getattr(loader, "device", None) is not None:
        return torch.device(loader.device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def correct_mask(model: nn.Module, loader, device=None, *, flip: bool = False, translate: bool = False) -> torch.Tensor:
    """(N,) bool: whether ``model``'s top-1 prediction of each of the loader's N samples (in loader order) is
    right; eval mode, flags restored.

    Test-time augmentation: ``flip=True`` averages the logits of each image and of its horizontal
    mirror; ``translate=True`` (airbench's second level) averages those logits, weight 1/2, with the
    mean logits of the image shifted one pixel up-left and one pixel down-right (border reflected),
    weight 1/4 each (each view itself flip-averaged when ``flip``).
    """
    device = _resolve_device(model, loader, device)
    masks = []
    with preserve_mode(model, training=False):
        for x, y, *_ in loader:
            x, y = x.to(device), y.to(device)
            logits = _view_logits(model, x, flip)  # (B, classes)
            if translate:
                padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H + 2, W + 2)
                shifted = (_view_logits(model, padded[..., :-2, :-2], flip) + _view_logits(model, padded[..., 2:, 2:], flip)) / 2
                logits = (logits + shifted) / 2
            masks.append((logits.argmax(1) == y).cpu())
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


def count_correct(model: nn.Module, loader, device=None, *, flip: bool = False, translate: bool = False) -> tuple[int, int]:
    """(correct top-1 predictions, samples) of ``model`` over ``loader`` (see :func:`correct_mask`)."""
    mask = correct_mask(model, loader, device, flip=flip, translate=translate)
    return int(mask.sum()), len(mask)


def _view_logits(model: nn.Module, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """(B, classes) logits of ``x``, averaged with its mirror's when ``flip``."""
    logits = model(x)
    return (logits + model(x.flip(-1))) / 2 if flip else logits


def evaluate(model: nn.Module, loader, device=None, *, flip: bool = False, translate: bool = False, dist=None) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``loader`` batches ``(x (B, ...), y (B,))``.

    Eval mode, no gradients, every training flag restored afterwards. ``device``: where batches go
    (None: the loader's device, else the model's). ``flip`` / ``translate``: test-time
    augmentation (see :func:`count_correct`). ``dist``: a data-parallel run's DistContext; each sample is then counted once
    over all ranks.
    """
    shard, split = (loader, False) if dist is None or not dist.enabled else dist.eval_shard(loader)
    correct, total = count_correct(model, shard, device, flip=flip, translate=translate)
    if split:
        counts = dist.all_reduce_sum(torch.tensor([correct, total], dtype=torch.float64))
        correct, total = int(counts[0]), int(counts[1])
    if total == 0:
        raise ValueError("Expected a test loader that yields at least one batch but it yielded none.")
    return correct / total
