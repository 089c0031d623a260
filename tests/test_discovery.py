"""Layer discovery by structure (issue 15): research-style models whose blocks sit in ModuleLists,
ModuleDicts and nested containers driven by a custom forward, registration order that differs from
execution order, blocks called in a loop, token models, and timm's families.

Oracles: the planted block structure of each hand-written model (the expected tap list is written
out in full), execution order recorded independently by forward hooks, and, for timm, each model's
own ``feature_info``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from align_kd import describe_layers, discover_layers
from align_kd.taps import FeatureTap


@pytest.fixture
def x32():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class ConvBlock(nn.Module):
    """Research style: conv + BN, the activation functional in forward. (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ModuleListCNN(nn.Module):
    """Blocks in an nn.ModuleList run by a loop; pooling and head functional or plain."""

    def __init__(self, widths=(8, 16, 16, 32), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            ConvBlock(widths[max(i - 1, 0)], w, stride=1 if i == 0 else 2) for i, w in enumerate(widths)
        )
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ModuleDictCNN(nn.Module):
    """Stages in an nn.ModuleDict, run in an order the forward spells out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stages = nn.ModuleDict({
            "low": ConvBlock(3, 8),
            "mid": ConvBlock(8, 16, stride=2),
            "high": ConvBlock(16, 32, stride=2),
        })
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        for name in ("low", "mid", "high"):
            x = self.stages[name](x)
        return self.classifier(x.mean((2, 3)))


class NestedCNN(nn.Module):
    """Levels of blocks: a ModuleList of ModuleLists inside a holder module that is never called."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Module()  # a plain holder, never called
        self.body.levels = nn.ModuleList([
            nn.ModuleList([ConvBlock(3, 8), ConvBlock(8, 8)]),
            nn.ModuleList([ConvBlock(8, 16, stride=2), ConvBlock(16, 16)]),
        ])
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        for level in self.body.levels:
            for block in level:
                x = block(x)
        return self.head(x.mean((2, 3)))


class ReversedRegistration(nn.Module):
    """Modules registered head first, deepest block before the shallow ones; executed the other way."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.head = nn.Linear(32, num_classes)
        self.b3 = ConvBlock(16, 32, stride=2)
        self.b2 = ConvBlock(8, 16, stride=2)
        self.b1 = ConvBlock(3, 8)

    def forward(self, x):
        x = self.b3(self.b2(self.b1(x)))
        return self.head(x.mean((2, 3)))


class LoopedBlock(nn.Module):
    """One block applied three times (weight sharing), between two others."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList([ConvBlock(3, 8), ConvBlock(8, 8), ConvBlock(8, 16, stride=2)])
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.blocks[0](x)
        for _ in range(3):
            x = self.blocks[1](x)
        return self.fc(self.blocks[2](x).mean((2, 3)))


class TokenMixer(nn.Module):
    """A research-style token model: patches, a ModuleList of pre-norm MLP blocks, mean-pooled head."""

    def __init__(self, dim: int = 32, depth: int = 4, num_classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)  # (B, dim, 4, 4) -> 16 tokens
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))})
            for _ in range(depth)
        )
        self.out = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)  # (B, 16, dim)
        for layer in self.layers:
            x = x + layer["mlp"](layer["norm"](x))
        return self.out(x.mean(1))


def _exit_order(model, x) -> list[str]:
    """Module names in the order their (first) call returned, recorded independently of align_kd."""
    order, handles = [], []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(lambda m, a, o, name=name: order.append(name)))
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return order


@pytest.mark.parametrize("model, expected", [
    (ModuleListCNN(), ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "fc"]),
    (ModuleDictCNN(), ["stages.low", "stages.mid", "stages.high", "classifier"]),
    (NestedCNN(), ["body.levels.0.0", "body.levels.0.1", "body.levels.1.0", "body.levels.1.1", "head"]),
    (ReversedRegistration(), ["b1", "b2", "b3", "head"]),
    (LoopedBlock(), ["blocks.0", "blocks.1:0", "blocks.1:1", "blocks.1:2", "blocks.2", "fc"]),
], ids=["modulelist", "moduledict", "nested", "reversed-registration", "looped"])
def test_research_style_models_get_every_block(model, expected, x32):
    names = discover_layers(model, x32)
    assert names == expected
    # the taps are real, distinct features of the right kind, and the last one is the model's output
    with FeatureTap(model, names) as tap, torch.no_grad():
        feats, out = tap(x32)
    assert torch.equal(feats[-1], out) and out.shape == (2, 10)
    assert all(f.dim() == 4 for f in feats[:-1])
    assert len({f.data_ptr() for f in feats}) == len(feats)


def test_depth_order_is_execution_order_not_registration_order(x32):
    model = ReversedRegistration()
    registered = [n for n, _ in model.named_children()]
    assert registered == ["head", "b3", "b2", "b1"]
    names = discover_layers(model, x32)
    executed = [n for n in _exit_order(model, x32) if n in names]
    assert names == executed == ["b1", "b2", "b3", "head"]
    shapes = [i.shape for i in FeatureTap.check_names(model, names, x32, role="teacher")]
    assert [s[0] for s in shapes[:-1]] == [8, 16, 32]  # channels grow with depth: the order is the depth order


def test_token_model_taps_are_blocks_with_token_shapes():
    model = TokenMixer()
    x = torch.randn(2, 3, 32, 32)
    names = discover_layers(model, x)
    # the residual sum happens in forward, so the block outputs are the mlp calls of each layer
    assert names == ["patch"] + [f"layers.{i}.mlp" for i in range(4)] + ["out"]
    infos = {i.name: i for i in describe_layers(model, x)}
    assert [infos[n].kind for n in names] == ["map"] + ["tokens"] * 4 + ["vector"]
    assert infos["layers.0.mlp"].shape == (16, 32)


def test_discovery_matches_planted_depth_on_deeper_lists(x32):
    for depth in (2, 5, 7):
        model = ModuleListCNN(widths=tuple([8] * depth))
        assert discover_layers(model, x32) == ["stem"] + [f"blocks.{i}" for i in range(depth)] + ["fc"]


# ------------------------------------------------------------------------------------------------
# never silent: fit() refuses a plan that degrades to one pair, reports its taps, checks its inputs

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from align_kd import fit  # noqa: E402

FAST = dict(epochs=1, progress=False, device="cpu", width=8)


def _data(n=32, batch=16, classes=10, channels=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, channels, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


class OpaqueBlocks(nn.Module):
    """Blocks the structural rule cannot see: called through a Python list, not a module container."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = ConvBlock(3, 8), ConvBlock(8, 8), ConvBlock(8, 16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.c(self.b(self.a(x)))
        return self.fc(x.mean((2, 3)))


def test_fit_on_modulelist_teacher_and_student_trains_the_full_plan():
    torch.manual_seed(0)
    teacher, student = ModuleListCNN(widths=(8, 16, 16, 32)).eval(), ModuleListCNN(widths=(4, 8, 8))
    result = fit(teacher, student, (_data(), _data()), strategy="sinkhorn", **FAST)
    assert result.teacher_layers == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "fc"]
    assert result.student_layers == ["stem", "blocks.0", "blocks.1", "blocks.2", "fc"]
    assert result.plan.shape == (6, 5) and result.mi.shape == (6, 5)
    assert torch.allclose(result.plan.sum(0), torch.ones(5), atol=1e-4)
    assert [s[0] for s in result.teacher_shapes[:-1]] == [8, 8, 16, 16, 32]


def test_single_tap_side_is_refused_with_a_message_that_says_what_to_do():
    teacher, student = ModuleListCNN().eval(), ModuleListCNN(widths=(4, 8))
    with pytest.raises(ValueError) as err:
        fit(teacher, student, _data(), strategy="pairwise", student_layers=["fc"], **FAST)
    msg = str(err.value)
    assert "single student tap ['fc']" in msg and "student_layers=[...]" in msg
    assert "describe_layers" in msg and "allow_few_taps=True" in msg
    # asked for explicitly: a warning, and the run goes on with the 6 x 1 plan
    with pytest.warns(UserWarning, match="single student tap"):
        result = fit(teacher, student, _data(), strategy="pairwise", student_layers=["fc"], allow_few_taps=True, **FAST)
    assert result.plan.shape == (6, 1)
    # strategies without a feature term need no taps at all
    assert fit(teacher, student, _data(), strategy="hinton", student_layers=["fc"], **FAST).plan.shape == (6, 1)


def test_discovery_that_misses_blocks_stops_fit(x32):
    model = OpaqueBlocks()
    found = discover_layers(model, x32)
    assert found == ["a", "b", "c", "fc"]  # direct children: found even without a container
    # a model whose blocks are hidden inside one opaque composite module: one tap besides the logits
    hidden = nn.Sequential()
    hidden.add_module("body", nn.Sequential(OpaqueBlocks().a, OpaqueBlocks().b, nn.Conv2d(8, 16, 3, padding=1)))
    hidden.add_module("pool", nn.AdaptiveAvgPool2d(1))
    hidden.add_module("flat", nn.Flatten())
    hidden.add_module("fc", nn.Linear(16, 10))
    names = discover_layers(hidden, x32)
    assert names == ["body", "fc"]
    with pytest.raises(ValueError) as err:
        fit(hidden.eval(), ModuleListCNN(widths=(4, 8)), _data(), strategy="sinkhorn", **FAST)
    msg = str(err.value)
    assert "found 1 teacher tap(s) besides the logits (['body', 'fc'])" in msg
    assert "3 weight layers at other depths" in msg and "body.0.conv" in msg
    assert "teacher_layers=[...]" in msg and "allow_few_taps=True" in msg


def test_fit_reports_the_chosen_taps(capsys):
    teacher, student = ModuleDictCNN().eval(), ModuleListCNN(widths=(4, 8))
    fit(teacher, student, _data(), strategy="uniform", **{**FAST, "progress": True})
    out = capsys.readouterr().out
    assert "taps: teacher T=4 [stages.low (8, 32, 32), stages.mid (16, 16, 16), stages.high (32, 8, 8), classifier (10,)]" in out
    assert "student S=4 [stem (4, 32, 32), blocks.0 (4, 32, 32), blocks.1 (8, 16, 16), fc (10,)]; plan 4 x 4" in out


def test_frozen_student_is_refused_before_training():
    student = ModuleListCNN(widths=(4, 8)).requires_grad_(False)
    with pytest.raises(ValueError, match=r"student \(ModuleListCNN\) has no parameter with requires_grad=True.*requires_grad_\(True\)"):
        fit(ModuleListCNN().eval(), student, _data(), **FAST)


def test_labels_outside_the_teachers_classes_are_refused_naming_the_loader():
    teacher, student = ModuleListCNN(num_classes=10).eval(), ModuleListCNN(widths=(4, 8), num_classes=10)
    with pytest.raises(ValueError, match=r"training loader has labels outside the teacher's class range 0..9: found \[10, 11\]"):
        x = torch.randn(48, 3, 32, 32)
        fit(teacher, student, DataLoader(TensorDataset(x, torch.arange(48) % 12), batch_size=16), **FAST)
    from align_kd.data import TensorLoader

    images, labels = torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.zeros(40, dtype=torch.int64)
    labels[-1] = 11  # only the last batch is bad: a TensorLoader's labels are all checked
    bad_test = TensorLoader(images, labels, batch_size=16)
    with pytest.raises(ValueError, match=r"test loader has labels outside .* found \[11\] \(1 of 40 checked\)"):
        fit(teacher, student, (_data(), bad_test), **FAST)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_model_that_cannot_take_the_batch_is_named(role):
    grey = ModuleListCNN()
    grey.stem = nn.Conv2d(1, 8, 3, padding=1)  # expects one channel; the data has three
    teacher, student = (grey.eval(), ModuleListCNN(widths=(4, 8))) if role == "teacher" else (ModuleListCNN().eval(), grey)
    with pytest.raises(RuntimeError) as err:
        fit(teacher, student, _data(), **FAST)
    msg = str(err.value)
    assert msg.startswith(f"The {role} (ModuleListCNN) cannot take the training batches: on a batch of shape (2, 3, 32, 32)")
    assert "input channels" in msg


def test_dict_batches_get_a_message_that_says_how_to_convert():
    batches = [{"image": torch.randn(4, 3, 32, 32), "label": torch.zeros(4, dtype=torch.int64)}]
    with pytest.raises(TypeError) as err:
        fit(ModuleListCNN().eval(), ModuleListCNN(widths=(4, 8)), batches, **FAST)
    msg = str(err.value)
    assert "a list of 1 batches (dicts with keys ['image', 'label'])" in msg and "(b['image'], b['label'])" in msg

    class DictLoader:
        def __iter__(self):
            return iter(batches)

        def __len__(self):
            return 1

    with pytest.raises(TypeError, match=r"training loader to yield \(inputs tensor, labels tensor\) pairs but it yielded dicts with keys \['image', 'label'\]"):
        fit(ModuleListCNN().eval(), ModuleListCNN(widths=(4, 8)), DictLoader(), **FAST)
    # the suggested conversion works
    tuples = [(b["image"], b["label"]) for b in batches]
    assert fit(ModuleListCNN().eval(), ModuleListCNN(widths=(4, 8)), (tuples, None), **FAST).plan.shape == (6, 4)


# ------------------------------------------------------------------------------------------------
# timm families (an optional dependency; installed with the test extras)

TIMM_MODELS = {
    "resnet18": {},
    "convnext_atto": {},
    "mobilenetv3_small_050": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 4},
    "efficientnet_b0": {},
}


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
def test_timm_families_have_at_least_four_taps_plus_logits(name, x32):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **TIMM_MODELS[name])
    names = discover_layers(model, x32)
    advertised = [d["module"] for d in model.feature_info]
    assert len(names) - 1 >= 4, names
    assert names[:-1] == [n for n in advertised if n in names[:-1]]  # the model's own stages, in its order
    assert set(names[:-1]) == set(advertised)
    executed = [n for n in _exit_order(model, x32) if n in names]
    assert names == sorted(set(executed), key=executed.index)
    with FeatureTap(model, names) as tap, torch.no_grad():
        feats, out = tap(x32)
    assert torch.equal(feats[-1], out) and out.shape == (2, 10)
