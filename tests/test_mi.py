"""Variational Gaussian MI bank (align_kd.mi).

Oracles: the closed form -0.5 log(1 - rho^2) for jointly Gaussian pairs (the bank's estimate is a
lower bound on it), closed-form parameter counts and pair resolutions, the linearity of
``student_grad_weight``, invariance to the teacher's scale and shift, and to a ViT class token.
"""
import math

import pytest
import torch

torch.set_num_threads(1)

from align_kd.mi import BANK_LAYOUTS, MIBank, RunningStandardizer, as_map, map_shape  # noqa: E402

LAYOUTS = list(BANK_LAYOUTS)
SHAPES = {
    "map8": (8, 8, 8),
    "map_other": (6, 4, 4),  # different C, H and W
    "map_wide": (5, 2, 6),  # non-square
    "tokens": (16, 12),  # 4 x 4 patch grid, no class token
    "tokens_cls": (17, 12),  # class token + 4 x 4 grid
    "tokens_odd": (7, 6),  # 7 and 6 are not squares: averaged over tokens
    "vector": (10,),
}


def _feats(shapes, B=4, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, *s, generator=g).requires_grad_(requires_grad) for s in shapes]


# ----------------------------------------------------------------------------------------------
# shapes


def test_as_map_closed_forms():
    x = torch.randn(3, 17, 12)  # class token + 4 x 4 grid
    expect = x[:, 1:, :].transpose(1, 2).reshape(3, 12, 4, 4)
    assert torch.equal(as_map(x), expect)
    y = torch.randn(3, 16, 12)
    assert torch.equal(as_map(y)[:, :, 1, 2], y[:, 1 * 4 + 2, :])
    z = torch.randn(3, 7, 6)
    torch.testing.assert_close(as_map(z)[:, :, 0, 0], z.mean(1))
    v = torch.randn(3, 10)
    assert as_map(v).shape == (3, 10, 1, 1) and torch.equal(as_map(v)[:, :, 0, 0], v)
    m = torch.randn(3, 2, 5, 7)
    assert as_map(m) is m
    for s in SHAPES.values():
        assert map_shape(s) == tuple(as_map(torch.zeros(1, *s)).shape[1:])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("t_keys,s_keys", [
    (["map8", "map_other"], ["map_wide", "map8", "map_other"]),  # maps with different C/H/W
    (["tokens", "tokens_cls"], ["tokens_cls", "tokens_odd"]),  # tokens with / without class token
    (["vector"], ["vector", "map8"]),  # vector -> map
    (["map8", "map_wide"], ["vector"]),  # map -> vector
    (["tokens_cls", "map_other"], ["map8", "tokens"]),  # tokens -> map and map -> tokens
    (list(SHAPES), list(SHAPES)),  # everything
])
def test_output_shape_and_gradients(layout, t_keys, s_keys):
    t_shapes, s_shapes = [SHAPES[k] for k in t_keys], [SHAPES[k] for k in s_keys]
    torch.manual_seed(0)
    bank = MIBank(t_shapes, s_shapes, layout=layout, width=8)
    t, s = _feats(t_shapes, seed=1), _feats(s_shapes, seed=2, requires_grad=True)
    mi = bank(t, s)
    T, S = len(t_shapes), len(s_shapes)
    assert mi.shape == (T, S) and mi.dtype == torch.float32
    assert torch.isfinite(mi).all()
    mi.sum().backward()
    for name, p in bank.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for k, f in enumerate(s):
        assert f.grad is not None and f.grad.abs().sum() > 0, k


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_parameter_is_registered(layout):
    t_shapes, s_shapes = [SHAPES["map8"], SHAPES["tokens"], SHAPES["vector"]], [SHAPES["map_other"], SHAPES["vector"]]
    T, S = 3, 2
    bank = MIBank(t_shapes, s_shapes, layout=layout, width=8)
    params = list(bank.parameters())
    if layout == "shared":  # alpha per teacher; trunk 2 Linear per student; pair maps; decoder per teacher
        expected = T + 4 * S + 1 + 2 * T
    else:  # alpha per teacher; 3 bias-free 1x1 convs per pair
        expected = T + 3 * T * S
    assert len(params) == expected
    # every tensor attribute that requires grad anywhere in the module tree is a registered parameter
    ids = {id(p) for p in params}
    for m in bank.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and v.requires_grad:
                assert id(v) in ids
    # the log-variances: one per teacher channel per pair, excluded from weight decay, in the state dict
    no_decay = bank.no_decay_parameters()
    assert [tuple(a.shape) for a in no_decay] == [(S, map_shape(s)[0]) for s in t_shapes]
    assert {id(a) for a in no_decay} <= ids
    assert sum(k.startswith("alpha.") for k in bank.state_dict()) == T
    variances = bank.variances()
    for v in variances:
        torch.testing.assert_close(v, torch.ones_like(v))  # init_var = 1.0


def test_pair_resolutions():
    # common resolution min(H_i, H_j) x min(W_i, W_j), capped at pool
    bank = MIBank([(4, 16, 16), (4, 2, 8), (3,)], [(4, 8, 8), (4, 3, 5)], pool=4, width=4)
    sizes = {(p.i, p.j): p.size for p in bank.pairs}
    assert sizes == {(0, 0): (4, 4), (0, 1): (3, 4), (1, 0): (2, 4), (1, 1): (2, 4), (2, 0): (1, 1), (2, 1): (1, 1)}
    full = MIBank([(4, 16, 16), (4, 2, 8)], [(4, 8, 8)], layout="full", pool=None)
    assert {(p.i, p.j): p.size for p in full.pairs} == {(0, 0): (8, 8), (1, 0): (2, 8)}
    default = MIBank([(4, 16, 16), (4, 1, 8)], [(4, 8, 8)], width=4)  # pool=2 by default
    assert {(p.i, p.j): p.size for p in default.pairs} == {(0, 0): (2, 2), (1, 0): (1, 2)}


def test_class_token_does_not_change_the_estimate():
    bank = MIBank([(17, 12)], [(17, 12), (10,)], width=8)
    t, s = _feats([(17, 12)], seed=1), _feats([(17, 12), (10,)], seed=2)
    bank(t, s)  # training mode: sets the running statistics from the patch tokens
    bank.eval()
    ref = bank(t, s)
    t2 = [t[0].clone()]
    t2[0][:, 0] += 100.0  # only the class token changes
    s2 = [s[0].clone(), s[1]]
    s2[0][:, 0] -= 50.0
    assert torch.equal(bank(t2, s2), ref)


def test_wrong_inputs_raise():
    bank = MIBank([(4, 2, 2)], [(3,)], width=4)
    with pytest.raises(ValueError, match="T=1"):
        bank([torch.randn(2, 4, 2, 2)] * 2, [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="map shape"):
        bank([torch.randn(2, 5, 2, 2)], [torch.randn(2, 3)])
    with pytest.raises(ValueError, match="bank_layout"):
        MIBank([(4,)], [(4,)], layout="dense")
    with pytest.raises(ValueError, match="pool"):
        MIBank([(4,)], [(4,)], pool=0)


# ----------------------------------------------------------------------------------------------
# standardisation


def test_running_standardizer_first_batch_gives_zero_mean_unit_var():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 9, 5, generator=g) * torch.tensor([0.01, 1.0, 30.0, 2.0, 7.0]) + torch.tensor([5.0, -3.0, 100.0, 0.0, 1.0])
    st = RunningStandardizer(5)
    z = st(t).flatten(0, 1)
    torch.testing.assert_close(z.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    # var / (var + 1e-5): 1 up to the epsilon, also for the channel with std 0.01
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(5), atol=0.11, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False)[1:], torch.ones(4), atol=1e-4, rtol=0)
    # eval mode applies the statistics without updating them
    st.eval()
    mean = st.mean.clone()
    st(t * 3 + 1)
    assert torch.equal(st.mean, mean)
    # EMA update in train mode: mean <- mean + momentum * (batch mean - mean)
    st.train()
    t2 = t + 1.0
    st(t2)
    torch.testing.assert_close(st.mean, mean + 0.1 * (t2.flatten(0, 1).mean(0) - mean))


def test_standardised_targets_are_invariant_to_teacher_scale_and_shift():
    t_shapes, s_shapes = [(6, 4, 4), (8,)], [(5,)]
    t, s = _feats(t_shapes, B=32, seed=1), _feats(s_shapes, B=32, seed=2)
    torch.manual_seed(0)
    a = MIBank(t_shapes, s_shapes, width=8)
    torch.manual_seed(0)
    b = MIBank(t_shapes, s_shapes, width=8)
    ref = a(t, s)
    out = b([t[0] * 25.0 - 7.0, t[1] * 0.5 + 3.0], s)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=0)


def test_dead_teacher_channels_are_excluded():
    C, dead = 8, 3
    torch.manual_seed(0)
    bank = MIBank([(C,)], [(C,)], width=16)
    opt = torch.optim.Adam(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        t = torch.randn(256, C, generator=g)
        t[:, :dead] = 2.5  # constant (dead) channels: perfectly predictable, would give log(1/eps)
        s = torch.randn(256, C, generator=g)  # independent of t: the true MI is 0
        mi = bank([t], [s])
        opt.zero_grad()
        (-mi.sum()).backward()
        opt.step()
    live = bank.standardizers["t0_1x1"].live
    assert live.tolist() == [False] * dead + [True] * (C - dead)
    bank.eval()
    with torch.no_grad():
        t = torch.randn(4096, C, generator=g)
        t[:, :dead] = 2.5
        mi = bank([t], [torch.randn(4096, C, generator=g)]).item()
    assert abs(mi) < 0.02  # vs 0.5 * log(1 / 1e-4) * 3/8 ~ 1.7 if the dead channels counted


# ----------------------------------------------------------------------------------------------
# the closed form on a Gaussian pair


def _train_gaussian(rho, *, scale=1.0, shift=0.0, steps=600, batch=512, C=8, seed=0, layout="shared"):
    """Train a 1 x 1 bank on t = z * scale + shift, s = rho z + sqrt(1 - rho^2) e; held-out estimate."""
    torch.manual_seed(seed)
    bank = MIBank([(C,)], [(C,)], layout=layout)
    opt = torch.optim.Adam(bank.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed + 1)

    def draw(n):
        z, e = torch.randn(n, C, generator=g), torch.randn(n, C, generator=g)
        return z * scale + shift, rho * z + math.sqrt(1 - rho**2) * e

    for _ in range(steps):
        t, s = draw(batch)
        mi = bank([t], [s])
        opt.zero_grad()
        (-mi.sum()).backward()
        opt.step()
    bank.eval()
    with torch.no_grad():
        t, s = draw(8192)
        return bank([t], [s]).item()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_variance_floor_enters_the_bound_as_its_closed_form(layout):
    # With every variance at its floor (alpha -> -inf), the bound per element is
    #   mi = 0.5 - 0.5 log eps - 0.5 R / eps,   R the mean squared residual of the regressor.
    # The floor changes nothing else (alpha's init is not random), so two banks with the same seed and
    # floors 1e-2 and 1e-1 must give the same R from the formula; and no bound exceeds its cap
    # 0.5 - 0.5 log eps whatever the inputs.
    t, s = _feats([(6, 4, 4)], B=64, seed=3)[0], _feats([(5, 4, 4)], B=64, seed=4)[0]
    residuals = []
    for eps in (1e-2, 1e-1):
        torch.manual_seed(0)
        bank = MIBank([(6, 4, 4)], [(5, 4, 4)], layout=layout, eps=eps, width=8)
        with torch.no_grad():
            for a in bank.alpha:
                a.fill_(-60.0)
        assert all(torch.equal(v, torch.full_like(v, eps)) for v in bank.variances())
        with torch.no_grad():
            mi = bank([t], [s]).item()
        cap = 0.5 - 0.5 * math.log(eps)
        assert mi <= cap
        residuals.append((cap - mi) * 2 * eps)
    assert residuals[0] > 0
    assert residuals[0] == pytest.approx(residuals[1], rel=1e-4)


def test_vid_eps_reaches_the_bank_and_is_checked():
    from torch import nn

    from align_kd import Distiller, FitConfig

    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(2, 3, 8, 8)
    assert Distiller(teacher, student, x, strategy="uniform").bank.eps == FitConfig.vid_eps == 1e-4
    assert Distiller(teacher, student, x, strategy="uniform", vid_eps=1e-2).bank.eps == 1e-2
    for bad in (0, -1e-3, 1.0, float("nan"), True, "1e-2"):
        with pytest.raises(ValueError, match="Expected `vid_eps` in \\(0, 1\\)"):
            FitConfig(vid_eps=bad)
    with pytest.raises(ValueError, match="vid_eps=0.01 is the floor of the VID bound's variances; mi_estimator='infonce'"):
        FitConfig(mi_estimator="infonce", vid_eps=1e-2)


@pytest.mark.parametrize("rho,below", [(0.5, 0.03), (0.9, 0.06)])
def test_gaussian_pair_reaches_closed_form(rho, below):
    truth = -0.5 * math.log(1 - rho**2)  # nats per element: 0.144 (rho .5), 0.830 (rho .9)
    est = _train_gaussian(rho)
    # a variational lower bound: never above the truth beyond the sampling error of the held-out
    # estimate (about 0.003 at 8192 x 8 elements), and within `below` of it after 600 Adam steps
    assert est <= truth + 0.01
    assert est >= truth - below


def test_independent_pair_gives_zero():
    assert abs(_train_gaussian(0.0, steps=200)) < 0.01


def test_trained_estimate_invariant_to_teacher_scale_and_shift():
    ref = _train_gaussian(0.7, steps=150)
    moved = _train_gaussian(0.7, steps=150, scale=40.0, shift=-9.0)
    assert abs(moved - ref) < 5e-3
    assert ref > 0.1  # the invariance is checked where there is something to learn


# ----------------------------------------------------------------------------------------------
# student_grad_weight


@pytest.mark.parametrize("layout", LAYOUTS)
def test_student_grad_weight(layout):
    t_shapes, s_shapes = [(4, 4, 4), (6,)], [(5, 4, 4), (3,)]
    torch.manual_seed(0)
    bank = MIBank(t_shapes, s_shapes, layout=layout, width=8)
    t = _feats(t_shapes, seed=1)
    s = _feats(s_shapes, seed=2, requires_grad=True)
    weight = torch.tensor([[0.0, 1.0], [0.5, 1.0]])

    def grads(target, w):
        bank.zero_grad()
        for f in s:
            f.grad = None
        target(bank(t, s, student_grad_weight=w)).backward()
        return [f.grad.clone() for f in s], {n: (None if p.grad is None else p.grad.clone()) for n, p in bank.named_parameters()}

    # pair (0, 0) has weight 0: no gradient reaches student feature 0, but its regressor and variance learn
    (g0, _), pg = grads(lambda mi: mi[0, 0], weight)
    assert torch.count_nonzero(g0) == 0
    assert pg["alpha.0"] is not None and pg["alpha.0"][0].abs().sum() > 0
    if layout == "shared":
        assert pg["pair_maps"][0, 0].abs().sum() > 0
        assert pg["decoders.0.weight"].abs().sum() > 0
        assert pg["trunks.0.0.weight"] is None or torch.count_nonzero(pg["trunks.0.0.weight"]) == 0
    else:
        k = [(p.i, p.j) for p in bank.pairs].index((0, 0))
        assert all(pg[f"regressors.{k}.{m}.weight"].abs().sum() > 0 for m in (0, 2, 4))

    # linearity: weight 0.5 on pair (1, 0) halves its student gradient; the regressor gradient is unchanged
    (full, _), pg_full = grads(lambda mi: mi[1, 0], None)
    (half, _), pg_half = grads(lambda mi: mi[1, 0], weight)
    assert full.abs().sum() > 0
    torch.testing.assert_close(half, 0.5 * full)
    torch.testing.assert_close(pg_half["alpha.1"], pg_full["alpha.1"])
    # the weighted sum over all pairs sends sum_ij w_ij * grad(mi_ij) into the student
    (_, g1), _ = grads(lambda mi: mi.sum(), weight)
    (_, g1_ref), _ = grads(lambda mi: mi[0, 1] + mi[1, 1], None)
    torch.testing.assert_close(g1, g1_ref)


# ----------------------------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_autocast_gives_float32_finite_mi(layout):
    t_shapes, s_shapes = [(8, 4, 4), (17, 12), (10,)], [(6, 4, 4), (5,)]
    torch.manual_seed(0)
    bank = MIBank(t_shapes, s_shapes, layout=layout, width=8)
    t, s = _feats(t_shapes, B=16, seed=1), _feats(s_shapes, B=16, seed=2, requires_grad=True)
    bank.eval()
    bank.standardizers.train()
    ref = bank(t, s)  # float32 reference; sets the running statistics
    bank.standardizers.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mi = bank([f.bfloat16() for f in t], s)
    assert mi.dtype == torch.float32
    assert torch.isfinite(mi).all()
    torch.testing.assert_close(mi, ref, atol=0.05, rtol=0.05)
    mi.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in bank.parameters())
    assert all(torch.isfinite(f.grad).all() for f in s)


# ----------------------------------------------------------------------------------------------
# active pairs (fit(skip_pairs_below=...))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_active_pairs_equal_the_full_bank_and_inactive_ones_are_constants(layout):
    """Pairs are independent given the (eval-mode) targets: the active entries and their gradients
    equal those of a full forward; inactive entries are the cached estimate and send no gradient."""
    t_shapes = [SHAPES["map8"], SHAPES["tokens_cls"], SHAPES["vector"]]
    s_shapes = [SHAPES["map_other"], SHAPES["vector"]]
    torch.manual_seed(0)
    bank = MIBank(t_shapes, s_shapes, layout=layout, width=8)
    t, s = _feats(t_shapes, seed=1), _feats(s_shapes, seed=2)
    bank.train()
    bank(t, s)  # training mode: standardiser statistics and the cache last_mi are set
    cache = bank.last_mi.clone()
    assert (cache != 0).all()
    bank.eval()
    active = torch.tensor([[True, False], [False, False], [True, True]])
    s_full = [x.clone().requires_grad_() for x in s]
    s_part = [x.clone().requires_grad_() for x in s]
    full = bank(t, s_full)
    (full * active).sum().backward()  # only the active pairs' gradient
    full_grads = {k: p.grad.clone() for k, p in bank.named_parameters() if p.grad is not None}
    bank.zero_grad(set_to_none=True)
    part = bank(t, s_part, active=active)
    part.sum().backward()
    torch.testing.assert_close(part[active], full[active], rtol=0, atol=0)
    assert torch.equal(part[~active], cache[~active])
    for a, b in zip(s_part, s_full):
        torch.testing.assert_close(a.grad, b.grad)
    for k, p in bank.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, full_grads.get(k, torch.zeros_like(p)), msg=k)
    assert torch.equal(bank.last_mi, cache)  # eval mode leaves the cache alone


def test_inactive_pairs_are_zero_before_their_first_estimate_and_cache_updates_in_training():
    t_shapes, s_shapes = [SHAPES["map8"], SHAPES["vector"]], [SHAPES["map_other"], SHAPES["tokens"]]
    torch.manual_seed(0)
    bank = MIBank(t_shapes, s_shapes, width=8)
    t, s = _feats(t_shapes, seed=1), _feats(s_shapes, seed=2)
    active = torch.tensor([[True, False], [False, False]])
    mi = bank(t, s, active=active)
    assert torch.equal(mi[~active], torch.zeros(3))  # MI >= 0: a valid (trivial) lower bound
    assert torch.equal(bank.last_mi, mi.detach())
    assert len(bank._targets(t, [p for p in bank.pairs if active[p.i, p.j]])) == 1  # one teacher target computed


@pytest.mark.parametrize("active", [torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 2), [[True] * 2] * 3])
def test_bad_active_mask_raises(active):
    bank = MIBank([SHAPES["map8"]] * 3, [SHAPES["vector"]] * 2, width=8)
    with pytest.raises(ValueError, match=r"bool tensor of shape \(T, S\) = \(3, 2\)"):
        bank(_feats([SHAPES["map8"]] * 3), _feats([SHAPES["vector"]] * 2), active=active)
