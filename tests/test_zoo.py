"""The teacher zoo: shipped weights are what their cards say, the recipe runs and is deterministic.

Oracles: each shipped teacher's accuracy re-measured on the full 10,000-image test split of the
shared archive against its card; sha256 of the weight file recomputed with hashlib; a damaged file
refused; two smoke runs of the recipe with the same seed give bitwise the same weights.
"""
import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields, replace

import pytest
import torch

from align_kd import zoo
from align_kd.data import CIFAR10_MEAN, CIFAR10_STD, TensorLoader, load_cifar10
from align_kd.models import evaluate
from shared_archive import ARCHIVE


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_cache")


def test_every_recipe_ships_and_cards_are_complete():
    assert zoo.list_teachers() == sorted(zoo.RECIPES)
    for name in zoo.list_teachers():
        card = json.loads((zoo.WEIGHTS_DIR / f"{name}.json").read_text())
        for key in ("test_acc", "test_acc_flip", "sha256", "mean", "std", "params", "train_seconds", "recipe", "seed", "threads"):
            assert key in card, (name, key)
        assert card["sha256"] == hashlib.sha256((zoo.WEIGHTS_DIR / f"{name}.pt").read_bytes()).hexdigest()
        assert card["mean"] == list(CIFAR10_MEAN) and card["std"] == list(CIFAR10_STD)
        assert card["test_images"] == 10_000 and card["train_images"] == 50_000
        model, loaded = zoo.load_teacher(name)
        assert loaded == card and not model.training
        assert card["params"] == sum(p.numel() for p in model.parameters())
        # `zoo train NAME` regenerates what the card records: every recipe field the card holds is the
        # recipe's, and a field the card predates is at its default (the behaviour before it existed)
        recipe, defaults = asdict(zoo.RECIPES[name]), {f.name: f.default for f in fields(zoo.Recipe)}
        for key, value in json.loads(json.dumps(recipe)).items():  # as JSON holds it: tuples are lists
            held = card["recipe"][key] if key in card["recipe"] else json.loads(json.dumps(defaults[key]))
            assert held == value, (name, key, held, value)


@pytest.mark.parametrize("name", sorted(zoo.RECIPES))
def test_shipped_teacher_accuracy_matches_its_card(name, cache):
    model, card = zoo.load_teacher(name)
    x, y = load_cifar10(ARCHIVE, split="test", cache_dir=cache)
    assert len(y) == 10_000
    test = TensorLoader(x, y, batch_size=250)  # 1.5-1.9x faster than batches of 1000 for the ResNets here, same accuracy
    threads = torch.get_num_threads()  # the suite runs on one thread (test_models sets it); the cards were made on 2
    torch.set_num_threads(max(threads, min(2, os.cpu_count() or 1)))
    try:
        acc = evaluate(model, test)
    finally:
        torch.set_num_threads(threads)
    # thread counts change float summation order; a handful of borderline images may flip
    assert abs(acc - card["test_acc"]) <= 5e-4, (acc, card["test_acc"])


def test_damaged_weights_are_refused(tmp_path):
    name = zoo.list_teachers()[0]
    for suffix in (".pt", ".json"):
        shutil.copy(zoo.WEIGHTS_DIR / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    zoo.load_teacher(name, weights_dir=tmp_path)  # an intact copy loads
    raw = bytearray((tmp_path / f"{name}.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / f"{name}.pt").write_bytes(bytes(raw))
    with pytest.raises(zoo.TeacherCheckError, match=rf"weights of zoo teacher '{name}'.*sha256.*zoo train {name}"):
        zoo.load_teacher(name, weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="zoo train"):
        zoo.load_teacher(name, weights_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="zoo teacher name"):
        zoo.load_teacher("resnet1000")


def test_recipe_smoke_run_is_deterministic_and_round_trips(tmp_path, cache):
    cards = []
    for run in ("a", "b"):
        model, card = zoo.train_teacher("fastcnn", data_root=ARCHIVE, cache_dir=cache, weights_dir=tmp_path / run,
                                        train_limit=512, test_limit=200, epochs=2, progress=False,
                                        checkpoint_dir=tmp_path / "checkpoints" if run == "b" else None)
        cards.append(card)
    assert cards[0]["sha256"] == cards[1]["sha256"]  # the same seed: bitwise the same weights
    # a run resumed from its epoch-1 checkpoint (epoch 2's deleted) ends with the same weights
    (tmp_path / "checkpoints" / "checkpoint-epoch0002.pt").unlink()
    _, resumed = zoo.train_teacher("fastcnn", data_root=ARCHIVE, cache_dir=cache, weights_dir=tmp_path / "r",
                                   train_limit=512, test_limit=200, epochs=2, progress=False,
                                   checkpoint_dir=tmp_path / "checkpoints", resume=True)
    assert resumed["sha256"] == cards[0]["sha256"] and resumed["history"]["train_loss"] == cards[0]["history"]["train_loss"]
    assert resumed["train_seconds"] >= resumed["history"]["wall_seconds"] >= sum(resumed["history"]["seconds"])
    assert cards[0]["test_acc"] == cards[1]["test_acc"] and cards[0]["train_images"] == 512
    assert cards[0]["recipe"]["epochs"] == 2 and cards[0]["history"]["epoch"] == [1, 2]
    assert cards[0]["history"]["train_loss"][1] < cards[0]["history"]["train_loss"][0]
    loaded, card = zoo.load_teacher("fastcnn", weights_dir=tmp_path / "a")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    _, other = zoo.train_teacher("fastcnn", data_root=ARCHIVE, cache_dir=cache, weights_dir=tmp_path / "c",
                                 train_limit=512, test_limit=200, epochs=2, progress=False, seed=1)
    assert other["sha256"] != cards[0]["sha256"] and other["seed"] == 1


def test_recipe_override_trains_the_given_recipe_and_needs_a_scratch_folder(tmp_path, cache):

    from align_kd.models import FastCNN

    study = replace(zoo.RECIPES["fastcnn"], model_kwargs={"widths": [8, 16, 16]}, lookahead=True,
                    padding_mode="reflect", flip="alternate", whiten_bias_epochs=1)
    with pytest.raises(ValueError, match="weights_dir"):
        zoo.train_teacher("fastcnn", recipe=study)
    with pytest.raises(ValueError, match="whiten_bias_epochs=1 but whiten=False"):
        zoo.train_teacher("study", recipe=replace(study, whiten=False), weights_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # refused before any work
    model, card = zoo.train_teacher("study", recipe=study, data_root=ARCHIVE, cache_dir=cache, weights_dir=tmp_path,
                                train_limit=512, test_limit=200, epochs=1, progress=False)
    assert card["recipe"]["model_kwargs"]["widths"] == [8, 16, 16] and card["recipe"]["lookahead"] is True
    assert card["recipe"]["padding_mode"] == "reflect" and card["recipe"]["flip"] == "alternate"
    assert 0 <= card["test_acc_tta"] <= 1 and bool(model.whiten.bias.abs().sum() > 0)  # the stem's bias trained
    assert card["params"] == sum(p.numel() for p in FastCNN((8, 16, 16)).parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json", "study.pt"]
    assert "study" not in zoo.list_teachers()


def test_swa_stage_from_its_first_stage_teacher_ends_where_training_from_scratch_ends(tmp_path, cache):
    """A two-stage recipe (first stage, then SWA) trained from scratch, and its SWA stage started from a
    teacher that its first stage wrote, give bitwise the same weights; a teacher that is not that first
    stage is refused before any training."""
    first = replace(zoo.RECIPES["resnet20"], model_kwargs={"depth": 8, "width": 4}, batch_size=128, lookahead=True)
    two = replace(first, swa_epochs=2, swa_lr=0.05)
    kw = dict(data_root=ARCHIVE, cache_dir=cache, train_limit=512, test_limit=200, epochs=1, progress=False)
    _, scratch = zoo.train_teacher("two", recipe=two, weights_dir=tmp_path / "scratch", **kw)
    zoo.train_teacher("first", recipe=first, weights_dir=tmp_path / "staged", **kw)
    first_card = json.loads((tmp_path / "staged" / "first.json").read_text())
    _, staged = zoo.train_teacher("two", recipe=two, weights_dir=tmp_path / "staged", from_teacher="first", **kw)
    assert staged["sha256"] == scratch["sha256"] and staged["test_acc"] == scratch["test_acc"]
    assert staged["from_teacher"] == {"name": "first", "sha256": first_card["sha256"]} and "from_teacher" not in scratch
    assert staged["test_acc_before_swa"] == scratch["test_acc_before_swa"] == first_card["test_acc"]
    assert scratch["history_swa"]["epoch"] == [1, 2] and scratch["history_swa"]["lr"] == [0.05, 0.05]
    assert scratch["recipe"]["swa_epochs"] == 2 and scratch["history"]["epoch"] == [1]
    assert staged["train_seconds"] == pytest.approx(first_card["train_seconds"] + staged["history_swa"]["wall_seconds"], abs=0.1)
    staged_files = sorted(p.name for p in (tmp_path / "staged").iterdir())
    for wrong, match in ((dict(recipe=replace(two, lr=0.3)), r"not the first stage of recipe 'two' \(lr: first has 0.2, two needs 0.3\)"),
                         (dict(recipe=two, seed=1), r"seed: first has 0, two needs 1"),
                         (dict(recipe=first), "no second stage"),
                         (dict(recipe=replace(two, swa_lr=0.0)), "swa_lr=0.0")):
        with pytest.raises(ValueError, match=match):
            zoo.train_teacher("two", weights_dir=tmp_path / "staged", from_teacher="first", **{**kw, **wrong})
    with pytest.raises(FileNotFoundError, match="'missing' has no weights"):
        zoo.train_teacher("two", recipe=two, weights_dir=tmp_path / "staged", from_teacher="missing", **kw)
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == staged_files  # nothing written


def test_swa_stage_distils_from_checked_shipped_teachers(tmp_path, cache):
    """An SWA stage with swa_teachers trains on (1 - w) CE + w KD from their mean softmax and records
    each teacher (name, the sha256 of the file that was read, its accuracy); misuse is refused before
    any training."""
    first = replace(zoo.RECIPES["resnet20"], model_kwargs={"depth": 8, "width": 4}, batch_size=128)
    kw = dict(data_root=ARCHIVE, cache_dir=cache, train_limit=512, test_limit=200, epochs=1, progress=False)
    plain = replace(first, swa_epochs=1, swa_lr=0.05)
    distilled = replace(plain, swa_teachers=("fastcnn", "fastcnn-lookahead"), swa_kd_weight=0.5)
    for wrong, error, match in ((replace(first, swa_teachers=("fastcnn",)), ValueError, "no SWA stage"),
                                (replace(distilled, swa_teachers=("resnet1000",)), ValueError, "zoo teacher name"),
                                (replace(distilled, swa_kd_weight=0.0), ValueError, r"swa_kd_weight in \(0, 1\]")):
        with pytest.raises(error, match=match):
            zoo.train_teacher("d", recipe=wrong, weights_dir=tmp_path / "wrong", **kw)
    assert not (tmp_path / "wrong").exists()  # refused before anything was written
    _, without = zoo.train_teacher("p", recipe=plain, weights_dir=tmp_path, **kw)
    _, card = zoo.train_teacher("d", recipe=distilled, weights_dir=tmp_path, **kw)
    assert card["test_acc_before_swa"] == without["test_acc_before_swa"]  # the same first stage
    assert card["history"]["train_loss"] == without["history"]["train_loss"]
    assert card["history_swa"]["train_loss"] != without["history_swa"]["train_loss"]  # the stage's loss changed
    assert card["sha256"] != without["sha256"] and "distilled_from" not in without
    assert [t["name"] for t in card["distilled_from"]] == ["fastcnn", "fastcnn-lookahead"]
    for record in card["distilled_from"]:
        shipped = json.loads((zoo.WEIGHTS_DIR / f"{record['name']}.json").read_text())
        assert record == {k: shipped[k] for k in ("name", "sha256", "test_acc", "train_seconds")}
    assert card["recipe"]["swa_teachers"] == ["fastcnn", "fastcnn-lookahead"] and card["recipe"]["swa_kd_temperature"] == 1.0


def test_whitening_init_decorrelates_patches():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 3, 12, 12, generator=g)
    images = base + 0.8 * base.roll(1, dims=1)  # correlated channels
    conv = torch.nn.Conv2d(3, 24, 2)
    zoo.whiten_init(conv, images, eps=0.0)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images.double(), conv.weight.double())  # (N, 24, 11, 11)
    flat = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-2)
    assert torch.equal(conv.weight[12:], -conv.weight[:12]) and torch.equal(conv.bias, torch.zeros(24))
    with pytest.raises(ValueError, match="2 \\* C \\* k \\* k"):
        zoo.whiten_init(torch.nn.Conv2d(3, 8, 2), images)


def test_zoo_train_command_refuses_resume_without_a_checkpoint_folder():
    from align_kd.__main__ import main

    with pytest.raises(SystemExit, match="--resume needs --checkpoint-dir"):
        main(["zoo", "train", "fastcnn", "--resume"])


def test_zoo_list_command_prints_every_card(capsys):
    from align_kd.__main__ import main

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    for name in zoo.list_teachers():
        card = zoo.load_teacher(name)[1]
        assert f"{name}" in out and f"test acc {card['test_acc']:.4f}" in out
