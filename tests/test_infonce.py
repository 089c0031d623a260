"""The contrastive (InfoNCE) estimator of the MI bank (issue 13, item 0: ``mi_estimator="infonce"``).

Oracles: a planted Gaussian pair (I = -C/2 log(1 - rho^2) nats per sample; the estimate is a lower
bound on it, about 0 for an independent teacher layer, and unchanged by the teacher's scale);
the bound recomputed by hand in float64 from the bank's own heads (pooling, standardisation,
cosine scores, log B minus the two cross-entropies, with an explicit logsumexp); the ceiling
log B; the linearity of ``student_grad_weight``; active pairs equal to the full bank; the
Distiller, fit() and the held-out rule on real CIFAR-10 images.
"""
import math

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

from align_kd import Distiller, FitConfig, fit  # noqa: E402
from align_kd.data import TensorLoader, load_cifar10  # noqa: E402
from align_kd.mi import MAX_INFONCE_SCALE, MIBank  # noqa: E402
from test_heldout import student8, teacher8  # noqa: E402  (the same small nets)
from shared_archive import ARCHIVE  # noqa: E402

T_SHAPES = [(8, 8, 8), (17, 12), (10,)]  # a map, ViT tokens with a class token, a vector
S_SHAPES = [(6, 4, 4), (5,)]


def _feats(shapes, B=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *s, generator=g).requires_grad_(requires_grad) for s in shapes]


def _bank(**kw):
    torch.manual_seed(0)
    return MIBank(T_SHAPES, S_SHAPES, estimator="infonce", width=8, **kw)


# ----------------------------------------------------------------------------------------------
# the planted answer


def _train_gaussian(rho, *, C=4, steps=400, batch=256, scale=3.0, shift=1.0, seed=0):
    """Teacher layer 0 is z * scale + shift, layer 1 independent noise; the student s = rho z + sqrt(1 - rho^2) e."""
    torch.manual_seed(seed)
    bank = MIBank([(C,), (C,)], [(C,)], estimator="infonce", width=32)
    opt = torch.optim.Adam(bank.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)

    def draw(n):
        z, e = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
        return [z * scale + shift, torch.randn(n, C, generator=g)], [rho * z + math.sqrt(1 - rho**2) * e]

    for _ in range(steps):
        mi = bank(*draw(batch))
        opt.zero_grad()
        (-mi.sum()).backward()
        opt.step()
    bank.eval()
    with torch.no_grad():  # held-out estimate: 20 fresh batches of the training batch size
        return torch.stack([bank(*draw(batch))[:, 0] for _ in range(20)]).mean(0).tolist()


def test_gaussian_pair_planted_answer():
    rho, C = 0.6, 4
    truth = -0.5 * C * math.log(1 - rho**2)  # 0.893 nats per sample; log 256 = 5.55 is far above it
    dependent, independent = _train_gaussian(rho, C=C)
    assert dependent <= truth + 0.03  # a lower bound, up to the held-out estimate's sampling error
    assert dependent >= truth - 0.1  # and a tight one after 400 Adam steps (measured 0.875)
    assert abs(independent) < 0.03  # the independent teacher layer: I = 0
    moved, _ = _train_gaussian(rho, C=C, scale=40.0, shift=-9.0)  # teacher targets are standardised
    assert abs(moved - dependent) < 0.02


# ----------------------------------------------------------------------------------------------
# the formula, recomputed by hand


def _by_hand(bank, t_feats, s_feats):
    """(T, S) bound in float64 from the bank's parameters, without the bank's forward code."""
    B = t_feats[0].shape[0]

    def head(seq, x):  # Linear, ReLU, Linear in float64
        (l1, _, l2) = seq
        h = (x @ l1.weight.double().T + l1.bias.double()).clamp_min(0)
        return h @ l2.weight.double().T + l2.bias.double()

    def as_vector(f, cap):  # maps pooled to at most cap x cap, tokens as a grid, vectors as they are
        if f.dim() == 3:  # tokens (B, 1 + 16, D): drop the class token, lay the 4 x 4 grid out as a map
            f = f[:, 1:, :].transpose(1, 2).reshape(B, f.shape[2], 4, 4)
        if f.dim() == 2:
            f = f[:, :, None, None]
        h, w = min(f.shape[2], cap), min(f.shape[3], cap)
        return F.adaptive_avg_pool2d(f.double(), (h, w))

    out = torch.zeros(bank.T, bank.S, dtype=torch.float64)
    for i, t in enumerate(t_feats):
        m = as_vector(t, bank.pool)  # (B, C, h, w)
        flat = m.flatten(2).transpose(1, 2)  # (B, P, C): statistics over samples and positions
        mean, var = flat.mean((0, 1)), flat.var((0, 1), unbiased=False)
        u = F.normalize(head(bank.teacher_heads[i], ((flat - mean) / torch.sqrt(var + 1e-5)).flatten(1)), dim=-1)
        for j, s in enumerate(s_feats):
            e = head(bank.trunks[j], as_vector(s, bank.pool).flatten(1))
            v = F.normalize(e @ bank.pair_maps[i, j].double().T, dim=-1)
            score = math.exp(bank.log_scale[i, j].item()) * (v @ u.T)  # (B, B) rows student, columns teacher
            rows = sum(torch.logsumexp(score[b], 0) - score[b, b] for b in range(B)) / B
            cols = sum(torch.logsumexp(score[:, c], 0) - score[c, c] for c in range(B)) / B
            out[i, j] = math.log(B) - 0.5 * (rows + cols)
    return out


def test_bound_equals_the_formula_computed_by_hand():
    bank = _bank()
    with torch.no_grad():  # a critic away from its initialisation, with distinct scales per pair
        bank.log_scale.copy_(torch.linspace(0.0, 3.0, bank.T * bank.S).view(bank.T, bank.S))
    t, s = _feats(T_SHAPES, seed=1), _feats(S_SHAPES, seed=2)
    mi = bank(t, s)  # training mode: the first batch sets the standardiser's statistics
    assert mi.shape == (3, 2) and mi.dtype == torch.float32
    torch.testing.assert_close(mi.double(), _by_hand(bank, t, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("B", [2, 8, 64])
def test_estimate_never_exceeds_log_batch(B):
    bank = _bank()
    with torch.no_grad():
        bank.log_scale.fill_(math.log(MAX_INFONCE_SCALE) + 5)  # far above the cap: the cap applies
    t = _feats(T_SHAPES, B=B, seed=3)
    # the student sees the teacher's vector layer exactly: as informative as a batch allows
    s = [torch.randn(B, *S_SHAPES[0]), t[2][:, :5].clone()]
    mi = bank(t, s)
    assert torch.isfinite(mi).all() and (mi <= math.log(B) + 1e-5).all()
    assert mi.min() < math.log(B)  # not a constant: the random critic does not reach the ceiling everywhere


# ----------------------------------------------------------------------------------------------
# a memory of negatives (infonce_memory)


def test_memory_bound_equals_the_formula_and_the_ring_keeps_the_last_k():
    torch.manual_seed(0)
    K, B = 8, 6
    bank = MIBank([(10,)], [(5,)], estimator="infonce", width=8, memory=K)
    g = torch.Generator().manual_seed(1)
    t1, t2 = torch.randn(B, 10, generator=g) * 3 + 1, torch.randn(B, 10, generator=g) * 3 + 1
    s1, s2 = torch.randn(B, 5, generator=g), torch.randn(B, 5, generator=g)
    first = bank([t1], [s1])  # empty memory: the rows bound over the batch alone
    mi = bank([t2], [s2])  # the 6 remembered samples of batch 1 are extra negatives
    std = bank.standardizers["t0_1x1"]
    mean, var = std.mean.double(), std.var.double()  # the statistics batch 2 left (and used)

    def head(seq, x):
        (l1, _, l2) = seq
        return (x @ l1.weight.double().T + l1.bias.double()).clamp_min(0) @ l2.weight.double().T + l2.bias.double()

    def rows_bound(t_cands, s):
        u = F.normalize(head(bank.teacher_heads[0], (t_cands.double() - mean) / torch.sqrt(var + 1e-5)), dim=-1)
        v = F.normalize(head(bank.trunks[0], s.double()) @ bank.pair_maps[0, 0].double().T, dim=-1)
        score = math.exp(bank.log_scale[0, 0].item()) * (v @ u.T)  # (B, N)
        return math.log(score.shape[1]) - sum(torch.logsumexp(score[b], 0) - score[b, b] for b in range(B)) / B

    torch.testing.assert_close(mi[0, 0].double(), rows_bound(torch.cat([t2, t1]), s2), atol=1e-5, rtol=1e-5)
    assert first[0, 0].item() <= math.log(B) + 1e-6 and mi[0, 0].item() <= math.log(2 * B) + 1e-6
    # the ring after 12 samples of K = 8: slots 0-3 batch 2's last four, 4-5 batch 1's last two, 6-7 batch 2's first two
    ring = bank.negatives_0
    assert torch.equal(ring, torch.cat([t2[2:], t1[4:], t2[:2]]))
    assert bank.negatives_filled.tolist() == [8] and bank.negatives_next.tolist() == [4]
    bank.eval()
    bank([t1], [s1])
    assert torch.equal(bank.negatives_0, ring)  # evaluation reads the memory, never writes it
    other = MIBank([(10,)], [(5,)], estimator="infonce", width=8, memory=K)
    other.load_state_dict(bank.state_dict())  # the memory travels with the state dict (checkpoints)
    other.eval()
    assert torch.equal(other([t2], [s2]), bank([t2], [s2]))


def test_memory_lifts_the_in_batch_ceiling():
    """rho = 0.99 over 8 dimensions: I = 15.6 nats, far above log 64; in-batch negatives cap the estimate at
    log 64 = 4.16, a memory of 1024 at log 1088 = 6.99."""
    C, B, K = 8, 64, 1024

    def train(memory):
        torch.manual_seed(0)
        bank = MIBank([(C,)], [(C,)], estimator="infonce", width=32, memory=memory)
        opt = torch.optim.Adam(bank.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(300):
            z, e = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g)
            mi = bank([z], [0.99 * z + math.sqrt(1 - 0.99**2) * e])
            opt.zero_grad()
            (-mi.sum()).backward()
            opt.step()
        return mi.item()

    in_batch, remembered = train(0), train(K)
    assert in_batch <= math.log(B) + 1e-6
    assert math.log(B) + 0.5 < remembered <= math.log(B + K) + 1e-6


def test_memory_options_are_checked():
    with pytest.raises(ValueError, match="infonce_memory=16 keeps negatives .* needs mi_estimator='infonce', not 'vid'"):
        FitConfig(infonce_memory=16)
    with pytest.raises(ValueError, match="`infonce_memory` to be an int >= 0"):
        FitConfig(mi_estimator="infonce", infonce_memory=-1)
    with pytest.raises(ValueError, match="needs mi_estimator='infonce'"):
        MIBank([(4,)], [(4,)], memory=8)


# ----------------------------------------------------------------------------------------------
# what the bank promises the Distiller


def test_student_grad_weight_scales_the_student_gradient_only():
    bank = _bank()
    t = _feats(T_SHAPES, seed=1)
    s = _feats(S_SHAPES, seed=2, requires_grad=True)
    weight = torch.tensor([[0.0, 1.0], [0.5, 1.0], [1.0, 1.0]])

    def grads(target, w):
        bank.zero_grad()
        for f in s:
            f.grad = None
        target(bank(t, s, student_grad_weight=w)).backward()
        return [f.grad.clone() for f in s], {n: None if p.grad is None else p.grad.clone() for n, p in bank.named_parameters()}

    (g0, _), pg = grads(lambda mi: mi[0, 0], weight)  # weight 0: nothing reaches the student ...
    assert torch.count_nonzero(g0) == 0
    assert pg["pair_maps"][0, 0].abs().sum() > 0 and pg["log_scale"][0, 0] != 0  # ... but the critic learns
    assert pg["teacher_heads.0.0.weight"].abs().sum() > 0
    (full, _), pg_full = grads(lambda mi: mi[1, 0], None)
    (half, _), pg_half = grads(lambda mi: mi[1, 0], weight)
    assert full.abs().sum() > 0
    torch.testing.assert_close(half, 0.5 * full)
    torch.testing.assert_close(pg_half["pair_maps"], pg_full["pair_maps"])
    torch.testing.assert_close(pg_half["teacher_heads.1.0.weight"], pg_full["teacher_heads.1.0.weight"])


def test_active_pairs_equal_the_full_bank():
    bank = _bank()
    t, s = _feats(T_SHAPES, seed=1), _feats(S_SHAPES, seed=2)
    bank(t, s)  # statistics and cache
    cache = bank.last_mi.clone()
    bank.eval()
    active = torch.tensor([[True, False], [False, False], [True, True]])
    full, part = bank(t, s), bank(t, s, active=active)
    torch.testing.assert_close(part[active], full[active], rtol=0, atol=0)
    assert torch.equal(part[~active], cache[~active])


def test_parameters_and_no_decay_group():
    bank = _bank()
    T, S = bank.T, bank.S
    assert len(list(bank.parameters())) == 2 * 2 * S + 2 * 2 * T + 2  # heads (2 Linear each), pair maps, log-scales
    assert [p is bank.log_scale for p in bank.no_decay_parameters()] == [True]
    assert bank.variances() == []
    assert not any(k.startswith("alpha") for k in bank.state_dict())


def test_bf16_autocast_gives_float32_finite_mi():
    bank = _bank()
    t, s = _feats(T_SHAPES, seed=1), _feats(S_SHAPES, seed=2, requires_grad=True)
    ref = bank(t, s)
    bank.standardizers.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mi = bank([f.bfloat16() for f in t], s)
    assert mi.dtype == torch.float32 and torch.isfinite(mi).all()
    torch.testing.assert_close(mi, ref, atol=0.1, rtol=0.05)
    mi.sum().backward()
    assert all(torch.isfinite(f.grad).all() for f in s)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match=r"`mi_estimator` to be one of \['vid', 'infonce'\] but got 'crd'"):
        FitConfig(mi_estimator="crd")
    with pytest.raises(ValueError, match="bank_layout='full' is a layout of the VID regressors"):
        FitConfig(mi_estimator="infonce", bank_layout="full")
    with pytest.raises(ValueError, match="mi_estimator"):
        MIBank(T_SHAPES, S_SHAPES, estimator="nce")


# ----------------------------------------------------------------------------------------------
# on real images


@pytest.fixture(scope="module")
def data():
    x, y = load_cifar10(ARCHIVE, split="train", limit=128)
    return F.avg_pool2d(x.float(), 4).to(torch.uint8), y  # real images at 8 x 8


@pytest.mark.parametrize("memory", [0, 64])
def test_fit_with_infonce_learns_a_valid_plan(data, memory):
    train = TensorLoader(*data, batch_size=32, shuffle=True, seed=0)
    res = fit(teacher8(), student8(), (train, None), strategy="sinkhorn", mi_estimator="infonce", infonce_memory=memory,
              epochs=2, width=8, device="cpu", progress=False)
    T, S = len(res.teacher_layers), len(res.student_layers)
    assert res.plan.shape == (T, S) and torch.allclose(res.plan.sum(0), torch.ones(S), atol=1e-4)
    assert torch.isfinite(res.mi).all() and (res.mi <= math.log(32 + memory) + 1e-5).all()
    assert res.config["mi_estimator"] == "infonce"
    assert res.history[0]["plan"] != res.history[-1]["plan"]  # the plan moved on the InfoNCE estimates


def test_heldout_rule_runs_on_infonce_estimates(data):
    (xt, yt), (xh, yh) = list(TensorLoader(*data, batch_size=64))
    d = Distiller(teacher8(), student8(), xt, strategy="sinkhorn", mi_estimator="infonce", plan_objective="heldout",
                  width=8)
    d.train()
    d.capture_step_start()  # the MI gradients' point (no step here: the student itself)
    d(xt, yt)
    names = {g["name"]: g for g in d.param_groups(0.1, weight_decay=5e-4)}
    assert names["bank_log_variances"]["params"] == [d.bank.log_scale]  # the log-scales get no weight decay
    assert names["bank_log_variances"]["weight_decay"] == 0.0
    before = d.plan().clone()
    record = d.update_plan(train=(xt, yt), heldout=(xh, yh))
    g = torch.tensor(record["hypergrad"])
    assert g.shape == before.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    assert not torch.equal(before, d.plan())
