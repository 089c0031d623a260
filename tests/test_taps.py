"""Layer discovery and capture (align_kd.taps).

Oracles: planted tap lists for architectures whose structure is known, a second independent tapping
method (torchvision's ``create_feature_extractor``, an FX rewrite, against our forward hooks),
hand-computed forwards for a custom module, and invariances (the model is left exactly as it was).
"""
import pytest
import torch
from torch import nn

torch.set_num_threads(1)

import torchvision  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from align_kd import FeatureTap, describe_layers, discover_layers  # noqa: E402
from align_kd.taps import TapInfo, feature_kind  # noqa: E402


# ----------------------------------------------------------------------------------------------
# models


def plain_cnn() -> nn.Sequential:
    """3 conv + 2 linear layers; the taps are after each activation/pool and the logits."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 0 1 2  -> tap "2"
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 3..6 -> "6"
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),  # 7 8 9 -> "8" (a reshape is never a tap)
        nn.Linear(16 * 8 * 8, 32), nn.ReLU(),  # 10 11 -> "11"
        nn.Linear(32, 10),  # 12 -> "12" (logits)
    )


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class SkipTwice(nn.Module):
    """A residual connection and a module (`shared`) called twice in one forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.act(self.stem(x))
        h = h + self.shared(h)  # skip connection around the first call
        h = self.shared(h)  # second call of the same module
        return self.fc(self.pool(h).flatten(1))


class AuxAfterLogits(nn.Module):
    """The logits layer (`fc`) is not the last module to run: an auxiliary head runs after it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU())
        self.fc = nn.Linear(16, 10)
        self.proj = nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        out = self.fc(h)
        self.aux = self.proj(h)  # computed after the logits, not returned
        return out


def small_vit():
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10
    )


@pytest.fixture(scope="module")
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


# ----------------------------------------------------------------------------------------------
# discovery on known architectures (planted answers)


def test_plain_cnn_taps_after_activation_and_pool(x32):
    model = plain_cnn()
    names = discover_layers(model, x32)
    assert names == ["2", "6", "8", "11", "12"]
    mods = dict(model.named_modules())
    # taps sit after the activation / pooling that closes each weight layer's group
    assert isinstance(mods["2"], nn.MaxPool2d)
    assert isinstance(mods["6"], nn.MaxPool2d)
    assert isinstance(mods["8"], nn.ReLU)  # before the Flatten: the tap keeps its (C, H, W) layout
    assert isinstance(mods["11"], nn.ReLU)
    assert isinstance(mods["12"], nn.Linear) and mods["12"].out_features == 10


def test_mlp_taps(x32):
    assert discover_layers(mlp(), x32) == ["2", "4", "5"]


def test_resnet18_taps(resnet18, x32):
    names = discover_layers(resnet18, x32)
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert names == ["maxpool", *blocks, "fc"]
    shapes = {i.name: i.shape for i in describe_layers(resnet18, x32)}
    assert shapes["maxpool"] == (64, 8, 8)
    assert shapes["layer1.1"] == (64, 8, 8)
    assert shapes["layer2.0"] == (128, 4, 4)
    assert shapes["layer4.1"] == (512, 1, 1)
    assert shapes["fc"] == (10,)


def test_mobilenet_v2_taps(x32):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    names = discover_layers(model, x32)
    assert names == [f"features.{k}" for k in range(len(model.features))] + ["classifier"]
    assert len(model.features) == 19


def test_vit_taps_are_encoder_blocks_with_token_shapes(x32):
    model = small_vit()
    names = discover_layers(model, x32)
    assert names == ["conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "heads"]
    infos = {i.name: i for i in describe_layers(model, x32)}
    n_tokens = (32 // 8) ** 2 + 1  # patches + class token
    for name in names[1:3]:
        assert infos[name].shape == (n_tokens, 16)
        assert infos[name].kind == "tokens"
    assert infos["heads"].shape == (10,) and infos["heads"].kind == "vector"
    assert infos["conv_proj"].kind == "map"


def test_skip_connection_and_module_called_twice(x32):
    model = SkipTwice()
    x = x32[:, :, :16, :16]
    infos = describe_layers(model, x)
    assert [i.name for i in infos] == ["stem", "act", "shared:0", "shared:1", "pool", "fc"]
    # groups: stem+act -> "act"; shared call 0 alone -> "shared:0"; shared call 1 + pool -> "pool"; fc
    assert discover_layers(model, x) == ["act", "shared:0", "pool", "fc"]

    with FeatureTap(model, ["shared:0", "shared:1", "act", "fc"]) as tap:
        (s0, s1, act, fc), out = tap(x)
    with torch.no_grad():  # the forward by hand
        h = model.act(model.stem(x))
        e0 = model.shared(h)
        e1 = model.shared(h + e0)
        e_out = model.fc(model.pool(e1).flatten(1))
    torch.testing.assert_close(act, h, rtol=0, atol=0)
    torch.testing.assert_close(s0, e0, rtol=0, atol=0)
    torch.testing.assert_close(s1, e1, rtol=0, atol=0)
    torch.testing.assert_close(fc, e_out, rtol=0, atol=0)
    torch.testing.assert_close(out, e_out, rtol=0, atol=0)
    assert not torch.allclose(s0, s1)  # the two calls are distinct taps


def test_logits_layer_is_last_even_when_other_modules_run_after_it():
    model = AuxAfterLogits()
    names = discover_layers(model, torch.randn(2, 3, 4, 4))
    assert names[-1] == "fc"
    assert set(names) == {"body", "fc", "proj"}


@pytest.mark.parametrize("factory", [plain_cnn, mlp, SkipTwice, small_vit])
def test_logits_layer_output_is_the_model_output(factory, x32):
    model = factory().eval()
    x = x32[:, :, :16, :16] if factory is SkipTwice else x32
    names = discover_layers(model, x)
    with FeatureTap(model, names) as tap, torch.no_grad():
        feats, out = tap(x)
    assert torch.equal(feats[-1], out)
    # every discovered name is a tappable layer reported by describe_layers, in forward order
    order = [i.name for i in describe_layers(model, x)]
    assert [order.index(n) for n in names] == sorted(order.index(n) for n in names)


def test_feature_kind_and_tapinfo():
    assert feature_kind((3, 4, 5)) == "map"
    assert feature_kind((17, 8)) == "tokens"
    assert feature_kind((10,)) == "vector"
    assert feature_kind((1, 2, 3, 4)) == "other"
    assert TapInfo("a", (4, 2, 2)).kind == "map"


# ----------------------------------------------------------------------------------------------
# the model is left unchanged


def _hook_counts(model):
    return [
        (name, len(m._forward_hooks), len(m._forward_pre_hooks), len(getattr(m, "_forward_hooks_with_kwargs", {})))
        for name, m in model.named_modules()
    ]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("start", ["train", "eval", "mixed"])
def test_discovery_leaves_model_unchanged(start, x32):
    model = plain_cnn()
    model.train(start == "train")
    if start == "mixed":
        model.train()
        model[4].eval()  # the BatchNorm in eval, the rest in train
        model[1].training = False
    flags = [(n, m.training) for n, m in model.named_modules()]
    before = _snapshot(model)
    hooks = _hook_counts(model)
    assert all(a == b == c == 0 for _, a, b, c in hooks)

    discover_layers(model, x32)
    describe_layers(model, x32)
    FeatureTap.check_names(model, ["2", "12"], x32, role="teacher")

    assert _hook_counts(model) == hooks
    assert [(n, m.training) for n, m in model.named_modules()] == flags
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # parameters, BN running stats and num_batches_tracked
        assert torch.equal(before[k], after[k]), k


def test_discovery_on_resnet_leaves_bn_statistics_unchanged(resnet18, x32):
    resnet18.train()
    before = _snapshot(resnet18)
    discover_layers(resnet18, x32)
    assert resnet18.training and all(m.training for m in resnet18.modules())
    for k, v in resnet18.state_dict().items():
        assert torch.equal(before[k], v), k
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in resnet18.modules())


def test_featuretap_removes_hooks_on_exit_and_on_error(x32):
    model = plain_cnn()
    with FeatureTap(model, ["2", "9"]) as tap:
        assert len(model[2]._forward_hooks) == 1 and len(model[9]._forward_hooks) == 1
        tap(x32)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(KeyError):
        with FeatureTap(model, ["2"]):
            raise KeyError("boom")
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_featuretap_keeps_training_flag_and_gradients(x32):
    model = plain_cnn().train()
    with FeatureTap(model, ["6", "12"]) as tap:
        (f6, f12), out = tap(x32)
    assert model.training and all(m.training for m in model.modules())
    f6.sum().backward()  # captured features are part of the autograd graph
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[12].weight.grad is None  # the logits layer lies after tap "6"


# ----------------------------------------------------------------------------------------------
# a second, independent tapping method


def test_featuretap_matches_torchvision_feature_extractor(resnet18, x32):
    resnet18.eval()
    names = ["maxpool", "layer1.0", "layer1.1", "layer2.0", "layer3.1", "layer4.1", "fc"]
    extractor = create_feature_extractor(resnet18, return_nodes={n: n for n in names})
    with torch.no_grad():
        ref = extractor(x32)
        with FeatureTap(resnet18, names) as tap:
            feats, out = tap(x32)
    for name, f in zip(names, feats):
        torch.testing.assert_close(f, ref[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref["fc"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad names


def test_unknown_name_check_names_lists_available(x32):
    model = plain_cnn()
    with pytest.raises(ValueError) as err:
        FeatureTap.check_names(model, ["2", "conv99"], x32, role="teacher")
    msg = str(err.value)
    assert "conv99" in msg and "'2'" in msg and "'11'" in msg


def test_unknown_name_featuretap_constructor_lists_available(resnet18):
    with pytest.raises(ValueError) as err:
        FeatureTap(resnet18, ["layer1.0", "layer9.0"])
    msg = str(err.value)
    assert "layer9.0" in msg and "layer1.0" in msg and "fc" in msg


def test_module_called_twice_needs_call_index(x32):
    model = SkipTwice()
    x = x32[:, :, :16, :16]
    with pytest.raises(ValueError) as err:
        FeatureTap.check_names(model, ["shared"], x, role="student")
    assert "shared:0" in str(err.value) and "shared:1" in str(err.value)
    with FeatureTap(model, ["shared:2"]) as tap, pytest.raises(RuntimeError, match="shared:2"):
        tap(x)


def test_duplicate_names_rejected(x32):
    model = plain_cnn()
    with pytest.raises(ValueError, match="more than once"):
        FeatureTap.check_names(model, ["2", "6", "2"], x32, role="teacher")
    with pytest.raises(ValueError, match="more than once"):
        FeatureTap(model, ["6", "6"])


def test_other_bad_inputs(x32):
    model = plain_cnn()
    with pytest.raises(TypeError):
        FeatureTap.check_names(model, "2", x32, role="teacher")  # a str, not a list of str
    with pytest.raises(ValueError, match="empty"):
        FeatureTap.check_names(model, [], x32, role="teacher")
    with pytest.raises(TypeError, match="torch.Tensor"):
        discover_layers(model, x32.numpy())
    with pytest.raises(TypeError, match="nn.Module"):
        discover_layers(lambda x: x, x32)
