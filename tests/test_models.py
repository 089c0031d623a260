"""Tests for align_kd.models: the registry, supervised training and the teacher cache."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import align_kd.models as models
from align_kd.data import TensorLoader
from align_kd.models import (
    MLP,
    MODELS,
    ResNetCIFAR,
    SmallCNN,
    SoftmaxEnsemble,
    build_model,
    evaluate,
    load_or_train_teacher,
    train_supervised,
)

torch.set_num_threads(1)


def _coloured_dataset(n_per_class=20, seed=0):
    """Easily learnable images: class k is a noisy solid colour (k-dependent), uint8 (N, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)  # (N,)
    palette = torch.tensor([[(k * 37) % 256, (k * 91) % 256, (k * 157) % 256] for k in range(10)])  # (10, 3)
    base = palette[labels].view(-1, 3, 1, 1).float()  # (N, 3, 1, 1)
    noise = torch.randn(len(labels), 3, 32, 32, generator=g) * 20  # (N, 3, 32, 32)
    images = (base + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


def _loaders(batch_size=25):
    images, labels = _coloured_dataset()
    test_images, test_labels = _coloured_dataset(n_per_class=5, seed=1)
    train = TensorLoader(images, labels, batch_size=batch_size, shuffle=True, seed=0)
    test = TensorLoader(test_images, test_labels, batch_size=50)
    return train, test


@pytest.mark.parametrize("name", sorted(MODELS))
def test_registry_models_give_logits(name):
    torch.manual_seed(0)
    model = build_model(name)
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert build_model(name, num_classes=7)(x).shape == (2, 7)


def test_plain_nets_are_built_from_module_activations():
    cnn = SmallCNN(width=8)
    assert isinstance(cnn, nn.Sequential)
    assert [type(m).__name__ for m in cnn].count("Conv2d") == 3
    assert [type(m).__name__ for m in cnn].count("Linear") == 2
    relus = [m for m in cnn.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4 and not any(r.inplace for r in relus)  # in-place would corrupt hooked BN outputs
    mlp = MLP(hidden=(32, 16))
    assert [name for name, _ in mlp.named_children()] == ["flatten", "block1", "block2", "head"]
    resnet = ResNetCIFAR(depth=14, width=4)
    assert [name for name, _ in resnet.named_children()][:4] == ["stem", "layer1", "layer2", "layer3"]
    assert len(resnet.layer1) == 2


def test_build_model_validates_name_and_kwargs():
    with pytest.raises(ValueError, match="cnn") as err:
        build_model("transformer")
    assert all(name in str(err.value) for name in MODELS)
    with pytest.raises(TypeError, match="width"):
        build_model("mlp", width=3)
    with pytest.raises(ValueError, match="6n"):
        build_model("resnet", depth=21)
    with pytest.raises(ValueError, match="width"):
        build_model("cnn", width=0)
    with pytest.raises(ValueError, match="hidden"):
        build_model("mlp", hidden=128)


def test_train_supervised_beats_chance_and_evaluate_restores_mode():
    train, test = _loaders()
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    before = evaluate(model, test)
    history = train_supervised(model, train, test, epochs=2, lr=0.05, progress=False)
    assert history["epoch"] == [1, 2]
    assert len(history["train_loss"]) == len(history["train_acc"]) == len(history["test_acc"]) == 2
    assert history["train_loss"][1] < history["train_loss"][0]
    assert history["test_acc"][-1] >= 0.6 > 0.1  # chance is 0.1
    assert history["lr"][-1] < 0.05 * 0.01  # the cosine schedule ended near zero
    model.train()
    acc = evaluate(model, test)
    assert model.training and acc == history["test_acc"][-1]
    model.eval()
    evaluate(model, test)
    assert not model.training
    assert acc > before


def test_train_supervised_validates_arguments():
    train, _ = _loaders()
    with pytest.raises(ValueError, match="epochs"):
        train_supervised(SmallCNN(width=4), train, epochs=0)
    with pytest.raises(ValueError, match="lr"):
        train_supervised(SmallCNN(width=4), train, epochs=1, lr=-1.0)


def test_teacher_cache_reuses_and_refuses_mismatch(tmp_path, monkeypatch, capsys):
    train, test = _loaders(batch_size=50)
    kwargs = {"hidden": [32]}
    first, info = load_or_train_teacher("mlp", kwargs, train, test, epochs=1, cache_dir=tmp_path,
                                        data_tag="colours", progress=False)
    assert info["cached"] is False
    assert info["path"].endswith(f"mlp-{info['key']}.pt") and (tmp_path / "teachers").is_dir()
    assert 0.0 <= info["test_acc"] <= 1.0

    def no_training(*args, **kwargs):
        raise AssertionError("a cached teacher must not be retrained")

    monkeypatch.setattr(models, "train_supervised", no_training)
    second, info2 = load_or_train_teacher("mlp", kwargs, train, test, epochs=1, cache_dir=tmp_path,
                                          data_tag="colours", progress=False)  # no_training above: a cache hit
    assert info2["cached"] is True and info2["key"] == info["key"] and info2["test_acc"] == info["test_acc"]
    assert "loaded cached teacher" in capsys.readouterr().out
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    assert evaluate(second, test) == info["test_acc"]

    # any change to the config is a different key (and here would need training)
    with pytest.raises(AssertionError, match="must not be retrained"):
        load_or_train_teacher("mlp", kwargs, train, test, epochs=1, cache_dir=tmp_path, data_tag="other")
    train.data_tag = "colours"  # an empty data_tag falls back to the loader's tag
    _, info_tagged = load_or_train_teacher("mlp", kwargs, train, test, epochs=1, cache_dir=tmp_path)
    assert info_tagged["cached"] is True and info_tagged["key"] == info["key"]
    train.data_tag = ""

    # a file whose stored config does not match its key is refused, not overwritten
    payload = torch.load(info["path"], weights_only=True)
    payload["config"] = payload["config"].replace('"epochs":1', '"epochs":9')
    torch.save(payload, info["path"])
    with pytest.raises(ValueError, match="retrain=True"):
        load_or_train_teacher("mlp", kwargs, train, test, epochs=1, cache_dir=tmp_path, data_tag="colours")
    assert torch.load(info["path"], weights_only=True)["config"] == payload["config"]

    monkeypatch.setattr(models, "train_supervised", train_supervised)
    _, info3 = load_or_train_teacher("mlp", kwargs, train, test, epochs=1, cache_dir=tmp_path,
                                     data_tag="colours", retrain=True, progress=False)
    assert info3["cached"] is False
    assert torch.load(info["path"], weights_only=True)["config"] != payload["config"]


def test_teacher_cache_validates_inputs(tmp_path):
    train, test = _loaders()
    with pytest.raises(ValueError, match="model name"):
        load_or_train_teacher("nope", {}, train, test, epochs=1, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        load_or_train_teacher("mlp", {"hidden": object()}, train, test, epochs=1, cache_dir=tmp_path)
    assert not (tmp_path / "teachers").exists()


def test_fastcnn_shapes_and_frozen_parts():
    from align_kd.models import FastCNN

    model = FastCNN(widths=(8, 16, 16))
    assert [n for n, _ in model.named_children()] == ["whiten", "act", "block1", "block2", "block3", "pool", "flatten",
                                                       "head", "scale"]
    x = torch.randn(2, 3, 32, 32)
    h = model.act(model.whiten(x))
    assert h.shape == (2, 24, 31, 31)
    h = model.block1(h)
    assert h.shape == (2, 8, 15, 15)
    assert model.block3(model.block2(h)).shape == (2, 16, 3, 3)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    assert not model.block1.bn1.weight.requires_grad and model.block1.bn1.bias.requires_grad
    # Dirac init: the first C_in filters of a conv pass their input channel through at the centre tap
    w = model.block2.conv2.weight
    assert torch.equal(w[:16, :, 1, 1], torch.eye(16)) and w[:16].abs().sum() == 16
    with pytest.raises(ValueError, match="three ints"):
        FastCNN(widths=(8, 16))


def test_train_supervised_schedule_groups_and_frozen_parameters():
    train, test = _loaders()
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    model.conv1.weight.requires_grad_(False)
    frozen = model.conv1.weight.detach().clone()
    epochs, steps = 4, len(train)
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() == 1]
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    history = train_supervised(model, train, test, epochs=epochs, lr=0.1, schedule="linear", warmup_epochs=1,
                               lr_start=0.2, lr_end=0.1, label_smoothing=0.1, progress=False,
                               param_groups=[{"params": matrices}, {"params": vectors, "lr_scale": 2.0}])
    assert torch.equal(model.conv1.weight, frozen)
    # closed form of the triangle at the end of each epoch (the factor for the next step)
    warm, total = steps, epochs * steps

    def factor(k):
        if k < warm:
            return 0.2 + 0.8 * (k + 1) / warm
        return 0.1 + 0.9 * (1 - (k - warm) / (total - warm))

    expected = [0.1 * factor(e * steps) for e in range(1, epochs)] + [0.1 * 0.1]
    assert history["lr"] == pytest.approx(expected, rel=1e-12)
    assert len(history["seconds"]) == epochs and history["test_acc"][-1] > 0.3
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        train_supervised(SmallCNN(width=4).requires_grad_(False), train, epochs=1, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        train_supervised(SmallCNN(width=4), train, epochs=1, schedule="step", progress=False)
    with pytest.raises(ValueError, match="warmup_epochs"):
        train_supervised(SmallCNN(width=4), train, epochs=1, warmup_epochs=1, progress=False)


def test_flip_evaluation_averages_mirrored_logits():
    _, test = _loaders()

    class Asymmetric(nn.Module):
        """Predicts from the left half only: flipping the image changes the prediction."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(3 * 32 * 16, 10)

        def forward(self, x):
            return self.fc(x[..., :16].flatten(1))

    model = Asymmetric()
    x, y = next(iter(test))
    with torch.no_grad():
        manual = ((model(x) + model(x.flip(-1))) / 2).argmax(1)
    flip_acc = evaluate(model, TensorLoader(test.images[: len(y)], test.labels[: len(y)], batch_size=len(y)), flip=True)
    assert flip_acc == pytest.approx((manual == y).float().mean().item())


def test_lookahead_ends_at_the_closed_form_slow_average():
    """One sync (5 steps in all): the model ends at init + (1 - 0.95**5) * (plain weights - init),
    weights and BatchNorm statistics alike, where 'plain' is the same run without lookahead."""
    images, labels = _coloured_dataset()  # 200 images: 5 steps of 40
    runs = {}
    for lookahead in (False, True):
        torch.manual_seed(0)
        model = ResNetCIFAR(depth=8, width=4)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        train = TensorLoader(images, labels, batch_size=40, shuffle=True, seed=0)
        train_supervised(model, train, epochs=1, lr=0.1, lookahead=lookahead, progress=False)
        runs[lookahead] = model.state_dict()
    keep = 1 - 0.95 ** 5
    floats = [k for k, v in init.items() if v.is_floating_point()]
    assert any("running_mean" in k for k in floats)
    for k in floats:
        expected = init[k] + keep * (runs[False][k] - init[k])
        assert torch.allclose(runs[True][k], expected, atol=1e-6), k
    moved = [k for k in floats if not torch.equal(runs[False][k], init[k])]
    assert moved and all(not torch.allclose(runs[True][k], runs[False][k]) for k in moved)
    assert torch.equal(runs[True]["stem.bn.num_batches_tracked"], runs[False]["stem.bn.num_batches_tracked"])


def test_lookahead_before_its_first_sync_keeps_the_trained_model():
    """Fewer steps than one Lookahead period: the slow copy is still the init, so the model must end
    as plainly trained (bitwise the run without Lookahead), not be reset to its initial weights."""
    images, labels = _coloured_dataset()
    runs = {}
    for lookahead in (False, True):
        torch.manual_seed(0)
        model = SmallCNN(width=4)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        train = TensorLoader(images[:120], labels[:120], batch_size=40, shuffle=True, seed=0)  # 3 steps < 5
        train_supervised(model, train, epochs=1, lr=0.1, lookahead=lookahead, progress=False)
        runs[lookahead] = model.state_dict()
    for k, v in runs[False].items():
        assert torch.equal(runs[True][k], v), k
    assert not torch.equal(runs[True]["conv1.weight"], init["conv1.weight"])


def test_param_group_train_epochs_freezes_the_group_after_its_epochs():
    """A group with train_epochs=1 ends bitwise where it stood when epoch 2 began (snapshotted by the
    loader's set_epoch); a group with 0 never moves; the other group keeps training throughout."""
    images, labels = _coloured_dataset()

    class Snapshots(TensorLoader):
        """Records the model's parameters each time train_supervised starts an epoch."""

        def set_epoch(self, epoch):
            super().set_epoch(epoch)
            self.seen.append({n: p.detach().clone() for n, p in model.named_parameters()})

    for limit in (1, 0):
        torch.manual_seed(0)
        model = SmallCNN(width=4)
        vectors = [n for n, p in model.named_parameters() if p.dim() == 1]
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1]},
                  {"params": [p for p in model.parameters() if p.dim() == 1], "train_epochs": limit}]
        train = Snapshots(images, labels, batch_size=25, shuffle=True, seed=0)
        train.seen = []
        train_supervised(model, train, epochs=3, lr=0.1, progress=False, param_groups=groups)
        final = dict(model.named_parameters())
        start, after_limit = train.seen[0], train.seen[limit]
        assert vectors
        for n in vectors:
            assert torch.equal(final[n], after_limit[n]), n
            assert torch.equal(final[n], start[n]) == (limit == 0), n
        assert not torch.equal(final["conv1.weight"], train.seen[-1]["conv1.weight"])  # still training in epoch 3
    with pytest.raises(ValueError, match="train_epochs"):
        train_supervised(SmallCNN(width=4), train, epochs=1, progress=False,
                         param_groups=[{"params": list(SmallCNN(width=4).parameters()), "train_epochs": -1}])


def test_translate_evaluation_matches_the_six_view_closed_form():
    """translate=True: 1/2 the (flip-averaged) logits of the image plus 1/4 each of the image shifted
    one pixel up-left and down-right with reflected borders, rebuilt here with numpy's own padding."""
    import numpy as np

    _, test = _loaders()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x, y = next(iter(test))
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect"))  # (B, 3, 34, 34)
    views = [x, padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]]
    with torch.no_grad():
        for flip in (False, True):
            logit = [(model(v) + model(v.flip(-1))) / 2 if flip else model(v) for v in views]
            manual = (0.5 * logit[0] + 0.25 * logit[1] + 0.25 * logit[2]).argmax(1)
            loader = TensorLoader(x, y, batch_size=len(y))
            acc = evaluate(model, loader, flip=flip, translate=True)
            assert acc == pytest.approx((manual == y).float().mean().item())
            assert not torch.equal(manual, logit[0].argmax(1))  # the views do change predictions


@pytest.mark.parametrize("average", [None, "swa", "swa+kd"])
def test_train_supervised_resumes_bitwise_after_an_interruption(tmp_path, average):
    """Ctrl-C in the middle of epoch 2 of 3, then a fresh model resumed from the checkpoint of epoch 1:
    it ends bitwise where the uninterrupted run ends (weights, BatchNorm statistics, Lookahead's slow
    copy or SWA's running mean, schedule, history), in channels_last and with a frozen-after-1-epoch group."""
    images, labels = _coloured_dataset()

    class InterruptedLoader(TensorLoader):
        """Raises KeyboardInterrupt at the third batch of epoch ``stop_epoch`` (0-based)."""

        stop_epoch = None

        def __iter__(self):
            epoch = self.epoch
            for k, batch in enumerate(super().__iter__()):
                if epoch == self.stop_epoch and k == 2:
                    raise KeyboardInterrupt
                yield batch

    def run(stop_epoch, init_seed, **kwargs):
        torch.manual_seed(init_seed)
        # width 8: in channels_last, a 1x1 stride-2 shortcut with fewer than 8 input channels hits oneDNN's
        # AVX2 weight-gradient bug (uxlfoundation/oneDNN#6035: heap corruption or wrong gradients)
        model = ResNetCIFAR(depth=8, width=8)
        loader = InterruptedLoader(images, labels, batch_size=25, shuffle=True, augment=True, seed=3)
        options = dict(lookahead=True) if average is None else dict(average="swa", schedule="constant", epoch_offset=4)
        if average == "swa+kd":  # distilling from a fixed teacher (its own init seed)
            torch.manual_seed(7)
            options.update(teacher=ResNetCIFAR(depth=8, width=8), kd_weight=0.5, kd_temperature=2.0)
            torch.manual_seed(init_seed)
            model = ResNetCIFAR(depth=8, width=8)
        loader.stop_epoch = None if stop_epoch is None else stop_epoch + options.get("epoch_offset", 0)
        groups = [{"params": [p for p in model.parameters() if p.dim() > 1]},
                  {"params": [p for p in model.parameters() if p.dim() == 1], "lr_scale": 2.0, "train_epochs": 1}]
        history = train_supervised(model, loader, epochs=3, lr=0.1, warmup_epochs=1, channels_last=True,
                                   param_groups=groups, progress=False, **options, **kwargs)
        return model, history

    plain, plain_history = run(None, init_seed=0)
    folder = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run(1, init_seed=0, checkpoint_dir=folder)
    assert [p.name for p in sorted(folder.iterdir())] == ["checkpoint-epoch0001.pt"]  # the partial epoch 2 is not saved
    resumed, resumed_history = run(None, init_seed=1, checkpoint_dir=folder, resume=True)  # a different init: overwritten
    for name, value in plain.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    for key in ("epoch", "train_loss", "train_acc", "lr"):
        assert resumed_history[key] == plain_history[key], key
    assert len(resumed_history["seconds"]) == 3 and resumed_history["wall_seconds"] >= sum(resumed_history["seconds"])
    assert [p.name for p in sorted(folder.iterdir())] == ["checkpoint-epoch0002.pt", "checkpoint-epoch0003.pt"]
    # resuming a finished run trains nothing more and ends at the same weights
    again, _ = run(None, init_seed=2, checkpoint_dir=folder, resume=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_train_supervised_checkpoint_misuse_is_refused_before_training(tmp_path):
    images, labels = _coloured_dataset()
    train = TensorLoader(images, labels, batch_size=50, shuffle=True, seed=0)
    folder = tmp_path / "run"
    torch.manual_seed(0)
    train_supervised(SmallCNN(width=4), train, epochs=2, lr=0.1, progress=False, checkpoint_dir=folder)
    model = SmallCNN(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="already holds 2 checkpoint.*resume=True"):
        train_supervised(model, train, epochs=2, lr=0.1, progress=False, checkpoint_dir=folder)
    with pytest.raises(ValueError, match=r"different training run \(lr: checkpoint 0.1, now 0.2\)"):
        train_supervised(model, train, epochs=2, lr=0.2, progress=False, checkpoint_dir=folder, resume=True)
    with pytest.raises(ValueError, match="model: checkpoint 'SmallCNN', now 'MLP'"):
        train_supervised(MLP(hidden=(8,)), train, epochs=2, lr=0.1, progress=False, checkpoint_dir=folder, resume=True)
    with pytest.raises(ValueError, match="the model does not match the checkpoint's weights"):
        train_supervised(SmallCNN(width=8), train, epochs=2, lr=0.1, progress=False, checkpoint_dir=folder, resume=True)
    with pytest.raises(ValueError, match="teacher: checkpoint None, now 'MLP'"):
        train_supervised(model, train, epochs=2, lr=0.1, progress=False, checkpoint_dir=folder, resume=True,
                         teacher=MLP(hidden=(8,)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing trained
    newest = folder / "checkpoint-epoch0002.pt"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated: falls back to epoch 1, with a warning
    with pytest.warns(RuntimeWarning, match="Resuming from epoch 1"):
        history = train_supervised(model, train, epochs=2, lr=0.1, progress=False, checkpoint_dir=folder, resume=True)
    assert history["epoch"] == [1, 2]


def test_swa_ends_at_the_mean_of_the_epoch_end_weights():
    """Oracle: at a constant learning rate a run of k epochs is the first k epochs of a longer one, so
    SWA over 3 epochs must end at the mean of the plain runs' weights after 1, 2 and 3 epochs (a model
    without BatchNorm, so nothing is recomputed). The loader sees epochs offset, offset + 1, ..."""
    images, labels = _coloured_dataset()

    class Epochs(TensorLoader):
        def set_epoch(self, epoch):
            super().set_epoch(epoch)
            self.seen.append(epoch)

    def run(epochs, average=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))
        train = Epochs(images, labels, batch_size=40, shuffle=True, augment=True, seed=0)
        train.seen = []
        history = train_supervised(model, train, epochs=epochs, lr=0.05, schedule="constant", average=average,
                                   epoch_offset=7, progress=False)
        return model.state_dict(), history, train.seen

    plain = [run(k)[0] for k in (1, 2, 3)]
    swa, history, seen = run(3, "swa")
    assert seen == [7, 8, 9, 10]  # three training epochs, then the BatchNorm pass at epoch offset + 3
    assert history["lr"] == [0.05, 0.05, 0.05]  # constant, to the end
    for name, value in swa.items():
        expected = sum(run_[name] for run_ in plain) / 3
        assert torch.allclose(value, expected, atol=1e-6), name
        assert not torch.allclose(value, plain[-1][name], atol=1e-4), name  # the mean is not the last epoch


def test_swa_recomputes_batchnorm_statistics_over_the_training_loader():
    """Oracle: a BatchNorm on the input itself ends with the equal-weight mean over the batches (of the
    loader at epoch offset + epochs) of each batch's channel mean and unbiased variance."""
    images, labels = _coloured_dataset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    train = TensorLoader(images, labels, batch_size=40, shuffle=True, augment=True, seed=0)
    train_supervised(model, train, epochs=2, lr=0.05, schedule="constant", average="swa", epoch_offset=3,
                     progress=False)
    train.set_epoch(5)
    batches = [x.double() for x, _ in train]
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])  # (batches, 3)
    variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in batches])  # (batches, 3), unbiased
    bn = model[0]
    assert torch.allclose(bn.running_mean.double(), means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), variances.mean(0), rtol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # update_bn restores the momentum; the model ends in eval


def test_swa_options_are_checked_before_training():
    train, _ = _loaders()
    model = SmallCNN(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="average to be None or 'swa'.*'ema'"):
        train_supervised(model, train, epochs=1, average="ema", progress=False)
    with pytest.raises(ValueError, match="two weight averages"):
        train_supervised(model, train, epochs=1, average="swa", lookahead=True, progress=False)
    with pytest.raises(ValueError, match="epoch_offset to be an int >= 0"):
        train_supervised(model, train, epochs=1, epoch_offset=-1, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_distilling_step_matches_the_closed_form_gradient():
    """Oracle: one Nesterov SGD step (momentum m, no weight decay, constant lr) of a linear model moves
    W by -lr (1 + m) g with g written out by hand: the gradients in the student's logits s of
    cross-entropy, softmax(s) - onehot, and of T^2 KL(softmax(t / T) || softmax(s / T)),
    T (softmax(s / T) - softmax(t / T)), mixed (1 - w) : w and averaged over the batch."""
    images, labels = _coloured_dataset(n_per_class=2)
    loader = TensorLoader(images, labels, batch_size=len(labels))
    x, y = next(iter(loader))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10, bias=False))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10, bias=False))
    with torch.no_grad():
        teacher[1].weight.mul_(20)  # confident, varied targets
    w0, t0 = model[1].weight.detach().double().clone(), teacher[1].weight.detach().clone()
    lr, m, w, T = 0.1, 0.9, 0.3, 2.0
    teacher.train()
    train_supervised(model, loader, epochs=1, lr=lr, momentum=m, weight_decay=0.0, schedule="constant",
                     teacher=teacher, kd_weight=w, kd_temperature=T, progress=False)
    xs = x.flatten(1).double()  # (B, D)
    s, t = xs @ w0.T, xs @ t0.double().T  # (B, K) logits
    onehot = torch.nn.functional.one_hot(y, 10).double()
    dlogits = (1 - w) * (s.softmax(1) - onehot) + w * T * ((s / T).softmax(1) - (t / T).softmax(1))  # (B, K)
    g = dlogits.T @ xs / len(y)  # (K, D)
    expected = w0 - lr * (1 + m) * g
    assert torch.allclose(model[1].weight.double(), expected, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(expected, w0 - lr * (1 + m) * (s.softmax(1) - onehot).T @ xs / len(y), atol=1e-4)
    assert torch.equal(teacher[1].weight, t0) and not teacher.training  # the teacher is read, in eval mode


def test_softmax_ensemble_is_the_mean_probability():
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(12, 5)) for _ in range(3)]
    x = torch.randn(4, 3, 2, 2)
    probs = torch.stack([m(x).softmax(1) for m in members]).mean(0)  # (4, 5)
    assert torch.allclose(SoftmaxEnsemble(members)(x).softmax(1), probs, atol=1e-6)
    assert torch.allclose(SoftmaxEnsemble(members)(x).exp().sum(1), torch.ones(4), atol=1e-6)  # log-probabilities
    assert torch.allclose(SoftmaxEnsemble(members[:1])(x), members[0](x).log_softmax(1), atol=1e-6)
    with pytest.raises(ValueError, match="at least one member"):
        SoftmaxEnsemble([])


def test_distillation_options_are_checked_before_training():
    train, _ = _loaders()
    model = SmallCNN(width=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for bad, match in ((dict(kd_weight=0.0), r"kd_weight in \(0, 1\].*0.0"), (dict(kd_weight=1.5), "1.5"),
                       (dict(kd_temperature=0.0), "kd_temperature to be a positive"),
                       (dict(kd_temperature=float("nan")), "nan")):
        with pytest.raises(ValueError, match=match):
            train_supervised(model, train, epochs=1, teacher=SmallCNN(width=4), progress=False, **bad)
    with pytest.raises(TypeError, match="teacher to be an nn.Module.*dict"):
        train_supervised(model, train, epochs=1, teacher={"weights": 1}, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
