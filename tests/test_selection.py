"""Choosing a strategy by held-out accuracy of truncated runs (align_kd.select_strategy).

Oracles: a truncated run resumed to the end is bit for bit the uninterrupted run (so a truncated run
is the prefix of the full one, on the full schedule); each candidate's score is recomputed by hand
(the same split, a fit of a copy, align_kd.evaluate on the held-out images); identical candidates
tie and the earlier one wins in either order; the cache gives back what was trained and retrains
only a candidate whose options changed; the user's student is left untouched. The fallback test:
the exact McNemar p-value against the binomial tail summed by hand, each candidate's per-image
held-out results recomputed by hand, a planted clear winner (a fallback that cannot learn), a
planted tie (the same candidate twice) and a cache written before per-image results were kept.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from align_kd import FitConfig, evaluate, fit, select_strategy  # noqa: E402
from align_kd.data import TensorLoader, load_cifar10, split_heldout  # noqa: E402
from align_kd.evaluation import correct_mask  # noqa: E402
from align_kd.selection import _fingerprint, mcnemar_greater, pack_mask, unpack_mask  # noqa: E402
from shared_archive import ARCHIVE  # noqa: E402
from test_heldout import student8, student8_bn, teacher8  # noqa: E402

COMMON = {"epochs": 3, "lr": 0.05, "progress": False, "seed": 3}


@pytest.fixture(scope="module")
def loader():
    """512 real CIFAR-10 training images at 8 x 8, shuffled and flipped like the benchmark's loaders."""
    x, y = load_cifar10(ARCHIVE, split="train", limit=512)
    return TensorLoader(F.avg_pool2d(x.float() / 255, 4), y, batch_size=64, shuffle=True, augment=True, seed=0)


def test_a_truncated_run_resumed_to_the_end_is_the_full_run(loader, tmp_path):
    full = fit(teacher8(), student8_bn(), loader, strategy="sinkhorn", **COMMON)
    part = fit(teacher8(), student8_bn(), loader, strategy="sinkhorn", stop_after_epochs=1,
               checkpoint_dir=str(tmp_path), **COMMON)
    assert len(part.history) == 1 and len(full.history) == 3
    # the first epoch's learning rate is the 3-epoch schedule's, not a 1-epoch schedule's
    assert part.history[0]["lr"] == full.history[0]["lr"]
    one_epoch = fit(teacher8(), student8_bn(), loader, strategy="sinkhorn", **{**COMMON, "epochs": 1})
    assert one_epoch.history[0]["lr"] != full.history[0]["lr"]
    rest = fit(teacher8(), student8_bn(), loader, strategy="sinkhorn", checkpoint_dir=str(tmp_path), resume=True, **COMMON)
    for name, value in full.student.state_dict().items():
        assert torch.equal(rest.student.state_dict()[name], value), name
    assert torch.equal(rest.plan, full.plan)


def test_each_candidate_is_scored_by_its_own_heldout_accuracy(loader):
    teacher, student = teacher8(), student8()
    before = _fingerprint(student)
    sel = select_strategy(teacher, student, loader, candidates=["pairwise", "sinkhorn", "hinton"], search_epochs=2,
                          heldout_fraction=0.25, **COMMON)
    assert _fingerprint(student) == before  # every candidate trained a copy
    train, heldout = split_heldout(loader, 0.25, seed=COMMON["seed"])
    assert (sel.train_images, sel.heldout_images) == (384, 128)
    for name in ("pairwise", "sinkhorn", "hinton"):
        copy_ = copy.deepcopy(student)
        fit(teacher, copy_, train, strategy=name, stop_after_epochs=2, **COMMON)
        assert sel.scores[name] == evaluate(copy_, heldout), name
        assert len(sel.curves[name]) == 2 and sel.curves[name][-1] == sel.scores[name]
    best = max(sel.scores.values())
    assert sel.scores[sel.choice] == best
    assert sel.choice == next(n for n in ("pairwise", "sinkhorn", "hinton") if sel.scores[n] == best)
    assert sel.ranking()[0] == sel.choice and sorted(sel.ranking()) == ["hinton", "pairwise", "sinkhorn"]
    assert sel.options[sel.choice] == {"strategy": sel.choice, **COMMON}  # what to pass to fit() on all the data


def test_identical_candidates_tie_and_the_earlier_one_wins(loader):
    same = {"strategy": "uniform", "tau": 0.5}
    for order in (("a", "b"), ("b", "a")):
        sel = select_strategy(teacher8(), student8(), loader, candidates={n: same for n in order}, search_epochs=1, **COMMON)
        assert sel.scores["a"] == sel.scores["b"]
        assert sel.choice == order[0]


def test_the_cache_reads_back_finished_candidates_and_reruns_changed_ones(loader, tmp_path):
    args = dict(search_epochs=1, cache_dir=tmp_path, **COMMON)
    first = select_strategy(teacher8(), student8(), loader, candidates=["pairwise", "uniform"], **args)
    assert first.cached == [] and sorted(p.name for p in tmp_path.iterdir()) == ["pairwise.json", "uniform.json"]
    again = select_strategy(teacher8(), student8(), loader, candidates=["pairwise", "uniform"], **args)
    assert again.cached == ["pairwise", "uniform"]
    assert (again.scores, again.curves, again.choice) == (first.scores, first.curves, first.choice)
    changed = select_strategy(teacher8(), student8(), loader, candidates={"pairwise": {}, "uniform": {"tau": 0.3}}, **args)
    assert changed.cached == ["pairwise"]  # uniform's options changed (tau is a plan option it ignores, but it is asked for)
    other_student = student8()
    with torch.no_grad():
        next(other_student.parameters()).add_(1.0)
    assert select_strategy(teacher8(), other_student, loader, candidates=["pairwise", "uniform"], **args).cached == []
    other_labels = TensorLoader(loader.images, loader.labels.roll(1), batch_size=64, shuffle=True, augment=True, seed=0)
    assert select_strategy(teacher8(), student8(), other_labels, candidates=["pairwise", "uniform"], **args).cached == []


def test_a_diverging_candidate_is_listed_not_chosen_and_cached(loader, tmp_path):
    from align_kd import TrainingDiverged

    candidates = {"wild": {"strategy": "uniform", "lr": 1e3}, "pairwise": {}, "uniform": {}}
    args = dict(search_epochs=1, cache_dir=tmp_path, max_bad_steps=2, **COMMON)
    with pytest.warns(RuntimeWarning, match="loss is"):
        sel = select_strategy(teacher8(), student8(), loader, candidates=candidates, **args)
    # what fit() itself says about that candidate on the same split
    train, _ = split_heldout(loader, 0.1, seed=COMMON["seed"])
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingDiverged) as err:
        fit(teacher8(), student8(), train, stop_after_epochs=1, max_bad_steps=2, **{**COMMON, "strategy": "uniform", "lr": 1e3})
    assert sel.diverged == {"wild": str(err.value)}
    assert sorted(sel.scores) == sorted(sel.curves) == ["pairwise", "uniform"]
    assert sel.choice == max(["pairwise", "uniform"], key=lambda n: (sel.scores[n], n == "pairwise"))  # ties: the earlier
    assert "wild" not in sel.ranking() and set(sel.seconds) == set(candidates)
    again = select_strategy(teacher8(), student8(), loader, candidates=candidates, **args)  # no warning: nothing trains
    assert again.cached == list(candidates) and again.diverged == sel.diverged and again.scores == sel.scores
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="Every candidate's search run diverged.*wild.*wilder"):
        select_strategy(teacher8(), student8(), loader, candidates={"wild": candidates["wild"], "wilder": {"strategy": "pairwise", "lr": 1e6}},
                        **{**args, "cache_dir": None})


@pytest.mark.parametrize("candidates, kwargs, error, match", [
    (["pairwise"], {}, ValueError, "at least two candidates"),
    (["pairwise", "pairwise"], {}, ValueError, "distinct candidates"),
    ("pairwise", {}, TypeError, "list of strategy names"),
    (["pairwise", 3], {}, TypeError, "strategy names"),
    (["pairwise", "sinkhorn"], {"search_epochs": 4}, ValueError, r"search_epochs.*\[1, epochs\]"),
    ({"a/b": {"strategy": "pairwise"}, "c": {"strategy": "uniform"}}, {}, ValueError, "usable as file names"),
    ({"pairwise": {"epochs": 2}, "uniform": {}}, {}, ValueError, "same schedule length"),
    ({"pairwise": {"seed": 1}, "uniform": {}}, {}, ValueError, "one seed"),
    ({"pairwise": {"stop_after_epochs": 1}, "uniform": {}}, {}, ValueError, "truncates every run itself"),
    (["pairwise", "nonsense"], {}, ValueError, "strategy"),
    ({"pairwise": "sinkhorn", "uniform": {}}, {}, TypeError, "mapping of fit"),
    (["pairwise", "uniform"], {"fallback": "hinton"}, ValueError, "`fallback` to be one of the candidates"),
    (["pairwise", "hinton"], {"fallback": "hinton", "alpha": 1.0}, ValueError, r"`alpha`.*in \(0, 1\)"),
    (["pairwise", "hinton"], {"fallback": "hinton", "alpha": 0}, ValueError, r"`alpha`.*in \(0, 1\)"),
])
def test_bad_searches_fail_before_any_training(loader, candidates, kwargs, error, match, tmp_path):
    options = {"search_epochs": 1, "cache_dir": tmp_path / "cache", **COMMON, **kwargs}
    with pytest.raises(error, match=match):
        select_strategy(teacher8(), student8(), loader, candidates=candidates, **options)
    assert not (tmp_path / "cache").exists()  # no candidate trained (each writes its result as it finishes)


def test_the_split_needs_a_tensor_loader(loader):
    batches = list(loader)
    with pytest.raises(TypeError, match="TensorLoader"):
        select_strategy(teacher8(), student8(), (batches, None), candidates=["pairwise", "uniform"], search_epochs=1, **COMMON)


@pytest.mark.parametrize("value", [0, 4, 1.5])
def test_stop_after_epochs_is_checked(value):
    with pytest.raises(ValueError, match=r"stop_after_epochs.*\[1, epochs=3\]"):
        FitConfig(epochs=3, stop_after_epochs=value)


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (1, 0), (0, 3), (5, 5), (9, 2), (2, 9), (40, 21), (130, 95)])
def test_mcnemar_p_value_is_the_binomial_tail(only_a, only_b):
    n = only_a + only_b
    by_hand = 1.0 if n == 0 else sum(math.comb(n, k) for k in range(only_a, n + 1)) / 2 ** n
    assert mcnemar_greater(only_a, only_b) == pytest.approx(by_hand, rel=1e-12, abs=1e-300)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_greater(-1, only_b)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 5000])
def test_packed_masks_read_back(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.7
    packed = pack_mask(mask)
    assert len(packed) == 2 * math.ceil(n / 8)
    assert torch.equal(unpack_mask(packed, n), mask)
    with pytest.raises(ValueError, match=f"packed mask of {n + 8} samples"):
        unpack_mask(packed, n + 8)
    if n % 8:
        with pytest.raises(ValueError, match="bits set past the end"):
            unpack_mask(pack_mask(torch.ones(n, dtype=torch.bool)), n - 1)


#: a candidate that cannot learn (its steps change nothing measurable): a fallback any real candidate beats
STUCK = {"strategy": "hinton", "lr": 1e-9}


def test_the_fallback_stays_unless_the_best_beats_it_significantly(loader, tmp_path):
    candidates = {"pairwise": {}, "sinkhorn": {}, "stuck": STUCK}
    teacher, student = teacher8(), student8_bn()
    sel = select_strategy(teacher, student, loader, candidates=candidates, search_epochs=2, heldout_fraction=0.25,
                          fallback="stuck", cache_dir=tmp_path, **COMMON)
    # each candidate's per-image held-out results, recomputed by hand (the same split, a fit of a copy)
    train, heldout = split_heldout(loader, 0.25, seed=COMMON["seed"])
    masks = {}
    for name, opts in candidates.items():
        copy_ = copy.deepcopy(student)
        fit(teacher, copy_, train, stop_after_epochs=2, **{**COMMON, "strategy": name, **opts})
        masks[name] = correct_mask(copy_, heldout)
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert torch.equal(unpack_mask(record["heldout_correct"], 128), masks[name]), name
        assert masks[name].sum().item() / len(masks[name]) == sel.scores[name], name
    best = max(["pairwise", "sinkhorn"], key=lambda n: (sel.scores[n], n == "pairwise"))
    assert sel.best == best and sel.fallback == "stuck" and sel.alpha == 0.05
    only_best, only_stuck = int((masks[best] & ~masks["stuck"]).sum()), int((~masks[best] & masks["stuck"]).sum())
    assert sel.mcnemar == {"candidate": best, "fallback": "stuck", "candidate_only": only_best, "fallback_only": only_stuck,
                           "p_value": mcnemar_greater(only_best, only_stuck)}
    assert sel.scores[best] - sel.scores["stuck"] > 0.1  # planted: the stuck fallback stays near chance
    assert sel.mcnemar["p_value"] < 0.01 and sel.choice == best
    assert f"{only_best} held-out images only {best} gets right, {only_stuck} only stuck" in sel.fallback_summary()
    assert sel.fallback_summary().endswith("(< 0.05)")
    # the same search at a level below its p-value keeps the fallback (nothing trains: all read back)
    strict = select_strategy(teacher, student, loader, candidates=candidates, search_epochs=2, heldout_fraction=0.25,
                             fallback="stuck", alpha=sel.mcnemar["p_value"] / 2, cache_dir=tmp_path, **COMMON)
    assert strict.cached == list(candidates) and strict.best == best and strict.choice == "stuck"
    assert f"(>= {strict.alpha})" in strict.fallback_summary()
    # the fallback as the best candidate: no test, it is the choice
    own = select_strategy(teacher, student, loader, candidates=candidates, search_epochs=2, heldout_fraction=0.25,
                          fallback=best, cache_dir=tmp_path, **COMMON)
    assert own.choice == best and own.mcnemar is None and own.fallback_summary() == ""


def test_per_image_results_are_those_fit_scored_under_channels_last(loader, tmp_path):
    """fit() scores a channels_last run on converted batches (FitResult.eval_model); the kept per-image results
    come from the same model, so they count to the held-out score."""
    options = {**COMMON, "channels_last": True}
    sel = select_strategy(teacher8(), student8_bn(), loader, candidates=["pairwise", "hinton"], search_epochs=1,
                          cache_dir=tmp_path, **options)
    result = fit(teacher8(), student8_bn(), loader, strategy="hinton", stop_after_epochs=1, **options)
    assert result.eval_model is not result.student and result.eval_model.model is result.student
    plain = fit(teacher8(), student8_bn(), loader, strategy="hinton", stop_after_epochs=1, **COMMON)
    assert plain.eval_model is plain.student
    for name in ("pairwise", "hinton"):
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert unpack_mask(record["heldout_correct"], sel.heldout_images).sum().item() / sel.heldout_images == sel.scores[name], name


def test_a_tie_with_the_fallback_keeps_the_fallback(loader):
    same = {"strategy": "uniform", "tau": 0.5}
    sel = select_strategy(teacher8(), student8(), loader, candidates={"a": same, "b": same}, search_epochs=1,
                          fallback="b", **COMMON)
    assert sel.best == "a"  # ties go to the earlier candidate
    assert sel.mcnemar == {"candidate": "a", "fallback": "b", "candidate_only": 0, "fallback_only": 0, "p_value": 1.0}
    assert sel.choice == "b"
    assert select_strategy(teacher8(), student8(), loader, candidates={"a": same, "b": same}, search_epochs=1,
                           **COMMON).choice == "a"  # without a fallback


def test_a_cache_without_per_image_results_retrains_only_what_the_test_needs(loader, tmp_path):
    candidates = {"pairwise": {}, "uniform": {}, "stuck": STUCK}
    args = dict(candidates=candidates, search_epochs=2, heldout_fraction=0.25, cache_dir=tmp_path, **COMMON)
    first = select_strategy(teacher8(), student8_bn(), loader, **args)
    assert first.choice != "stuck"
    files = {name: tmp_path / f"{name}.json" for name in candidates}
    for file in files.values():  # as written before per-image results were kept
        record = json.loads(file.read_text())
        del record["heldout_correct"]
        file.write_text(json.dumps(record))
    old = {name: json.loads(file.read_text()) for name, file in files.items()}
    plain = select_strategy(teacher8(), student8_bn(), loader, **args)  # no fallback: no per-image results needed
    assert plain.cached == list(candidates) and plain.choice == first.choice
    tested = select_strategy(teacher8(), student8_bn(), loader, fallback="stuck", **args)
    loser = next(name for name in ("pairwise", "uniform") if name != first.choice)
    assert tested.cached == [loser] and tested.best == first.choice
    assert "heldout_correct" not in json.loads(files[loser].read_text())
    for name in (first.choice, "stuck"):  # trained again: the same run, its first seconds kept, now with its results
        record = json.loads(files[name].read_text())
        assert record["curve"] == old[name]["curve"] and record["seconds"] == old[name]["seconds"]
        assert unpack_mask(record["heldout_correct"], tested.heldout_images).sum().item() / tested.heldout_images == tested.scores[name]
    assert tested.scores == first.scores and tested.mcnemar["candidate"] == first.choice
