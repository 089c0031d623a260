"""Logit distillation terms (align_kd.losses) against the papers' formulas computed independently.

Oracles: numpy float64 re-implementations written from the papers' definitions (not from our
code), DKD's own identity KD = TCKD + (1 - p_t) * NCKD (Zhao et al. 2022, Eq. 4), the invariance of
logit standardisation to a per-sample shift and positive scale, and float64 gradcheck.
"""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from align_kd import FitConfig, fit
from align_kd.losses import KD_LOSSES, KD_PAPER_SETTINGS, dkd, hinton_kd, kd_term, ls_kd, standardize


def _logits(b=5, k=7, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=torch.float64) * scale,
            torch.randn(b, k, generator=g, dtype=torch.float64) * scale,
            torch.randint(0, k, (b,), generator=g))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def _np_parts(s, t, y, T):
    """Per-sample TCKD and NCKD (no T^2) and the teacher's target probability, from the definitions."""
    ps, pt = _softmax(s / T), _softmax(t / T)
    rows = np.arange(len(y))
    bs = np.stack([ps[rows, y], 1 - ps[rows, y]], 1)
    bt = np.stack([pt[rows, y], 1 - pt[rows, y]], 1)
    mask = np.ones_like(ps, dtype=bool)
    mask[rows, y] = False
    qs = ps[mask].reshape(len(y), -1)
    qt = pt[mask].reshape(len(y), -1)
    qs, qt = qs / qs.sum(1, keepdims=True), qt / qt.sum(1, keepdims=True)
    return _kl(bt, bs), _kl(qt, qs), pt[rows, y]


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_hinton_kd_closed_form(T):
    s, t, _ = _logits()
    expected = T**2 * _kl(_softmax(t.numpy() / T), _softmax(s.numpy() / T)).mean()
    assert hinton_kd(s, t, T).item() == pytest.approx(expected, rel=1e-12)
    assert hinton_kd(t, t, T).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("T,alpha,beta", [(4.0, 1.0, 8.0), (1.0, 0.5, 2.0), (2.0, 0.0, 1.0)])
def test_dkd_matches_the_definition(T, alpha, beta):
    s, t, y = _logits(seed=1)
    tckd, nckd, _ = _np_parts(s.numpy(), t.numpy(), y.numpy(), T)
    expected = T**2 * (alpha * tckd + beta * nckd).mean()
    assert dkd(s, t, y, T, alpha, beta).item() == pytest.approx(expected, rel=1e-10)


def test_dkd_reformulates_kd():
    """KD = TCKD + (1 - p_t^teacher) * NCKD per sample (Zhao et al. 2022, Eq. 4)."""
    s, t, y = _logits(b=8, k=10, seed=2)
    T = 4.0
    tckd, nckd, pt_target = _np_parts(s.numpy(), t.numpy(), y.numpy(), T)
    kd = _kl(_softmax(t.numpy() / T), _softmax(s.numpy() / T))
    assert np.allclose(kd, tckd + (1 - pt_target) * nckd, rtol=1e-10)
    assert hinton_kd(s, t, T).item() == pytest.approx(T**2 * (tckd + (1 - pt_target) * nckd).mean(), rel=1e-10)


def test_dkd_has_no_nan_with_confident_logits():
    s, t, y = _logits(scale=200.0)
    s.requires_grad_(True)
    loss = dkd(s, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_logit_standardisation_formula_and_invariance():
    s, t, _ = _logits(seed=3)
    z = s.numpy()
    zs = (z - z.mean(1, keepdims=True)) / (z.std(1, ddof=1, keepdims=True) + 1e-7)
    assert np.allclose(standardize(s).numpy(), zs, rtol=1e-12)
    T = 2.0
    tz = t.numpy()
    tz = (tz - tz.mean(1, keepdims=True)) / (tz.std(1, ddof=1, keepdims=True) + 1e-7)
    expected = T**2 * _kl(_softmax(tz / T), _softmax(zs / T)).mean()
    assert ls_kd(s, t, T).item() == pytest.approx(expected, rel=1e-10)
    # a per-sample shift and positive scale of either side's logits changes nothing
    a = torch.rand(len(s), 1, dtype=torch.float64) * 5 + 0.1
    b = torch.randn(len(s), 1, dtype=torch.float64) * 10
    assert ls_kd(a * s + b, t * 3 - 1, T).item() == pytest.approx(ls_kd(s, t, T).item(), rel=1e-6)
    assert hinton_kd(a * s + b, t, T).item() != pytest.approx(hinton_kd(s, t, T).item(), rel=1e-3)  # plain KD is not invariant


@pytest.mark.parametrize("name", KD_LOSSES)
def test_gradcheck_float64(name):
    s, t, y = _logits(b=3, k=5, seed=4, scale=1.0)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: kd_term(name, z, t, y, 3.0), (s,))


def test_bf16_logits_are_computed_in_float32():
    s, t, y = _logits()
    for name in KD_LOSSES:
        low = kd_term(name, s.bfloat16(), t.bfloat16(), y, 4.0)
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(kd_term(name, s.bfloat16().double(), t.bfloat16().double(), y, 4.0).item(), rel=1e-4)


def test_paper_settings_are_complete():
    assert set(KD_PAPER_SETTINGS) == set(KD_LOSSES)
    assert KD_PAPER_SETTINGS["dkd"]["beta"] == 8.0 and KD_PAPER_SETTINGS["dkd"]["warmup"] == pytest.approx(1 / 12)
    assert KD_PAPER_SETTINGS["ls"]["temperature"] == 2.0 and KD_PAPER_SETTINGS["ls"]["kd_weight"] == 9.0


def _tiny():
    from torch import nn

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 4, (32,), generator=g)
    return teacher, student, DataLoader(TensorDataset(x, y), batch_size=16)


def test_fit_first_step_loss_is_each_papers_objective():
    """Epoch-1 loss of a one-step run = ce_weight * CE + ramp * kd_weight * term, computed by hand."""
    for name in KD_LOSSES:
        teacher, student, data = _tiny()
        x, y = next(iter(data))
        with torch.no_grad():
            s_logits, t_logits = student(x), teacher(x)
            ce = torch.nn.functional.cross_entropy(s_logits, y)
            term = kd_term(name, s_logits, t_logits, y, 4.0)
        one_batch = DataLoader(TensorDataset(x, y), batch_size=16)
        res = fit(teacher, student, one_batch, strategy="hinton", kd_loss=name, ce_weight=0.3, kd_weight=2.0,
                  kd_warmup=0.5, epochs=4, progress=False, device="cpu")
        # 4 steps in all, warm-up over the first 2: the first step's ramp is 1/2
        assert res.history[0]["loss"] == pytest.approx(0.3 * ce.item() + 0.5 * 2.0 * term.item(), rel=1e-5)
        assert res.history[0]["kd"] == pytest.approx(term.item(), rel=1e-5)
        assert res.config["kd_loss"] == name


def test_kd_loss_options_are_checked():
    with pytest.raises(ValueError, match=r"kd_loss.*\['hinton', 'dkd', 'ls'\].*'crd'"):
        FitConfig(kd_loss="crd")
    with pytest.raises(ValueError, match="kd_warmup"):
        FitConfig(kd_warmup=2.0)
    with pytest.raises(ValueError, match="ce_weight"):
        FitConfig(ce_weight=-1.0)


def test_ls_warns_when_the_students_logits_have_no_spread():
    """torchvision's ViT starts with a zero head: its logits have no spread, the z-scoring divides by
    1e-7 and the gradient through it is ~1e7 times that of ordinary logits (why the benchmark's ViT
    diverged under `ls`). The Distiller says so before training; a randomly initialised head, or
    another KD loss, gets no warning."""
    import warnings

    from align_kd import Distiller
    from align_kd.models import build_model

    torch.manual_seed(0)
    teacher = build_model("cnn", width=8)
    x = torch.randn(4, 3, 32, 32)
    flat = torch.zeros(2, 10, dtype=torch.float64, requires_grad=True)  # what the zero head gives
    spread = _logits(2, 10)[0].requires_grad_(True)
    t = _logits(2, 10, seed=1)[1]
    (g_flat,) = torch.autograd.grad(ls_kd(flat + 1e-9 * t, t), flat)
    (g_spread,) = torch.autograd.grad(ls_kd(spread, t), spread)
    assert g_flat.norm() > 1e5 * g_spread.norm()

    vit = build_model("vit", hidden_dim=32, mlp_dim=64, num_layers=2, patch_size=8)
    assert not vit.heads.head.weight.any()  # torchvision's zero-initialised head
    with pytest.warns(RuntimeWarning, match=r"kd_loss='ls'.*no spread.*std 0\.0e\+00.*normal_"):
        Distiller(teacher, vit, x, strategy="hinton", kd_loss="ls")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Distiller(teacher, vit, x, strategy="hinton", kd_loss="hinton")
        torch.nn.init.normal_(vit.heads.head.weight, std=0.01)
        Distiller(teacher, vit, x, strategy="hinton", kd_loss="ls")
