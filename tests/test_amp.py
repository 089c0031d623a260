"""The GPU dtype path (bfloat16 autocast, ``fit(amp=True)``), exercised on CPU.

Oracles: the MI matrix comes back float32 and finite, the learned plan keeps its marginals
(columns sum to 1, rows to S / T), training proceeds (no skipped step, finite losses, the student
moves), and under autocast the bank's estimate stays close to its float32 value.
"""
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)

from align_kd import fit  # noqa: E402
from align_kd.mi import BANK_LAYOUTS, MIBank  # noqa: E402

CLASSES = 4


def make_teacher() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 16), nn.ReLU(),
        nn.Linear(16, CLASSES),
    )


def make_student() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
        nn.Linear(8, CLASSES),
    )


def loaders(n=64, batch=16):
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    return DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True), DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)


@pytest.mark.parametrize("layout", list(BANK_LAYOUTS))
def test_fit_amp_sinkhorn_on_cpu(layout):
    student = make_student()
    before = [p.detach().clone() for p in student.parameters()]
    res = fit(make_teacher(), student, loaders(), strategy="sinkhorn", amp=True, bank_layout=layout,
              epochs=2, width=8, device="cpu", progress=False)
    T, S = len(res.teacher_layers), len(res.student_layers)
    assert res.mi is not None and res.mi.dtype == torch.float32 and res.mi.shape == (T, S)
    assert torch.isfinite(res.mi).all()
    assert res.plan.dtype == torch.float32
    assert torch.allclose(res.plan.sum(0), torch.ones(S), atol=1e-4)  # every column sums to 1
    assert torch.allclose(res.plan.sum(1), torch.full((T,), S / T), atol=1e-3)  # uniform row marginal S / T
    for h in res.history:
        assert h["skipped_steps"] == 0
        assert math.isfinite(h["loss"]) and math.isfinite(h["feature"])
        assert torch.isfinite(torch.tensor(h["mi"])).all()
        assert torch.allclose(torch.tensor(h["plan"]).sum(0), torch.ones(S), atol=1e-4)
    assert res.history[-1]["step"] == 2 * 4
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, student.parameters())]
    assert all(moved), "every student parameter should have been updated"
    assert all(torch.isfinite(p).all() for p in student.parameters())


def _feats(shapes, B, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *s, generator=g).to(dtype) for s in shapes]


@pytest.mark.parametrize("layout", list(BANK_LAYOUTS))
def test_mibank_under_bf16_autocast_returns_float32(layout):
    t_shapes, s_shapes = [(8, 8, 8), (16,), (17, 12)], [(4, 4, 4), (10,)]
    torch.manual_seed(0)
    bank = MIBank(t_shapes, s_shapes, layout=layout, width=16)
    B = 64
    g = torch.Generator().manual_seed(1)
    s_base = _feats(s_shapes, B, 1)
    # teacher features carry signal about the student's (so the MI is not ~0 and the check is meaningful)
    t = [torch.randn(B, *sh, generator=g) for sh in t_shapes]
    t[1] = t[1] + torch.cat([s_base[1], s_base[1][:, :6]], 1)
    s = [x.clone().requires_grad_(True) for x in s_base]
    opt = torch.optim.Adam(bank.parameters(), lr=1e-2)
    for _ in range(30):  # fit the regressors a little in float32 so the bounds are informative
        mi = bank(t, s)
        opt.zero_grad()
        (-mi.sum()).backward()
        opt.step()
    bank.eval()
    with torch.no_grad():
        ref = bank(t, s)
    lam = torch.full((len(t_shapes), len(s_shapes)), 1.0 / len(t_shapes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mi = bank([x.bfloat16() for x in t], s, student_grad_weight=lam)
    assert mi.dtype == torch.float32 and mi.shape == ref.shape
    assert torch.isfinite(mi).all()
    assert (mi - ref).abs().max() < 0.02  # bf16 matmuls: close (observed ~2e-4 nats), not equal
    (-mi.sum()).backward()
    assert all(x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all() for x in s)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in bank.parameters())
    assert all(a.grad is not None for a in bank.alpha)  # the log-variances get a float32 gradient too
    assert all(a.dtype == torch.float32 for a in bank.alpha)
