"""Checkpoints and resume: a run interrupted mid-epoch (Ctrl-C in process, or a hard kill of a
subprocess) and resumed ends bitwise equal to an uninterrupted run with the same seed; damaged
checkpoints (bytes flipped, file truncated) fall back to the previous one with a warning, or
raise when none is usable; a resume with different options names the differing fields.

Oracle: the uninterrupted run (student weights, plan, history except wall times).
"""
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

torch.set_num_threads(1)

from align_kd import fit
from align_kd.checkpoint import (
    CheckpointError,
    checkpoint_path,
    config_diff,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)

# the tiny problem, as source so that the subprocess builds exactly the same one
PROBLEM = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from align_kd.data import TensorLoader

    CLASSES = 4

    class Student(nn.Module):
        """MLP with BatchNorm; ``bomb(n, action)`` fires ``action`` at the n-th training forward."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                     nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))
            self.calls, self.at, self.action = 0, None, None

        def bomb(self, at, action):
            self.calls, self.at, self.action = 0, at, action
            return self

        def forward(self, x):
            if self.training and torch.is_grad_enabled():
                self.calls += 1
                if self.calls == self.at:
                    self.action()
            return self.net(x)

    def make_teacher():
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, CLASSES),
        ).eval()

    def tensor_loaders():
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (80, 3, 8, 8), dtype=torch.uint8, generator=g)
        y = torch.randint(0, CLASSES, (80,), generator=g)
        train = TensorLoader(x[:64], y[:64], batch_size=16, shuffle=True, augment=True, seed=3)
        return train, TensorLoader(x[64:], y[64:], batch_size=16)

    def data_loaders():  # shuffled by the global RNG: resume must restore it
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(80, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (80,), generator=g)
        return (DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True),
                DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16))

    STEPS = 4  # training batches per epoch
    OPTS = dict(epochs=3, device="cpu", width=8, progress=False, exact_warmup=2, exact_every=3)
''')
_ns: dict = {}
exec(PROBLEM, _ns)  # noqa: S102 -- the same source the subprocess runs
Student, make_teacher, tensor_loaders, data_loaders = _ns["Student"], _ns["make_teacher"], _ns["tensor_loaders"], _ns["data_loaders"]
STEPS, OPTS = _ns["STEPS"], _ns["OPTS"]


def run(strategy="sinkhorn", data=tensor_loaders, student=None, **kw):
    student = student or Student()
    res = fit(make_teacher(), student, data(), strategy=strategy, **{**OPTS, **kw})
    return res, student


def summary(res, student):
    history = [{k: v for k, v in h.items() if k != "wall_s"} for h in res.history]
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, res.plan.clone(), history, res.solves


def assert_same(a, b):
    (sa, pa, ha, xa), (sb, pb, hb, xb) = a, b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert torch.equal(pa, pb)
    assert ha == hb
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in xa] == [{k: v for k, v in s.items() if k != "seconds"} for s in xb]


class _Refs(dict):
    def __missing__(self, key):
        strategy, data = key
        self[key] = summary(*run(strategy, data=data))
        return self[key]


@pytest.fixture(scope="module")
def reference():
    """Uninterrupted runs without checkpoints, keyed by (strategy, data)."""
    return _Refs()


def _interrupt():
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# resume equals an uninterrupted run


@pytest.mark.parametrize("strategy,data", [("sinkhorn", tensor_loaders), ("exact", data_loaders), ("softmax", data_loaders),
                                           ("hinton", data_loaders)])
def test_ctrl_c_mid_epoch_then_resume_equals_uninterrupted(reference, tmp_path, capsys, strategy, data):
    student = Student().bomb(STEPS + 2, _interrupt)  # second step of epoch 2
    with pytest.raises(KeyboardInterrupt):
        run(strategy, data=data, student=student, checkpoint_dir=tmp_path)
    err = capsys.readouterr().err
    assert "1/3 completed epochs" in err and "resume=True" in err and str(checkpoint_path(tmp_path, 1)) in err
    assert [e for e, _ in list_checkpoints(tmp_path)] == [1]
    resumed = Student().bomb(1, lambda: None)  # fresh weights: all must come from the checkpoint
    res, st = run(strategy, data=data, student=resumed, checkpoint_dir=tmp_path, resume=True)
    assert resumed.calls == 2 * STEPS  # only epochs 2 and 3 were trained
    assert_same(summary(res, st), reference[(strategy, data)])
    assert [e for e, _ in list_checkpoints(tmp_path)] == [2, 3]


def test_resume_with_skipped_pairs_equals_uninterrupted(tmp_path):
    """skip_pairs_below: the full-pass schedule (step counter) and the cached estimates of skipped
    pairs (MIBank.last_mi) come back from the checkpoint."""
    skip = dict(strategy="pairwise", skip_pairs_below=0.5, full_pass_every=3)  # one of the T pairs between full passes
    ref = summary(*run(**skip))
    assert 0 < ref[2][1]["pairs_evaluated"] < 1  # pairs were skipped in epoch 2
    with pytest.raises(KeyboardInterrupt):
        run(student=Student().bomb(STEPS + 2, _interrupt), checkpoint_dir=tmp_path, **skip)
    res, st = run(student=Student(), checkpoint_dir=tmp_path, resume=True, **skip)
    assert_same(summary(res, st), ref)


def test_ctrl_c_during_a_save_saves_that_epoch_again(reference, tmp_path, monkeypatch, capsys):
    import align_kd.checkpoint as ck

    write = ck._write_bytes
    calls = []

    def flaky(blob, path):
        calls.append(path.name)
        if len(calls) == 2:  # the epoch-2 save is interrupted half-way: nothing of it reaches the disk
            raise KeyboardInterrupt
        return write(blob, path)

    monkeypatch.setattr(ck, "_write_bytes", flaky)
    student = Student()
    with pytest.raises(KeyboardInterrupt):
        run(student=student, checkpoint_dir=tmp_path)
    assert calls == ["checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt", "checkpoint-epoch0002.pt"]
    assert student.calls == 2 * STEPS and "2/3 completed epochs" in capsys.readouterr().err
    monkeypatch.setattr(ck, "_write_bytes", write)
    res, st = run(checkpoint_dir=tmp_path, resume=True)
    assert_same(summary(res, st), reference[("sinkhorn", tensor_loaders)])


def test_checkpointing_does_not_change_the_result(reference, tmp_path):
    assert_same(summary(*run(checkpoint_dir=tmp_path)), reference[("sinkhorn", tensor_loaders)])


KILLED = PROBLEM + textwrap.dedent('''
    import os, sys
    from align_kd import fit
    torch.set_num_threads(1)
    student = Student().bomb(STEPS + 3, lambda: os._exit(17))  # hard crash in epoch 2: no cleanup at all
    fit(make_teacher(), student, tensor_loaders(), strategy="sinkhorn", checkpoint_dir=sys.argv[1], **OPTS)
    sys.exit(0)
''')


def test_hard_killed_subprocess_then_resume_equals_uninterrupted(reference, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, str(script), str(ckpt)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert [e for e, _ in list_checkpoints(ckpt)] == [1]
    res, st = run(checkpoint_dir=ckpt, resume=True)
    assert_same(summary(res, st), reference[("sinkhorn", tensor_loaders)])


def test_resume_of_a_finished_run_trains_nothing(reference, tmp_path):
    run(checkpoint_dir=tmp_path)
    student = Student().bomb(1, _interrupt)  # any training step would raise
    res, st = run(student=student, checkpoint_dir=tmp_path, resume=True)
    assert_same(summary(res, st), reference[("sinkhorn", tensor_loaders)])


def test_resume_with_no_checkpoint_starts_fresh(reference, tmp_path):
    res, st = run(checkpoint_dir=tmp_path / "new", resume=True)
    assert_same(summary(res, st), reference[("sinkhorn", tensor_loaders)])


# ----------------------------------------------------------------------------------------------
# damaged checkpoints


def _flip(path, at=0.5):
    data = bytearray(path.read_bytes())
    k = int(len(data) * at)
    data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["corrupted", "truncated"])
def test_damaged_newest_checkpoint_falls_back_to_previous(reference, tmp_path, damage):
    run(checkpoint_dir=tmp_path)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [2, 3]  # the newest two are kept
    damage(checkpoint_path(tmp_path, 3))
    # a half-written temporary file from a crash during a save is ignored
    (tmp_path / ".checkpoint-epoch0004.pt.abc123.tmp").write_bytes(b"ALIGN_KD_CHECKPOINT v1\n12")
    with pytest.raises(CheckpointError):
        read_checkpoint(checkpoint_path(tmp_path, 3))
    student = Student().bomb(1, lambda: None)
    with pytest.warns(RuntimeWarning, match="Skipped unusable checkpoint.*epoch 2 instead"):
        res, st = run(student=student, checkpoint_dir=tmp_path, resume=True)
    assert student.calls == STEPS  # epoch 3 trained again from the epoch-2 checkpoint
    assert_same(summary(res, st), reference[("sinkhorn", tensor_loaders)])
    read_checkpoint(checkpoint_path(tmp_path, 3))  # rewritten, good again


def test_no_usable_checkpoint_raises_a_clear_error(tmp_path):
    run(checkpoint_dir=tmp_path, epochs=2)
    _flip(checkpoint_path(tmp_path, 2))
    _truncate(checkpoint_path(tmp_path, 1), keep=0.1)
    with pytest.raises(CheckpointError, match="No usable checkpoint.*corrupted or truncated"):
        run(checkpoint_dir=tmp_path, epochs=2, resume=True)
    (tmp_path / "checkpoint-epoch0005.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not an align_kd checkpoint"):
        read_checkpoint(tmp_path / "checkpoint-epoch0005.pt")


# ----------------------------------------------------------------------------------------------
# what is stored, and option checks


def test_checkpoint_contents(tmp_path):
    res, _ = run(checkpoint_dir=tmp_path, epochs=1)
    ck = read_checkpoint(checkpoint_path(tmp_path, 1))
    assert ck["epoch"] == 1 and ck["step"] == STEPS and ck["world_size"] == 1
    state = ck["distiller"]  # the Distiller's state_dict: student, bank and plan
    assert {"plan.logits", "plan.potential", "plan.row_marginal"} <= set(state)  # Sinkhorn warm start saved
    assert torch.isfinite(state["plan.potential"]).all()
    assert any(k.startswith("student.") and "running_mean" in k for k in state)
    assert any(k.startswith("bank.") and k.endswith(".var") for k in state)
    assert not any(k.startswith("teacher") for k in state)
    assert ck["optimizer"]["state"] and ck["scheduler"]["last_epoch"] == STEPS
    assert set(ck["rng"][0]) == {"torch", "cuda", "python", "numpy", "generators"}
    assert ck["config"]["lr"] == 0.05 and ck["config"]["checkpoint_dir"] == str(tmp_path)
    assert ck["loop"]["history"] == res.history
    assert ck["teacher_layers"] == res.teacher_layers and len(ck["teacher_sha256"]) == 64


def test_keep_checkpoints(tmp_path):
    run(checkpoint_dir=tmp_path, keep_checkpoints=1)
    assert [e for e, _ in list_checkpoints(tmp_path)] == [3]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_with_different_options_names_them(tmp_path):
    run(checkpoint_dir=tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"different options: beta: checkpoint 0\.5, now 0\.7; lr: checkpoint 0\.05, now 0\.1"):
        run(checkpoint_dir=tmp_path, epochs=1, resume=True, lr=0.1, beta=0.7)
    with pytest.raises(ValueError, match="student_layers"):
        run(checkpoint_dir=tmp_path, epochs=1, resume=True, student_layers=["net.3", "net.6"])
    # runtime-only options may change
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(checkpoint_dir=tmp_path, epochs=1, resume=True, progress=True, keep_checkpoints=3)


def test_a_checkpoint_older_than_an_option_resumes_bitwise_as_its_default(reference, tmp_path):
    # a checkpoint written before `vid_eps` existed ran with what is now its default: resuming it with
    # the default continues the same run; asking for another floor is refused, naming the option
    run(checkpoint_dir=tmp_path, keep_checkpoints=3)
    for epoch in (1, 2, 3):
        ck = read_checkpoint(checkpoint_path(tmp_path, epoch))
        del ck["config"]["vid_eps"]
        write_checkpoint(ck, checkpoint_path(tmp_path, epoch))
    (tmp_path / "checkpoint-epoch0003.pt").unlink()  # epoch 3 trains again from epoch 2's checkpoint
    with pytest.raises(ValueError, match=r"different options: vid_eps: checkpoint 0\.0001, now 0\.01"):
        run(checkpoint_dir=tmp_path, resume=True, vid_eps=1e-2)
    res, st = run(checkpoint_dir=tmp_path, resume=True)
    assert_same(summary(res, st), reference[("sinkhorn", tensor_loaders)])


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    run(checkpoint_dir=tmp_path, epochs=1)
    with pytest.raises(ValueError, match="already holds 1 checkpoint.*resume=True"):
        run(checkpoint_dir=tmp_path, epochs=1)


@pytest.mark.parametrize("opts,match", [
    (dict(resume=True), "resume=True needs `checkpoint_dir`"),
    (dict(checkpoint_dir=""), "checkpoint_dir"),
    (dict(checkpoint_dir="x", keep_checkpoints=0), "keep_checkpoints"),
    (dict(checkpoint_dir="x", resume="yes"), "resume"),
])
def test_checkpoint_options_are_validated(opts, match):
    with pytest.raises(ValueError, match=match):
        run(**opts)


def test_config_diff():
    assert config_diff({"lr": 0.1, "seed": 0, "progress": True}, {"lr": 0.2, "seed": 0, "progress": False}) == ["lr"]
    assert config_diff({"a": 1}, {"b": 1}) == ["a", "b"]
    # a field the checkpoint predates counts as its default, and only as that
    assert config_diff({"lr": 0.1}, {"lr": 0.1, "vid_eps": 1e-4}, defaults={"vid_eps": 1e-4}) == []
    assert config_diff({"lr": 0.1}, {"lr": 0.1, "vid_eps": 1e-2}, defaults={"vid_eps": 1e-4}) == ["vid_eps"]
    assert config_diff({"lr": 0.1}, {"lr": 0.1, "vid_eps": 1e-4}) == ["vid_eps"]
