"""align_kd.runlog: CSV / TensorBoard training logger and plan statistics."""
from __future__ import annotations

import csv
import math
import struct
import sys

import numpy as np
import pytest
import torch

from align_kd.plans import pairwise_plan
from align_kd.runlog import STEP_FLUSH_EVERY, RunLogger, plan_stats


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


def event_files(d):
    return sorted(p for p in d.iterdir() if p.name.startswith("events.out.tfevents"))


def png_size(path):
    """(width, height) from the PNG IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def test_csv_round_trip_exact(tmp_path):
    d = tmp_path / "run" / "nested"
    vals = [0.1, 1 / 3, 1e-300, -2.5e17, 7.0]
    with RunLogger(d, tensorboard=False) as log:
        assert log.tensorboard is False
        for s, v in enumerate(vals, start=1):
            log.log_step(s, {"loss": v, "lr": torch.tensor(v / 7), "n": np.int64(s)})
        log.log_epoch(0, 5, {"train_loss": 1 / 7, "val_acc": None})
        log.log_epoch(1, 9, {"train_loss": math.pi})  # missing key -> empty cell
    assert (d / "steps.csv").is_file() and (d / "epochs.csv").is_file()

    cols, rows = read_csv(d / "steps.csv")
    assert cols == ["step", "loss", "lr", "n"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == vals
    assert [float(r["lr"]) for r in rows] == [torch.tensor(v / 7).item() for v in vals]
    assert [r["n"] for r in rows] == ["1", "2", "3", "4", "5"]

    cols, rows = read_csv(d / "epochs.csv")
    assert cols == ["epoch", "step", "train_loss", "val_acc"]
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "5"), ("1", "9")]
    assert float(rows[0]["train_loss"]) == 1 / 7
    assert float(rows[1]["train_loss"]) == math.pi
    assert rows[0]["val_acc"] == ""
    assert rows[1]["val_acc"] == ""
    assert not list(d.glob("events.out.tfevents*"))
    assert not (d / "plan.png").exists()


def test_plan_columns_in_epochs_csv(tmp_path):
    plan = torch.tensor([[0.75, 0.5], [0.25, 0.5]])
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_epoch(0, 10, {"loss": 0.5}, plan=plan)
        log.log_epoch(1, 20, {"loss": 0.25})  # no plan this epoch: empty plan cells
    cols, rows = read_csv(tmp_path / "epochs.csv")
    stats = plan_stats(plan)
    assert cols == ["epoch", "step", "loss"] + ["plan_" + k for k in stats]
    for k, v in stats.items():
        assert float(rows[0]["plan_" + k]) == v
        assert rows[1]["plan_" + k] == ""
    assert not (tmp_path / "plan.png").exists()  # CSV only: no heat-map


def test_unknown_key_raises_with_header(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_step(1, {"loss": 1.0})
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['acc'\]") as ei:
            log.log_step(2, {"loss": 1.0, "acc": 0.5})
        assert "['step', 'loss']" in str(ei.value)
        log.log_epoch(0, 1, {"a": 1.0})
        with pytest.raises(ValueError, match=r"\['b'\]"):
            log.log_epoch(1, 2, {"a": 1.0, "b": 2.0})
        with pytest.raises(ValueError, match="reserved"):
            log.log_step(3, {"step": 1.0})
        with pytest.raises(TypeError, match="'loss'"):
            log.log_step(3, {"loss": "high"})
    _, rows = read_csv(tmp_path / "steps.csv")
    assert [r["step"] for r in rows] == ["1"]  # rejected rows left no trace
    _, rows = read_csv(tmp_path / "epochs.csv")
    assert [r["epoch"] for r in rows] == ["0"]


def test_flush_leaves_parseable_files_before_close(tmp_path):
    log = RunLogger(tmp_path, tensorboard=False)
    for s in range(1, STEP_FLUSH_EVERY + 1):
        log.log_step(s, {"loss": 1.0 / s})
    _, rows = read_csv(tmp_path / "steps.csv")  # not closed: flushed by the 50-row rule
    assert len(rows) == STEP_FLUSH_EVERY
    assert float(rows[-1]["loss"]) == 1.0 / STEP_FLUSH_EVERY
    log.log_step(STEP_FLUSH_EVERY + 1, {"loss": 0.125})
    log.log_epoch(0, STEP_FLUSH_EVERY + 1, {"val": 0.5})
    _, steps = read_csv(tmp_path / "steps.csv")  # the epoch row flushed the step file too
    _, epochs = read_csv(tmp_path / "epochs.csv")
    assert len(steps) == STEP_FLUSH_EVERY + 1
    assert [(r["epoch"], float(r["val"])) for r in epochs] == [("0", 0.5)]
    log.close()
    log.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        log.log_step(99, {"loss": 1.0})


def _interrupted_run(d):
    """Steps 1..10, epochs at steps 4 and 8, then step rows 9, 10 (crash before the next epoch)."""
    with RunLogger(d, tensorboard=False) as log:
        for s in range(1, 11):
            log.log_step(s, {"loss": float(s)})
            if s % 4 == 0:
                log.log_epoch(s // 4 - 1, s, {"val": s / 10})


def test_resume_truncates_then_appends(tmp_path):
    _interrupted_run(tmp_path)
    with RunLogger(tmp_path, tensorboard=False, resume_step=4) as log:  # checkpoint from epoch 0
        _, steps = read_csv(tmp_path / "steps.csv")
        _, epochs = read_csv(tmp_path / "epochs.csv")
        assert [int(r["step"]) for r in steps] == [1, 2, 3, 4]
        assert [(int(r["epoch"]), int(r["step"])) for r in epochs] == [(0, 4)]
        for s in range(5, 9):
            log.log_step(s, {"loss": s + 0.5})
        log.log_epoch(1, 8, {"val": 0.75})
    cols, steps = read_csv(tmp_path / "steps.csv")
    assert cols == ["step", "loss"]
    assert [int(r["step"]) for r in steps] == list(range(1, 9))
    assert [float(r["loss"]) for r in steps] == [1.0, 2.0, 3.0, 4.0, 5.5, 6.5, 7.5, 8.5]
    cols, epochs = read_csv(tmp_path / "epochs.csv")
    assert cols == ["epoch", "step", "val"]
    assert [(int(r["epoch"]), int(r["step"]), float(r["val"])) for r in epochs] == [(0, 4, 0.4), (1, 8, 0.75)]


def test_resume_without_step_appends_and_drops_partial_line(tmp_path):
    _interrupted_run(tmp_path)
    with open(tmp_path / "steps.csv", "a", newline="") as f:
        f.write("11,1")  # crashed mid-row
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_step(11, {"loss": 11.0})
    _, steps = read_csv(tmp_path / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 12))
    assert [float(r["loss"]) for r in steps] == [float(s) for s in range(1, 12)]
    _, epochs = read_csv(tmp_path / "epochs.csv")
    assert [int(r["step"]) for r in epochs] == [4, 8]


def test_resume_header_mismatch_raises(tmp_path):
    _interrupted_run(tmp_path)
    with RunLogger(tmp_path, tensorboard=False, resume_step=8) as log:
        with pytest.raises(ValueError, match=r"unknown key\(s\) \['acc'\]"):
            log.log_step(9, {"loss": 9.0, "acc": 1.0})
        with pytest.raises(ValueError, match=r"lacks \['val'\]"):
            log.log_epoch(2, 12, {})
        log.log_step(9, {"loss": 9.0})
    _, steps = read_csv(tmp_path / "steps.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 10))
    (tmp_path / "epochs.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match=r"header starts with \['epoch', 'step'\]"):
        RunLogger(tmp_path, tensorboard=False)


def test_disabled_writes_nothing(tmp_path):
    d = tmp_path / "rank1"
    with RunLogger(d, enabled=False, resume_step=3) as log:
        log.log_step(1, {"loss": 1.0})
        log.log_epoch(0, 1, {"loss": 1.0}, plan=torch.eye(3))
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_resume_step():
    with pytest.raises(ValueError, match="resume_step"):
        RunLogger("unused", enabled=False, resume_step=-1)


def test_tensorboard_true_without_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    with pytest.raises(ImportError, match="pip install tensorboard"):
        RunLogger(tmp_path / "x", tensorboard=True)
    assert not (tmp_path / "x").exists()
    with RunLogger(tmp_path / "y") as log:  # None: CSV only
        assert log.tensorboard is False
        log.log_step(1, {"loss": 1.0})
    assert [p.name for p in (tmp_path / "y").iterdir()] == ["steps.csv"]


# --------------------------------------------------------------------------------------------
# plan_stats
# --------------------------------------------------------------------------------------------


def test_plan_stats_uniform():
    T, S = 4, 3
    st = plan_stats(torch.full((T, S), 1 / T))
    assert st["entropy"] == pytest.approx(math.log(T), abs=1e-12)
    assert st["effective_teachers"] == pytest.approx(T, abs=1e-12)
    assert st["max_weight"] == pytest.approx(1 / T, abs=1e-12)
    assert st["row_mass_min"] == pytest.approx(S / T, abs=1e-12)
    assert st["row_mass_max"] == pytest.approx(S / T, abs=1e-12)
    assert st["diagonal_share"] == pytest.approx(1 / T, abs=1e-12)


@pytest.mark.parametrize("T,S", [(5, 3), (3, 3), (4, 1), (2, 6)])
def test_plan_stats_pairwise_one_hot(T, S):
    plan = pairwise_plan(T, S)
    st = plan_stats(plan)
    assert st["entropy"] == 0.0
    assert st["effective_teachers"] == 1.0
    assert st["max_weight"] == 1.0
    assert st["diagonal_share"] == 1.0
    rows = plan.sum(1)
    assert st["row_mass_min"] == float(rows.min())
    assert st["row_mass_max"] == float(rows.max())


def test_plan_stats_planted_2x2():
    plan = [[0.75, 0.5], [0.25, 0.5]]
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h1 = math.log(2)
    want = {
        "entropy": (h0 + h1) / 2,
        "max_weight": (0.75 + 0.5) / 2,
        "effective_teachers": (math.exp(h0) + 2.0) / 2,
        "row_mass_min": 0.75,
        "row_mass_max": 1.25,
        "diagonal_share": (0.75 + 0.5) / 2,  # pairwise_plan(2, 2) is the identity
    }
    for x in (plan, np.array(plan), torch.tensor(plan, dtype=torch.float64)):
        st = plan_stats(x)
        assert set(st) == set(want)
        for k, v in want.items():
            assert st[k] == pytest.approx(v, abs=1e-12), k
            assert isinstance(st[k], float)


def test_plan_stats_all_zero_and_bad_input():
    assert plan_stats(torch.zeros(3, 2)) == {}
    with pytest.raises(ValueError, match=r"2-D .*got shape \(3,\)"):
        plan_stats(torch.ones(3))
    with pytest.raises(ValueError, match=r"got shape \(0, 2\)"):
        plan_stats(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        plan_stats([[1.5, 1.0], [-0.5, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        plan_stats([[float("nan"), 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="finite"):
        plan_stats([[float("inf"), 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="column 1 sums to 0.5"):
        plan_stats([[1.0, 0.25], [0.0, 0.25]])
    with pytest.raises(ValueError, match="could not convert"):
        plan_stats("plan")


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------


def _accumulator(d):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_tensorboard_scalars_and_heatmap(tmp_path):
    from torchvision.io import ImageReadMode, decode_image, read_image

    plan = torch.tensor([[0.75, 0.5, 0.0], [0.25, 0.5, 1.0]])  # (T=2, S=3)
    with RunLogger(tmp_path, tensorboard=True, teacher_layers=["t.a", "t.b"],
                   student_layers=["s.x", "s.y", "s.z"]) as log:
        assert log.tensorboard is True
        log.log_step(1, {"loss": 2.5, "lr": 0.1})
        log.log_step(2, {"loss": 1.25, "lr": 0.05})
        log.log_epoch(0, 2, {"val_acc": 0.625, "test_acc": None}, plan=plan)
        log.log_epoch(1, 4, {"val_acc": 0.75}, plan=torch.zeros(2, 3))  # all-zero: no stats, no image
    assert len(event_files(tmp_path)) == 1
    acc = _accumulator(tmp_path)
    stats = plan_stats(plan)
    want = {"train/loss": [(1, 2.5), (2, 1.25)], "train/lr": [(1, 0.1), (2, 0.05)],
            "epoch/val_acc": [(2, 0.625), (4, 0.75)]}
    want.update({f"plan/{k}": [(2, v)] for k, v in stats.items()})
    assert sorted(acc.Tags()["scalars"]) == sorted(want)
    for tag, pts in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert got == [(s, float(np.float32(v))) for s, v in pts], tag  # stored as float32

    assert acc.Tags()["images"] == ["plan/heatmap"]
    (img,) = acc.Images("plan/heatmap")
    png = tmp_path / "plan.png"
    assert png.is_file()
    assert img.step == 2
    assert (img.width, img.height) == png_size(png)
    logged = decode_image(torch.frombuffer(bytearray(img.encoded_image_string), dtype=torch.uint8))
    on_disk = read_image(str(png), mode=ImageReadMode.UNCHANGED)[:3]
    assert logged.shape == (3, img.height, img.width)
    assert torch.equal(logged, on_disk)

    _, rows = read_csv(tmp_path / "epochs.csv")  # CSV written alongside
    assert [float(r["val_acc"]) for r in rows] == [0.625, 0.75]
    assert [r["test_acc"] for r in rows] == ["", ""]
    assert float(rows[0]["plan_entropy"]) == stats["entropy"]
    assert rows[1]["plan_entropy"] == ""


def test_tensorboard_false_writes_no_event_file(tmp_path):
    with RunLogger(tmp_path, tensorboard=False) as log:
        log.log_step(1, {"loss": 1.0})
        log.log_epoch(0, 1, {"loss": 1.0}, plan=torch.eye(2))
    assert event_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.csv", "steps.csv"]


def test_tensorboard_resume_purges_orphaned_steps(tmp_path):
    with RunLogger(tmp_path, tensorboard=True) as log:
        for s in range(1, 7):
            log.log_step(s, {"loss": float(s)})
    with RunLogger(tmp_path, tensorboard=True, resume_step=3) as log:
        for s in range(4, 6):
            log.log_step(s, {"loss": s + 0.5})
    acc = _accumulator(tmp_path)
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.5), (5, 5.5)]
    _, steps = read_csv(tmp_path / "steps.csv")
    assert [(int(r["step"]), float(r["loss"])) for r in steps] == got


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
def test_png_reader_drops_alpha_and_pillow_fallback_agrees(tmp_path, monkeypatch):
    from PIL import Image

    from align_kd.runlog import _read_png_chw

    rgba = np.arange(5 * 7 * 4, dtype=np.uint8).reshape(5, 7, 4)  # (H, W, 4)
    path = tmp_path / "x.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    want = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)  # (3, H, W)
    got = _read_png_chw(path)
    assert got.dtype == torch.uint8
    assert torch.equal(got, want)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    assert torch.equal(_read_png_chw(path), want)
