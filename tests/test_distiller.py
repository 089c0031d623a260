"""align_kd.Distiller: the objective as a module for a plain training loop.

Real teacher and data: the shipped fast CNN teacher (86.8% on CIFAR-10) on CIFAR-10 images.
Oracles: the teacher bitwise untouched by training; the loss falls on a fixed batch; plan columns
sum to 1; fit() equals a loop written by hand on the public API, bitwise; a Distiller loaded from
another's state_dict gives identical outputs; the logged loss equals the objective as written in
the docs, computed independently from the returned terms; the registry is what the CLI offers;
2 Gloo ranks under torchrun end identical and equal to one process on the global batch.
"""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from align_kd import PLAN_STRATEGIES, PLANS, Distiller, fit, register_plan  # noqa: E402
from align_kd.data import TensorLoader, load_cifar10  # noqa: E402
from align_kd.models import SmallCNN  # noqa: E402
from align_kd.zoo import load_teacher  # noqa: E402
from shared_archive import ARCHIVE  # noqa: E402


@pytest.fixture(scope="module")
def images():
    x, y = load_cifar10(ARCHIVE, split="train", limit=128)
    return x, y


def loader(images, batch=32, **kw):
    x, y = images
    return TensorLoader(x, y, batch_size=batch, **kw)


def teacher():
    return load_teacher("fastcnn")[0]


def student(seed=3):
    torch.manual_seed(seed)
    return SmallCNN(width=4)


def state(module):
    return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in module.state_dict().items()}


def same(a, b):
    """Equal state dicts: tensors bitwise, extra state (a plan's update count and optimiser) by value."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


# ----------------------------------------------------------------------------------------------
# the contract


def test_plain_loop_trains_the_student_and_leaves_the_teacher_untouched(images):
    t, s = teacher(), student()
    t_before = state(t)
    x, y = next(iter(loader(images, batch=64)))
    d = Distiller(t, s, x, strategy="sinkhorn", width=8)
    opt = torch.optim.SGD(d.param_groups(lr=0.05, weight_decay=5e-4), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(25):
        out = d(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        T, S = len(d.teacher_layers), len(d.student_layers)
        assert out.plan.shape == (T, S) and out.mi.shape == (T, S) and out.logits.shape == (64, 10)
        assert torch.allclose(out.plan.sum(0), torch.ones(S), atol=1e-5)  # every column sums to 1
        assert {"ce", "kd", "feature"} <= set(out.terms) and all(v.dim() == 0 for v in out.terms.values())
    assert losses[-1] < losses[0] - 0.5, losses  # observed: ~2.9 -> ~0.4 on the fixed batch
    assert same(state(t), t_before) and not t.training
    assert all(not p.requires_grad and p.grad is None for p in t.parameters())


def test_teacher_is_frozen_and_outside_parameters_and_state_dict(images):
    t, s = teacher(), student()
    x, _ = next(iter(loader(images)))
    d = Distiller(t, s, x, strategy="sinkhorn", width=8)
    teacher_ids = {id(p) for p in t.parameters()} | {id(b) for b in t.buffers()}
    assert not teacher_ids & {id(p) for p in d.parameters()}
    assert not teacher_ids & {id(b) for b in d.buffers()}
    assert {k.split(".")[0] for k in d.state_dict()} == {"student", "bank", "plan", "forward_count"}
    assert all(torch.is_tensor(v) for k, v in d.state_dict().items() if k != "plan._extra_state")
    d.train()
    assert d.student.training and d.bank.training and not t.training
    assert not any(m.training for m in t.modules())
    d.eval()
    assert not d.student.training


def test_loss_value_is_the_objective_as_written(images):
    # loss = beta * CE + (1 - beta) * (kd_weight * KD - feature_weight * sum(lam * mi)), from the terms
    x, y = next(iter(loader(images)))
    for opts in ({"beta": 0.3, "kd_weight": 0.7, "feature_weight": 2.0}, {"ce_weight": 1.0, "kd_weight": 1.0, "feature_weight": 0.5}):
        d = Distiller(teacher(), student(), x, strategy="sinkhorn", width=8, **opts)
        out = d(x, y)
        ce, kd, feature = (out.terms[k].double() for k in ("ce", "kd", "feature"))
        assert torch.allclose(feature, (out.plan.double() * out.mi.double()).sum(), rtol=1e-6)
        distil = opts["kd_weight"] * kd - opts["feature_weight"] * feature
        want = opts["ce_weight"] * ce + distil if "ce_weight" in opts else opts["beta"] * ce + (1 - opts["beta"]) * distil
        assert abs(out.loss.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), (out.loss.item(), want.item())


def test_state_dict_round_trip_gives_identical_outputs(images):
    data = loader(images, shuffle=True, augment=True, seed=1)
    x0, _ = next(iter(data))
    a = Distiller(teacher(), student(), x0, strategy="sinkhorn", width=8)
    opt = torch.optim.SGD(a.param_groups(lr=0.05), lr=0.05, momentum=0.9)
    for x, y in data:  # trains the student, the bank (and its standardisers) and the plan
        out = a(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    b = Distiller(teacher(), student(seed=99), x0, strategy="sinkhorn", width=8)
    assert not same(state(a), state(b))
    b.load_state_dict(a.state_dict())
    assert same(state(a), state(b))
    x, y = next(iter(data))
    for mode in (False, True):  # eval, then a training forward (which updates running statistics)
        a.train(mode), b.train(mode)
        oa, ob = a(x, y), b(x, y)
        assert torch.equal(oa.loss, ob.loss) and torch.equal(oa.logits, ob.logits)
        assert torch.equal(oa.plan, ob.plan) and torch.equal(oa.mi, ob.mi)
    assert same(state(a), state(b))


def test_fit_equals_a_hand_written_loop_bitwise(images):
    lr, wd, epochs = 0.05, 5e-4, 2
    opts = dict(width=8, beta=0.5, tau=0.1)

    def data():
        return loader(images, shuffle=True, augment=True, seed=2)

    s_fit = student()
    res = fit(teacher(), s_fit, (data(), None), strategy="sinkhorn", epochs=epochs, lr=lr, weight_decay=wd,
              device="cpu", progress=False, seed=0, **opts)

    # the same run written by hand on the public API (fit seeds the global RNG with `seed` after
    # taking its models: the bank's regressors are drawn from it)
    t_hand, s_hand = teacher(), student()
    torch.manual_seed(0)
    train = data()
    x0, _ = next(iter(train))
    d = Distiller(t_hand, s_hand, x0[:2], strategy="sinkhorn", **opts)
    opt = torch.optim.SGD(d.param_groups(lr=lr, weight_decay=wd), lr=lr, momentum=0.9, nesterov=True)
    total = epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
    for epoch in range(epochs):
        train.set_epoch(epoch)
        d.train()
        for x, y in train:
            out = d(x, y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():  # fit() reads the plan for each epoch's record: it warm-starts the next projection
            d.plan()
    assert same(state(s_fit), state(s_hand))
    assert torch.equal(res.plan, d.plan().detach().float())


def test_fit_writes_step_and_epoch_logs(images, tmp_path):
    import csv

    res = fit(teacher(), student(), (loader(images), loader(images, batch=64)), strategy="sinkhorn", epochs=2,
              width=8, device="cpu", progress=False, log_dir=tmp_path / "logs")
    with open(tmp_path / "logs" / "steps.csv") as f:
        steps = list(csv.DictReader(f))
    with open(tmp_path / "logs" / "epochs.csv") as f:
        epochs = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == list(range(1, 9))  # 4 batches x 2 epochs
    assert {"loss", "ce", "kd", "feature", "acc", "lr"} <= set(steps[0])
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    for row, h in zip(epochs, res.history, strict=True):
        assert float(row["test_acc"]) == h["test_acc"] and float(row["loss"]) == h["loss"]
        assert math.isclose(float(row["plan_entropy"]), -sum(
            p * math.log(p) for col in zip(*h["plan"]) for p in col if p > 0) / len(h["plan"][0]), rel_tol=1e-5)


def test_bf16_autocast_in_the_users_loop(images):
    x, y = next(iter(loader(images)))
    d = Distiller(teacher(), student(), x, strategy="sinkhorn", width=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(x, y)
    assert out.loss.dtype == torch.float32 and out.mi.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in d.parameters() if p.grad is not None)
    assert d.plan.logits.grad is not None and d.bank.alpha[0].grad is not None


@pytest.mark.slow  # compiling teacher, student and bank on one CPU thread takes ~1 minute
def test_compiled_distiller_matches_eager(images):
    x, y = next(iter(loader(images)))
    eager = Distiller(teacher(), student(), x, strategy="sinkhorn", width=8)
    compiled = Distiller(teacher(), student(), x, strategy="sinkhorn", width=8, compile=True)
    a, b = eager(x, y), compiled(x, y)
    assert torch.allclose(a.loss, b.loss, atol=1e-5) and torch.allclose(a.mi, b.mi, atol=1e-5)


def test_bad_options_are_refused_with_what_to_do(images):
    x, _ = next(iter(loader(images)))
    with pytest.raises(TypeError, match=r"training-loop option\(s\) \['epochs', 'lr'\].*belong to fit\(\)"):
        Distiller(teacher(), student(), x, epochs=3, lr=0.1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['temperature'\]"):
        Distiller(teacher(), student(), x, temperature=4)
    with pytest.raises(ValueError, match="Expected `tau` > 0"):
        Distiller(teacher(), student(), x, tau=0)
    with pytest.raises(ValueError, match=r"strategy.*one of"):
        Distiller(teacher(), student(), x, strategy="optimal")
    with pytest.raises(ValueError, match="is on cpu but `example_input` is on meta"):
        Distiller(teacher(), student(), x.to("meta"))


def test_exact_plan_is_updated_by_the_users_loop(images):
    from align_kd.exact import exact_plan_info

    data = loader(images)
    held = [next(iter(data))]
    d = Distiller(teacher(), student(), held[0][0], strategy="exact", exact_warmup=1, width=8)
    before = d.plan().clone()
    assert d.plan_update_due(1, len(data)) and not d.plan_update_due(2, len(data))
    record = d.update_plan(held)
    plan, _ = exact_plan_info(torch.tensor(record["mi"], dtype=torch.float64), d.plan.row_marginal.double(),
                              tau=d.plan.tau)  # an independent solve of the recorded MI
    assert torch.allclose(d.plan().double(), plan, atol=1e-6) and not torch.allclose(before, d.plan())
    assert Distiller(teacher(), student(), held[0][0], strategy="sinkhorn", width=8).update_plan(held) is None


def test_registry_is_what_fit_and_the_cli_offer():
    from align_kd.__main__ import build_parser
    from align_kd.experiment import ALL_STRATEGIES, PLAN_FROM_ROW, PLAN_VARIANTS

    assert PLAN_STRATEGIES == tuple(PLANS) == ("hinton", "pairwise", "uniform", "softmax", "sinkhorn", "exact")
    parser = build_parser()
    fit_cmd = next(a for a in parser._subparsers._group_actions[0].choices["fit"]._actions if a.dest == "strategy")
    assert set(fit_cmd.choices) == set(ALL_STRATEGIES) == set(PLANS) | {"alone", "dkd", "ls"} | set(PLAN_VARIANTS) | set(PLAN_FROM_ROW)
    assert all(plan in PLANS for plan, _ in PLAN_VARIANTS.values())
    # the --strategy help is written by hand: it names every row the CLI accepts (as a whole word)
    missing = [s for s in ALL_STRATEGIES if not re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", fit_cmd.help)]
    assert missing == []
    with pytest.raises(ValueError, match="already registered"):
        register_plan("sinkhorn")(type("Again", (PLANS["sinkhorn"],), {}))


def test_a_registered_plan_is_a_strategy_everywhere(images):
    from align_kd.plans import FixedPlan

    @register_plan("last-layer")
    class LastLayer(FixedPlan):  # every student layer learns from the teacher's deepest tap
        @classmethod
        def build(cls, T, S, **_):
            plan = torch.zeros(T, S)
            plan[-1] = 1.0
            return cls(plan)

    try:
        x, y = next(iter(loader(images)))
        d = Distiller(teacher(), student(), x, strategy="last-layer", width=8)
        assert torch.equal(d(x, y).plan[-1], torch.ones(len(d.student_layers)))
    finally:
        PLANS.pop("last-layer")


# ----------------------------------------------------------------------------------------------
# data parallel: DistributedDataParallel(Distiller) on 2 Gloo ranks vs one process

DDP_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from align_kd import Distiller
    from align_kd.data import TensorLoader, load_cifar10
    from align_kd.models import MLP
    from align_kd.zoo import load_teacher

    archive, out_dir = sys.argv[1], sys.argv[2]
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("gloo")
    rank, ws = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    x, y = load_cifar10(archive, split="train", limit=64)
    batches = list(TensorLoader(x, y, batch_size=32))  # two global batches of 32
    teacher = load_teacher("fastcnn")[0]
    torch.manual_seed(10 + rank)  # a different start on every rank: DDP broadcasts rank 0's
    student = MLP(hidden=(32, 16))
    if not ddp:
        torch.manual_seed(10)
        student = MLP(hidden=(32, 16))
    distiller = Distiller(teacher, student, batches[0][0][:2], strategy="sinkhorn", width=8, skip_pairs_below=0.05,
                          full_pass_every=2)
    model = DistributedDataParallel(distiller, find_unused_parameters=True) if ddp else distiller
    opt = torch.optim.SGD(distiller.param_groups(lr=0.05, weight_decay=5e-4), lr=0.05, momentum=0.9)
    losses, evaluated = [], []
    for step in range(6):
        xb, yb = batches[step % 2]
        share = slice(rank * 32 // ws, (rank + 1) * 32 // ws)  # this rank's half of the global batch
        out = model(xb[share], yb[share])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        evaluated.append(out.pairs_evaluated)
    torch.save({"state": distiller.state_dict(), "losses": losses, "evaluated": evaluated, "wrapped": type(model).__name__},
               os.path.join(out_dir, f"{'ddp' if ddp else 'single'}-rank{rank}.pt"))
''')


def _run_worker(script, out, ddp):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"] if ddp else [sys.executable]
    proc = subprocess.run([*launch, str(script), str(ARCHIVE), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_ddp_wrapped_distiller_ranks_identical_and_equal_to_one_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    _run_worker(script, tmp_path, ddp=True)
    _run_worker(script, tmp_path, ddp=False)
    r0, r1 = (torch.load(tmp_path / f"ddp-rank{r}.pt") for r in (0, 1))
    one = torch.load(tmp_path / "single-rank0.pt")
    assert r0["wrapped"] == "DistributedDataParallel" and one["wrapped"] == "Distiller"
    assert same(r0["state"], r1["state"])  # every parameter and buffer, bitwise
    assert min(r0["evaluated"]) < 1.0 == max(r0["evaluated"])  # pairs were skipped between full passes
    for k, v in one["state"].items():
        if not torch.is_tensor(v):
            assert v == r0["state"][k], k
        elif v.is_floating_point():  # gradients averaged over the halves = the global batch's (round-off apart)
            assert torch.allclose(r0["state"][k], v, atol=2e-5, rtol=1e-4), (k, (r0["state"][k] - v).abs().max())
        else:
            assert torch.equal(r0["state"][k], v), k
    # the mean of the two ranks' losses is the loss on the global batch
    for a, b, g in zip(r0["losses"], r1["losses"], one["losses"], strict=True):
        assert abs((a + b) / 2 - g) < 1e-4 * max(1.0, abs(g)), (a, b, g)


def test_the_torchrun_example_runs(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "torchrun_distill.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGN_KD_DATA": str(ARCHIVE)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2", str(example),
           "--limit", "256", "--test-limit", "256", "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("epoch 1/1: loss") == 1  # rank 0 alone prints
    state = torch.load(tmp_path / "distiller.pt")
    assert any(k.startswith("plan.") for k in state) and not any(k.startswith("teacher") for k in state)
