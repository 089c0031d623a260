"""Training guards: non-finite steps, gradient clipping, CUDA out-of-memory, Ctrl-C, determinism.

Oracles: a skipped step leaves the weights exactly as they were; with plain SGD (no momentum, no
weight decay) the clipped update is the unclipped one scaled by one common factor and its norm is
at most lr * grad_clip; the same seed gives bitwise the same run.
"""
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)

from align_kd import FitConfig, fit
from align_kd.data import TensorLoader

CLASSES = 4
FAST = dict(epochs=2, progress=False, device="cpu", width=8)


def make_teacher():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, CLASSES),
    ).eval()


class Student(nn.Module):
    """MLP that can misbehave at a given training forward (1-based) and records its weights."""

    def __init__(self, hook=None):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, CLASSES))
        self.hook, self.calls, self.seen = hook, 0, []

    def forward(self, x):
        out = self.net(x)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            self.seen.append([p.detach().clone() for p in self.parameters()])
            if self.hook is not None:
                out = self.hook(self.calls, out)
        return out


def data(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def test_non_finite_loss_is_skipped_warned_counted_and_leaves_no_trace():
    def nan_at_3(k, out):
        return out * float("nan") if k == 3 else out

    student = Student(nan_at_3)
    with pytest.warns(RuntimeWarning, match=r"Skipped training step 2: the loss is nan"):
        res = fit(make_teacher(), student, data(), strategy="sinkhorn", **FAST)
    assert [h["skipped_steps"] for h in res.history] == [1, 0]
    before, after = student.seen[2], student.seen[3]  # weights at the NaN forward and at the next one
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not all(torch.equal(a, b) for a, b in zip(student.seen[1], student.seen[2]))  # normal steps move
    assert torch.isfinite(res.plan).all() and torch.isfinite(res.mi).all()


def test_non_finite_losses_in_a_row_stop_training():
    student = Student(lambda k, out: out * float("inf") if k >= 2 else out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match="3 training steps in a row were skipped.*Lower `lr`"):
            fit(make_teacher(), student, data(), strategy="uniform", max_bad_steps=3, **FAST)


def _one_sgd_step(**kw):
    student = Student()
    w0 = [p.detach().clone() for p in student.parameters()]
    fit(make_teacher(), student, data(n=16), strategy="sinkhorn", epochs=1, momentum=0.0, weight_decay=0.0, lr=0.1,
        progress=False, device="cpu", width=8, **kw)
    return [p.detach() - w for p, w in zip(student.parameters(), w0)]


def test_gradient_clipping_scales_the_whole_update():
    free = _one_sgd_step()
    clip = 0.05
    clipped = _one_sgd_step(grad_clip=clip)
    norm = lambda ds: torch.sqrt(sum((d.double() ** 2).sum() for d in ds))
    assert norm(free) > 0.1 * clip * 2  # the test means something: unclipped it would be larger
    assert norm(clipped) <= 0.1 * clip * (1 + 1e-5)
    scale = norm(clipped) / norm(free)
    for a, b in zip(clipped, free):  # one common factor (the norm is over student, MI bank and plan)
        torch.testing.assert_close(a.double(), scale * b.double(), rtol=1e-4, atol=1e-7)


def test_grad_clip_must_be_positive():
    with pytest.raises(ValueError, match="grad_clip"):
        FitConfig(grad_clip=0.0)
    with pytest.raises(ValueError, match="grad_clip"):
        FitConfig(grad_clip=-1.0)


@pytest.mark.parametrize("layout", ["shared", "full"])
def test_cuda_out_of_memory_suggests_what_to_lower(layout):
    def oom(k, out):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 8 GiB total)")

    student = Student(oom)
    student.train()
    teacher = make_teacher()
    with pytest.raises(torch.cuda.OutOfMemoryError) as info:
        fit(teacher, student, data(), bank_layout=layout, pool=4, **FAST)
    msg = str(info.value)
    assert "batch size (now 16)" in msg and "`pool` (now 4)" in msg and "`width` (now 8)" in msg
    assert "Tried to allocate 2.00 GiB" in msg
    assert ("'shared'" in msg) == (layout == "full")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert student.training and not teacher.training  # flags restored
    assert all(p.requires_grad for p in teacher.parameters())


def test_ctrl_c_without_checkpoint_dir_says_nothing_was_saved(capsys):
    def stop(k, out):
        if k == 6:
            raise KeyboardInterrupt
        return out

    with pytest.raises(KeyboardInterrupt):
        fit(make_teacher(), Student(stop), data(), **FAST)
    err = capsys.readouterr().err
    assert "after 1/2 completed epochs; nothing was saved" in err and "checkpoint_dir" in err


def _tensor_run(seed):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (64,), generator=g)
    train = TensorLoader(x, y, batch_size=16, shuffle=True, augment=True)
    student = Student()
    res = fit(make_teacher(), student, (train, TensorLoader(x[:32], y[:32])), strategy="sinkhorn", seed=seed, **FAST)
    return [p.detach().clone() for p in student.state_dict().values()], res


def test_same_seed_same_result_on_cpu():
    (wa, a), (wb, b) = _tensor_run(0), _tensor_run(0)
    assert all(torch.equal(p, q) for p, q in zip(wa, wb))
    assert torch.equal(a.plan, b.plan) and torch.equal(a.mi, b.mi)
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]
    assert strip(a.history) == strip(b.history)
    _, c = _tensor_run(1)
    assert not torch.equal(a.mi, c.mi)  # the seed matters (MI bank initialisation)
