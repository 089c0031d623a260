"""The dustbin (issue 13): a "no teacher" row so that a student layer can learn from no teacher layer.

Oracles: the marginals of the augmented Sinkhorn plan (columns 1, teacher rows r (S - m) / S, the
dustbin m); a planted plan with every column on the dustbin gives exactly the logit-KD objective
and the student gradient of strategy "hinton"; the run record, graph and drawing carry the
dustbin as its own node; the held-out rule keeps the plan valid.
"""

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from align_kd import Distiller, alignment_graph, draw_alignment, fit  # noqa: E402
from align_kd.data import TensorLoader, load_cifar10  # noqa: E402
from align_kd.plans import DUSTBIN, sinkhorn, with_dustbin  # noqa: E402
from test_heldout import student8, teacher8  # noqa: E402  (the same small nets)
from shared_archive import ARCHIVE  # noqa: E402


@pytest.fixture(scope="module")
def data():
    x, y = load_cifar10(ARCHIVE, split="train", limit=128)
    return F.avg_pool2d(x.float(), 4).to(torch.uint8), y  # real images at 8 x 8


def batch(data, n=64):
    return next(iter(TensorLoader(*data, batch_size=n)))


def test_augmented_sinkhorn_marginals():
    T, S, m = 4, 5, 1.5
    prior, r = with_dustbin(torch.randn(T, S, generator=torch.Generator().manual_seed(0)), torch.full((T,), S / T), m)
    assert prior.shape == (T + 1, S) and r.shape == (T + 1,) and abs(float(r.sum()) - S) < 1e-6
    plan = sinkhorn(prior.double(), r.double(), tau=0.1, tol=1e-10)
    assert torch.allclose(plan.sum(0), torch.ones(S, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(plan[:T].sum(1), torch.full((T,), (S - m) / T, dtype=torch.float64), atol=1e-8)
    assert abs(float(plan[T].sum()) - m) < 1e-8
    with pytest.raises(ValueError, match=r"dustbin_mass` in \(0, S\) = \(0, 5\)"):
        with_dustbin(torch.zeros(T, S), torch.full((T,), S / T), 5.0)


def test_all_mass_on_the_dustbin_is_exactly_logit_kd(data):
    x, y = batch(data)
    plain = Distiller(teacher8(), student8(), x, strategy="hinton")
    bin_ = Distiller(teacher8(), student8(), x, strategy="softmax", dustbin=True, width=4)
    with torch.no_grad():
        bin_.plan.logits[-1] = 1e3  # planted: every student layer learns from no teacher
    a, b = plain(x, y), bin_(x, y)
    assert b.plan.shape == (len(bin_.teacher_layers) + 1, len(bin_.student_layers))
    assert torch.allclose(b.plan.sum(0), torch.ones(b.plan.shape[1])) and torch.all(b.plan[-1] == 1)
    assert b.terms["feature"].item() == 0.0 and b.mi is not None and b.mi.abs().sum() > 0  # MI is there, unweighed
    assert abs(a.loss.item() - b.loss.item()) < 1e-6
    ga = torch.autograd.grad(a.loss, list(plain.student.parameters()))
    gb = torch.autograd.grad(b.loss, list(bin_.student.parameters()))
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(ga, gb))  # the student hears the teacher's logits only


def test_fit_record_graph_and_drawing_show_the_dustbin(data, tmp_path):
    train = TensorLoader(*data, batch_size=32, shuffle=True, seed=0)
    res = fit(teacher8(), student8(), (train, None), strategy="sinkhorn", dustbin=True, dustbin_mass=0.5, epochs=2,
              width=4, device="cpu", progress=False, log_dir=tmp_path / "logs")
    T, S = len(res.teacher_layers) - 1, len(res.student_layers)
    assert res.teacher_layers[-1] == DUSTBIN and res.plan.shape == (T + 1, S) and res.mi.shape == (T + 1, S)
    assert torch.all(res.mi[-1] == 0) and abs(float(res.plan[-1].sum()) - 0.5) < 1e-4
    assert torch.allclose(res.plan.sum(0), torch.ones(S), atol=1e-4)
    assert [round(h["dustbin_mass"], 6) for h in res.history] == [round(sum(h["plan"][-1]) / S, 6) for h in res.history]
    G = alignment_graph(res)
    assert any(DUSTBIN in str(n) for n in G.nodes)
    draw_alignment(res, tmp_path / "alignment.png")
    assert (tmp_path / "alignment.png").stat().st_size > 1000
    # the run's logs: the plan picture has the dustbin's row (a (T + 1, S) plan once crashed the logger)
    assert (tmp_path / "logs" / "plan.png").stat().st_size > 1000
    assert len((tmp_path / "logs" / "epochs.csv").read_text().splitlines()) == 3  # header + 2 epochs
    loaded = type(res).load(res.save(tmp_path / "run"))
    assert loaded.teacher_layers == res.teacher_layers and torch.equal(loaded.plan, res.plan)


def test_heldout_rule_with_a_dustbin(data):
    (xt, yt), (xh, yh) = list(TensorLoader(*data, batch_size=64))
    d = Distiller(teacher8(), student8(), xt, strategy="sinkhorn", dustbin=True, plan_objective="heldout", width=4)
    d.train()
    d.capture_step_start()  # the MI gradients' point (no step here: the student itself)
    d(xt, yt)
    before = d.plan().clone()
    record = d.update_plan(train=(xt, yt), heldout=(xh, yh))
    after = d.plan()
    g = torch.tensor(record["hypergrad"])  # the plan's rows: the dustbin's entries are 0 (it carries no feature term)
    assert record["kind"] == "heldout" and g.shape == after.shape and torch.all(g[-1] == 0) and g[:-1].abs().sum() > 0
    assert not torch.equal(before, after) and torch.allclose(after.sum(0), torch.ones(after.shape[1]), atol=1e-5)
    assert abs(float(after[-1].sum()) - 1.0) < 1e-4  # the dustbin keeps its mass (default 1 student layer)


def test_dustbin_is_refused_where_it_cannot_work(data):
    x, _ = batch(data)
    with pytest.raises(ValueError, match="needs strategy 'softmax' or 'sinkhorn', not 'pairwise'"):
        Distiller(teacher8(), student8(), x, strategy="pairwise", dustbin=True)
    with pytest.raises(ValueError, match=r"dustbin_mass` in \(0, S\)"):
        Distiller(teacher8(), student8(), x, strategy="sinkhorn", dustbin=True, dustbin_mass=10.0)


class _PlantedHypergradient:
    """Stands in for a Distiller in LearnedPlan.update: the (T, S) hypergradient is planted."""

    def __init__(self, g):
        self.g = g

    def heldout_hypergradient(self, train, heldout):
        return self.g


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_softmax_dustbin_takes_the_mass_the_hypergradient_asks_for(sign):
    """The relaxed dustbin (softmax plan, no row marginal): where every teacher pair raises the held-out
    loss (planted hypergradient +1) one Adam step opens the dustbin in every column, where every pair
    lowers it (-1) the step closes it; the new plan is the closed form softmax((Z - lr sign(dL/dZ)) / tau)
    with dL/dZ[i, j] = lam[i, j] (g[i, j] - sum_k lam[k, j] g[k, j]). The fixed-mass (Sinkhorn) dustbin keeps
    its one layer's worth under the same push."""
    from align_kd.plans import make_plan

    T, S, tau, lr = 4, 3, 0.5, 0.01
    g = torch.full((T, S), sign)
    plan = make_plan("softmax", T, S, tau=tau, row_marginal=None,
                     options={"dustbin": True, "plan_objective": "heldout", "heldout_lr": lr})
    z0, lam0 = plan.logits.detach().clone(), plan().detach().clone()  # (T + 1, S), last row the dustbin
    record = plan.update(_PlantedHypergradient(g), train=(None, None), heldout=(None, None))
    gfull = torch.cat([g, torch.zeros(1, S)])
    grad_z = lam0 * (gfull - (lam0 * gfull).sum(0)) / tau  # d(sum lam g)/d(logits): the softmax of logits / tau
    expected = torch.softmax((z0 - lr * grad_z.sign()) / tau, dim=0)
    assert torch.allclose(plan(), expected, atol=1e-6) and record["hypergrad_norm"] == pytest.approx(float(g.norm()))
    moved = plan()[-1] - lam0[-1]  # (S,) the dustbin's weight in each student column
    assert torch.all(moved * sign > 0) and torch.allclose(plan().sum(0), torch.ones(S), atol=1e-6)
    fixed = make_plan("sinkhorn", T, S, tau=tau, row_marginal=None,
                      options={"dustbin": True, "plan_objective": "heldout", "heldout_lr": lr})
    fixed.update(_PlantedHypergradient(g), train=(None, None), heldout=(None, None))
    assert abs(float(fixed()[-1].sum()) - 1.0) < 1e-4
