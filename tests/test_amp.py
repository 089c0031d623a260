"""The GPU path (``fit(amp=True, channels_last=True, compile=True)``), exercised on CPU.

Oracles: under bfloat16 autocast the MI matrix comes back float32 and finite, the learned plan
keeps its marginals (columns sum to 1, rows to S / T), training proceeds (no skipped step, finite
losses, the student moves), and the bank's estimate stays close to its float32 value.
channels_last and torch.compile change the memory layout and the kernels, not the maths: a run
with them equals the default run (same seed) to float round-off, the models really run in
channels_last, and checkpoints and results hold the user's own modules' weights.
"""
import math
from contextlib import nullcontext

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)

from align_kd import FitConfig, FitResult, _env, fit  # noqa: E402
from align_kd.__main__ import _fit_options_from_args, build_parser  # noqa: E402
from align_kd.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from align_kd.mi import BANK_LAYOUTS, MIBank  # noqa: E402

CLASSES = 4


@pytest.fixture(autouse=True)
def bf16_everywhere(monkeypatch):
    """These tests exercise bfloat16 autocast on any CPU: amp=True autocasts only where the device
    computes bf16 natively (elsewhere fit() trains in float32), so the probe says yes here."""
    monkeypatch.setattr(_env, "bf16_is_native", lambda device: True)


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


# ----------------------------------------------------------------------------------------------
# channels_last and torch.compile

CHANNELS_LAST = torch.channels_last


def _run(student=None, **opts) -> FitResult:
    opts = {"strategy": "sinkhorn", "epochs": 2, "width": 8, "device": "cpu", "progress": False, **opts}
    return fit(make_teacher(), make_student() if student is None else student, loaders(), **opts)


def assert_same_run(a: FitResult, b: FitResult, atol: float) -> None:
    """Same layers, plan, MI, per-epoch losses and accuracies, and student weights, to ``atol``."""
    assert (a.teacher_layers, a.student_layers) == (b.teacher_layers, b.student_layers)
    assert torch.allclose(a.plan, b.plan, atol=atol, rtol=0) and torch.allclose(a.mi, b.mi, atol=atol, rtol=0)
    for ha, hb in zip(a.history, b.history, strict=True):
        for key in ("loss", "ce", "kd", "feature", "train_acc", "test_acc"):
            assert abs(ha[key] - hb[key]) <= atol, (key, ha[key], hb[key])
        assert torch.allclose(torch.tensor(ha["mi"]), torch.tensor(hb["mi"]), atol=atol, rtol=0)
    wa, wb = a.student.state_dict(), b.student.state_dict()
    assert list(wa) == list(wb)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=atol, rtol=0) for k in wa)


@pytest.mark.parametrize("layout", list(BANK_LAYOUTS))
def test_channels_last_gives_the_same_run(layout):
    # observed differences ~1e-7 (other conv kernels); a swapped or transposed layout would be O(1)
    assert_same_run(_run(channels_last=True, bank_layout=layout), _run(bank_layout=layout), atol=1e-5)


def test_channels_last_with_amp_gives_the_same_run():
    # bfloat16 round-off differs between the kernels of the two layouts (observed ~5e-5 on the loss)
    assert_same_run(_run(channels_last=True, amp=True), _run(amp=True), atol=2e-3)


def test_channels_last_reaches_weights_and_every_batch():
    """Weights and input batches are channels_last in the training steps, the held-batch MI
    estimate ("exact") and the evaluation; the user's student is trained in place."""
    seen = []  # (role, training, grad enabled, batch size, input channels_last, weight channels_last)

    def record(role):
        def hook(mod, args):
            x = args[0]
            seen.append((role, mod.training, torch.is_grad_enabled(), len(x),
                         x.is_contiguous(memory_format=CHANNELS_LAST), mod.weight.is_contiguous(memory_format=CHANNELS_LAST)))
        return hook

    teacher, student = make_teacher(), make_student()
    teacher[0].register_forward_pre_hook(record("teacher"))
    student[0].register_forward_pre_hook(record("student"))
    res = fit(teacher, student, loaders(), strategy="exact", exact_warmup=2, exact_every=3, held_batches=1,
              channels_last=True, epochs=2, width=8, device="cpu", progress=False)
    assert res.student is student and len(res.solves) >= 2
    run = [s for s in seen if s[3] != 2]  # leave out fit()'s setup probes (2 samples, before the conversion)
    kinds = {(role, training, grad, batch) for role, training, grad, batch, _, _ in run}
    assert ("student", True, True, 16) in kinds  # training steps
    assert ("teacher", False, False, 16) in kinds  # the teacher in the training steps
    assert ("student", False, False, 16) in kinds  # the held-batch MI estimate
    assert ("student", False, False, 32) in kinds  # evaluation on the test loader
    assert all(x_cl and w_cl for *_, x_cl, w_cl in run), [s for s in run if not (s[4] and s[5])]
    assert student[0].weight.is_contiguous(memory_format=CHANNELS_LAST)
    assert not make_student()[0].weight.is_contiguous(memory_format=CHANNELS_LAST)  # the check can fail


@pytest.mark.parametrize("name", ["amp", "channels_last", "compile"])
def test_gpu_path_options_must_be_bools(name):
    with pytest.raises(ValueError, match=f"Expected `{name}` to be True or False but got 'yes'"):
        FitConfig(**{name: "yes"})
    assert getattr(FitConfig(**{name: True}), name) is True


def test_cli_flags_set_the_gpu_path_options():
    args = build_parser().parse_args(["fit", "--amp", "--channels-last", "--compile", "--tau", "0.2"])
    opts = _fit_options_from_args(args)
    assert opts == {"tau": 0.2, "amp": True, "channels_last": True, "compile": True}
    assert FitConfig(**opts).compile is True
    assert _fit_options_from_args(build_parser().parse_args(["fit"])) == {}


def test_compile_failure_names_what_failed_and_compile_false(monkeypatch):
    # a real failure, no mock: the inductor backend on CPU is pointed at a C++ compiler that does not exist
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    student = make_student()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"torch\.compile failed \(.*C\+\+ compiler.*\)\. Run with compile=False"):
        _run(student, compile=True)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # nothing was trained


@pytest.mark.slow  # compiling teacher, student and bank takes ~20-80 s on one CPU thread
@pytest.mark.parametrize("opts", [{}, {"channels_last": True, "bank_layout": "full"}], ids=["shared", "channels_last-full"])
def test_compile_gives_the_same_run_and_saves_the_plain_modules(tmp_path, opts):
    student = make_student()
    res = _run(student, compile=True, checkpoint_dir=tmp_path / "ckpt", **opts)
    assert_same_run(res, _run(**opts), atol=1e-5)  # observed ~1e-7
    assert res.student is student and type(res.student) is nn.Sequential  # the user's module, not a compiled wrapper
    keys = list(make_student().state_dict())
    assert list(student.state_dict()) == keys
    ckpt = read_checkpoint(list_checkpoints(tmp_path / "ckpt")[-1][1])
    assert [k.removeprefix("student.") for k in ckpt["distiller"] if k.startswith("student.")] == keys
    bank = [k for k in ckpt["distiller"] if k.startswith("bank.")]
    assert bank and not any("_orig_mod" in k for k in ckpt["distiller"])
    fresh = make_student()
    FitResult.load(res.save(tmp_path / "run"), student=fresh)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_amp_trains_in_float32_where_bf16_is_not_native(monkeypatch):
    """amp=True autocasts only where the device computes bfloat16 natively (emulated bf16 on an AVX2
    CPU made a training step 8-14x slower than float32). With the probe saying no, fit() and the
    teacher recipe warn and train bit for bit as amp=False; with it saying yes, bf16 really runs."""
    from align_kd.models import train_supervised

    plain = _run(amp=False)
    monkeypatch.setattr(_env, "bf16_is_native", lambda device: False)
    with pytest.warns(RuntimeWarning, match="has no native bfloat16.*training in float32 instead"):
        fallback = _run(amp=True)
    assert_same_run(fallback, plain, atol=0.0)
    monkeypatch.setattr(_env, "bf16_is_native", lambda device: True)
    bf16 = _run(amp=True)
    assert bf16.history[0]["loss"] != plain.history[0]["loss"]  # bf16 round-off: autocast was on
    weights = {}
    for native in (False, True):
        monkeypatch.setattr(_env, "bf16_is_native", lambda device, native=native: native)
        for amp in (False, True):
            model = make_student()
            with pytest.warns(RuntimeWarning, match="no native bfloat16") if amp and not native else nullcontext():
                train_supervised(model, loaders()[0], epochs=1, lr=0.05, device="cpu", progress=False, amp=amp)
            weights[native, amp] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(weights[False, True], weights[False, False])  # fell back to float32
    assert not torch.equal(weights[True, True], weights[True, False])
    assert isinstance(_env.versions()["cpu_bf16"], bool)  # every record says which ran


def test_channels_last_is_not_used_where_onednn_gets_the_gradient_wrong(monkeypatch):
    """oneDNN's AVX2 kernels write past their workspace in the weight gradient of a 1x1 convolution
    with stride > 1 and fewer than 8 input channels in channels_last (uxlfoundation/oneDNN#6035; here a
    width-4 ResNet's backward ended in "free(): invalid next size"). Such convolutions are found by
    shape, only for CPUs below AVX-512, and where one is found fit() and the teacher recipe warn and
    train in the default memory format: bit for bit the channels_last=False run."""
    from align_kd.models import train_supervised

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 16, 1, stride=2),
                        nn.Conv2d(16, 16, 1), nn.Conv2d(16, 32, 1, stride=2, groups=4))
    assert _env.channels_last_hazards(net, cpu_capability="AVX2") == ["Sequential.1 (4 -> 8, stride (2, 2))",
                                                                        "Sequential.4 (16 -> 32, stride (2, 2))"]
    assert _env.channels_last_hazards(net, cpu_capability="AVX512") == []
    assert _env.channels_last_hazards(make_student(), make_teacher(), cpu_capability="DEFAULT") == []
    plain = _run(channels_last=False)
    monkeypatch.setattr(_env, "channels_last_hazards", lambda *modules, **_: ["Sequential.1 (4 -> 8, stride (2, 2))"])
    with pytest.warns(RuntimeWarning, match=r"oneDNN#6035\): Sequential.1 \(4 -> 8.*default memory format"):
        fallback = _run(channels_last=True)
    assert_same_run(fallback, plain, atol=0.0)
    weights = []
    for channels_last in (False, True):
        model = make_student()
        with pytest.warns(RuntimeWarning, match="oneDNN#6035") if channels_last else nullcontext():
            train_supervised(model, loaders()[0], epochs=1, lr=0.05, device="cpu", progress=False,
                             channels_last=channels_last)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])
