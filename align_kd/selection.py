"""Choose a distillation strategy (a plan, with its options) by held-out accuracy of truncated runs.

The layer-alignment plan is a hyperparameter. Which plan wins depends on the pair. In the `real`
benchmark, the MI rule's `softmax` wins the CNN -> ViT pair, the depth pairing wins the
ResNet -> ViT pair and nothing separates the CNN pairs. :func:`select_strategy` decides this for a
user's own pair, from the training data alone:

1. a fixed ``heldout_fraction`` of the training images is kept aside (never trained on);
2. every candidate trains a copy of the student on the rest, for the first ``search_epochs`` epochs
   of the full schedule (``fit(stop_after_epochs=...)``). All copies start from the same
   initialisation and see the same data order;
3. each copy is scored by its accuracy on the held-out images after each epoch. The candidate with the
   best score after the last search epoch is the choice (ties go to the earlier candidate).

A candidate that diverges (fit() raises :class:`TrainingDiverged`) is not a choice: it is listed in
``Selection.diverged`` with fit()'s message, and the search goes on with the others.

The caller then trains the choice on all the data (``fit(teacher, student, data, **selection.options[selection.choice])``).
The test set is never used. The search costs about ``len(candidates) * search_epochs / epochs * (1 - heldout_fraction)``
full runs. With ``cache_dir``, each candidate's result is written the moment it finishes. A rerun with the same
teacher, student initialisation, data split and options reads it back instead of training again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_write_text
from .checkpoint import tensor_digest
from .data import split_heldout
from .training import FitConfig, TrainingDiverged, _split_data, fit


@dataclass
class Selection:
    """What :func:`select_strategy` returns.

    choice: the name of the candidate with the best held-out accuracy after ``search_epochs``.
    scores: candidate -> held-out accuracy after ``search_epochs`` epochs.
    curves: candidate -> held-out accuracy after each search epoch.
    options: candidate -> the fit() options it ran with, ``strategy`` included, without
        ``stop_after_epochs``. Pass them to fit() to train the choice on all the data.
    seconds: candidate -> wall seconds of its truncated run (as first trained, when read back from the cache).
    cached: the candidates read back from ``cache_dir`` instead of trained.
    diverged: candidate -> fit()'s message, for the candidates whose truncated run diverged. They have no
        score and no curve, and cannot be the choice.
    search_epochs / epochs: the truncated and the full schedule's length.
    heldout_images / train_images: the sizes of the split.
    """

    choice: str
    scores: dict[str, float]
    curves: dict[str, list[float]]
    options: dict[str, dict]
    seconds: dict[str, float]
    search_epochs: int
    epochs: int
    heldout_images: int
    train_images: int
    cached: list[str] = field(default_factory=list)
    diverged: dict[str, str] = field(default_factory=dict)

    def ranking(self) -> list[str]:
        """The scored candidates from best to worst held-out score (ties in candidate order); diverged ones are not ranked."""
        order = list(self.scores)
        return sorted(order, key=lambda name: (-self.scores[name], order.index(name)))


def _fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state: the same weights give the same string."""
    return tensor_digest(module.state_dict().items())


#: fit() arguments that are not FitConfig fields
_TAP_ARGS = ("teacher_layers", "student_layers")


def _config(opts: dict) -> FitConfig:
    return FitConfig(**{k: v for k, v in opts.items() if k not in _TAP_ARGS})


def _candidate_options(candidates, shared: dict) -> dict[str, dict]:
    """candidate name -> fit() options (``strategy`` included) from a list of strategy names or a mapping."""
    if isinstance(candidates, (str, Tensor)) or not isinstance(candidates, (Sequence, Mapping)):
        raise TypeError(f"Expected `candidates` as a list of strategy names or a mapping name -> fit() options, but got "
                        f"{type(candidates).__name__}. Example: candidates=['pairwise', 'softmax', 'sinkhorn'].")
    if isinstance(candidates, Mapping):
        named = {}
        for name, opts in candidates.items():
            if not isinstance(opts, Mapping):
                raise TypeError(f"Expected candidate {name!r}'s value to be a mapping of fit() options (e.g. "
                                f"{{'strategy': 'sinkhorn', 'tau': 0.1}}) but got {type(opts).__name__}.")
            named[str(name)] = {"strategy": name, **shared, **opts}
    else:
        names = list(candidates)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise TypeError(f"Expected strategy names (str) in `candidates` but got {bad!r}; pass a mapping name -> "
                            "{'strategy': ..., other fit() options} for anything else.")
        if len(set(names)) != len(names):
            raise ValueError(f"Expected distinct candidates but got {names} (a name appears twice).")
        named = {n: {"strategy": n, **shared} for n in names}
    unusable = [n for n in named if not n or n != Path(n).name or n in (".", "..")]
    if unusable:
        raise ValueError(f"Expected candidate names usable as file names (a cache_dir holds <name>.json) but got {unusable}.")
    if len(named) < 2:
        raise ValueError(f"Expected at least two candidates to choose between but got {list(named)}.")
    for name, opts in named.items():
        if "stop_after_epochs" in opts:
            raise ValueError(f"Candidate {name!r} sets stop_after_epochs; the search truncates every run itself "
                             "(search_epochs=...). Remove it from the candidate's options.")
        if not isinstance(opts["strategy"], str):
            raise TypeError(f"Candidate {name!r}: expected `strategy` to be a strategy name but got "
                            f"{type(opts['strategy']).__name__}; fixed (T, S) plans cannot be searched over yet.")
        # every option checked (and a clear error raised) before any candidate trains
        _config(opts)
    return named


def select_strategy(
    teacher: nn.Module,
    student: nn.Module,
    data,
    *,
    candidates=("pairwise", "uniform", "softmax", "sinkhorn"),
    search_epochs: int,
    heldout_fraction: float = 0.1,
    cache_dir=None,
    **options,
) -> Selection:
    """Choose among ``candidates`` by held-out accuracy after the first ``search_epochs`` epochs.

    Args:
        teacher: the trained teacher (as for :func:`fit`).
        student: the student to distil. Each candidate trains a deep copy of it, so it is left as given.
        data: an :class:`align_kd.data.TensorLoader` of training batches, or a (train, test) pair whose
            test loader is ignored (the choice is made on a split of the training images).
        candidates: strategy names (sharing ``options``), or a mapping name -> fit() options
            (``strategy`` defaults to the name; ``options`` are the shared defaults).
        search_epochs: how many epochs of the ``epochs``-long schedule each candidate trains.
        heldout_fraction: share of the training images kept aside to score the candidates.
        cache_dir: write each candidate's result here as it finishes, and read back results that
            match (same teacher and student weights, split, options).
        **options: fit() options shared by every candidate (``epochs``, ``seed``, ``lr``, ...).

    Returns:
        A :class:`Selection`.
    """
    named = _candidate_options(candidates, options)
    lengths = {name: _config(opts).epochs for name, opts in named.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"Expected every candidate to run the same schedule length, so that the truncated runs are "
                         f"comparable, but got epochs {lengths}. Give the candidates one `epochs`.")
    epochs = next(iter(lengths.values()))
    if not isinstance(search_epochs, int) or not 1 <= search_epochs <= epochs:
        raise ValueError(f"Expected `search_epochs` to be an int in [1, epochs] (epochs: {epochs}) but got {search_epochs!r}.")
    train_loader, _ = _split_data(data)  # the test loader, if any, plays no part in the choice
    seeds = {_config(opts).seed for opts in named.values()}
    if len(seeds) != 1:
        raise ValueError(f"Expected every candidate to use one seed (the same split and data order) but got seeds {sorted(seeds)}.")
    split_train, heldout = split_heldout(train_loader, heldout_fraction, seed=seeds.pop())
    heldout_images = sum(len(y) for _, y in heldout)
    identity = {"teacher": _fingerprint(teacher), "student": _fingerprint(student), "search_epochs": search_epochs,
                "heldout_fraction": heldout_fraction, "train_images": len(split_train.labels),
                "heldout_images": heldout_images, "data": tensor_digest([("images", train_loader.images), ("labels", train_loader.labels)]),
                "data_tag": train_loader.data_tag}
    folder = None if cache_dir is None else Path(cache_dir)
    scores, curves, seconds, cached, diverged = {}, {}, {}, [], {}
    for name, opts in named.items():
        key = cache_key(identity, opts)
        file = None if folder is None else folder / f"{name}.json"
        done = _read_cached(file, key)
        if done is None:
            start = time.perf_counter()
            done = {"key": key, "name": name, "options": opts}
            try:
                result = fit(teacher, copy.deepcopy(student), (split_train, heldout), stop_after_epochs=search_epochs, **opts)
                done.update(curve=[h["test_acc"] for h in result.history], plan=result.plan.tolist())
            except TrainingDiverged as err:  # deterministic for these options and data: cached like a finished run
                done.update(diverged=str(err), first_step=err.first_step, step=err.step)
            done.update(seconds=time.perf_counter() - start, **identity)
            if file is not None:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(file, json.dumps(done, indent=1, default=str))
        else:
            cached.append(name)
        seconds[name] = done["seconds"]
        if "diverged" in done:
            diverged[name] = done["diverged"]
        else:
            curves[name], scores[name] = done["curve"], done["curve"][-1]
    if not scores:
        raise RuntimeError("Every candidate's search run diverged, so there is nothing to choose from. "
                           + " ".join(f"{name}: {msg}" for name, msg in diverged.items()))
    choice = max(scores, key=lambda name: (scores[name], -list(named).index(name)))
    return Selection(choice=choice, scores=scores, curves=curves, options=named, seconds=seconds,
                     search_epochs=search_epochs, epochs=epochs, heldout_images=heldout_images,
                     train_images=len(split_train.labels), cached=cached, diverged=diverged)


def cache_key(identity: dict, options: dict) -> str:
    """The key of one candidate's cached result: what identifies the search (teacher, student, data, split) and the
    candidate's fit() options (the progress bar aside)."""
    blob = json.dumps({**identity, "options": {k: v for k, v in options.items() if k != "progress"}}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_cached(file: Path | None, key: str) -> dict | None:
    """A candidate's finished result from ``file`` when it was made with ``key``, else None (absent, damaged, other run)."""
    if file is None or not file.is_file():
        return None
    try:
        done = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return done if done.get("key") == key else None
