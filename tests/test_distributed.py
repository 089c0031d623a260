"""Data-parallel fit(): two Gloo processes under torchrun on a tiny problem.

Oracles: both ranks end with bitwise identical students, plans and histories (although their
students start from different random weights and see different shards); the recorded test
accuracy equals a single-process evaluation of the final weights on the whole test set; a step
skipped on one rank (NaN input) is skipped on both; an interrupted 2-process run resumed from
its checkpoint equals the uninterrupted 2-process run; only rank 0 prints and writes.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import (
    DataLoader,
    IterableDataset,
    TensorDataset,
    WeightedRandomSampler,
)

torch.set_num_threads(1)

from align_kd import evaluate
from align_kd.data import TensorLoader
from align_kd.distributed import DistContext, is_main, presharded, setup
from shared_archive import ARCHIVE

WORKER = textwrap.dedent('''
    import os, sys, warnings
    import torch
    torch.set_num_threads(1)
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import align_kd
    import align_kd.checkpoint as ck
    from align_kd.data import TensorLoader
    from align_kd.distributed import presharded

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    writes = []
    _write = ck._write_bytes
    ck._write_bytes = lambda blob, path: (writes.append(str(path)), _write(blob, path))[1]

    class Student(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)  # a different start on every rank: fit() must broadcast rank 0's
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
            self.calls, self.at = 0, None

        def forward(self, x):
            if self.training and torch.is_grad_enabled():
                self.calls += 1
                if self.calls == self.at:
                    raise KeyboardInterrupt
            return self.net(x)

    def teacher():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()

    g = torch.Generator().manual_seed(0)
    X = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g)
    Y = torch.randint(0, 4, (96,), generator=g)
    XT = torch.randint(0, 256, (51, 3, 8, 8), dtype=torch.uint8, generator=g)  # odd: uneven eval shards
    YT = torch.randint(0, 4, (51,), generator=g)
    def tensor_data():
        return (TensorLoader(X, Y, batch_size=16, shuffle=True, augment=True, seed=5), TensorLoader(XT, YT, batch_size=16))
    OPTS = dict(epochs=2, device="cpu", width=8, progress=False)

    def record(name, res, student, **extra):
        torch.save({"student": student.state_dict(), "plan": res.plan, "history": res.history, "solves": res.solves,
                    "writes": list(writes), **extra}, os.path.join(out, f"{name}-rank{rank}.pt"))
        writes.clear()

    # 1. TensorLoader, sinkhorn, checkpoints, progress output
    s = Student(10 + rank)
    res = align_kd.fit(teacher(), s, tensor_data(), **{**OPTS, "progress": True}, checkpoint_dir=os.path.join(out, "ck1"))
    record("tensor", res, s)

    # 2. DataLoader (rebuilt with a DistributedSampler); NaN in sample 0 -> only rank 0's first batch
    Xf = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    Xf[0] = float("nan")
    train = DataLoader(TensorDataset(Xf, Y), batch_size=16, shuffle=False)
    test = DataLoader(TensorDataset(XT.float() / 255, YT), batch_size=16)
    s = Student(20 + rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = align_kd.fit(teacher(), s, (train, test), strategy="softmax", **OPTS)
    record("dataloader", res, s, warned=[str(w.message) for w in caught if "Skipped" in str(w.message)])

    # 3. exact: MI estimates averaged over ranks before every solve
    s = Student(30 + rank)
    res = align_kd.fit(teacher(), s, tensor_data(), strategy="exact", exact_warmup=2, exact_every=3, **OPTS)
    record("exact", res, s)

    # 4. the run of 1, interrupted in epoch 2 on both ranks, then resumed
    ck4 = os.path.join(out, "ck4")
    s = Student(10 + rank)
    s.at = 3 + 2  # three steps per epoch per rank
    try:
        align_kd.fit(teacher(), s, tensor_data(), **OPTS, checkpoint_dir=ck4)
    except KeyboardInterrupt:
        pass
    s = Student(40 + rank)
    res = align_kd.fit(teacher(), s, tensor_data(), **OPTS, checkpoint_dir=ck4, resume=True)
    record("resumed", res, s)

    # 4b. the held-out plan: hypergradients averaged over ranks, the plan logits outside DDP's buckets
    s = Student(60 + rank)
    res = align_kd.fit(teacher(), s, tensor_data(), strategy="sinkhorn", plan_objective="heldout", heldout_every=2, **OPTS)
    record("heldout", res, s)

    # 5. a loader the caller sharded; 6. unequal shards are refused on every rank (no hang)
    def batches(n):
        return [(X[k:k + 16].float() / 255, Y[k:k + 16]) for k in range(rank * 16, rank * 16 + 16 * n, 16)]
    class Batches(list):
        pass
    s = Student(50 + rank)
    res = align_kd.fit(teacher(), s, presharded(Batches(batches(2))), **OPTS)
    record("presharded", res, s)
    try:
        align_kd.fit(teacher(), Student(0), presharded(Batches(batches(2 + rank))), **OPTS)
        err = None
    except ValueError as e:
        err = str(e)
    torch.save(err, os.path.join(out, f"unequal-rank{rank}.pt"))
''')


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """Run WORKER with torchrun on 2 CPU processes (Gloo); return (output dir, combined output)."""
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return out, log


def load(out, name, rank):
    return torch.load(out / f"{name}-rank{rank}.pt", weights_only=False)


def same(a, b):
    assert a["student"].keys() == b["student"].keys()
    for k in a["student"]:
        assert torch.equal(a["student"][k], b["student"][k]), k
    assert torch.equal(a["plan"], b["plan"])
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]
    assert strip(a["history"]) == strip(b["history"])
    no_time = lambda s: [{k: v for k, v in r.items() if k != "seconds"} for r in s]
    assert no_time(a["solves"]) == no_time(b["solves"])


@pytest.mark.parametrize("name", ["tensor", "dataloader", "exact", "resumed", "presharded", "heldout"])
def test_both_ranks_end_identical(ddp, name):
    out, _ = ddp
    r0, r1 = load(out, name, 0), load(out, name, 1)
    same(r0, r1)
    assert all(torch.isfinite(v).all() for v in r0["student"].values() if v.is_floating_point())
    assert torch.allclose(r0["plan"].sum(0), torch.ones(r0["plan"].shape[1]), atol=1e-5)
    if name == "heldout":
        assert [r["kind"] for r in r0["solves"]] == ["heldout"] * 3  # 96 - 10 held out = 86 images: 3 steps x 2 epochs, every 2nd


def _student():
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _test_loader(kind):
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g)
    torch.randint(0, 4, (96,), generator=g)
    xt = torch.randint(0, 256, (51, 3, 8, 8), dtype=torch.uint8, generator=g)
    yt = torch.randint(0, 4, (51,), generator=g)
    if kind == "tensor":
        return TensorLoader(xt, yt, batch_size=51)
    return DataLoader(TensorDataset(xt.float() / 255, yt), batch_size=51)


@pytest.mark.parametrize("name,kind", [("tensor", "tensor"), ("dataloader", "dataloader"), ("exact", "tensor")])
def test_test_accuracy_equals_single_process_evaluation(ddp, name, kind):
    out, _ = ddp
    r0 = load(out, name, 0)
    student = _student()
    student.load_state_dict({k.removeprefix("net."): v for k, v in r0["student"].items()})
    acc = evaluate(student, _test_loader(kind), "cpu")
    assert r0["history"][-1]["test_acc"] == acc
    assert abs(acc * 51 - round(acc * 51)) < 1e-9  # counted over all 51 samples, each once (up to float round-off)


def test_a_step_skipped_on_one_rank_is_skipped_on_both(ddp):
    out, _ = ddp
    r0, r1 = load(out, "dataloader", 0), load(out, "dataloader", 1)
    assert [h["skipped_steps"] for h in r0["history"]] == [1, 1]  # the NaN batch, every epoch
    assert any("input batch contains NaN" in w for w in r0["warned"])
    assert r1["warned"] and all("Skipped training step" in w for w in r1["warned"])


def test_resumed_two_process_run_equals_uninterrupted(ddp):
    out, log = ddp
    same(load(out, "resumed", 0), load(out, "tensor", 0))
    assert log.count("fit() interrupted (KeyboardInterrupt) after 1/2 completed epochs") == 1  # rank 0 only


def test_only_rank_zero_prints_and_writes(ddp):
    out, log = ddp
    assert log.count("[sinkhorn] epoch 1/2") == 1 and log.count("[sinkhorn] epoch 2/2") == 1
    assert [os.path.basename(p) for p in load(out, "tensor", 0)["writes"]] == ["checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt"]
    assert load(out, "tensor", 1)["writes"] == []
    assert sorted(p.name for p in (out / "ck1").glob("*.pt")) == ["checkpoint-epoch0001.pt", "checkpoint-epoch0002.pt"]
    # the run's logs (log_dir defaults to checkpoint_dir), written by rank 0 alone: one row per step and epoch
    import csv

    with open(out / "ck1" / "epochs.csv") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]
    with open(out / "ck1" / "steps.csv") as f:
        assert [row["step"] for row in csv.DictReader(f)] == [str(k) for k in range(1, 7)]
    from align_kd.checkpoint import read_checkpoint

    ck = read_checkpoint(out / "ck1" / "checkpoint-epoch0002.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2


def test_unequal_shards_are_refused_on_every_rank(ddp):
    out, _ = ddp
    for rank in (0, 1):
        err = torch.load(out / f"unequal-rank{rank}.pt", weights_only=False)
        assert err is not None and "same number of training steps" in err


# ----------------------------------------------------------------------------------------------
# in-process: single-process behaviour and what cannot be sharded


def test_single_process_context_is_a_no_op():
    ctx = setup("cpu")
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1 and ctx.device == torch.device("cpu")
    loader = DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)), batch_size=2)
    assert ctx.shard_train(loader) is loader
    assert ctx.agree_on_skip(None) is None and ctx.agree_on_skip("bad") == "bad"
    module = torch.nn.Linear(2, 2)
    assert ctx.wrap(module) is module  # no DistributedDataParallel in one process
    assert is_main()


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(1), torch.tensor(0)


@pytest.mark.parametrize("loader,match", [
    (DataLoader(_Stream(), batch_size=1), "IterableDataset"),
    (DataLoader(TensorDataset(torch.zeros(4, 1), torch.zeros(4)), batch_size=2,
                sampler=WeightedRandomSampler([1.0] * 4, 4)), "custom sampler"),
    ([(torch.zeros(2, 1), torch.zeros(2))], "list cannot be split"),
    (TensorLoader(torch.zeros(8, 3, 2, 2), torch.zeros(8, dtype=torch.long), rank=1, world_size=4), "rank 1 of 4"),
])
def test_what_cannot_be_sharded_is_refused_clearly(loader, match):
    ctx = DistContext(rank=0, world_size=2)  # no process group needed: refused before any collective
    with pytest.raises((ValueError, TypeError), match=match) as info:
        ctx.shard_train(loader)
    assert "presharded" in str(info.value)


def test_presharded_forwards_set_epoch():
    loader = TensorLoader(torch.zeros(8, 3, 2, 2), torch.zeros(8, dtype=torch.long), batch_size=4)
    wrapped = presharded(loader)
    wrapped.set_epoch(3)
    assert loader.epoch == 3 and len(wrapped) == 2 and wrapped.batch_size == 4


def test_world_size_without_torchrun_variables_is_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=2"):
        setup("cpu")


def test_exit_waits_for_runnable_threads_and_not_for_idle_ones():
    """The exit handler's settle step (a Gloo worker releasing its last collective after the
    interpreter began finalising aborts the process): it returns only once a thread computing
    without the GIL has finished, and does not wait for a thread that only sleeps (an idle worker)."""
    import hashlib
    import threading

    from align_kd.distributed import _let_threads_settle

    blob = bytes(32 << 20)
    computing = threading.Thread(target=lambda: [hashlib.sha256(blob).digest() for _ in range(8)])  # GIL released
    wake = threading.Event()
    sleeping = threading.Thread(target=wake.wait)
    computing.start()
    sleeping.start()
    try:
        _let_threads_settle(timeout=600.0)
        assert not computing.is_alive()
        assert sleeping.is_alive()
    finally:
        wake.set()
        computing.join()
        sleeping.join()


@pytest.mark.slow
def test_command_line_fit_under_torchrun_writes_outputs_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ALIGN_KD_DATA": str(ARCHIVE)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "align_kd", "fit", "--quick", "--no-progress", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("| sinkhorn | 1 |") == 1 and log.count("wall time") == 1  # rank 0 alone reports
    run = tmp_path / "cli"
    assert {"table.md", "results.json", "accuracy.png", "alignment.png"} <= {p.name for p in run.iterdir()}
    assert (run / "sinkhorn-s0" / "result.json").is_file() and (run / "sinkhorn-s0" / "student.pt").is_file()
