"""CIFAR-10 as in-memory uint8 tensors, a batch augmenter and a tiny tensor loader.

Where the data comes from (first hit wins):

1. ``root=`` passed to :func:`load_cifar10`,
2. the environment variable ``ALIGN_KD_DATA``,
3. the cache directory (``cache_dir=``, else ``$ALIGN_KD_CACHE``, else ``~/.cache/align_kd``),
4. with ``download=True``: ``torchvision.datasets.CIFAR10`` downloads the original release there.

Each of these may be the JPEG archive ``cifar10-jpeg.tar.gz`` (``train/<class>/<n>.jpg``,
``test/<class>/<n>.jpg``, read straight from the archive), the original python release folder
``cifar-10-batches-py`` (or its ``cifar-10-python.tar.gz``), an extracted ImageFolder-layout
directory (``train/`` and ``test/``), or a directory holding one of those.

A source is decoded once; both splits are then cached as uint8 tensors in
``<cache_dir>/cifar10/<split>-<key>.pt`` (``key`` hashes the source path, size and mtime), so later
loads memory-map the file and take a fraction of a second. The cached split is stored in a fixed
pseudo-random order (a seed-0 permutation of the source order), so ``limit=n`` is just the first
``n`` images and even a small subset holds every class.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import tarfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._io import atomic_save

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "TensorLoader",
    "augment",
    "cifar10_loaders",
    "default_cache_dir",
    "load_cifar10",
    "normalize",
    "sample_order",
    "split_heldout",
]

#: class names; index in this tuple is the label (the usual CIFAR-10 order, also the sorted order)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: per-channel mean and std of the CIFAR-10 training set, pixels scaled to [0, 1]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "test")
DATA_ENV = "ALIGN_KD_DATA"
CACHE_ENV = "ALIGN_KD_CACHE"
ORDER_SEED = 0
_CACHE_VERSION = "cifar10-v1"
_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"
_BATCHES_DIR = "cifar-10-batches-py"
_BATCH_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
#: names looked for inside a directory, besides the directory itself
_CHILD_NAMES = (_BATCHES_DIR, _JPEG_ARCHIVE, "cifar10-jpeg", "CIFAR-10-images", "cifar-10-python.tar.gz")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------
# locating a source
# --------------------------------------------------------------------------------------------
def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``cache_dir`` if given, else ``$ALIGN_KD_CACHE``, else ``~/.cache/align_kd``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "align_kd"


def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar"))


def _is_batches_dir(path: Path) -> bool:
    return path.is_dir() and (path / "data_batch_1").is_file() and (path / "test_batch").is_file()


def _is_image_folder(path: Path) -> bool:
    return path.is_dir() and all(
        (path / split).is_dir() and any((path / split / c).is_dir() for c in CIFAR10_CLASSES) for split in SPLITS
    )


def _probe(path: Path) -> tuple[str, Path] | None:
    """Classify ``path`` (or a known child of it) as a CIFAR-10 source: ``(kind, path)`` or None."""
    for candidate in [path] + ([path / name for name in _CHILD_NAMES] if path.is_dir() else []):
        if _is_tar(candidate):
            return "tar", candidate
        if _is_batches_dir(candidate):
            return "batches", candidate
        if _is_image_folder(candidate):
            return "folder", candidate
    return None


def _describe_probe(path: Path, origin: str) -> str:
    if not path.exists():
        return f"{path} ({origin}): does not exist"
    if path.is_dir():
        children = ", ".join(_CHILD_NAMES)
        return (
            f"{path} ({origin}): not a cifar-10-batches-py folder, JPEG archive or train/+test/ image "
            f"folder, and holds none of: {children}"
        )
    return f"{path} ({origin}): a file, but not a .tar.gz/.tgz/.tar archive"


def _locate(root, cache_dir: Path) -> tuple[tuple[str, Path] | None, list[str]]:
    """Search root, $ALIGN_KD_DATA and the cache dir in that order; return the hit and what was looked at."""
    env = os.environ.get(DATA_ENV)
    places = [
        (root, "root= argument", "root=: not given"),
        (env or None, f"${DATA_ENV}", f"${DATA_ENV}: not set"),
        (cache_dir, "cache directory", ""),
    ]
    looked = []
    for place, origin, absent in places:
        if place is None:
            looked.append(absent)
            continue
        path = Path(place).expanduser()
        hit = _probe(path)
        if hit is not None:
            return hit, looked
        looked.append(_describe_probe(path, origin))
    return None, looked


def _not_found_message(looked: list[str], cache_dir: Path, download_error: BaseException | None) -> str:
    lines = ["CIFAR-10 was not found. Looked in:"] + [f"  - {place}" for place in looked]
    if download_error is not None:
        lines.append(f"  - download=True: torchvision could not download into {cache_dir}: {download_error!r}")
    lines += [
        "Fix it in one of two ways:",
        f"  1. set {DATA_ENV}=/path/to/it (or pass root=) to a '{_BATCHES_DIR}' folder (the original python "
        f"release), the JPEG archive '{_JPEG_ARCHIVE}', or a directory containing either;",
        "  2. call load_cifar10(..., download=True) on a machine with network access; the original release "
        f"is then downloaded into {cache_dir}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def _member_split_class(name: str) -> tuple[str, int] | None:
    """``'.../train/cat/0001.jpg'`` -> ``('train', 3)``; None for members that are not split images."""
    parts = name.replace("\\", "/").split("/")
    if len(parts) < 3 or not parts[-1].lower().endswith(_IMAGE_SUFFIXES) or parts[-3] not in SPLITS:
        return None
    if parts[-2] not in CIFAR10_CLASSES:
        raise ValueError(
            f"Expected CIFAR-10 class folders {CIFAR10_CLASSES} but found {parts[-2]!r} in {name!r}. "
            "Use the ImageFolder layout train/<class>/<n>.jpg with the standard class names."
        )
    return parts[-3], CIFAR10_CLASSES.index(parts[-2])


def _decode_image(data: bytes, name: str) -> np.ndarray:
    """JPEG/PNG bytes -> (32, 32, 3) uint8 array."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        array = np.asarray(img.convert("RGB"))
    if array.shape != (32, 32, 3):
        raise ValueError(f"Expected a 32x32 RGB image in {name!r} but got shape {array.shape}; is this CIFAR-10?")
    return array


def _stack(records: list[tuple[str, int, np.ndarray]]) -> tuple[Tensor, Tensor]:
    """Sort ``(name, label, (32, 32, 3) image)`` records by name -> images (N, 3, 32, 32), labels (N,)."""
    records.sort(key=lambda r: r[0])
    images = np.stack([r[2] for r in records]).transpose(0, 3, 1, 2)  # (N, 3, 32, 32)
    labels = np.array([r[1] for r in records], dtype=np.int64)  # (N,)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def _decode_tar(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Read an archive of JPEGs (``train/<class>/<n>.jpg``) or of the python release's pickled batches."""
    records: dict[str, list] = {split: [] for split in SPLITS}
    batches: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive, tqdm(
            desc=f"decoding {path.name} (once, then cached)", unit="img", mininterval=0.5
        ) as bar:
            for member in archive:
                if not member.isfile():
                    continue
                basename = member.name.rsplit("/", 1)[-1]
                if basename in _BATCH_FILES["train"] + _BATCH_FILES["test"]:
                    batches[basename] = archive.extractfile(member).read()
                    continue
                where = _member_split_class(member.name)
                if where is None:
                    continue
                split, label = where
                data = archive.extractfile(member).read()
                records[split].append((member.name, label, _decode_image(data, member.name)))
                bar.update(1)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ValueError(
            f"Expected a readable CIFAR-10 archive at {path} but reading it failed ({err!r}); "
            "the file may be truncated: delete it and copy or download it again."
        ) from err
    if batches:
        return _batches_from_bytes(batches, str(path))
    return {split: _stack(records[split]) for split in SPLITS if records[split]}


def _decode_folder(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    records: dict[str, list] = {split: [] for split in SPLITS}
    files = sorted(p for p in path.glob("*/*/*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    for file in tqdm(files, desc=f"decoding {path.name} (once, then cached)", unit="img", mininterval=0.5):
        rel = file.relative_to(path).as_posix()
        where = _member_split_class(rel)
        if where is not None:
            records[where[0]].append((rel, where[1], _decode_image(file.read_bytes(), str(file))))
    return {split: _stack(records[split]) for split in SPLITS if records[split]}


def _read_batch(raw: bytes, name: str) -> tuple[np.ndarray, list]:
    """Unpickle one python-release batch -> data (n, 3072) uint8, labels (n,)."""
    batch = pickle.loads(raw, encoding="bytes")
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    labels = batch.get(b"labels", batch.get("labels")) if isinstance(batch, dict) else None
    if data is None or labels is None:
        keys = sorted(map(repr, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"Expected a CIFAR-10 batch dict with b'data' and b'labels' in {name} but got {keys}; "
            "re-download the original python release."
        )
    return np.asarray(data, dtype=np.uint8), list(labels)


def _decode_batches(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    files = {n: path / n for names in _BATCH_FILES.values() for n in names if (path / n).is_file()}
    return _batches_from_bytes({n: f.read_bytes() for n, f in files.items()}, str(path))


def _batches_from_bytes(raw: dict[str, bytes], where: str) -> dict[str, tuple[Tensor, Tensor]]:
    """``{"data_batch_1": pickled bytes, ...}`` -> ``{split: (images (N, 3, 32, 32), labels (N,))}``."""
    out = {}
    for split, names in _BATCH_FILES.items():
        missing = [n for n in names if n not in raw]
        if missing:
            raise FileNotFoundError(
                f"Expected the CIFAR-10 batch files {names} in {where} but {missing} are missing; "
                "re-extract the original python release."
            )
        parts = [_read_batch(raw[n], f"{where}/{n}") for n in names]
        data = np.concatenate([p[0] for p in parts])  # (N, 3072)
        labels = np.concatenate([np.asarray(p[1], dtype=np.int64) for p in parts])  # (N,)
        images = data.reshape(-1, 3, 32, 32)  # (N, 3, 32, 32): 1024 R, then 1024 G, then 1024 B
        out[split] = (torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))
    return out


def _decode_source(kind: str, path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """Decode every split of a source into ``{split: (images (N, 3, 32, 32) uint8, labels (N,) int64)}``."""
    decoders = {"tar": _decode_tar, "batches": _decode_batches, "folder": _decode_folder}
    return decoders[kind](path)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def _source_stamp(kind: str, path: Path) -> list:
    """(name, size, mtime_ns) of the files/folders whose change should invalidate the cache."""
    if kind == "tar":
        files = [path]
    elif kind == "batches":
        files = [path / n for names in _BATCH_FILES.values() for n in names]
    else:
        files = [path / s / c for s in SPLITS for c in CIFAR10_CLASSES if (path / s / c).is_dir()]
    return [[str(f.name), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _cache_key(kind: str, path: Path) -> str:
    blob = repr([_CACHE_VERSION, ORDER_SEED, kind, str(path.resolve()), _source_stamp(kind, path)])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_order(n: int, seed: int = ORDER_SEED) -> Tensor:
    """The fixed (n,) permutation that maps cached position -> position in the sorted source order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _load_cached(file: Path) -> tuple[Tensor, Tensor] | None:
    if not file.is_file():
        return None
    try:
        payload = torch.load(file, mmap=True, weights_only=True)
        return payload["images"], payload["labels"]
    except Exception as err:  # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"Ignoring unreadable CIFAR-10 cache file {file} ({err!r}); decoding the source again.")
        return None


# --------------------------------------------------------------------------------------------
# public loading API
# --------------------------------------------------------------------------------------------
def load_cifar10(
    root: str | os.PathLike | None = None,
    *,
    split: str = "train",
    limit: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load one CIFAR-10 split as uint8 tensors.

    Args:
        root: the JPEG ``.tar.gz``, a ``cifar-10-batches-py`` folder, an ImageFolder-layout directory,
            or a directory containing one of them. Falls back to ``$ALIGN_KD_DATA``, then the cache dir.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        limit: keep only the first ``limit`` images of the fixed seed-0 shuffled order (all classes
            appear even in small subsets); None keeps the whole split.
        cache_dir: where decoded tensors are cached (default ``$ALIGN_KD_CACHE`` or ``~/.cache/align_kd``).
        download: if nothing is found, download the original release into ``cache_dir`` with torchvision.

    Returns:
        images: (N, 3, 32, 32) uint8; labels: (N,) int64 in 0..9 (order of :data:`CIFAR10_CLASSES`).
        Without ``limit`` the tensors may be memory-mapped from the (read-only by convention) cache file.
    """
    if split not in SPLITS:
        raise ValueError(f"Expected split to be one of {SPLITS} but got {split!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"Expected limit to be a positive int or None (whole split) but got {limit!r}.")
    cache = default_cache_dir(cache_dir)

    found, looked = _locate(root, cache)
    download_error = None
    if found is None and download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(cache), train=True, download=True)
            found = _probe(cache)
        except Exception as err:  # no network, proxy, disk full...
            download_error = err
    if found is None:
        raise FileNotFoundError(_not_found_message(looked, cache, download_error)) from download_error
    kind, path = found
    if root is not None and looked:  # root was given but held nothing; a later place did
        warnings.warn(f"root={str(root)!r} holds no CIFAR-10 ({looked[0]}); using {path} instead.")

    key = _cache_key(kind, path)
    cache_file = cache / "cifar10" / f"{split}-{key}.pt"
    cached = _load_cached(cache_file)
    if cached is None:
        decoded = _decode_source(kind, path)
        if split not in decoded:
            raise FileNotFoundError(
                f"Expected a {split!r} split in {path} but found only {sorted(decoded)}; "
                f"point root= at a copy that has {split}/<class>/ images."
            )
        for name, (images, labels) in decoded.items():
            order = sample_order(len(labels))  # (N,)
            payload = {
                "images": images[order].contiguous(),  # (N, 3, 32, 32) uint8
                "labels": labels[order].contiguous(),  # (N,) int64
                "source": str(path),
                "kind": kind,
                "version": _CACHE_VERSION,
            }
            try:
                atomic_save(payload, cache / "cifar10" / f"{name}-{key}.pt")
            except OSError as err:
                warnings.warn(f"Could not write the CIFAR-10 cache in {cache} ({err}); the next load decodes again.")
            if name == split:
                cached = payload["images"], payload["labels"]
    images, labels = cached
    if limit is not None:
        if limit > len(labels):
            raise ValueError(
                f"Expected limit <= {len(labels)} (the size of the {split} split) but got {limit}; "
                "pass limit=None for the whole split."
            )
        images, labels = images[:limit], labels[:limit]
    return images, labels


def normalize(images: Tensor) -> Tensor:
    """uint8 images (..., 3, H, W) in 0..255 -> float32 (..., 3, H, W) standardised with CIFAR-10 mean/std."""
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() < 3 or images.shape[-3] != 3:
        got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"Expected a uint8 tensor of shape (..., 3, H, W) but got a {got}; pass raw CIFAR-10 pixels.")
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(3, 1, 1)  # (3, 1, 1)
    return (images.float() / 255.0 - mean) / std  # (..., 3, H, W)


PADDING_MODES = ("zeros", "reflect")  # augment(): how the translated crop fills the border
FLIP_MODES = ("random", "alternate")  # TensorLoader: how training images are mirrored
FLIP_SEED = 7_919  # TensorLoader(flip="alternate") draws each image's orientation from seed + FLIP_SEED


def augment(
    x: Tensor,
    generator: torch.Generator | None = None,
    *,
    padding: int = 4,
    flip: bool | Tensor = True,
    padding_mode: str = "zeros",
) -> Tensor:
    """Random crop (padding ``padding``) plus random horizontal flip, for a whole batch at once.

    Args:
        x: (B, C, H, W) images of any dtype.
        generator: a CPU ``torch.Generator`` for the random offsets and flips (None: global RNG).
        flip: True: each image mirrored with probability 1/2 (drawn after the offsets); False: none;
            a (B,) bool tensor: exactly those images mirrored (nothing drawn for them).
        padding_mode: ``"zeros"`` (0 = black for uint8 pixels) or ``"reflect"`` (airbench's: the
            border mirrored, so a shifted image shows no black edge; needs ``padding`` < H and W).

    Returns:
        (B, C, H, W) tensor of the same dtype and device.
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"Expected a (B, C, H, W) tensor but got {got}; add a batch dimension with x[None].")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"Expected padding to be an int >= 0 but got {padding!r}.")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"Expected padding_mode in {PADDING_MODES} but got {padding_mode!r}.")
    b, c, h, w = x.shape
    if padding_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"padding_mode='reflect' needs padding < the image size {h}x{w} but got padding={padding}.")
    if isinstance(flip, Tensor) and (flip.dtype != torch.bool or tuple(flip.shape) != (b,)):
        raise ValueError(f"Expected flip as a ({b},) bool tensor (one per image) but got {flip.dtype} of shape {tuple(flip.shape)}.")
    padded = torch.nn.functional.pad(x, (padding,) * 4, mode="constant" if padding_mode == "zeros" else "reflect")  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(x.device)  # (B, 1)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator).to(x.device)  # (B, 1)
    if isinstance(flip, Tensor):
        flips = flip.view(b, 1).to(x.device)
    elif flip:
        flips = torch.rand(b, 1, generator=generator).to(x.device) < 0.5
    else:
        flips = torch.zeros(b, 1, dtype=torch.bool, device=x.device)
    rows = dy + torch.arange(h, device=x.device)  # (B, H)
    cols = torch.arange(w, device=x.device)  # (W,)
    cols = dx + torch.where(flips, w - 1 - cols, cols)  # (B, W)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    chans = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, chans, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]  # (B, C, H, W)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {name} to be an int >= {minimum} but got {value!r}.")


class TensorLoader:
    """Batches ``(x, y)`` from in-memory tensors: x float32 normalised (B, 3, H, W), y int64 (B,).

    Each epoch draws its shuffle permutation and augmentation from a ``torch.Generator`` seeded with
    ``seed + epoch``, so runs are reproducible and every rank sees the same permutation. The epoch is
    set with :meth:`set_epoch`; without it, each new iteration advances the epoch by one.

    With ``world_size > 1`` the (permuted) indices are sharded as ``perm[rank::world_size]``, first
    padded by wrapping around (or, with ``drop_last``, trimmed) to a multiple of ``world_size`` like
    ``DistributedSampler``, so every rank gets the same number of samples. ``drop_last`` also drops
    the final incomplete batch.

    Args:
        images: (N, 3, H, W) uint8 pixels (normalised with CIFAR-10 mean/std on the fly), or a float
            tensor taken as already normalised.
        labels: (N,) integer class indices.
        padding: with ``augment``, the random crop's padding (a translation by up to that many pixels).
        padding_mode: with ``augment``, ``"zeros"`` (black border) or ``"reflect"`` (see :func:`augment`).
        flip: with ``augment``, ``"random"`` (each image mirrored with probability 1/2 every epoch) or
            ``"alternate"`` (airbench's: each image gets one random orientation, fixed by ``seed``, in
            even epochs and the other in odd epochs, so every image is seen both ways every two epochs).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        padding: int = 4,
        padding_mode: str = "zeros",
        flip: str = "random",
    ):
        if not isinstance(images, Tensor) or images.dim() != 4:
            got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"Expected images to be a (N, C, H, W) tensor but got {got}; use load_cifar10().")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
            got = f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(f"Expected labels to be a (N,) integer tensor but got {got}.")
        if len(images) != len(labels):
            raise ValueError(f"Expected as many labels as images but got {len(labels)} labels for {len(images)} images.")
        if len(images) == 0:
            raise ValueError("Expected a non-empty dataset but got 0 images.")
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("seed", seed, 0)
        _check_int("padding", padding, 0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"Expected padding_mode in {PADDING_MODES} but got {padding_mode!r}.")
        if flip not in FLIP_MODES:
            raise ValueError(f"Expected flip in {FLIP_MODES} but got {flip!r}.")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"Expected rank in 0..{world_size - 1} (world_size={world_size}) but got {rank!r}.")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # (N, C, H, W)
        self.labels = labels.to(self.device, torch.int64)  # (N,)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, bool(shuffle), bool(augment), seed
        self.drop_last, self.rank, self.world_size = bool(drop_last), rank, world_size
        self.padding = padding  # augmentation: random translation by up to this many pixels
        self.padding_mode, self.flip = padding_mode, flip
        # "alternate": each image's orientation in even epochs, from its own generator (not the epochs'),
        # on the device of the batch indices that pick from it
        even = torch.rand(len(labels), generator=torch.Generator().manual_seed(FLIP_SEED + seed)) < 0.5 if flip == "alternate" else None
        self._even_flips = even.to(self.device) if even is not None else None  # (N,) bool
        self.dataset_size = len(labels)
        if drop_last and world_size > 1:
            self.num_samples = self.dataset_size // world_size
        else:
            self.num_samples = math.ceil(self.dataset_size / world_size)
        if len(self) == 0:
            raise ValueError(
                f"Expected at least one batch but rank {rank} has {self.num_samples} samples, fewer than "
                f"batch_size={batch_size} with drop_last=True; lower batch_size or pass drop_last=False."
            )
        self._epoch = 0
        #: describes the data (set by cifar10_loaders); load_or_train_teacher keys teachers by it
        self.data_tag = ""

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will use."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (seed ``seed + epoch``) for the next iteration."""
        _check_int("epoch", epoch, 0)
        self._epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """(num_samples,) dataset indices this rank visits in ``epoch``, in order."""
        return self._indices(torch.Generator().manual_seed(self.seed + epoch))

    def _indices(self, generator: torch.Generator) -> Tensor:
        n = self.dataset_size
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)  # (N,)
        total = self.num_samples * self.world_size
        if total > n:  # pad by wrapping around, as DistributedSampler does
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]  # (num_samples,)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self._epoch
        self._epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)  # the permutation, then augmentation
        index = self._indices(generator).to(self.device)  # (num_samples,)
        for i in range(len(self)):
            batch = index[i * self.batch_size : (i + 1) * self.batch_size]  # (B,)
            x = self.images[batch]  # (B, C, H, W)
            if self.augment:
                flips = True if self._even_flips is None else self._even_flips[batch] ^ bool(epoch % 2)  # (B,)
                x = augment(x, generator, padding=self.padding, padding_mode=self.padding_mode, flip=flips)
            x = normalize(x) if x.dtype == torch.uint8 else x.float()  # (B, C, H, W) float32
            yield x, self.labels[batch]


def heldout_count(n: int, fraction: float) -> int:
    """Images :func:`split_heldout` keeps aside out of ``n`` at ``fraction``."""
    return round(fraction * n)


def split_heldout(loader, fraction: float, *, seed: int = 0) -> tuple["TensorLoader", list[tuple[Tensor, Tensor]]]:
    """Split a training :class:`TensorLoader` into (training loader, held-out batches).

    A fixed random ``fraction`` of the images (permutation from ``seed``) is kept aside, never
    trained on: returned as a list of (x, y) batches (normalised, unaugmented, in a fixed order,
    the loader's batch size). The training loader keeps every other option of ``loader``.
    """
    if not isinstance(loader, TensorLoader):
        raise TypeError(
            f"A held-out split needs an align_kd.data.TensorLoader (its images can be split by index) but got "
            f"{type(loader).__name__}. Build the training data with align_kd.data.cifar10_loaders or TensorLoader."
        )
    if loader.world_size != 1:
        raise ValueError("Split the training data before sharding it (pass the unsharded TensorLoader).")
    n = loader.dataset_size
    k = heldout_count(n, fraction)
    if not 1 <= k < n:
        raise ValueError(f"heldout_fraction={fraction} of {n} training images keeps {k} aside; expected at least one "
                         "image on each side. Raise the fraction or use more training data.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed), device="cpu").to(loader.images.device)
    keep, held = order[:-k].sort().values, order[-k:].sort().values
    train = TensorLoader(loader.images[keep], loader.labels[keep], batch_size=loader.batch_size, shuffle=loader.shuffle,
                         augment=loader.augment, seed=loader.seed, drop_last=loader.drop_last, device=loader.device,
                         padding=loader.padding)
    train.data_tag = f"{loader.data_tag}-heldout{k}of{n}s{seed}" if loader.data_tag else ""
    heldout = list(TensorLoader(loader.images[held], loader.labels[held], batch_size=loader.batch_size, device=loader.device))
    return train, heldout


def cifar10_loaders(
    root: str | os.PathLike | None = None,
    *,
    batch_size: int = 128,
    limit: int | None = None,
    test_limit: int | None = None,
    augment: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[TensorLoader, TensorLoader]:
    """CIFAR-10 train loader (shuffled, augmented, sharded by rank) and test loader (in order, unsharded).

    The test loader is not sharded: every rank evaluates the whole test set, so test accuracy needs
    no all-reduce. ``limit``/``test_limit`` keep the first images of each split's fixed order.
    ``train.data_tag`` records limit, test_limit, augment, batch_size and seed (teacher cache key).
    """
    train_x, train_y = load_cifar10(root, split="train", limit=limit, cache_dir=cache_dir)
    test_x, test_y = load_cifar10(root, split="test", limit=test_limit, cache_dir=cache_dir)
    train = TensorLoader(
        train_x, train_y, batch_size=batch_size, shuffle=True, augment=augment, seed=seed,
        device=device, rank=rank, world_size=world_size,
    )
    test = TensorLoader(test_x, test_y, batch_size=batch_size, shuffle=False, augment=False, device=device)
    train.data_tag = f"cifar10:limit={limit}:test_limit={test_limit}:augment={augment}:batch_size={batch_size}:seed={seed}"
    test.data_tag = f"cifar10-test:limit={test_limit}"
    return train, test
