"""fit() end to end on tiny models (CNN teacher with T = 5 taps -> MLP student with S = 3 taps).

Oracles: planted plans (pairwise one-hot by relative depth, uniform 1/T, a user tensor), the plan
of the exact strategy recomputed from its recorded MI by an independent call to exact_plan_info,
the sinkhorn row marginal S / T, bitwise determinism for a fixed seed, a save/load round trip,
the teacher left exactly as it was, and validation that fails before any training step.
"""
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)

from align_kd import FitResult, describe_layers, discover_layers, fit  # noqa: E402
from align_kd.exact import exact_plan_info  # noqa: E402
from align_kd.plans import PLAN_STRATEGIES  # noqa: E402

T_LAYERS, S_LAYERS = 5, 3
CLASSES = 4
FAST = dict(epochs=2, progress=False, device="cpu", width=8)


def make_teacher() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.ReLU(),
        nn.Linear(16, CLASSES),
    )


def make_student(classes: int = CLASSES) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, classes)
    )


def dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def loaders(batch=16):
    X, Y = dataset()
    train = DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True)  # shuffled by the global RNG (seeded by fit)
    test = DataLoader(TensorDataset(X[:32], Y[:32]), batch_size=32)
    return train, test


class Batches:
    """A plain iterable of (x, y) batches with a length (not a list: a list means (train, test))."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FIXED = torch.tensor([
    [0.5, 0.0, 0.1],
    [0.5, 0.2, 0.1],
    [0.0, 0.8, 0.1],
    [0.0, 0.0, 0.3],
    [0.0, 0.0, 0.4],
])


# ----------------------------------------------------------------------------------------------
# every strategy


class _Runs(dict):
    """One fit() per strategy, run on first use and shared by the tests of this module."""

    def __missing__(self, name):
        student = make_student()
        before = state(student)
        res = fit(make_teacher(), student, loaders(), strategy=FIXED if name == "fixed" else name, **FAST)
        self[name] = (res, before)
        return self[name]


@pytest.fixture(scope="module")
def results():
    return _Runs()


def test_models_have_the_planned_taps():
    x = dataset(2)[0]
    assert len(discover_layers(make_teacher(), x)) == T_LAYERS
    assert len(discover_layers(make_student(), x)) == S_LAYERS


@pytest.mark.parametrize("name", PLAN_STRATEGIES + ("fixed",))
def test_fit_result_fields(results, name):
    res, before = results[name]
    x = dataset(2)[0]
    teacher, student = make_teacher(), make_student()
    assert res.teacher_layers == discover_layers(teacher, x)
    assert res.student_layers == discover_layers(student, x)
    t_info = {i.name: list(i.shape) for i in describe_layers(teacher, x)}
    s_info = {i.name: list(i.shape) for i in describe_layers(student, x)}
    assert res.teacher_shapes == [t_info[n] for n in res.teacher_layers]
    assert res.student_shapes == [s_info[n] for n in res.student_layers]
    assert res.plan.shape == (T_LAYERS, S_LAYERS)
    assert torch.isfinite(res.plan).all() and (res.plan >= 0).all()
    if name == "hinton":  # logit KD only: no feature term, no MI
        assert torch.equal(res.plan, torch.zeros(T_LAYERS, S_LAYERS))
        assert res.mi is None
    else:
        torch.testing.assert_close(res.plan.sum(0), torch.ones(S_LAYERS), atol=1e-5, rtol=0)
        assert res.mi.shape == (T_LAYERS, S_LAYERS) and torch.isfinite(res.mi).all()
    assert len(res.history) == 2
    for epoch, rec in enumerate(res.history, start=1):
        assert rec["epoch"] == epoch
        assert rec["skipped_steps"] == 0
        plan = torch.tensor(rec["plan"])
        assert plan.shape == (T_LAYERS, S_LAYERS)
        if name != "hinton":
            torch.testing.assert_close(plan.sum(0), torch.ones(S_LAYERS), atol=1e-5, rtol=0)
        assert 0.0 <= rec["test_acc"] <= 1.0 and math.isfinite(rec["loss"])
    assert res.history[-1]["step"] == 2 * 4  # 64 samples / batch 16 = 4 steps per epoch
    torch.testing.assert_close(torch.tensor(res.history[-1]["plan"]), res.plan)
    assert res.test_acc == res.history[-1]["test_acc"]
    assert res.config["strategy"] == name and res.config["epochs"] == 2
    # the student was trained in place
    assert res.student is not None
    assert not same_state(before, res.student.state_dict())
    assert all(torch.isfinite(p).all() for p in res.student.parameters())


def test_pairwise_plan_is_relative_depth_one_hot(results):
    res, _ = results["pairwise"]
    expected = torch.zeros(T_LAYERS, S_LAYERS)
    expected[0, 0] = expected[2, 1] = expected[4, 2] = 1.0  # depths 0, 1/2, 1 on both sides
    assert torch.equal(res.plan, expected)


def test_uniform_plan(results):
    res, _ = results["uniform"]
    torch.testing.assert_close(res.plan, torch.full((T_LAYERS, S_LAYERS), 1.0 / T_LAYERS))


def test_fixed_plan_is_kept(results):
    res, _ = results["fixed"]
    torch.testing.assert_close(res.plan, FIXED, rtol=0, atol=0)
    assert res.config["fixed_plan"] == FIXED.tolist()


def test_sinkhorn_plan_has_uniform_row_marginal_and_moved(results):
    res, _ = results["sinkhorn"]
    torch.testing.assert_close(res.plan.sum(1), torch.full((T_LAYERS,), S_LAYERS / T_LAYERS), atol=1e-4, rtol=0)
    first, last = torch.tensor(res.history[0]["plan"]), res.plan
    assert not torch.equal(first, last)  # the plan logits were trained


def test_softmax_plan_was_learned(results):
    res, _ = results["softmax"]
    assert not torch.equal(torch.tensor(res.history[0]["plan"]), res.plan)


def test_exact_plan_matches_independent_solve_of_recorded_mi(results):
    res, _ = results["exact"]
    assert [s["step"] for s in res.solves] == [4, 8]  # once per epoch (exact_every=None)
    last = res.solves[-1]
    tau = res.config["tau"] if res.config["exact_tau"] is None else res.config["exact_tau"]
    assert last["tau"] == tau
    row_marginal = torch.full((T_LAYERS,), S_LAYERS / T_LAYERS, dtype=torch.float64)  # default: uniform S / T
    expected, info = exact_plan_info(torch.tensor(last["mi"]).double(), row_marginal, tau=tau)
    assert info["status"] == "optimal"
    torch.testing.assert_close(res.plan.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.plan.sum(1).double(), row_marginal, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# determinism, persistence, the teacher


def test_same_seed_same_result_and_other_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        res = fit(make_teacher(), make_student(), loaders(), strategy="sinkhorn", seed=seed, **FAST)
        runs.append((state(res.student), res.plan.clone(), res.mi.clone()))
    (s0, p0, m0), (s1, p1, m1), (s2, p2, _) = runs
    assert same_state(s0, s1)
    assert torch.equal(p0, p1) and torch.equal(m0, m1)
    assert not same_state(s0, s2)  # the seed matters (shuffling, bank init), so the check above can fail


def test_save_load_round_trip(results, tmp_path):
    res, _ = results["sinkhorn"]
    path = res.save(tmp_path / "run")
    assert (path / "result.json").exists() and (path / "student.pt").exists()
    fresh = make_student()
    loaded = FitResult.load(path, student=fresh)
    assert loaded.student is fresh
    assert same_state(state(fresh), res.student.state_dict())
    torch.testing.assert_close(loaded.plan, res.plan, rtol=0, atol=0)
    torch.testing.assert_close(loaded.mi, res.mi, rtol=0, atol=0)
    assert loaded.to_dict() == res.to_dict()
    again = FitResult.load(path / "result.json")  # the file itself; no student
    assert again.student is None and again.teacher_layers == res.teacher_layers
    with pytest.raises(FileNotFoundError):
        FitResult.load(tmp_path / "missing")


@pytest.mark.parametrize("start", ["train", "eval"])
def test_teacher_is_unchanged(start):
    teacher = make_teacher().train(start == "train")
    teacher[1].training = start != "train"  # the BatchNorm in the other mode than the rest
    teacher[0].bias.requires_grad_(False)  # a mix of frozen and trainable parameters
    flags = [m.training for m in teacher.modules()]
    requires = [p.requires_grad for p in teacher.parameters()]
    before = state(teacher)
    fit(teacher, make_student(), loaders(), strategy="uniform", epochs=1, progress=False, device="cpu", width=8)
    assert [m.training for m in teacher.modules()] == flags
    assert [p.requires_grad for p in teacher.parameters()] == requires
    assert same_state(before, teacher.state_dict())  # weights and BN running statistics
    assert all(p.grad is None for p in teacher.parameters())
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in teacher.modules())


def test_full_bank_layout_and_bf16_autocast():
    res = fit(make_teacher(), make_student(), loaders(), strategy="softmax", bank_layout="full", amp=True,
              **{**FAST, "epochs": 1})
    assert res.mi.dtype == torch.float32 and torch.isfinite(res.mi).all()
    torch.testing.assert_close(res.plan.sum(0), torch.ones(S_LAYERS), atol=1e-5, rtol=0)
    assert all(torch.isfinite(p).all() for p in res.student.parameters())


# ----------------------------------------------------------------------------------------------
# bad inputs fail before training


def _bad_cases():
    X, Y = dataset()
    good = DataLoader(TensorDataset(X, Y), batch_size=16)
    return {
        "unknown teacher layer": (dict(teacher_layers=["3", "conv99"]), ValueError, r"conv99.*Available"),
        "duplicate student layer": (dict(student_layers=["2", "2"]), ValueError, "more than once"),
        "unknown strategy": (dict(strategy="optimal"), ValueError, r"'hinton'.*'pairwise'.*'uniform'.*'softmax'.*'sinkhorn'.*'exact'.*'optimal'"),
        "fixed plan wrong shape": (dict(strategy=torch.full((S_LAYERS, T_LAYERS), 1 / S_LAYERS)), ValueError, r"\(5, 3\)"),
        "fixed plan columns": (dict(strategy=torch.full((T_LAYERS, S_LAYERS), 0.3)), ValueError, "sum to 1"),
        "fixed plan negative": (dict(strategy=FIXED * torch.tensor([[-1.0], [3.0], [1.0], [1.0], [1.0]])), ValueError, "non-negative"),
        "beta above 1": (dict(beta=1.5), ValueError, "beta"),
        "beta below 0": (dict(beta=-0.1), ValueError, "beta"),
        "different classes": (dict(student=make_student(classes=CLASSES + 1)), ValueError, "5"),
        "inputs only": (dict(data=DataLoader(TensorDataset(X), batch_size=16)), TypeError, "labels"),
        "float labels": (dict(data=DataLoader(TensorDataset(X, Y.float()), batch_size=16)), TypeError, "integer"),
        "not iterable": (dict(data=42), TypeError, "iterable"),
        "three loaders": (dict(data=(good, good, good)), ValueError, "pair"),
        "empty loader": (dict(data=DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=16)), ValueError, "empty"),
        "unknown option": (dict(epoch=2), TypeError, r"'epoch'"),
        "bad row marginal": (dict(row_marginal=[1.0] * T_LAYERS), ValueError, "row_marginal"),
        "bad layout": (dict(bank_layout="dense"), ValueError, "bank_layout"),
        "skip threshold above 1": (dict(skip_pairs_below=1.5), ValueError, "skip_pairs_below"),
        "full pass every 0": (dict(skip_pairs_below=0.1, full_pass_every=0), ValueError, "full_pass_every"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_inputs_raise_before_training(case):
    kwargs, exc, pattern = _bad_cases()[case]
    teacher = make_teacher()
    student = kwargs.pop("student", make_student())
    data = kwargs.pop("data", loaders()[0])
    t_before, s_before = state(teacher), state(student)
    with pytest.raises(exc, match=pattern):
        fit(teacher, student, data, progress=False, device="cpu", **kwargs)
    assert same_state(s_before, student.state_dict())  # no training step was taken
    assert same_state(t_before, teacher.state_dict())
    assert all(len(m._forward_hooks) == 0 for m in list(teacher.modules()) + list(student.modules()))


# ----------------------------------------------------------------------------------------------
# bad batches


def _batches(n=4, seed=0):
    X, Y = dataset(16 * n, seed)
    return [(X[k * 16:(k + 1) * 16], Y[k * 16:(k + 1) * 16]) for k in range(n)]


def test_nan_batch_is_skipped_with_a_warning():
    batches = _batches()
    x = batches[1][0].clone()
    x[3, 0, 2, 2] = float("nan")
    batches[1] = (x, batches[1][1])
    with pytest.warns(RuntimeWarning, match="NaN"):
        res = fit(make_teacher(), make_student(), Batches(batches), strategy="sinkhorn", **FAST)
    assert [h["skipped_steps"] for h in res.history] == [1, 1]
    assert all(torch.isfinite(p).all() for p in res.student.parameters())
    assert torch.isfinite(res.mi).all() and torch.isfinite(res.plan).all()


def test_overflowing_batch_is_skipped_without_poisoning_later_steps():
    # finite inputs whose features overflow: the loss is inf; the step must leave no trace (running
    # statistics of the student's BatchNorm and of the MI bank included), so the next batches train
    batches = _batches()
    batches[1] = (torch.full_like(batches[1][0], 3e38), batches[1][1])
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))
    with pytest.warns(RuntimeWarning, match="loss is"):
        res = fit(make_teacher(), student, Batches(batches), strategy="uniform", max_bad_steps=2, **FAST)
    assert [h["skipped_steps"] for h in res.history] == [1, 1]
    assert torch.isfinite(res.mi).all()
    assert all(torch.isfinite(b).all() for b in student.buffers())
    assert student[2].running_var.max() < 1e3  # not dragged by the 3e38 batch


def test_too_many_bad_batches_stop_with_the_likely_causes(tmp_path):
    import csv

    from align_kd import TrainingDiverged

    batches = _batches(5)
    for k in (1, 2, 3):
        batches[k] = (torch.full_like(batches[k][0], float("nan")), batches[k][1])
    student = make_student()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(TrainingDiverged) as err:
            fit(make_teacher(), student, Batches(batches), strategy="uniform", max_bad_steps=3, log_dir=str(tmp_path),
                **FAST)
    assert isinstance(err.value, RuntimeError)  # callers that caught RuntimeError still do
    assert (err.value.first_step, err.value.step) == (1, 3)  # the NaN batches, 0-based
    assert err.value.reason == "the input batch contains NaN or inf"
    msg = str(err.value)
    assert "3 training steps in a row" in msg and "steps 1-3" in msg
    assert "lr" in msg and "tau" in msg and "NaN" in msg
    # the last finite step's terms, as steps.csv logged them (its only row: step 0)
    (logged,) = list(csv.DictReader(open(tmp_path / "steps.csv")))
    terms = {k: float(logged[k]) for k in ("ce", "kd", "feature")}
    assert (f"The last finite step, 0, had ce {terms['ce']:.4g}, kd {terms['kd']:.4g} and feature "
            f"(sum(lam * mi), nats) {terms['feature']:.4g}.") in msg
    assert "vid_eps" not in msg  # a small bound: no hint about the variance floor
    assert all(torch.isfinite(p).all() for p in student.parameters())


@pytest.mark.parametrize("estimator,feature,hint", [("vid", -39.2, True), ("vid", -1.5, False), ("infonce", -39.2, False)])
def test_divergence_names_the_vid_floor_only_for_a_bound_far_below_zero(estimator, feature, hint):
    # the terms of real-resnet-vit's `softmax` seed 2 one step before it diverged (steps.csv, step 325)
    from align_kd.config import FitConfig
    from align_kd.training import _too_many_bad_steps

    err = _too_many_bad_steps(FitConfig(mi_estimator=estimator), 10, "the loss is nan", 335,
                              {"ce": 2.10, "kd": 1.52, "feature": feature})
    assert (err.first_step, err.step) == (326, 335)
    assert "The last finite step, 325, had ce 2.1, kd 1.52" in str(err)
    assert ("raise `vid_eps` (e.g. 1e-2) or set `grad_clip`" in str(err)) == hint


def test_bad_batches_not_in_a_row_do_not_stop():
    batches = _batches(5)
    for k in (1, 3):
        batches[k] = (torch.full_like(batches[k][0], float("nan")), batches[k][1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = fit(make_teacher(), make_student(), Batches(batches), strategy="uniform", max_bad_steps=2, **FAST)
    assert [h["skipped_steps"] for h in res.history] == [2, 2]


def test_log_variances_and_plan_logits_get_no_weight_decay():
    from align_kd import Distiller
    from align_kd.training import FitConfig, make_optimizer

    cfg = FitConfig(strategy="sinkhorn", weight_decay=0.1, progress=False, device="cpu", width=8)
    student = make_student()
    distiller = Distiller(make_teacher().eval(), student, next(iter(loaders()[0]))[0][:2], strategy="sinkhorn", width=8)
    optimizer = make_optimizer(distiller, cfg)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    n_params = sum(len(g["params"]) for g in optimizer.param_groups)
    expected = [*student.parameters(), *distiller.bank.parameters(), *distiller.plan.parameters()]
    assert n_params == len(decay) == len(expected)  # every trainable tensor exactly once
    assert {id(p) for p in expected} == set(decay)
    assert sorted(map(id, distiller.parameters())) == sorted(map(id, expected))  # nothing else is trained
    for a in distiller.bank.alpha:
        assert decay[id(a)] == 0.0
    assert decay[id(distiller.plan.logits)] == 0.0
    assert all(decay[id(p)] == 0.1 for p in student.parameters())
    assert decay[id(distiller.bank.pair_maps)] == 0.1


# ----------------------------------------------------------------------------------------------
# skipping pairs with a small plan weight (skip_pairs_below)


def test_skip_threshold_below_every_weight_changes_nothing():
    """Every sinkhorn weight is positive: a tiny threshold keeps all pairs, so the run is the default run."""
    runs = []
    for opts in ({}, {"skip_pairs_below": 1e-30}):
        student = make_student()
        res = fit(make_teacher(), student, loaders(), strategy="sinkhorn", **FAST, **opts)
        runs.append((res, state(student)))
    (a, sa), (b, sb) = runs
    assert same_state(sa, sb)
    assert torch.equal(a.plan, b.plan) and torch.equal(a.mi, b.mi)
    assert [h["pairs_evaluated"] for h in b.history] == [1.0, 1.0]


def test_skipped_pairs_follow_the_plan_and_the_full_passes():
    """Planted: pairwise has one weight-1 pair per column, so between full passes 1/T of the pairs
    run. 4 steps per epoch, a full pass every 3 steps (steps 0, 3, 6): epoch 1 evaluates
    (1 + 1/T + 1/T + 1) / 4, epoch 2 (1/T + 1/T + 1 + 1/T) / 4."""
    student = make_student()
    res = fit(make_teacher(), student, loaders(), strategy="pairwise", skip_pairs_below=0.5, full_pass_every=3, **FAST)
    f = 1 / T_LAYERS
    expect = [(2 + 2 * f) / 4, (1 + 3 * f) / 4]
    assert [round(h["pairs_evaluated"], 6) for h in res.history] == [round(e, 6) for e in expect]
    # the MI matrix stays complete and finite: skipped pairs carry their last estimate
    assert res.mi.shape == (T_LAYERS, S_LAYERS) and torch.isfinite(res.mi).all()
    assert (res.mi[res.plan == 0] != 0).all()  # estimated on the full passes


def test_cli_flag_skip_pairs_below():
    from align_kd.__main__ import _fit_options_from_args, build_parser

    opts = _fit_options_from_args(build_parser().parse_args(["fit", "--skip-pairs-below", "0.05"]))
    assert opts == {"skip_pairs_below": 0.05}


def test_constant_plan_schedule_keeps_the_plan_moving_to_the_end():
    """plan_schedule="constant": the plan group keeps its rate while the student's decays to 0, so
    the last epoch still moves the plan (with the shared cosine it barely does)."""
    from align_kd.training import make_optimizer, make_scheduler
    from align_kd import Distiller
    from align_kd.config import FitConfig

    moved = {}
    for schedule in ("cosine", "constant"):
        res = fit(make_teacher(), make_student(), loaders(), strategy="softmax", plan_schedule=schedule, epochs=4,
                  lr=0.05, plan_lr=0.01, **{k: v for k, v in FAST.items() if k != "epochs"})
        plans = [torch.tensor(h["plan"]) for h in res.history]
        moved[schedule] = float((plans[-1] - plans[-2]).abs().sum())
    assert moved["constant"] > 5 * moved["cosine"], moved  # observed 0.43 against 0.036
    cfg = FitConfig(strategy="softmax", plan_schedule="constant", plan_lr=0.5, epochs=2)
    x = next(iter(loaders()[0]))[0]
    opt = make_optimizer(Distiller(make_teacher(), make_student(), x, strategy="softmax", width=8), cfg)
    sched = make_scheduler(opt, cfg, steps_per_epoch=4)
    for _ in range(8):
        opt.step()
        sched.step()
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates["plan"] == 0.5 and rates["student"] < 1e-12  # cosine ends at 0; the plan's rate is untouched
    with pytest.raises(ValueError, match="plan_schedule"):
        FitConfig(plan_schedule="linear")
