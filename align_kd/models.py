"""Reference models for 32x32 RGB input, supervised training, and a cache of trained teachers.

Every model maps (B, 3, 32, 32) float images to (B, num_classes) logits and is built from
submodules (activations are ``nn.ReLU`` modules, never in-place, never functional in the plain
nets) so that forward hooks on submodules see every intermediate representation.

- ``SmallCNN``: 3 conv + 2 linear layers, a flat ``nn.Sequential`` of leaf modules.
- ``ResNetCIFAR``: the classic CIFAR ResNet (depth 6n+2, BasicBlocks, stages ``layer1..layer3``).
- ``MLP``: Flatten, then Linear+ReLU blocks, then a Linear head.
- ``tiny_vit``: a small ``torchvision.models.VisionTransformer`` (patch 4, 4 layers, dim 128).
- ``FastCNN``: the fast-training CIFAR-10 net of the airbench family (a frozen patch-whitening
  conv, three conv groups with max-pooling, BatchNorm and GELU, a linear head), the zoo's teacher.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, update_bn
from tqdm.auto import tqdm

from ._env import amp_in_effect, channels_last_in_effect
from ._io import atomic_save
from .checkpoint import (
    FORMAT,
    CheckpointError,
    capture_rng,
    checkpoint_path,
    config_diff,
    find_resume_point,
    prune_checkpoints,
    restore_rng,
    write_checkpoint,
)
from .evaluation import _resolve_device, evaluate
from .losses import hinton_kd

__all__ = [
    "FastCNN",
    "MLP",
    "MODELS",
    "ResNetCIFAR",
    "SmallCNN",
    "SoftmaxEnsemble",
    "build_model",
    "evaluate",
    "load_or_train_teacher",
    "teacher_key",
    "tiny_vit",
    "train_supervised",
]


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {name} to be an int >= {minimum} but got {value!r}.")


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
class SmallCNN(nn.Sequential):
    """3 conv layers + 2 linear layers; channels ``width, 2*width, 4*width``, hidden ``8*width``.

    Input (B, 3, 32, 32) -> logits (B, num_classes). Children, in order: ``conv1 bn1 relu1 pool1``,
    ``conv2 bn2 relu2 pool2``, ``conv3 bn3 relu3 pool3`` (each pool halves 32 -> 16 -> 8 -> 4),
    ``flatten``, ``fc1 relu4``, ``fc2``. Use a wide instance (width 64/128) as teacher, a narrow one
    (16/32) as student.
    """

    def __init__(self, width: int = 32, num_classes: int = 10):
        _check_int("width", width)
        _check_int("num_classes", num_classes)
        layers: list[tuple[str, nn.Module]] = []
        channels = [3, width, 2 * width, 4 * width]
        for i in range(3):
            layers += [
                (f"conv{i + 1}", nn.Conv2d(channels[i], channels[i + 1], 3, padding=1, bias=False)),
                (f"bn{i + 1}", nn.BatchNorm2d(channels[i + 1])),
                (f"relu{i + 1}", nn.ReLU()),
                (f"pool{i + 1}", nn.MaxPool2d(2)),
            ]
        layers += [
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(4 * width * 4 * 4, 8 * width)),
            ("relu4", nn.ReLU()),
            ("fc2", nn.Linear(8 * width, num_classes)),
        ]
        super().__init__(OrderedDict(layers))
        self.width, self.num_classes = width, num_classes


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual shortcut (1x1 conv + BN when the shape changes).

    (B, C_in, H, W) -> (B, C_out, H / stride, W / stride).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, C_out, H', W')
        out = self.bn2(self.conv2(out))  # (B, C_out, H', W')
        return self.relu2(out + self.shortcut(x))  # (B, C_out, H', W')


class ResNetCIFAR(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth ``6n + 2`` (20, 32, 44, 56, ...).

    ``stem`` (3x3 conv, BN, ReLU: 32x32x``width``) -> ``layer1`` (n blocks, 32x32x``width``) ->
    ``layer2`` (16x16x``2*width``) -> ``layer3`` (8x8x``4*width``) -> ``pool`` -> ``flatten`` -> ``fc``.
    Input (B, 3, 32, 32) -> logits (B, num_classes).
    """

    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Expected depth = 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, ...) but got {depth!r}.")
        _check_int("width", width)
        _check_int("num_classes", num_classes)
        blocks = (depth - 2) // 6
        self.depth, self.width, self.num_classes = depth, width, num_classes
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(3, width, 3, padding=1, bias=False), bn=nn.BatchNorm2d(width), relu=nn.ReLU()
            )
        )
        self.layer1 = self._stage(width, width, blocks, stride=1)
        self.layer2 = self._stage(width, 2 * width, blocks, stride=2)
        self.layer3 = self._stage(2 * width, 4 * width, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, w, 32, 32)
        x = self.layer1(x)  # (B, w, 32, 32)
        x = self.layer2(x)  # (B, 2w, 16, 16)
        x = self.layer3(x)  # (B, 4w, 8, 8)
        x = self.flatten(self.pool(x))  # (B, 4w)
        return self.fc(x)  # (B, num_classes)


class MLP(nn.Sequential):
    """A non-convolutional student: ``flatten``, ``block1..blockK`` (Linear + ReLU), ``head`` (Linear).

    Input (B, 3, 32, 32) (or any (B, ...) with ``in_features`` elements) -> logits (B, num_classes).
    """

    def __init__(self, hidden: tuple[int, ...] = (512, 256, 128), num_classes: int = 10, in_features: int = 3 * 32 * 32):
        if isinstance(hidden, int) or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ValueError(f"Expected hidden to be a sequence of positive ints, e.g. (512, 256, 128), but got {hidden!r}.")
        _check_int("num_classes", num_classes)
        _check_int("in_features", in_features)
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
        sizes = [in_features, *hidden]
        for i in range(len(hidden)):
            layers.append((f"block{i + 1}", nn.Sequential(nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU())))
        layers.append(("head", nn.Linear(sizes[-1], num_classes)))
        super().__init__(OrderedDict(layers))
        self.hidden, self.num_classes = tuple(hidden), num_classes


def tiny_vit(
    image_size: int = 32,
    patch_size: int = 4,
    num_layers: int = 4,
    num_heads: int = 4,
    hidden_dim: int = 128,
    mlp_dim: int = 256,
    num_classes: int = 10,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> nn.Module:
    """A small ``torchvision.models.VisionTransformer``: (B, 3, 32, 32) -> (B, num_classes).

    64 patches of 4x4 plus a class token; encoder blocks are ``encoder.layers.encoder_layer_<i>``.
    """
    from torchvision.models import VisionTransformer

    for name, value in dict(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                            num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes).items():
        _check_int(name, value)
    if image_size % patch_size:
        raise ValueError(f"Expected patch_size to divide image_size but got patch_size={patch_size}, image_size={image_size}.")
    if hidden_dim % num_heads:
        raise ValueError(f"Expected num_heads to divide hidden_dim but got num_heads={num_heads}, hidden_dim={hidden_dim}.")
    return VisionTransformer(
        image_size=image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
        hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes, dropout=dropout,
        attention_dropout=attention_dropout,
    )


class ConvGroup(nn.Module):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU: (B, C_in, H, W) -> (B, C_out, H // 2, W // 2).

    As in airbench: convs start as identity on their first ``C_in`` filters (Dirac init), BatchNorm
    has fixed scale 1 (only its shift trains) and running-statistics momentum 0.4.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=1e-12, momentum=0.4)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-12, momentum=0.4)
        self.act2 = nn.GELU()
        for conv in (self.conv1, self.conv2):  # identity init of the first filters: an implicit residual
            nn.init.dirac_(conv.weight.data[: conv.in_channels])
        for bn in (self.bn1, self.bn2):  # BatchNorm scales stay 1; only the shifts train
            bn.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.pool(self.conv1(x))))  # (B, C_out, H // 2, W // 2)
        return self.act2(self.bn2(self.conv2(x)))  # (B, C_out, H // 2, W // 2)


class SoftmaxEnsemble(nn.Module):
    """Several classifiers as one: ``log`` of their mean softmax, so ``softmax(output)`` is the members'
    mean probability (the usual classifier ensemble). (B, 3, H, W) -> (B, num_classes) log-probabilities."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) == 0:
            raise ValueError("Expected at least one member for a SoftmaxEnsemble but got none.")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        log_probs = torch.stack([torch.log_softmax(m(x).float(), dim=1) for m in self.members])  # (M, B, K)
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # (B, K)


class Scale(nn.Module):
    """Multiply by a fixed constant (the head's output scale)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class FastCNN(nn.Sequential):
    """A fast-training CIFAR-10 CNN in the style of airbench (Keller Jordan, 2024).

    Children: ``whiten`` (2x2 conv, 3 -> 24 channels, no padding: 32 -> 31; its weights are set from
    the training images' patch covariance by :func:`align_kd.zoo.whiten_init` and then frozen),
    ``act`` (GELU), ``block1..block3`` (:class:`ConvGroup`, 31 -> 15 -> 7 -> 3), ``pool`` (3x3 max:
    -> 1), ``flatten``, ``head`` (Linear, no bias), ``scale`` (x 1/9). Input (B, 3, 32, 32) ->
    logits (B, num_classes). ``widths=(64, 256, 256)`` is airbench94's net; the zoo default is narrower.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 128, 128), num_classes: int = 10):
        if isinstance(widths, int) or len(widths) != 3:
            raise ValueError(f"Expected widths to be three ints (block1, block2, block3) but got {widths!r}.")
        for w in widths:
            _check_int("each width", w)
        _check_int("num_classes", num_classes)
        widths = tuple(int(w) for w in widths)
        super().__init__(OrderedDict(
            whiten=nn.Conv2d(3, 24, 2, padding=0, bias=True),
            act=nn.GELU(),
            block1=ConvGroup(24, widths[0]),
            block2=ConvGroup(widths[0], widths[1]),
            block3=ConvGroup(widths[1], widths[2]),
            pool=nn.MaxPool2d(3),
            flatten=nn.Flatten(),
            head=nn.Linear(widths[2], num_classes, bias=False),
            scale=Scale(1 / 9),
        ))
        self.widths, self.num_classes = widths, num_classes
        self.whiten.weight.requires_grad_(False)  # set by whiten_init, never trained


#: name -> constructor; every constructor takes ``num_classes`` and 32x32 RGB input
MODELS = {"cnn": SmallCNN, "resnet": ResNetCIFAR, "mlp": MLP, "vit": tiny_vit, "fastcnn": FastCNN}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model: ``build_model("cnn", width=64)``. Raises on unknown names or kwargs."""
    if name not in MODELS:
        raise ValueError(f"Expected a model name in {sorted(MODELS)} but got {name!r}.")
    constructor = MODELS[name]
    signature = inspect.signature(constructor)
    unknown = sorted(set(kwargs) - set(signature.parameters) - {"self"})
    if unknown:
        accepted = [p for p in signature.parameters if p != "self"]
        raise TypeError(f"Model {name!r} does not take {unknown}; it accepts {accepted}.")
    return constructor(**kwargs)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def check_kd_options(kd_weight, kd_temperature, prefix: str = "") -> None:
    """Raise unless ``kd_weight`` is in (0, 1] and ``kd_temperature`` is positive and finite (the
    distillation options of :func:`train_supervised`; ``prefix`` names them as the caller does)."""
    if not (isinstance(kd_weight, (int, float)) and 0 < kd_weight <= 1):
        raise ValueError(f"Expected {prefix}kd_weight in (0, 1] (the KD term's share of the loss) but got {kd_weight!r}.")
    if not (isinstance(kd_temperature, (int, float)) and kd_temperature > 0 and math.isfinite(kd_temperature)):
        raise ValueError(f"Expected {prefix}kd_temperature to be a positive finite number but got {kd_temperature!r}.")


def train_supervised(
    model: nn.Module,
    train_loader,
    test_loader=None,
    *,
    epochs: int,
    lr: float = 0.05,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device=None,
    progress: bool = True,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    warmup_epochs: float = 0.0,
    schedule: str = "cosine",
    flip_eval: bool = False,
    channels_last: bool = False,
    amp: bool = False,
    lr_start: float = 0.0,
    lr_end: float = 0.0,
    param_groups: list[dict] | None = None,
    lookahead: bool = False,
    average: str | None = None,
    epoch_offset: int = 0,
    teacher: nn.Module | None = None,
    kd_weight: float = 0.5,
    kd_temperature: float = 1.0,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
) -> dict:
    """Train with cross-entropy and SGD (Nesterov momentum), the learning rate set every step.

    ``schedule="cosine"``: linear warm-up over ``warmup_epochs`` from ``lr_start * lr``, then cosine
    decay to ``lr_end * lr``; ``"linear"``: the same warm-up, then linear decay (a one-cycle triangle);
    ``"constant"``: the same warm-up, then ``lr`` to the end (``lr_end`` unused; SWA's schedule).
    ``param_groups``: torch optimiser groups (default: every trainable parameter in one group); a
    group's optional ``"lr_scale"`` multiplies its learning rate, its ``"weight_decay"`` overrides, its
    ``"train_epochs"`` (an int) freezes it after that many epochs (learning rate 0 from then on). Cross-entropy uses
    ``label_smoothing``. ``flip_eval`` scores the test set with test-time flips (see :func:`evaluate`).
    ``channels_last`` puts the model and each batch in channels_last memory format (faster
    convolutions on CPU and GPU; the same results up to float round-off). ``amp`` runs the forward
    under bfloat16 autocast (the loss in float32; about 1.6x faster on CPUs with AMX) where the device
    has native bf16; elsewhere it warns and trains in float32 (:func:`align_kd._env.amp_in_effect`).
    ``lookahead`` (airbench's Lookahead): a slow copy of every float tensor of the state dict
    (weights and BatchNorm statistics) moves towards the model by ``1 - decay`` every 5 steps and
    replaces it, ``decay = 0.95**5 * (step / total_steps)**3``; the model ends as the slow copy.
    ``average="swa"`` (stochastic weight averaging, Izmailov et al. 2018): the model ends as the
    equal-weight mean of its parameters at the end of every epoch (``torch.optim.swa_utils.AveragedModel``),
    its BatchNorm statistics then recomputed by one pass over ``train_loader`` in train mode
    (``update_bn``; the loader at epoch ``epoch_offset + epochs``). ``epoch_offset``: the loader's
    epochs are numbered from it (``set_epoch(epoch_offset + epoch)``), so a second stage that continues
    a finished run draws new shuffles and augmentations.
    ``teacher``: distil from it while training (for example a :class:`SoftmaxEnsemble` of trained
    nets): the loss becomes ``(1 - kd_weight) * cross-entropy + kd_weight * T^2 * KL(softmax(t / T) ||
    softmax(s / T))`` at ``T = kd_temperature`` (:func:`align_kd.losses.hinton_kd`); the teacher runs
    in eval mode (it is put there), without gradients, under the same autocast and memory format.
    The weights sum to 1, so the step size on the loss is that of cross-entropy alone.
    ``checkpoint_dir``: after every epoch, write ``checkpoint-epochNNNN.pt`` there (the format of
    :mod:`align_kd.checkpoint`; the newest 2 kept) with the model, optimiser, Lookahead copy,
    history and RNG states; ``resume=True`` continues from the newest one and ends bitwise where an
    uninterrupted run ends (the loader's order must be a function of its seed and ``set_epoch``, as
    :class:`~align_kd.data.TensorLoader`'s is). Without ``resume`` the folder must hold no checkpoint.

    ``train_loader`` yields ``(x (B, 3, 32, 32) float, y (B,) int64)``; if it has ``set_epoch`` it is
    called with 0..epochs-1. Seeds torch's global RNG with ``seed``. The model is moved to ``device``
    (default: the loader's ``device`` attribute, else the model's current device). Parameters with
    ``requires_grad=False`` stay as they are.

    Returns:
        ``{"epoch": [1..E], "train_loss": [E], "train_acc": [E], "test_acc": [E] (None without a test
        loader), "lr": [E] (at the end of each epoch), "seconds": [E] (training time of each epoch),
        "wall_seconds": total wall time of the run, summed over the sittings of a resumed one}``.
    """
    import time

    started = time.perf_counter()

    _check_int("epochs", epochs)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"Expected lr to be a positive finite number but got {lr!r}.")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"Expected weight_decay to be a number >= 0 but got {weight_decay!r}.")
    if not (isinstance(momentum, (int, float)) and 0 < momentum < 1):
        raise ValueError(f"Expected momentum in (0, 1) (Nesterov SGD) but got {momentum!r}.")
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 1):
        raise ValueError(f"Expected label_smoothing in [0, 1) but got {label_smoothing!r}.")
    if not (isinstance(warmup_epochs, (int, float)) and 0 <= warmup_epochs < epochs):
        raise ValueError(f"Expected warmup_epochs in [0, epochs={epochs}) but got {warmup_epochs!r}.")
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(f"Expected schedule to be 'cosine', 'linear' or 'constant' but got {schedule!r}.")
    if average not in (None, "swa"):
        raise ValueError(f"Expected average to be None or 'swa' (stochastic weight averaging) but got {average!r}.")
    if average is not None and lookahead:
        raise ValueError("lookahead=True and average='swa' are two weight averages of one run; pick one (a second "
                         "stage can average a Lookahead run's result: train_supervised(..., average='swa') on it).")
    _check_int("epoch_offset", epoch_offset, minimum=0)
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"Expected teacher to be an nn.Module (or None) but got {type(teacher).__name__}.")
    check_kd_options(kd_weight, kd_temperature)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("Expected a train_loader with at least one batch but len(train_loader) == 0.")
    device = _resolve_device(model, train_loader, device)
    autocast_bf16 = amp_in_effect(amp, device)  # only where bf16 is native (else a warning, and float32)
    torch.manual_seed(seed)
    model.to(device)
    # channels_last as asked, except where oneDNN's kernels get the model's gradients wrong (then a warning)
    channels_last = channels_last_in_effect(channels_last, device, model, *([teacher] if teacher is not None else []))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device, memory_format=memory_format).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True; there is nothing to train.")
    groups = [dict(g) for g in param_groups] if param_groups is not None else [{"params": trainable}]
    scales = [g.pop("lr_scale", 1.0) for g in groups]
    group_epochs = [g.pop("train_epochs", epochs) for g in groups]  # a group stops moving after these
    for limit in group_epochs:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"Expected a param group's 'train_epochs' to be an int >= 0 but got {limit!r}.")
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    total_steps, warmup_steps = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:  # the factor for the step about to be taken (0-based)
        if step < warmup_steps:
            return lr_start + (1 - lr_start) * (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress_ = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        decay = 0.5 * (1 + math.cos(math.pi * progress_)) if schedule == "cosine" else 1 - progress_
        return lr_end + (1 - lr_end) * decay

    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()} if lookahead else None
    averaged = AveragedModel(model) if average == "swa" else None  # parameters only: BatchNorm is recomputed at the end
    history: dict[str, list] = {"epoch": [], "train_loss": [], "train_acc": [], "test_acc": [], "lr": [], "seconds": []}
    step = first_epoch = 0
    earlier_seconds = 0.0  # wall time of the sittings before this one (a resumed run)
    if checkpoint_dir is not None:
        config = {"kind": "train_supervised", "model": type(model).__name__, "epochs": epochs, "lr": lr,
                  "weight_decay": weight_decay, "seed": seed, "momentum": momentum, "label_smoothing": label_smoothing,
                  "warmup_epochs": warmup_epochs, "schedule": schedule, "lr_start": lr_start, "lr_end": lr_end,
                  "amp": amp, "lookahead": lookahead, "steps_per_epoch": steps_per_epoch, "lr_scales": scales,
                  "group_epochs": group_epochs, "group_sizes": [len(g["params"]) for g in groups],
                  "loader_seed": getattr(train_loader, "seed", None),
                  # only when set, so a checkpoint written before these options existed still resumes
                  **({"average": average} if average else {}), **({"epoch_offset": epoch_offset} if epoch_offset else {}),
                  **({"teacher": type(teacher).__name__, "teacher_params": sum(p.numel() for p in teacher.parameters()),
                      "kd_weight": kd_weight, "kd_temperature": kd_temperature} if teacher is not None else {})}
        resumed = _resume_supervised(checkpoint_dir, resume, config, model, optimizer, slow, averaged, train_loader)
        if resumed is not None:
            first_epoch, step, history, earlier_seconds = resumed
    bar = tqdm(total=total_steps, initial=step, desc=f"train {type(model).__name__}", disable=not progress, unit="step")
    try:
        for epoch in range(first_epoch, epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch_offset + epoch)
            model.train()
            loss_sum = correct = seen = 0
            start = time.perf_counter()
            for x, y in train_loader:
                x, y = x.to(device, memory_format=memory_format) if x.dim() == 4 else x.to(device), y.to(device)
                for group, scale, limit in zip(optimizer.param_groups, scales, group_epochs):
                    group["lr"] = lr * scale * lr_factor(step) if epoch < limit else 0.0
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    logits = model(x).float()  # (B, num_classes)
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x).float()  # (B, num_classes)
                loss = criterion(logits, y)
                if teacher is not None:
                    loss = (1 - kd_weight) * loss + kd_weight * hinton_kd(logits, teacher_logits, kd_temperature)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"Training loss became {loss.item()} at epoch {epoch + 1}; lower lr (got {lr})."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if slow is not None and step % LOOKAHEAD_EVERY == 0:
                    _lookahead_sync(model, slow, decay=LOOKAHEAD_DECAY ** LOOKAHEAD_EVERY * (step / total_steps) ** 3)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(dim=1) == y).sum().item()
                seen += len(y)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            if averaged is not None:
                averaged.update_parameters(model)
            history["seconds"].append(time.perf_counter() - start)
            test_acc = evaluate(model, test_loader, device, flip=flip_eval) if test_loader is not None else None
            history["epoch"].append(epoch + 1)
            history["train_loss"].append(loss_sum / seen)
            history["train_acc"].append(correct / seen)
            history["test_acc"].append(test_acc)
            history["lr"].append(lr * lr_factor(step))  # after the last step: the schedule's end, lr_end * lr or lr
            if test_acc is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / seen:.3f}", test_acc=f"{test_acc:.3f}")
            if checkpoint_dir is not None:
                _save_supervised(checkpoint_dir, config, epoch + 1, step, model, optimizer, slow, averaged, history,
                                 earlier_seconds + time.perf_counter() - started, train_loader)
    except KeyboardInterrupt:
        if checkpoint_dir is not None:
            print(f"train_supervised interrupted; the completed epochs are saved in {str(checkpoint_dir)!r}. Resume "
                  "with the same call plus resume=True.", flush=True)
        raise
    finally:
        bar.close()
    if slow is not None and step >= LOOKAHEAD_EVERY:  # (before the first sync the slow copy is the init)
        _lookahead_sync(model, slow, decay=1.0)  # the model ends as the slow copy
    if averaged is not None:
        _take_average(model, averaged, train_loader, epoch_offset + epochs, device, memory_format)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    history["wall_seconds"] = earlier_seconds + time.perf_counter() - started
    return history


@torch.no_grad()
def _take_average(model: nn.Module, averaged: AveragedModel, loader, epoch: int, device, memory_format) -> None:
    """Set ``model``'s parameters to SWA's running mean, then recompute its BatchNorm statistics over
    ``loader`` at ``epoch`` (torch's ``update_bn``: the equal-weight mean of the batches' statistics)."""
    for mine, mean in zip(model.parameters(), averaged.module.parameters()):
        mine.copy_(mean)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    update_bn((x.to(device, memory_format=memory_format) if x.dim() == 4 else x.to(device) for x, _ in loader), model)


def _save_supervised(directory, config, epoch, step, model, optimizer, slow, averaged, history, wall_seconds,
                     loader) -> None:
    """train_supervised's checkpoint after ``epoch`` epochs (the newest 2 kept)."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_checkpoint({"format": FORMAT, "epoch": epoch, "step": step, "model": model.state_dict(),
                      "optimizer": optimizer.state_dict(), "slow": slow or {},
                      "averaged": averaged.state_dict() if averaged is not None else {}, "history": history,
                      "wall_seconds": wall_seconds, "rng": [capture_rng(loader)], "config": config,
                      "versions": {"torch": str(torch.__version__)}}, checkpoint_path(directory, epoch))
    prune_checkpoints(directory, keep=2)


def _resume_supervised(directory, resume, config, model, optimizer, slow, averaged, loader):
    """Load the newest usable checkpoint of ``directory`` into the run; ``(first epoch, step,
    history, earlier wall seconds)``, or None to start from scratch. Raises before any training
    when the folder holds another run's checkpoints."""
    message, payload = find_resume_point(directory, resume)
    if message is not None and message[0] == "error":
        raise (CheckpointError if resume else ValueError)(message[1])
    if message is not None:
        warnings.warn(message[1], RuntimeWarning, stacklevel=3)
    if payload is None:
        return None
    diff = config_diff(payload["config"], config, ignore=())
    if diff:
        details = "; ".join(f"{k}: checkpoint {payload['config'].get(k)!r}, now {config.get(k)!r}" for k in diff)
        raise ValueError(f"Cannot resume from {directory}: its checkpoint was written by a different training run "
                         f"({details}). Resume with the same model, loader and options, or use an empty checkpoint_dir.")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:
        raise ValueError(f"Cannot resume from {directory}: the model does not match the checkpoint's weights: {err}") from err
    optimizer.load_state_dict(payload["optimizer"])
    if slow is not None:
        for name, value in payload["slow"].items():
            slow[name].copy_(value)
    if averaged is not None:
        averaged.load_state_dict(payload["averaged"])
    restore_rng(payload["rng"][0], loader)
    return payload["epoch"], payload["step"], payload["history"], payload["wall_seconds"]


LOOKAHEAD_EVERY, LOOKAHEAD_DECAY = 5, 0.95  # airbench's Lookahead: a sync every 5 steps, 0.95 per step


@torch.no_grad()
def _lookahead_sync(model: nn.Module, slow: dict[str, Tensor], decay: float) -> None:
    """Move each slow tensor towards the model's by ``1 - decay``, then set the model's to it."""
    for name, value in model.state_dict().items():
        if name in slow:
            slow[name].lerp_(value, 1 - decay)
            value.copy_(slow[name])


# --------------------------------------------------------------------------------------------
# teacher cache
# --------------------------------------------------------------------------------------------
def _teacher_config(name: str, model_kwargs: dict, epochs: int, lr: float, seed: int, data_tag: str) -> str:
    """Canonical JSON of everything that determines a trained teacher."""
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    config = {"name": name, "model_kwargs": model_kwargs, "epochs": epochs, "lr": lr, "seed": seed,
              "data_tag": data_tag, "torch": major_minor}
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise TypeError(
            f"Expected JSON-serialisable model_kwargs (ints, floats, strings, lists) but got {model_kwargs!r}: {err}."
        ) from err


def teacher_key(config_json: str) -> str:
    """Short hash (12 hex digits) of a canonical config JSON."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:12]


def load_or_train_teacher(
    name: str,
    model_kwargs: dict,
    train_loader,
    test_loader,
    *,
    epochs: int,
    lr: float = 0.05,
    seed: int = 0,
    data_tag: str = "",
    cache_dir: str | os.PathLike | None = None,
    retrain: bool = False,
    progress: bool = True,
    device=None,
) -> tuple[nn.Module, dict]:
    """Return a trained teacher, from ``<cache_dir>/teachers/<name>-<key>.pt`` when it exists.

    ``key`` hashes the canonical JSON of (name, model_kwargs, epochs, lr, seed, data_tag, torch
    major.minor); put whatever identifies the training data (split, limit, augmentation) in
    ``data_tag``; when it is empty, ``train_loader.data_tag`` is used if the loader has one (the
    loaders of ``cifar10_loaders`` do). A cached file is reused, never silently retrained; a file whose stored config differs
    from the requested one raises ``ValueError`` unless ``retrain=True``. The file holds
    ``{"state_dict", "config" (JSON str), "test_acc", "history"}`` and is written atomically.

    Returns:
        ``(model in eval mode, {"test_acc", "key", "path", "cached", "config", "history"})``.
    """
    from .data import default_cache_dir

    if not isinstance(model_kwargs, dict):
        raise TypeError(f"Expected model_kwargs to be a dict, e.g. {{'width': 64}}, but got {type(model_kwargs).__name__}.")
    if not isinstance(data_tag, str):
        raise TypeError(f"Expected data_tag to be a str but got {type(data_tag).__name__}.")
    data_tag = data_tag or getattr(train_loader, "data_tag", "") or ""
    config = _teacher_config(name, model_kwargs, epochs, lr, seed, data_tag)
    key = teacher_key(config)
    path = default_cache_dir(cache_dir) / "teachers" / f"{name}-{key}.pt"
    torch.manual_seed(seed)
    model = build_model(name, **model_kwargs)  # validates name and kwargs before any training

    if path.is_file() and not retrain:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("config") != config:
            raise ValueError(
                f"The cached teacher {path} was trained with config {payload.get('config')} but "
                f"{config} was requested. Delete the file or pass retrain=True to overwrite it."
            )
        model.load_state_dict(payload["state_dict"])
        model.to(_resolve_device(model, train_loader, device)).eval()
        print(f"loaded cached teacher {name} from {path} (test acc {payload['test_acc']:.4f})")
        info = {"test_acc": payload["test_acc"], "key": key, "path": str(path), "cached": True,
                "config": json.loads(config), "history": payload.get("history")}
        return model, info

    history = train_supervised(model, train_loader, test_loader, epochs=epochs, lr=lr, seed=seed,
                               device=device, progress=progress)
    test_acc = history["test_acc"][-1] if test_loader is not None else float("nan")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"state_dict": state, "config": config, "test_acc": test_acc, "history": history}, path)
    info = {"test_acc": test_acc, "key": key, "path": str(path), "cached": False,
            "config": json.loads(config), "history": history}
    return model, info
