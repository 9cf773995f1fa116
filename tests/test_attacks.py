"""Attacks: registry, parameter errors, and effects with hand-computed cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks import AttackContext, ParamError, get_attack, honest_statistics, list_attacks
from attacks.alie import alie_z
from attacks.label_flip import LabelFlip

ALL = [
    "alie",
    "gaussian",
    "ipm",
    "label_flip",
    "mask_aware",
    "min_max",
    "min_sum",
    "random",
    "scaling",
    "sign_flip",
    "zero",
]


def ctx(
    shape: tuple[int, ...],
    malicious: torch.Tensor,
    *,
    masks: torch.Tensor | None = None,
    participants: torch.Tensor | None = None,
    seed: int = 0,
) -> AttackContext:
    return AttackContext(
        round=1,
        generator=torch.Generator().manual_seed(seed),
        reference=torch.zeros(shape[:-2] + shape[-1:]),
        masks=masks,
        malicious=malicious,
        participants=participants,
    )


def mal(k: int, f: int) -> torch.Tensor:
    return torch.arange(k) < f


def test_registry_complete_and_tags() -> None:
    assert set(ALL) <= set(list_attacks())
    for name in ALL:
        a = get_attack(name)
        assert a.kind in ("model", "data")
    assert get_attack("alie").omniscient and get_attack("alie").mask_aware
    assert get_attack("min_max").omniscient and get_attack("ipm").omniscient
    assert not get_attack("gaussian").omniscient and not get_attack("gaussian").mask_aware
    assert get_attack("mask_aware").mask_aware and not get_attack("mask_aware").omniscient
    assert get_attack("label_flip").kind == "data"
    for name in ALL:  # persistence is the engine's threat-model setting, not an attack parameter
        assert "persistent" not in get_attack(name).param_names()
        assert not hasattr(get_attack(name), "persistent")


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("gaussian", {"p_a": 1.5}, "'p_a' must be a finite real number in [0, 1]"),
        ("gaussian", {"sigma": -1.0}, "'sigma'"),
        ("gaussian", {"persistent": True}, "parameter(s) 'persistent'; allowed: p_a, sigma"),
        ("alie", {"z_mode": "cdf"}, "one of 'paper', 'karimireddy', 'fixed'"),
        ("alie", {"ddof": 2}, "'ddof' must be an integer in [0, 1]"),
        ("min_max", {"direction": "random"}, "one of 'unit_vec', 'std', 'sign'"),
        ("min_sum", {"gamma_init": 0.0}, "'gamma_init'"),
        ("mask_aware", {"base": "alie"}, "one of 'gaussian', 'sign_flip'"),
        ("ipm", {"eps": 1.0}, "allowed: epsilon"),
        ("label_flip", {"p": 2.0}, "'p'"),
    ],
)
def test_bad_params_name_param_and_range(name: str, params: dict, needle: str) -> None:
    with pytest.raises(ParamError) as e:
        get_attack(name, **params)
    assert needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_unknown_attack_lists_allowed() -> None:
    with pytest.raises(ValueError, match="unknown attack 'lie'; allowed: alie, "):
        get_attack("lie")


@pytest.mark.parametrize("name", [n for n in ALL if n != "label_flip"])
@pytest.mark.parametrize("partial", [False, True])
def test_only_active_rows_change_batched(name: str, partial: bool) -> None:
    torch.manual_seed(0)
    r, k, d = 3, 8, 20
    x = torch.randn(r, k, d) * 0.1 + 1.0
    malicious = mal(k, 3)
    part = torch.ones(r, k, dtype=torch.bool)
    part[:, 1] = False  # a malicious non-participant must stay untouched
    part[1, 5] = False
    masks = torch.rand(r, k, d) < 0.5 if partial else None
    out = get_attack(name)(x, ctx((r, k, d), malicious, masks=masks, participants=part))
    assert out.shape == x.shape
    active = malicious & part
    assert torch.equal(out[~active], x[~active])
    assert not torch.equal(out[active], x[active])
    if partial and name not in ("sign_flip", "scaling", "zero", "random", "gaussian"):
        # mask-aware / omniscient attacks only touch the attacker's shared coordinates
        assert masks is not None
        unshared = active.unsqueeze(-1) & ~masks
        assert torch.equal(out[unshared], x[unshared])


def test_flower_shape_and_batch_agree() -> None:
    """[K, D] (Flower engine) equals one run of [R, K, D] (batched engine) for deterministic
    attacks."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 5)
    m = mal(6, 2)
    for name in ("alie", "ipm", "min_max", "min_sum", "sign_flip", "scaling", "zero"):
        a = get_attack(name)
        batched = a(x, ctx((2, 6, 5), m))
        single = a(x[1], ctx((6, 5), m))
        assert torch.allclose(batched[1], single, atol=1e-6), name


def test_simple_attacks_hand_computed() -> None:
    x = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    c = ctx((2, 2), torch.tensor([True, False]))
    assert torch.equal(get_attack("sign_flip", scale=3.0)(x, c)[0], torch.tensor([-3.0, 6.0]))
    assert torch.equal(get_attack("scaling", factor=10.0)(x, c)[0], torch.tensor([10.0, -20.0]))
    assert torch.equal(get_attack("zero")(x, c)[0], torch.zeros(2))
    assert torch.equal(get_attack("sign_flip")(x, c)[1], x[1])


def test_gaussian_determinism_probability_and_variance() -> None:
    r, k, d = 4, 50, 400
    x = torch.zeros(r, k, d)
    m = mal(k, 25)
    a = get_attack("gaussian", p_a=0.5, sigma=2.0)
    c1 = ctx((r, k, d), m, seed=7)
    out1 = a(x, c1)
    fired = c1.info["fired"]
    out2 = get_attack("gaussian", p_a=0.5, sigma=2.0)(x, ctx((r, k, d), m, seed=7))
    assert torch.equal(out1, out2)
    out3 = a(x, ctx((r, k, d), m, seed=8))
    assert not torch.equal(out1, out3)
    assert fired is not None and not bool(fired[:, 25:].any())
    frac = fired[:, :25].float().mean().item()
    assert 0.3 < frac < 0.7
    std = out1[fired].std().item()
    assert abs(std - 2.0) < 0.1
    assert torch.equal(out1[~fired], x[~fired])
    assert torch.equal(get_attack("gaussian", p_a=0.0)(x, ctx((r, k, d), m)), x)


def test_mask_aware_energy_on_shared_only() -> None:
    r, k, d = 100, 4, 1000
    x = torch.randn(r, k, d)
    masks = torch.zeros(r, k, d, dtype=torch.bool)
    masks[..., :100] = True  # p_e = 0.1
    m = torch.tensor([True, True, False, False])
    out = get_attack("mask_aware", sigma=1.0)(x, ctx((r, k, d), m, masks=masks))
    diff = out - x
    assert torch.equal(diff[..., 100:], torch.zeros_like(diff[..., 100:]))
    assert torch.equal(diff[:, 2:], torch.zeros_like(diff[:, 2:]))
    # full budget sigma^2 D = 1000 concentrated on 100 shared coordinates (variance 10 each)
    energy = diff[:, :2].square().sum(-1)
    assert torch.allclose(energy.mean(), torch.tensor(1000.0), rtol=0.05)
    g = get_attack("gaussian", sigma=1.0)(x, ctx((r, k, d), m, masks=masks)) - x
    shared_g = (g[:, :2, :100]).square().sum(-1).mean()
    assert shared_g < 0.2 * energy.mean()  # plain gaussian: only ~p_e of the energy is shared
    # sign_flip base: exactly the budget, against the own update
    out_s = get_attack("mask_aware", base="sign_flip", budget=4.0)(
        x, ctx((r, k, d), m, masks=masks)
    )
    ds = out_s - x
    assert torch.allclose(ds[:, :2].norm(dim=-1), torch.full((r, 2), 2.0), atol=1e-4)
    assert (ds[:, :2, :100] * x[:, :2, :100]).sum(-1).lt(0).all()


def test_label_flip() -> None:
    a = get_attack("label_flip")
    assert isinstance(a, LabelFlip)
    y = torch.tensor([0, 1, 9, 4])
    assert torch.equal(a.poison_labels(y, 10), torch.tensor([9, 8, 0, 5]))
    x = torch.randn(3, 4)
    assert torch.equal(a(x, ctx((3, 4), mal(3, 1))), x)
    half = get_attack("label_flip", p=0.5)
    assert isinstance(half, LabelFlip)
    g = torch.Generator().manual_seed(0)
    yy = torch.zeros(1000, dtype=torch.long)
    frac = (half.poison_labels(yy, 2, g) == 1).float().mean().item()
    assert 0.4 < frac < 0.6
    with pytest.raises(ParamError, match="num_classes"):
        a.poison_labels(y, 1)
    with pytest.raises(ParamError, match="labels must lie"):
        a.poison_labels(y, 5)


def test_alie_z_table() -> None:
    # testbeds.md §2.1
    assert float(alie_z(25, 5, "paper")) == pytest.approx(0.468, abs=1e-3)
    assert float(alie_z(25, 5, "karimireddy")) == pytest.approx(0.253, abs=1e-3)
    assert float(alie_z(20, 8, "paper")) == pytest.approx(1.036, abs=1e-3)
    assert float(alie_z(20, 8, "karimireddy")) == pytest.approx(0.674, abs=1e-3)
    assert float(alie_z(12, 2, "karimireddy")) == pytest.approx(0.0, abs=1e-9)
    assert float(alie_z(50, 24, "paper")) == pytest.approx(1.751, abs=1e-3)


def test_alie_hand_case_and_z_band() -> None:
    # honest rows 1..4 with values [1, 2, 3, 4] on coordinate 0: mu = 2.5, sd(ddof=1) = 1.2910
    x = torch.tensor([[0.0, 0.0], [1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])
    m = mal(5, 1)
    a = get_attack("alie", z_mode="fixed", z=2.0)
    out = a(x, ctx((5, 2), m))
    sd = torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item()
    assert out[0, 0].item() == pytest.approx(2.5 + 2.0 * sd, rel=1e-6)
    assert out[0, 1].item() == pytest.approx(5.0)  # sigma = 0 there
    minus = get_attack("alie", z_mode="fixed", z=2.0, direction="minus", ddof=0)(x, ctx((5, 2), m))
    sd0 = torch.tensor([1.0, 2.0, 3.0, 4.0]).std(correction=0).item()
    assert minus[0, 0].item() == pytest.approx(2.5 - 2.0 * sd0, rel=1e-6)
    # paper z with n = 5 participants and f = 1 attacker: s = 2, z = ppf(3/5)
    cp = ctx((5, 2), m)
    get_attack("alie")(x, cp)
    assert float(cp.info["z"]) == pytest.approx(0.2533, abs=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(5, 12),
    f=st.integers(1, 3),
    d=st.integers(1, 30),
    seed=st.integers(0, 10_000),
)
def test_alie_stays_in_z_band(k: int, f: int, d: int, seed: int) -> None:
    """|mal - mu| = z sigma coordinate-wise, over the honest reporters only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, d, generator=g, dtype=torch.float64)
    masks = torch.rand(k, d, generator=g) < 0.7
    m = mal(k, f)
    a = get_attack("alie", z_mode="karimireddy")
    c = ctx((k, d), m, masks=masks)
    out = a(x, c)
    mu, sd, count = honest_statistics(x, c, ddof=1)
    z = float(c.info["z"])
    sel = masks[:f] & (count > 0)
    dev = (out[:f] - mu)[sel].abs()
    assert torch.all(dev <= abs(z) * sd.expand(f, d)[sel] + 1e-9)


def test_honest_statistics_mask_aware() -> None:
    x = torch.tensor([[100.0, 100.0], [1.0, 7.0], [3.0, 9.0], [5.0, 0.0]])
    masks = torch.tensor([[True, True], [True, True], [True, False], [False, True]])
    c = ctx((4, 2), mal(4, 1), masks=masks)
    mu, sd, count = honest_statistics(x, c, ddof=0)
    # coord 0: reporters 1, 2 -> mean 2; coord 1: reporters 1, 3 -> mean 3.5; attacker excluded
    assert torch.allclose(mu, torch.tensor([2.0, 3.5]))
    assert torch.allclose(sd, torch.tensor([1.0, 3.5]))
    assert torch.equal(count, torch.tensor([2.0, 2.0]))


def test_ipm_hand_case() -> None:
    x = torch.tensor([[9.0, 9.0], [1.0, 2.0], [3.0, 4.0]])
    out = get_attack("ipm", epsilon=0.5)(x, ctx((3, 2), mal(3, 1)))
    assert torch.allclose(out[0], torch.tensor([-1.0, -1.5]))


@pytest.mark.parametrize("name", ["min_max", "min_sum"])
@pytest.mark.parametrize("direction", ["unit_vec", "std", "sign"])
@pytest.mark.parametrize("partial", [False, True])
def test_min_max_min_sum_gamma_meets_constraint(name: str, direction: str, partial: bool) -> None:
    torch.manual_seed(3)
    r, k, d, f = 2, 12, 30, 3
    x = torch.randn(r, k, d, dtype=torch.float64) + 0.5
    masks = torch.rand(r, k, d) < 0.6 if partial else None
    m = mal(k, f)
    a = get_attack(name, direction=direction)
    c = ctx((r, k, d), m, masks=masks)
    out = a(x, c)
    gamma = c.info["gamma"]
    assert bool((gamma[:, :f] > 0).all())
    assert bool(gamma[:, f:].isnan().all())
    mk = torch.ones(r, k, d, dtype=torch.bool) if masks is None else masks
    fill = torch.where(mk, x, torch.zeros(()))  # server's fill view (delta 0 where unshared)
    honest, mali = fill[:, f:], torch.where(mk, out, torch.zeros(()))[:, :f]
    hd = torch.cdist(honest, honest).square()
    md = torch.cdist(mali, honest).square()  # [r, f, k - f]
    if name == "min_max":
        assert torch.all(md.amax(-1) <= hd.amax((-1, -2)).unsqueeze(-1) + 1e-9)
    else:
        assert torch.all(md.sum(-1) <= hd.sum(-1).amin(-1, keepdim=True) + 1e-9)
    # and gamma is (nearly) maximal: a 1% larger gamma breaks the constraint
    big = get_attack(name, direction=direction, gamma_init=float(gamma[0, 0]) * 1.01, max_iter=1)
    cb = ctx((r, k, d), m, masks=masks)
    out_b = big(x, cb)
    assert float(cb.info["gamma"][0, 0]) == 0.0
    assert torch.equal(out_b[:, f:], x[:, f:])


def test_min_max_dense_hand_case() -> None:
    # honest 1-D values {-1, 1}: mu = 0 -> unit_vec direction is 0 -> gamma irrelevant, mal = mu
    # with mu != 0: honest {1, 3}: mu = 2, p = -1, max pair dist^2 = 4; mal = 2 - g:
    # max((1-g)^2, (3-(2-g))^2) = (1+g)^2 <= 4  ->  g* = 1
    x = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    a = get_attack("min_max", gamma_init=10.0, threshold=1e-9)
    c = ctx((3, 1), mal(3, 1))
    out = a(x, c)
    assert float(c.info["gamma"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(out[0, 0]) == pytest.approx(1.0, abs=1e-6)
    # min-sum: sum (2-g-1)^2 + (2-g-3)^2 = 2 + 2 g^2 <= min_j sum_i d = 4 -> g* = 1
    s = get_attack("min_sum", threshold=1e-9)
    cs = ctx((3, 1), mal(3, 1))
    s(x, cs)
    assert float(cs.info["gamma"][0]) == pytest.approx(1.0, abs=1e-6)


def test_omniscient_uses_ctx_honest_when_given() -> None:
    x = torch.zeros(3, 2)
    honest = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])
    c = ctx((3, 2), mal(3, 1))
    c.honest = honest
    out = get_attack("ipm", epsilon=1.0)(x, c)
    assert torch.allclose(out[0], torch.tensor([-3.0, -3.0]))


@pytest.mark.parametrize("name", ["gaussian", "random", "mask_aware"])
def test_stochastic_attacks_deterministic_per_seed(name: str) -> None:
    x = torch.randn(2, 6, 30)
    masks = torch.rand(2, 6, 30) < 0.5
    m = mal(6, 3)
    a = get_attack(name, **({"p_a": 0.5} if name != "random" else {}))
    o1 = a(x, ctx((2, 6, 30), m, masks=masks, seed=11))
    o2 = a(x, ctx((2, 6, 30), m, masks=masks, seed=11))
    o3 = a(x, ctx((2, 6, 30), m, masks=masks, seed=12))
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)
