"""Tests for align_kd.data: CIFAR-10 loading from every source, the cache, augmentation, TensorLoader."""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import align_kd.data as data
from align_kd.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    TensorLoader,
    augment,
    cifar10_loaders,
    load_cifar10,
    normalize,
    sample_order,
)
from shared_archive import ARCHIVE

torch.set_num_threads(1)

BATCH_SIZES = {"data_batch_1": 4, "data_batch_2": 4, "data_batch_3": 4, "data_batch_4": 4, "data_batch_5": 4, "test_batch": 6}


def _expected_release():
    """Rows (N, 3072) and labels (N,) per split, exactly what the synthetic release holds."""
    out, start = {}, 0
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        rows, labels = [], []
        for name in names:
            for _ in range(BATCH_SIZES[name]):
                rows.append((start * 7 + np.arange(3072)) % 256)  # image `start` has a unique pattern
                labels.append((start * 3) % 10)
                start += 1
        out[split] = (np.array(rows, dtype=np.uint8), np.array(labels, dtype=np.int64))
    return out


@pytest.fixture
def release_dir(tmp_path) -> Path:
    """A tiny `cifar-10-batches-py` folder in the original release's pickle format."""
    folder = tmp_path / "src" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = _expected_release()
    offsets = {"train": 0, "test": 0}
    for name, n in BATCH_SIZES.items():
        split = "test" if name == "test_batch" else "train"
        rows, labels = expected[split]
        i = offsets[split]
        batch = {b"batch_label": name.encode(), b"labels": labels[i : i + n].tolist(),
                 b"data": rows[i : i + n], b"filenames": [b"x.png"] * n}
        offsets[split] += n
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No $ALIGN_KD_DATA and an empty cache dir via $ALIGN_KD_CACHE."""
    monkeypatch.delenv("ALIGN_KD_DATA", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALIGN_KD_CACHE", str(cache))
    return cache


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _colour(split: str, label: int, k: int) -> tuple[int, int, int]:
    return (label * 20, k * 50, 200 if split == "train" else 100)


def _image_files() -> dict[str, bytes]:
    """ImageFolder-layout PNGs whose colour encodes (split, label, index)."""
    files = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for label, cls in enumerate(CIFAR10_CLASSES):
            for k in range(per_class):
                files[f"{split}/{cls}/{k:04d}.png"] = _png(_colour(split, label, k))
    return files


# --------------------------------------------------------------------------------------------
# (1) the original binary release
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "test"])
def test_binary_release_loads_exact_pixels_and_labels(release_dir, clean_env, split):
    images, labels = load_cifar10(release_dir, split=split)
    rows, expected_labels = _expected_release()[split]
    n = len(rows)
    assert images.shape == (n, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    order = sample_order(n)  # cached order = fixed permutation of the release order
    expected = torch.from_numpy(rows).view(n, 3, 32, 32)[order]
    assert torch.equal(images, expected)
    assert torch.equal(labels, torch.from_numpy(expected_labels)[order])
    # channel-major layout of the release: 1024 red values, then green, then blue
    row = rows[order[0].item()]
    assert images[0, 1, 2, 5].item() == row[1024 + 2 * 32 + 5]
    assert images[0, 2, 31, 31].item() == row[3071]


def test_label_order_is_the_usual_cifar10_order():
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)


def test_limit_is_a_prefix_and_validated(release_dir, clean_env):
    full_x, full_y = load_cifar10(release_dir, split="train")
    x, y = load_cifar10(release_dir, split="train", limit=5)
    assert torch.equal(x, full_x[:5]) and torch.equal(y, full_y[:5])
    with pytest.raises(ValueError, match="limit"):
        load_cifar10(release_dir, split="train", limit=0)
    with pytest.raises(ValueError, match="limit=None"):
        load_cifar10(release_dir, split="test", limit=1000)
    with pytest.raises(ValueError, match="split"):
        load_cifar10(release_dir, split="val")


# --------------------------------------------------------------------------------------------
# JPEG/PNG archives and extracted ImageFolder directories (synthetic)
# --------------------------------------------------------------------------------------------
def _check_colour_coded(images, labels, split):
    per_class = 3 if split == "train" else 2
    assert images.shape == (10 * per_class, 3, 32, 32)
    seen = set()
    for img, label in zip(images, labels):
        r, g, b = img[:, 0, 0].tolist()
        assert (img == img[:, :1, :1]).all()  # solid colour survived
        assert r == label.item() * 20 and b == (200 if split == "train" else 100)
        seen.add((label.item(), g // 50))
    assert len(seen) == 10 * per_class  # every file exactly once


@pytest.mark.parametrize("split", ["train", "test"])
def test_tar_archive_and_image_folder(tmp_path, clean_env, split):
    files = _image_files()
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"CIFAR-10-images/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    folder = tmp_path / "extracted"
    for name, blob in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(blob)

    from_tar = load_cifar10(archive, split=split)
    from_dir_holding_tar = load_cifar10(tmp_path, split=split)  # a directory containing the archive
    from_folder = load_cifar10(folder, split=split)
    _check_colour_coded(*from_tar, split)
    _check_colour_coded(*from_folder, split)
    assert torch.equal(from_tar[0], from_dir_holding_tar[0])
    assert torch.equal(from_tar[0], from_folder[0]) and torch.equal(from_tar[1], from_folder[1])


# --------------------------------------------------------------------------------------------
# (2) the real JPEG archive
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real_cache")


def test_real_archive_test_split_matches_member_names(real_cache):
    limit = 40
    images, labels = load_cifar10(ARCHIVE, split="test", limit=limit, cache_dir=real_cache)
    assert images.shape == (limit, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9
    assert len(set(labels.tolist())) >= 8  # the fixed order mixes classes even in a small prefix

    with tarfile.open(ARCHIVE, "r:gz") as tar:
        names = sorted(m.name for m in tar if m.isfile() and m.name.startswith("test/"))
    assert len(names) == 10_000
    wanted = {names[j]: i for i, j in enumerate(sample_order(len(names))[:limit].tolist())}
    checked = 0
    with tarfile.open(ARCHIVE, "r:gz") as tar:
        for member in tar:
            if member.name in wanted:
                i = wanted[member.name]
                with Image.open(tar.extractfile(member)) as img:
                    pixels = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
                assert torch.equal(images[i], pixels), member.name
                assert labels[i].item() == CIFAR10_CLASSES.index(member.name.split("/")[1]), member.name
                checked += 1
                if checked == limit:
                    break
    assert checked == limit


def test_real_archive_second_load_is_a_cache_hit(real_cache, monkeypatch):
    load_cifar10(ARCHIVE, split="test", limit=10, cache_dir=real_cache)  # decodes unless already cached

    def no_decode(*args):
        raise AssertionError("a cached split must not be decoded again")

    monkeypatch.setattr(data, "_decode_source", no_decode)  # a cache hit is observable without a clock
    train_x, train_y = load_cifar10(ARCHIVE, split="train", cache_dir=real_cache)
    test_x, _ = load_cifar10(ARCHIVE, split="test", cache_dir=real_cache)
    assert train_x.shape == (50_000, 3, 32, 32) and test_x.shape == (10_000, 3, 32, 32)
    assert torch.equal(torch.bincount(train_y), torch.full((10,), 5000))


# --------------------------------------------------------------------------------------------
# (3) the cache
# --------------------------------------------------------------------------------------------
def test_cache_is_hit_and_keyed_by_source_mtime(release_dir, tmp_path, monkeypatch, clean_env):
    calls = []
    real_decode = data._decode_source
    monkeypatch.setattr(data, "_decode_source", lambda *a: calls.append(a) or real_decode(*a))
    cache = tmp_path / "my_cache"
    source_files = sorted(os.listdir(release_dir))

    first = load_cifar10(release_dir, split="train", cache_dir=cache)
    assert len(calls) == 1
    cached = sorted(p.name for p in (cache / "cifar10").iterdir())
    assert len(cached) == 2 and cached[0].startswith("test-") and cached[1].startswith("train-")
    assert sorted(os.listdir(release_dir)) == source_files  # nothing written next to the source

    second = load_cifar10(release_dir, split="train", cache_dir=cache)
    test_split = load_cifar10(release_dir, split="test", cache_dir=cache)  # cached by the same decode
    assert len(calls) == 1  # both were cache hits
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert len(test_split[1]) == 6

    stat = (release_dir / "data_batch_3").stat()
    os.utime(release_dir / "data_batch_3", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_cifar10(release_dir, split="train", cache_dir=cache)
    assert len(calls) == 2  # a changed source is decoded again


def test_corrupt_cache_file_is_replaced(release_dir, tmp_path, clean_env):
    cache = tmp_path / "c"
    expected = load_cifar10(release_dir, split="test", cache_dir=cache)
    for file in (cache / "cifar10").iterdir():
        file.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = load_cifar10(release_dir, split="test", cache_dir=cache)
    assert torch.equal(again[0], expected[0])
    assert torch.equal(load_cifar10(release_dir, split="test", cache_dir=cache)[0], expected[0])


# --------------------------------------------------------------------------------------------
# locating the data and (5) the error when it is missing
# --------------------------------------------------------------------------------------------
def test_env_var_and_cache_dir_are_searched(release_dir, tmp_path, monkeypatch, clean_env):
    expected, _ = load_cifar10(release_dir, split="test")
    monkeypatch.setenv("ALIGN_KD_DATA", str(release_dir.parent))  # a directory containing the folder
    assert torch.equal(load_cifar10(split="test")[0], expected)
    with pytest.warns(UserWarning, match="holds no CIFAR-10"):  # a wrong root falls back, loudly
        assert torch.equal(load_cifar10(tmp_path / "wrong", split="test")[0], expected)

    monkeypatch.delenv("ALIGN_KD_DATA")
    cache = tmp_path / "cache_with_release"
    (cache / "cifar-10-batches-py").mkdir(parents=True)
    for file in release_dir.iterdir():
        (cache / "cifar-10-batches-py" / file.name).write_bytes(file.read_bytes())
    assert torch.equal(load_cifar10(split="test", cache_dir=cache)[0], expected)


def test_missing_data_error_lists_places_and_fixes(tmp_path, monkeypatch, clean_env):
    bogus_env = tmp_path / "env_points_here"
    bogus_env.mkdir()
    monkeypatch.setenv("ALIGN_KD_DATA", str(bogus_env))
    nowhere = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(nowhere, split="test")
    message = str(err.value)
    for place in (str(nowhere), str(bogus_env), str(clean_env)):
        assert place in message
    assert "ALIGN_KD_DATA" in message and "root=" in message
    assert "cifar-10-batches-py" in message and "cifar10-jpeg.tar.gz" in message
    assert "download=True" in message and "network" in message


# --------------------------------------------------------------------------------------------
# normalize and (4) augment
# --------------------------------------------------------------------------------------------
def test_normalize_values_and_validation():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.tensor((1 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]))
    with pytest.raises(ValueError, match="uint8"):
        normalize(x.float())


def _random_batch(b=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)


def test_augment_shape_dtype_determinism():
    x = _random_batch()
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    changed = (a != x).flatten(1).any(dim=1)  # (B,)
    assert changed.sum() >= len(x) // 2
    assert augment(x.float(), torch.Generator().manual_seed(5)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment(x[0], torch.Generator())


def test_augment_matches_manual_crop_and_flip():
    x = _random_batch(b=64, seed=1)
    out = augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # (B, 3, 40, 40)
    flips, offsets = set(), set()
    for i in range(len(x)):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.equal(out[i], (lambda v: v.flip(-1) if flip else v)(padded[i, :, dy : dy + 32, dx : dx + 32]))
        ]
        assert len(matches) == 1, f"image {i} is not a 32x32 crop (optionally flipped) of the padded input"
        dy, dx, flip = matches[0]
        flips.add(flip)
        offsets.add((dy, dx))
    assert flips == {False, True} and len(offsets) > 10

    flip_only = augment(x, torch.Generator().manual_seed(0), padding=0)
    for i in range(len(x)):
        assert torch.equal(flip_only[i], x[i]) or torch.equal(flip_only[i], x[i].flip(-1))
    assert not torch.equal(flip_only, x)


def test_augment_reflect_padding_matches_numpy_reflect_crops():
    """padding_mode='reflect': every output is a (possibly mirrored) 32x32 crop of numpy's reflect
    padding of its image, never of the zero padding; the offsets and flips are drawn exactly as with
    zeros, so the two modes differ only in the border pixels."""
    x = _random_batch(b=48, seed=2)
    out = augment(x, torch.Generator().manual_seed(3), padding=2, padding_mode="reflect")
    zeros = augment(x, torch.Generator().manual_seed(3), padding=2)
    padded = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect"))  # (B, 3, 36, 36)
    padded_zero = torch.nn.functional.pad(x, (2, 2, 2, 2))
    shifted = 0
    for i in range(len(x)):
        views = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)]
        crop = lambda p, dy, dx, f: (lambda v: v.flip(-1) if f else v)(p[i, :, dy : dy + 32, dx : dx + 32])  # noqa: E731
        matches = [v for v in views if torch.equal(out[i], crop(padded, *v))]
        assert len(matches) == 1, f"image {i} is not a crop of the reflect-padded image"
        assert torch.equal(zeros[i], crop(padded_zero, *matches[0]))  # same offsets and flip as zero mode
        shifted += matches[0][:2] != (2, 2)
    assert shifted > len(x) // 2
    def black_edges(batch):  # images whose first or last row or column is all 0 (a zero-filled border)
        edges = [batch[:, :, 0], batch[:, :, -1], batch[:, :, :, 0], batch[:, :, :, -1]]  # each (B, 3, 32)
        return sum(int((e == 0).flatten(1).all(1).sum()) for e in edges)

    assert black_edges(out) == 0 and black_edges(zeros) > len(x) // 2
    with pytest.raises(ValueError, match="padding_mode"):
        augment(x, padding_mode="circular")
    with pytest.raises(ValueError, match="reflect"):
        augment(x, padding=32, padding_mode="reflect")


def test_augment_given_flips_are_applied_exactly_and_draw_nothing():
    x = _random_batch(b=16, seed=4)
    flips = torch.arange(16) % 3 == 0  # (B,)
    g = torch.Generator().manual_seed(9)
    out = augment(x, g, padding=0, flip=flips)
    for i in range(16):
        assert torch.equal(out[i], x[i].flip(-1) if flips[i] else x[i])
    reference = torch.Generator().manual_seed(9)
    torch.randint(0, 1, (16, 1), generator=reference), torch.randint(0, 1, (16, 1), generator=reference)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=reference))  # only the offsets drawn
    with pytest.raises(ValueError, match=r"\(16,\) bool"):
        augment(x, flip=torch.ones(8, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# (6) TensorLoader
# --------------------------------------------------------------------------------------------
def _indexed(n):
    """Images whose pixel values and labels both encode the index (labels = arange(n))."""
    images = (torch.arange(n) % 256).view(n, 1, 1, 1).expand(n, 3, 32, 32).to(torch.uint8).contiguous()
    return images, torch.arange(n)


def _visited(loader):
    return torch.cat([y for _, y in loader])


def test_tensor_loader_batches_and_values():
    images, labels = _indexed(50)
    loader = TensorLoader(images, labels, batch_size=16)
    assert len(loader) == 4 and loader.dataset_size == 50
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 16, 2]
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(x, normalize(images[:16]))
    assert torch.equal(_visited(loader), labels)  # no shuffle: in order
    assert len(TensorLoader(images, labels, batch_size=16, drop_last=True)) == 3


def test_tensor_loader_shuffle_is_reproducible_per_seed_and_epoch():
    images, labels = _indexed(50)
    a = TensorLoader(images, labels, batch_size=8, shuffle=True, augment=True, seed=3)
    b = TensorLoader(images, labels, batch_size=8, shuffle=True, augment=True, seed=3)
    plain = TensorLoader(images, labels, batch_size=8, shuffle=True, augment=False, seed=3)
    first, second = _visited(a), _visited(a)  # no set_epoch: the epoch advances by itself
    assert sorted(first.tolist()) == list(range(50))
    assert not torch.equal(first, second)
    b.set_epoch(1)
    assert torch.equal(_visited(b), second)
    b.set_epoch(0)
    xs_a0 = torch.cat([x for x, _ in b])
    b.set_epoch(0)
    assert torch.equal(torch.cat([x for x, _ in b]), xs_a0)  # augmentation reproducible too
    plain.set_epoch(0)
    assert torch.equal(_visited(plain), first)  # augmentation does not change the order or labels
    other_seed = TensorLoader(images, labels, batch_size=8, shuffle=True, seed=4)
    assert not torch.equal(_visited(other_seed), first)


def test_tensor_loader_alternate_flip_shows_each_image_both_ways_every_two_epochs():
    """flip='alternate': an image's orientation in epoch 2k+1 is the mirror of epoch 2k and repeats
    every two epochs; the even-epoch orientations are mixed and fixed by the seed; with
    augment=False nothing is flipped."""
    x = _random_batch(b=40, seed=5)
    labels = torch.arange(40)

    def by_image(loader, epoch):  # (N, C, H, W) in image order, for one epoch
        loader.set_epoch(epoch)
        xs, ys = zip(*loader)
        out = torch.empty(40, 3, 32, 32)
        out[torch.cat(ys)] = torch.cat(xs)
        return out

    loader = TensorLoader(x, labels, batch_size=8, shuffle=True, augment=True, padding=0, flip="alternate", seed=1)
    plain = normalize(x)
    epochs = [by_image(loader, e) for e in range(4)]
    mirrored = [torch.tensor([torch.equal(e[i], plain[i].flip(-1)) for i in range(40)]) for e in epochs]  # (N,) each
    for e in range(4):
        assert all(torch.equal(epochs[e][i], plain[i]) or mirrored[e][i] for i in range(40))
    assert torch.equal(mirrored[0], ~mirrored[1]) and torch.equal(mirrored[0], mirrored[2])
    assert torch.equal(mirrored[1], mirrored[3])
    assert 10 <= int(mirrored[0].sum()) <= 30
    again = TensorLoader(x, labels, batch_size=8, shuffle=True, augment=True, padding=0, flip="alternate", seed=1)
    assert torch.equal(by_image(again, 2), epochs[2])
    other = TensorLoader(x, labels, batch_size=8, shuffle=True, augment=True, padding=0, flip="alternate", seed=2)
    assert not torch.equal(by_image(other, 0), epochs[0])
    no_aug = TensorLoader(x, labels, batch_size=8, shuffle=True, flip="alternate", seed=1)
    assert torch.equal(by_image(no_aug, 1), plain)
    with pytest.raises(ValueError, match="flip"):
        TensorLoader(x, labels, flip="mirror")
    with pytest.raises(ValueError, match="padding_mode"):
        TensorLoader(x, labels, padding_mode="edge")


@pytest.mark.parametrize("n, drop_last", [(48, False), (50, False), (50, True)])
def test_tensor_loader_rank_shards(n, drop_last):
    images, labels = _indexed(n)
    world = 3
    shards = []
    for rank in range(world):
        loader = TensorLoader(images, labels, batch_size=4, shuffle=True, seed=1, rank=rank,
                              world_size=world, drop_last=drop_last)
        loader.set_epoch(2)
        shards.append(_visited(loader).tolist())
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1  # equal length per rank
    everything = [i for s in shards for i in s]
    if n % world == 0:
        assert sorted(everything) == list(range(n))  # disjoint and covering
    elif drop_last:
        assert len(set(everything)) == len(everything) == n - n % world  # disjoint, trimmed
    else:
        assert set(everything) == set(range(n)) and len(everything) == n + (world - n % world)  # padded
    whole = TensorLoader(images, labels, batch_size=5, shuffle=True, seed=1).indices(2)
    interleaved = [shards[k % world][k // world] for k in range(len(everything))]
    assert interleaved[: min(n, len(everything))] == whole[: min(n, len(everything))].tolist()


def test_tensor_loader_validates_arguments():
    images, labels = _indexed(10)
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(images, labels, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        TensorLoader(images, labels, rank=2, world_size=2)
    with pytest.raises(ValueError, match="as many labels"):
        TensorLoader(images, labels[:5])
    with pytest.raises(ValueError, match="drop_last"):
        TensorLoader(images, labels, batch_size=16, drop_last=True)


def test_cifar10_loaders_from_release(release_dir, clean_env):
    train, test = cifar10_loaders(release_dir, batch_size=8, limit=10, test_limit=4)
    assert train.dataset_size == 10 and test.dataset_size == 4
    assert train.shuffle and train.augment and not test.shuffle and not test.augment
    x, y = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    assert torch.equal(_visited(test), load_cifar10(release_dir, split="test", limit=4)[1])
    other, _ = cifar10_loaders(release_dir, batch_size=8, limit=12, test_limit=4)
    assert "limit=10" in train.data_tag and train.data_tag != other.data_tag  # keys cached teachers
