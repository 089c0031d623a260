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
   best score after the last search epoch is the choice (ties go to the earlier candidate);
4. with ``fallback`` (a candidate's name, e.g. ``"hinton"``), the best candidate is the choice only if it beats
   the fallback on the held-out images by an exact one-sided McNemar test at level ``alpha``: over the
   images exactly one of the two gets right, the best one's share must be significantly above one half.
   Otherwise the fallback is the choice. A gap of a point on 5,000 images is within the noise of one
   search; the fallback keeps the rule from trading a safe baseline for it.

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
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_write_text
from .checkpoint import tensor_digest
from .data import split_heldout
from .evaluation import correct_mask
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
    best: the candidate with the best held-out score (the choice unless the fallback test kept the fallback).
    fallback / alpha: the fallback candidate and the test's level (None: no fallback, the best is the choice).
    mcnemar: the fallback test, when it ran (``best`` is not the fallback): ``{"candidate", "fallback",
        "candidate_only", "fallback_only", "p_value"}``, the counts of held-out images only one of the two gets
        right and the exact one-sided p-value (:func:`mcnemar_greater`).
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
    best: str = ""
    fallback: str | None = None
    alpha: float | None = None
    mcnemar: dict | None = None

    def fallback_summary(self) -> str:
        """One line on the fallback test ("" when it did not run), as the command line and the benchmark print it."""
        if self.mcnemar is None:
            return ""
        t = self.mcnemar
        return (f"{t['candidate']} against the fallback {t['fallback']}: {t['candidate_only']} held-out images only "
                f"{t['candidate']} gets right, {t['fallback_only']} only {t['fallback']}; one-sided exact McNemar "
                f"p = {t['p_value']:.4f} ({'<' if t['p_value'] < self.alpha else '>='} {self.alpha})")

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
    fallback: str | None = None,
    alpha: float = 0.05,
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
        fallback: a candidate's name (e.g. ``"hinton"``). The best candidate replaces it only if it gets
            significantly more held-out images right (exact one-sided McNemar test at level ``alpha``).
            None: the best held-out score is the choice.
        alpha: the fallback test's level, in (0, 1).
        **options: fit() options shared by every candidate (``epochs``, ``seed``, ``lr``, ...).

    Returns:
        A :class:`Selection`.
    """
    named = _candidate_options(candidates, options)
    if fallback is not None and fallback not in named:
        raise ValueError(f"Expected `fallback` to be one of the candidates {list(named)} but got {fallback!r}. "
                         f"Add it to the candidates (e.g. candidates=[..., {fallback!r}]) or pass fallback=None.")
    if not isinstance(alpha, float | int) or not 0 < alpha < 1:
        raise ValueError(f"Expected `alpha` (the fallback test's level) in (0, 1), e.g. 0.05, but got {alpha!r}.")
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

    def train(name: str, opts: dict) -> dict:
        """Run one candidate on the split and write its result (curve, plan, which held-out images it gets right)."""
        start = time.perf_counter()
        done = {"key": cache_key(identity, opts), "name": name, "options": opts}
        try:
            result = fit(teacher, copy.deepcopy(student), (split_train, heldout), stop_after_epochs=search_epochs, **opts)
            done.update(curve=[h["test_acc"] for h in result.history], plan=result.plan.tolist(),
                        heldout_correct=pack_mask(correct_mask(result.eval_model, heldout)))
        except TrainingDiverged as err:  # deterministic for these options and data: cached like a finished run
            done.update(diverged=str(err), first_step=err.first_step, step=err.step)
        done.update(seconds=time.perf_counter() - start, **identity)
        return write(name, done)

    def write(name: str, done: dict) -> dict:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / f"{name}.json", json.dumps(done, indent=1, default=str))
        return done

    runs, cached = {}, []
    for name, opts in named.items():
        runs[name] = _read_cached(None if folder is None else folder / f"{name}.json", cache_key(identity, opts))
        if runs[name] is None:
            runs[name] = train(name, opts)
        else:
            cached.append(name)

    def scored() -> tuple[dict, str]:
        """candidate -> held-out score (diverged ones left out), and the best (ties go to the earlier candidate)."""
        scores = {name: run["curve"][-1] for name, run in runs.items() if "diverged" not in run}
        return scores, max(scores, key=lambda name: (scores[name], -list(named).index(name)), default="")

    scores, best = scored()
    test = None
    while fallback in scores and best != fallback:
        stale = [name for name in (best, fallback) if "heldout_correct" not in runs[name]]
        if not stale:
            test = _fallback_test(best, runs[best], fallback, runs[fallback], heldout_images)
            break
        for name in stale:  # cached before per-image results were kept: train it again
            first = runs[name]
            runs[name] = train(name, named[name])
            cached.remove(name)
            if runs[name].get("curve") == first["curve"]:  # the same run: its seconds stay those of its first training
                runs[name] = write(name, {**runs[name], "seconds": first["seconds"]})
            else:
                warnings.warn(f"Candidate {name!r}, trained again for its per-image held-out results, gave the held-out "
                              f"curve {runs[name].get('curve')} where its cached run gave {first['curve']} (another "
                              "machine or library version); the new run counts.", stacklevel=2)
        scores, best = scored()
    if not scores:
        raise RuntimeError("Every candidate's search run diverged, so there is nothing to choose from. "
                           + " ".join(f"{name}: {run['diverged']}" for name, run in runs.items()))
    choice = fallback if fallback in scores and (test is None or test["p_value"] >= alpha) else best
    return Selection(choice=choice, scores=scores,
                     curves={name: run["curve"] for name, run in runs.items() if "diverged" not in run}, options=named,
                     seconds={name: run["seconds"] for name, run in runs.items()}, search_epochs=search_epochs,
                     epochs=epochs, heldout_images=heldout_images, train_images=len(split_train.labels), cached=cached,
                     diverged={name: run["diverged"] for name, run in runs.items() if "diverged" in run}, best=best,
                     fallback=fallback, alpha=alpha if fallback is not None else None, mcnemar=test)


def _fallback_test(best: str, best_run: dict, fallback: str, fallback_run: dict, n: int) -> dict:
    """Does ``best`` get significantly more of the ``n`` held-out images right than ``fallback``? Their discordant
    counts and the exact one-sided McNemar p-value, from the candidates' kept per-image results."""
    mine, theirs = (unpack_mask(run["heldout_correct"], n) for run in (best_run, fallback_run))
    only_mine, only_theirs = int((mine & ~theirs).sum()), int((~mine & theirs).sum())
    return {"candidate": best, "fallback": fallback, "candidate_only": only_mine, "fallback_only": only_theirs,
            "p_value": mcnemar_greater(only_mine, only_theirs)}


def mcnemar_greater(only_a: int, only_b: int) -> float:
    """Exact one-sided McNemar p-value that a gets more samples right than b, from the discordant counts.

    ``only_a`` / ``only_b``: samples a gets right and b wrong / the reverse. Under the null (neither is
    better), each of the ``only_a + only_b`` discordant samples favours a with probability 1/2, so the
    p-value is P(X >= only_a) for X ~ Binomial(only_a + only_b, 1/2); 1.0 when there is no discordant sample.
    """
    from scipy.stats import binomtest

    if only_a < 0 or only_b < 0:
        raise ValueError(f"Expected non-negative counts of discordant samples but got {only_a} and {only_b}.")
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5, alternative="greater").pvalue)


def pack_mask(mask: Tensor) -> str:
    """A (N,) bool tensor as a hex string (8 samples a byte, first sample in the highest bit); :func:`unpack_mask` inverts it."""
    import numpy as np

    return np.packbits(mask.cpu().numpy().astype(bool)).tobytes().hex()


def unpack_mask(packed: str, n: int) -> Tensor:
    """The (n,) bool tensor :func:`pack_mask` wrote as ``packed``."""
    import numpy as np

    bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    if len(bits) < n or bits[n:].any():
        raise ValueError(f"Expected a packed mask of {n} samples but got {len(bits)} bits"
                         + (" with bits set past the end." if len(bits) >= n else "."))
    return torch.from_numpy(bits[:n].astype(bool))


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
