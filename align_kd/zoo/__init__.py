"""Shipped CIFAR-10 teachers: fast training recipes, checksummed weights and a card for each.

``list_teachers()`` names the teachers that ship with the package; ``load_teacher(name)`` returns
``(model in eval mode, card)``. Each teacher is ``weights/<name>.pt`` (a float32 state dict) beside
``weights/<name>.json`` (its card):

- ``test_acc``: top-1 accuracy of the plain forward (what distillation sees) on the full
  10,000-image test split of the shared JPEG CIFAR-10; ``test_acc_flip`` with test-time flips;
- ``sha256`` of the weight file (checked on every load), ``params``, ``train_seconds``,
  ``threads`` (torch threads it was trained with), ``mean`` / ``std`` (the per-channel input
  normalisation for images scaled to [0, 1]: the library's loaders apply it), ``recipe`` (every
  training option), ``seed``, ``history`` and ``versions``; a recipe with an SWA stage adds
  ``test_acc_before_swa``, ``history_swa`` and, when that stage started from an existing teacher,
  ``from_teacher`` (its name and sha256); an SWA stage that distils (``Recipe.swa_teachers``) adds
  ``distilled_from`` (each teacher's name, sha256, test_acc and train_seconds).

``train_teacher(name)`` (``python -m align_kd zoo train NAME``) regenerates a teacher from scratch
with :func:`align_kd.models.train_supervised`, the library's supervised loop. A recipe with an SWA
stage can start that stage from a shipped teacher trained by its first stage
(``train_teacher(name, from_teacher=...)``, ``zoo train NAME --from-teacher FIRST``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .._env import versions
from .._io import atomic_save, atomic_write_text
from ..data import CIFAR10_MEAN, CIFAR10_STD, TensorLoader, load_cifar10
from ..models import FastCNN, SoftmaxEnsemble, build_model, check_kd_options, evaluate, train_supervised

__all__ = ["RECIPES", "Recipe", "TeacherCheckError", "list_teachers", "load_teacher", "train_teacher", "whiten_init"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class TeacherCheckError(RuntimeError):
    """A shipped teacher's weight file does not match its card (damaged or replaced)."""


@dataclass(frozen=True)
class Recipe:
    """How a zoo teacher is trained (every field goes on its card)."""

    model: str  # a name of align_kd.models.MODELS
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 512
    lr: float = 0.4  # peak learning rate (mean loss)
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    warmup_epochs: float = 2.0
    schedule: str = "linear"  # warm-up then linear decay to 0
    translate: int = 2  # augmentation: random translation by up to this many pixels, plus flips
    padding_mode: str = "zeros"  # the translation's border: "zeros" (black) or "reflect" (airbench's)
    flip: str = "random"  # "random" per image and epoch, or "alternate" (airbench's: both ways every two epochs)
    lr_start: float = 0.0  # the schedule starts at lr_start * lr ...
    lr_end: float = 0.0  # ... and ends at lr_end * lr
    bias_lr_scale: float = 1.0  # BatchNorm shifts (and other 1-d parameters) train at this multiple of lr
    whiten: bool = False  # set the FastCNN's first conv from the training images' patch covariance
    # None: the whitening conv's bias trains all along with the other 1-d parameters (at bias_lr_scale);
    # an int: it trains at the base lr for that many epochs, then stays fixed (airbench: 3)
    whiten_bias_epochs: int | None = None
    amp: bool = True  # bfloat16 autocast in training (evaluation and the shipped weights are float32)
    lookahead: bool = False  # airbench's Lookahead: the weights end as a slow average (see train_supervised)
    # a second stage after `epochs`: stochastic weight averaging (Izmailov et al. 2018), swa_epochs more epochs at
    # the constant learning rate swa_lr (fresh momentum, no Lookahead), the weights averaged at the end of each,
    # then BatchNorm statistics recomputed on the training images (train_supervised(average="swa"))
    swa_epochs: int = 0
    swa_lr: float = 0.0
    # the SWA stage can distil from shipped teachers (their mean softmax, a SoftmaxEnsemble): its loss is then
    # (1 - swa_kd_weight) * cross-entropy + swa_kd_weight * T^2 * KL at T = swa_kd_temperature (train_supervised(teacher=))
    swa_teachers: tuple[str, ...] = ()
    swa_kd_weight: float = 0.5
    swa_kd_temperature: float = 1.0
    description: str = ""


#: the teachers the package ships, by name
RECIPES: dict[str, Recipe] = {
    # airbench94's hyperparameters in mean-loss form: lr 11.5 per 1024 examples with momentum 0.85
    # is 0.75 at batch 512; its decoupled weight decay 0.0153 per 1024 examples is 1.33e-3 at that
    # lr; BatchNorm shifts at 64x the lr with the same decay per step; triangle 0.2 -> 1 (at 23% of
    # training) -> 0.07
    "fastcnn": Recipe(
        "fastcnn", {"widths": [32, 128, 128]}, epochs=17, batch_size=512, lr=0.75, momentum=0.85, weight_decay=1.33e-3,
        warmup_epochs=17 * 0.23, lr_start=0.2, lr_end=0.07, bias_lr_scale=64.0, whiten=True,
        description="airbench-style CNN (whitened 2x2 stem, 3 conv groups 32/128/128, GELU), 0.5M parameters",
    ),
    "resnet20": Recipe(
        "resnet", {"depth": 20, "width": 16}, epochs=25, batch_size=256, lr=0.2, label_smoothing=0.1,
        warmup_epochs=2.0, translate=4,
        description="CIFAR ResNet-20 (He et al. 2016), 0.27M parameters: the deep teacher for depth mismatch",
    ),
}


# the same recipe without label smoothing: a smoothed teacher's logits span a small range, so at
# Hinton's T = 4 its softened target is close to uniform (benchmarks/kd_temperature.py); this one
# is trained on plain cross-entropy, as the teachers of the KD papers are
RECIPES["fastcnn-ce"] = replace(
    RECIPES["fastcnn"], label_smoothing=0.0,
    description="fastcnn's net and recipe without label smoothing (plain cross-entropy), 0.5M parameters")

# the same recipe with airbench's Lookahead: +1.05 points on the plain forward at seed 0, in the same
# time (benchmarks/teacher_recipes.py); the best 10-minute teacher measured here, not the benchmarks'
# (their records hang on fastcnn)
RECIPES["fastcnn-lookahead"] = replace(
    RECIPES["fastcnn"], lookahead=True,
    description="fastcnn's net and recipe with airbench's Lookahead (a slow weight average), 0.5M parameters")

# the deep teacher at the depth of He et al.'s ResNet-56 (0.86M parameters): resnet20's recipe twice
# as long (50 epochs) with Lookahead (benchmarks/teacher_recipes.py, variant resnet56-50ep+lookahead;
# about 2 hours on this 2-core CPU). setting (ii)'s records hang on resnet20
RECIPES["resnet56"] = replace(
    RECIPES["resnet20"], model_kwargs={**RECIPES["resnet20"].model_kwargs, "depth": 56}, epochs=50, lookahead=True,
    description="CIFAR ResNet-56 (He et al. 2016), 0.86M parameters, 50 epochs with Lookahead")

# resnet56 then stochastic weight averaging: 12 more epochs (a quarter of the first stage's) at a constant lr of 0.05
# (a quarter of the peak), the weights averaged at every epoch's end, BatchNorm recomputed. `zoo train resnet56-swa
# --from-teacher resnet56` runs only the second stage, from the shipped resnet56 (its first stage, checked)
RECIPES["resnet56-swa"] = replace(
    RECIPES["resnet56"], swa_epochs=12, swa_lr=0.05,
    description="resnet56 plus 12 epochs of stochastic weight averaging (constant lr 0.05), 0.86M parameters")


# width instead of depth: ResNet-20 at twice the channels (32/64/128; 1.08M parameters, about ResNet-56's time per
# step), resnet56's recipe unchanged. 0.9021 at seed 0 against resnet56's 0.8915 (benchmarks/teacher_recipes.py,
# variant resnet20w32-50ep+lookahead): the deep teacher that reaches issue 12's 90%. Same 11 taps as resnet20
RECIPES["resnet20-w32"] = replace(
    RECIPES["resnet56"], model_kwargs={"depth": 20, "width": 32},
    description="CIFAR ResNet-20 at twice the width (32/64/128 channels), 1.08M parameters, resnet56's recipe: "
                "the deep teacher at 90%")


def _check_name(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"Expected a zoo teacher name in {sorted(RECIPES)} but got {name!r}.")
    return RECIPES[name]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_kwargs(recipe: Recipe) -> dict:
    kwargs = dict(recipe.model_kwargs)
    if "widths" in kwargs:
        kwargs["widths"] = tuple(kwargs["widths"])
    return kwargs


def list_teachers(weights_dir: str | Path | None = None) -> list[str]:
    """Names of the teachers whose weights and card ship in ``weights_dir`` (default: the package's)."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return sorted(n for n in RECIPES if (folder / f"{n}.pt").is_file() and (folder / f"{n}.json").is_file())


def _read_checked(name: str, folder: Path) -> tuple[dict, dict]:
    """``(state dict, card)`` of teacher ``name`` in ``folder``, the weight file's sha256 checked against the card."""
    weights, card_file = folder / f"{name}.pt", folder / f"{name}.json"
    if not weights.is_file() or not card_file.is_file():
        raise FileNotFoundError(
            f"Zoo teacher {name!r} has no weights/card in {folder} (expected {weights.name} and {card_file.name}); "
            f"shipped: {list_teachers(folder)}. Regenerate it with `python -m align_kd zoo train {name}`."
        )
    card = json.loads(card_file.read_text())
    digest = _sha256(weights)
    if digest != card.get("sha256"):
        raise TeacherCheckError(
            f"The weights of zoo teacher {name!r} ({weights}) have sha256 {digest} but its card says "
            f"{card.get('sha256')}: the file is damaged or was replaced. Reinstall align_kd or regenerate it "
            f"with `python -m align_kd zoo train {name}`."
        )
    return torch.load(weights, map_location="cpu", weights_only=True), card


def load_teacher(name: str, *, weights_dir: str | Path | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode on the CPU, card)`` of a shipped teacher; the weights' sha256 is checked."""
    recipe = _check_name(name)
    state, card = _read_checked(name, Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR)
    model = build_model(recipe.model, **_model_kwargs(recipe))
    model.load_state_dict(state)
    return model.eval(), card


@torch.no_grad()
def whiten_init(conv: nn.Conv2d, images: Tensor, eps: float = 5e-4) -> None:
    """Set ``conv``'s weights to whiten its input patches (airbench's frozen first layer).

    ``conv``: k x k, ``2 * C * k * k`` output channels, C input channels. ``images``: (N, C, H, W)
    normalised float images. With the patch covariance ``V diag(e) V^T`` (eigenvalues ascending),
    the filters are ``V / sqrt(e + eps)`` and their negatives, so every output channel has unit
    variance on the training patches and the channels are decorrelated. The bias is zeroed.
    """
    c, k = conv.in_channels, conv.kernel_size[0]
    d = c * k * k
    if conv.out_channels != 2 * d or conv.kernel_size[0] != conv.kernel_size[1]:
        raise ValueError(f"Expected a square conv with 2 * C * k * k = {2 * d} output channels but got {conv}.")
    patches = images.double().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)  # (N * H' * W', C * k * k)
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)  # (d, d)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    filters = (evecs.T / torch.sqrt(evals + eps)[:, None]).reshape(d, c, k, k)  # (d, C, k, k)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight.dtype))
    if conv.bias is not None:
        conv.bias.zero_()


def _param_groups(model: nn.Module, recipe: Recipe, epochs: int, *, second_stage: bool = False) -> list[dict]:
    """The recipe's optimiser groups: weights; 1-d parameters at ``bias_lr_scale``; a whitened stem's
    bias in its own group that stops training after ``whiten_bias_epochs`` (fixed all through a second stage)."""
    whiten_bias = [model.whiten.bias] if recipe.whiten_bias_epochs is not None else []
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() == 1 and not any(p is q for q in whiten_bias)]
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    groups = [{"params": matrices}, {"params": vectors, "lr_scale": recipe.bias_lr_scale,
                                     "weight_decay": recipe.weight_decay / recipe.bias_lr_scale}]
    if whiten_bias:
        groups.append({"params": whiten_bias, "train_epochs": 0 if second_stage else min(recipe.whiten_bias_epochs, epochs)})
    return groups


def _folder_of(name: str, weights_dir) -> Path:
    """Where teacher ``name`` is read from: ``weights_dir`` when it holds it, else the package's folder."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    return folder if (folder / f"{name}.pt").is_file() else WEIGHTS_DIR


def _load_swa_teachers(name: str, recipe: Recipe, weights_dir) -> tuple[SoftmaxEnsemble, list[dict]]:
    """The SWA stage's teacher (the mean softmax of ``recipe.swa_teachers``, each sha256-checked) and
    what the card records of each: name, sha256, test_acc, train_seconds."""
    if not recipe.swa_epochs:
        raise ValueError(f"Recipe {name!r} names swa_teachers={list(recipe.swa_teachers)} but has no SWA stage "
                         f"(swa_epochs=0) to distil in. Set swa_epochs > 0 or swa_teachers=().")
    check_kd_options(recipe.swa_kd_weight, recipe.swa_kd_temperature, prefix="swa_")
    loaded = [load_teacher(teacher, weights_dir=_folder_of(teacher, weights_dir)) for teacher in recipe.swa_teachers]
    records = [{k: card[k] for k in ("name", "sha256", "test_acc", "train_seconds")} for _, card in loaded]
    return SoftmaxEnsemble([model for model, _ in loaded]), records


def _first_stage(recipe: Recipe) -> dict:
    """The fields that decide a recipe's first stage (its SWA stage and description left out)."""
    second = ("swa_epochs", "swa_lr", "swa_teachers", "swa_kd_weight", "swa_kd_temperature", "description")
    return {k: v for k, v in asdict(recipe).items() if k not in second}


def _load_first_stage(name: str, recipe: Recipe, from_teacher: str, weights_dir, seed: int, epochs: int,
                      train_images: int) -> tuple[nn.Module, dict]:
    """``from_teacher``'s model (built by ``recipe``) and card, checked to be ``recipe``'s first stage."""
    if not recipe.swa_epochs:
        raise ValueError(f"from_teacher={from_teacher!r} skips the first stage of a two-stage recipe, but {name!r} has "
                         f"no second stage (swa_epochs=0). Train it from scratch (no from_teacher).")
    state, card = _read_checked(from_teacher, _folder_of(from_teacher, weights_dir))
    defaults = {f.name: f.default for f in fields(Recipe) if f.default is not MISSING}
    wanted = {**_first_stage(recipe), "epochs": epochs, "seed": seed, "train_images": train_images}
    had = {k: card["recipe"].get(k, defaults.get(k)) for k in _first_stage(recipe)}
    had.update(seed=card.get("seed"), train_images=card.get("train_images"))
    differ = [f"{k}: {from_teacher} has {had[k]!r}, {name} needs {wanted[k]!r}" for k in wanted if had[k] != wanted[k]]
    if differ:
        raise ValueError(f"Teacher {from_teacher!r} is not the first stage of recipe {name!r} ({'; '.join(differ)}). "
                         f"Start from a teacher trained by exactly that stage, or train {name!r} from scratch.")
    model = build_model(recipe.model, **_model_kwargs(recipe))
    model.load_state_dict(state)
    return model, card


def train_teacher(
    name: str,
    *,
    data_root=None,
    cache_dir=None,
    weights_dir: str | Path | None = None,
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    epochs: int | None = None,
    progress: bool = True,
    recipe: Recipe | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    from_teacher: str | None = None,
) -> tuple[nn.Module, dict]:
    """Train zoo teacher ``name`` from scratch on CIFAR-10 and write its weights and card.

    ``train_limit`` / ``test_limit`` / ``epochs`` shorten the recipe (smoke runs; the card records
    them; ``epochs`` is the first stage's). ``recipe`` trains that recipe instead of ``RECIPES[name]``
    (recipe studies: ``benchmarks/teacher_recipes.py``; it needs ``weights_dir``); ``name`` still names
    the files. Writes ``<weights_dir>/<name>.pt`` and ``<name>.json`` atomically (default: the
    package's folder) and returns ``(model in eval mode, card)``. ``checkpoint_dir`` / ``resume``: as
    :func:`align_kd.models.train_supervised`'s (a checkpoint after every epoch, the SWA stage's in
    ``checkpoint_dir/swa``; a resumed run ends with bitwise the weights of an uninterrupted one, and
    ``train_seconds`` sums its sittings). ``from_teacher``: a recipe with an SWA stage starts it from
    that teacher (in ``weights_dir``, else the package's), which must have been trained by this
    recipe's first stage at this seed (checked against its card: a ValueError otherwise); the card's
    ``train_seconds`` adds its ``train_seconds``. The first stage is deterministic, so this ends where
    training from scratch on the same machine ends.
    """
    if recipe is not None and weights_dir is None:
        raise ValueError(f"train_teacher({name!r}, recipe=...) got no weights_dir: a recipe study would overwrite "
                         f"the package's shipped teachers. Pass weights_dir (a scratch folder).")
    recipe = _check_name(name) if recipe is None else recipe
    epochs = recipe.epochs if epochs is None else epochs
    if recipe.whiten_bias_epochs is not None and not recipe.whiten:
        raise ValueError(f"Recipe {name!r} sets whiten_bias_epochs={recipe.whiten_bias_epochs} but whiten=False: "
                         f"only a whitened FastCNN stem has that bias. Set whiten=True or whiten_bias_epochs=None.")
    if recipe.swa_epochs and not recipe.swa_lr > 0:
        raise ValueError(f"Recipe {name!r} has swa_epochs={recipe.swa_epochs} but swa_lr={recipe.swa_lr!r}: the SWA "
                         f"stage needs a learning rate > 0.")
    train_x, train_y = load_cifar10(data_root, split="train", limit=train_limit, cache_dir=cache_dir)
    test_x, test_y = load_cifar10(data_root, split="test", limit=test_limit, cache_dir=cache_dir)
    first_card = swa_teacher = None
    if recipe.swa_teachers:  # checked and loaded before any training
        swa_teacher, swa_teacher_cards = _load_swa_teachers(name, recipe, weights_dir)
    if from_teacher is not None:  # checked before any training
        model, first_card = _load_first_stage(name, recipe, from_teacher, weights_dir, seed, epochs, len(train_y))
    train = TensorLoader(train_x, train_y, batch_size=recipe.batch_size, shuffle=True, augment=True, seed=seed,
                         padding=recipe.translate, padding_mode=recipe.padding_mode, flip=recipe.flip,
                         drop_last=len(train_y) >= 2 * recipe.batch_size)
    test = TensorLoader(test_x, test_y, batch_size=1000, shuffle=False)
    common = dict(weight_decay=recipe.weight_decay, seed=seed, momentum=recipe.momentum,
                  label_smoothing=recipe.label_smoothing, channels_last=True, amp=recipe.amp, progress=progress,
                  resume=resume)
    if first_card is not None:
        history, train_seconds = first_card["history"], first_card["train_seconds"]
    else:
        torch.manual_seed(seed)
        model = build_model(recipe.model, **_model_kwargs(recipe))
        start = time.perf_counter()
        if recipe.whiten:
            if not isinstance(model, FastCNN):
                raise ValueError(f"Recipe {name!r}: whiten=True needs a FastCNN but the model is {type(model).__name__}.")
            whiten_init(model.whiten, next(iter(TensorLoader(train_x[:5000], train_y[:5000], batch_size=5000)))[0])
        groups = _param_groups(model, recipe, epochs)
        setup_seconds = time.perf_counter() - start
        history = train_supervised(
            model, train, None, epochs=epochs, lr=recipe.lr, param_groups=groups, lr_start=recipe.lr_start,
            lr_end=recipe.lr_end, warmup_epochs=recipe.warmup_epochs * epochs / recipe.epochs, schedule=recipe.schedule,
            lookahead=recipe.lookahead, checkpoint_dir=checkpoint_dir, **common,
        )
        # this sitting's set-up (whitening) plus the loop's wall time over every sitting
        train_seconds = setup_seconds + history["wall_seconds"]
    swa = {}
    if recipe.swa_epochs:
        swa["test_acc_before_swa"] = evaluate(model, test)
        swa["history_swa"] = train_supervised(
            model, train, None, epochs=recipe.swa_epochs, lr=recipe.swa_lr, schedule="constant", average="swa",
            epoch_offset=epochs, param_groups=_param_groups(model, recipe, epochs, second_stage=True),
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / "swa",
            **(dict(teacher=swa_teacher, kd_weight=recipe.swa_kd_weight, kd_temperature=recipe.swa_kd_temperature)
               if swa_teacher is not None else {}), **common,
        )
        if swa_teacher is not None:
            swa["distilled_from"] = swa_teacher_cards
        train_seconds += swa["history_swa"]["wall_seconds"]
        if first_card is not None:
            swa["from_teacher"] = {"name": from_teacher, "sha256": first_card["sha256"]}
    model.eval()
    test_acc, test_acc_flip = evaluate(model, test), evaluate(model, test, flip=True)
    test_acc_tta = evaluate(model, test, flip=True, translate=True)  # airbench's test-time augmentation
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    weights = folder / f"{name}.pt"
    atomic_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights)
    card = {
        "name": name,
        "description": recipe.description,
        "test_acc": test_acc,
        "test_acc_flip": test_acc_flip,
        "test_acc_tta": test_acc_tta,
        "test_images": len(test_y),
        "train_images": len(train_y),
        "sha256": _sha256(weights),
        "params": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "recipe": {**asdict(recipe), "epochs": epochs, "swa_teachers": list(recipe.swa_teachers)},  # as JSON holds it
        "seed": seed,
        "history": history,
        **swa,
        "versions": versions(),
    }
    atomic_write_text(folder / f"{name}.json", json.dumps(card, indent=1))
    return model, card
