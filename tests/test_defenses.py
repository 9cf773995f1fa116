"""Defenses: Flower differential tests, hand-computed cases, partial-update modes, participants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses import Aggregator, Mode, ParamError, get_defense, list_defenses
from defenses._kernels import batcher_network, cpp_kernel_available, sort_columns, window_mean
from psfed_robust.core.aggregation import fill_unshared

ALL = [
    "bulyan",
    "centered_clipping",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "norm_clipping",
    "trimmed_mean",
]
PARAMS: dict[str, dict] = {"krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1}}


def make(name: str, **kw) -> Aggregator:
    return get_defense(name, **{**PARAMS.get(name, {}), **kw})


def flwr_results(x: torch.Tensor) -> list:
    return [([row.numpy().copy()], 1) for row in x]


# --------------------------------------------------------------------------- registry, params
def test_registry_complete() -> None:
    assert set(ALL) <= set(list_defenses())


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("trimmed_mean", {"beta": 0.5}, "'beta' must be a finite real number in [0, 0.5)"),
        ("trimmed_mean", {"f": -1}, "'f' must be an integer in [0, inf]"),
        ("krum", {"f": 1.5}, "'f' must be an integer"),
        ("krum", {"m": 3}, "allowed: f"),
        ("multi_krum", {"m": 0}, "'m' must be an integer in [1, inf]"),
        ("geometric_median", {"z0": "zero"}, "one of 'mean', 'global'"),
        ("geometric_median", {"nu": 0.0}, "'nu'"),
        ("centered_clipping", {"tau": -1.0}, "'tau'"),
        ("norm_clipping", {"tau": float("inf")}, "'tau'"),
    ],
)
def test_bad_params(name: str, params: dict, needle: str) -> None:
    with pytest.raises(ParamError) as e:
        get_defense(name, **params)
    assert needle in str(e.value)


def test_unknown_defense_and_mode() -> None:
    with pytest.raises(ValueError, match=r"unknown defense 'fedavg'; allowed: .*bulyan"):
        get_defense("fedavg")
    with pytest.raises(ValueError, match="'mode' must be one of 'fill', 'reporters'"):
        get_defense("median")(torch.zeros(2, 3), None, torch.zeros(3), mode="dense")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="global_model shape"):
        get_defense("median")(torch.zeros(2, 3), None, torch.zeros(4))


def test_bulyan_requires_4f_plus_3() -> None:
    with pytest.raises(ValueError, match=r"'bulyan': needs n >= 4f \+ 3 = 11 .*\(f=2\), got n=10"):
        get_defense("bulyan", f=2)(torch.randn(10, 4), None, torch.zeros(4))


# --------------------------------------------------------------------------- Flower differential
@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 15), d=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_median_matches_flower(k: int, d: int, seed: int) -> None:
    x = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    ours = get_defense("median")(x, None, torch.zeros(d))
    ref = aggregate_median(flwr_results(x))[0]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 15),
    d=st.integers(1, 30),
    beta=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.45]),
    seed=st.integers(0, 10_000),
)
def test_trimmed_mean_matches_flower(k: int, d: int, beta: float, seed: int) -> None:
    x = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    ours = get_defense("trimmed_mean", beta=beta)(x, None, torch.zeros(d))
    ref = aggregate_trimmed_avg(flwr_results(x), beta)[0]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("k", "f", "m"), [(10, 2, 0), (10, 2, 4), (7, 1, 0), (13, 3, 6), (9, 3, 0), (8, 2, 6)]
)
def test_krum_multikrum_match_flower(k: int, f: int, m: int) -> None:
    x = torch.randn(k, 25, generator=torch.Generator().manual_seed(k * 10 + f))
    agg = get_defense("krum", f=f) if m == 0 else get_defense("multi_krum", f=f, m=m)
    ours = agg(x, None, torch.zeros(25))
    ref = aggregate_krum(flwr_results(x), f, m)[0]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("k", "f"), [(7, 1), (11, 2), (12, 2), (15, 3), (3, 0)])
def test_bulyan_matches_flower(k: int, f: int) -> None:
    x = torch.randn(k, 30, generator=torch.Generator().manual_seed(k + f))
    ours = get_defense("bulyan", f=f)(x, None, torch.zeros(30))
    ref = aggregate_bulyan(flwr_results(x), f, aggregate_krum, to_keep=0)[0]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- effect under attack
def test_robust_rules_bound_sign_flip_that_breaks_mean() -> None:
    """2 of 11 clients send -100 x their update: the mean moves by ~18, robust rules stay near the
    honest mean (within 1)."""
    g = torch.Generator().manual_seed(0)
    k, d = 11, 50
    honest = 1.0 + 0.3 * torch.randn(k, d, generator=g)
    x = honest.clone()
    x[:2] = -100.0 * honest[:2]
    target = honest[2:].mean(0)
    gm = torch.zeros(d)
    assert (get_defense("mean")(x, None, gm) - target).norm() / d**0.5 > 10
    cases: list[tuple[str, dict]] = [
        ("median", {}),
        ("trimmed_mean", {"beta": 0.2}),
        ("krum", {"f": 2}),
        ("multi_krum", {"f": 2}),
        ("bulyan", {"f": 2}),
        ("geometric_median", {}),
        ("centered_clipping", {"tau": 1.0, "iterations": 5}),
    ]
    for name, kw in cases:
        out = get_defense(name, **kw)(x, None, gm)
        assert (out - target).norm() / d**0.5 < 1.0, name


def test_krum_excludes_attackers() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 20, generator=g)
    x[:2] = 50.0
    info: dict = {}
    get_defense("multi_krum", f=2)(x, None, torch.zeros(20), info=info)
    assert not bool(info["selected"][:2].any())
    assert int(info["selected"].sum()) == 8


# --------------------------------------------------------------------------- hand-computed cases
def test_trimmed_mean_zero_trim_is_mean_not_flpoison_zero() -> None:
    x = 5.0 + torch.arange(9.0).unsqueeze(-1).expand(9, 3)  # floor(0.1 * 9) = 0
    out = get_defense("trimmed_mean", beta=0.1)(x, None, torch.zeros(3))
    assert torch.allclose(out, torch.full((3,), 9.0))
    out_f = get_defense("trimmed_mean", f=2)(x, None, torch.zeros(3))  # drop 5, 6 and 12, 13
    assert torch.allclose(out_f, torch.full((3,), 9.0))


def test_median_reporters_hand_case() -> None:
    # coordinate 0: reporters 1, 2, 3 -> 2 ; coordinate 1: reporters 10, 20 -> 15 ;
    # coordinate 2: nobody -> global 7
    x = torch.tensor([[1.0, 10.0, 99.0], [2.0, 20.0, 99.0], [3.0, -5.0, 99.0]])
    masks = torch.tensor([[True, True, False], [True, True, False], [True, False, False]])
    g = torch.tensor([0.0, 0.0, 7.0])
    out = get_defense("median")(x, masks, g, mode="reporters")
    assert torch.equal(out, torch.tensor([2.0, 15.0, 7.0]))
    # fill mode: unshared entries are the global value: coord 1 -> median(10, 20, 0) = 10
    out_fill = get_defense("median")(x, masks, g, mode="fill")
    assert torch.equal(out_fill, torch.tensor([2.0, 10.0, 7.0]))


def test_mean_is_psofed_step() -> None:
    x = torch.tensor([[4.0, 4.0], [2.0, 8.0]])
    masks = torch.tensor([[True, False], [True, True]])
    g = torch.tensor([0.0, 2.0])
    # fill: g + 1/2 [(4 - 0) + (2 - 0), (8 - 2)] = [3, 5]; reporters: [3, 8]
    assert torch.equal(get_defense("mean")(x, masks, g), torch.tensor([3.0, 5.0]))
    assert torch.equal(get_defense("mean")(x, masks, g, mode="reporters"), torch.tensor([3.0, 8.0]))


def test_clipping_hand_cases() -> None:
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    g = torch.zeros(2)
    cc = get_defense("centered_clipping", tau=1.0, iterations=1)(x, None, g)
    assert torch.allclose(cc, torch.tensor([0.5, 0.5]))
    big = get_defense("centered_clipping", tau=1e6, iterations=1)(x, None, g)
    assert torch.allclose(big, x.mean(0))
    nc = get_defense("norm_clipping", tau=1.0)(torch.tensor([[3.0, 4.0], [0.1, 0.0]]), None, g)
    assert torch.allclose(nc, torch.tensor([(0.6 + 0.1) / 2, 0.4]))


def test_geometric_median_hand_cases() -> None:
    x = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    out = get_defense("geometric_median", iterations=200)(x, None, torch.zeros(1, dtype=x.dtype))
    assert float(out[0]) == pytest.approx(1.0, abs=1e-3)
    mean_like = get_defense("geometric_median", nu=1e6, iterations=3)(x, None, torch.zeros(1))
    assert float(mean_like[0]) == pytest.approx(11 / 3, rel=1e-6)
    z0g = get_defense("geometric_median", z0="global", iterations=0)(x, None, torch.ones(1))
    assert float(z0g[0]) == 1.0


def test_krum_reporters_overlap_normalised_distance() -> None:
    from defenses._distance import sq_distances

    x = torch.tensor([[1.0, 1.0, 0.0, 0.0], [3.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    masks = torch.tensor(
        [[True, True, False, False], [True, False, True, False], [False, False, False, True]]
    )
    d = sq_distances(x, torch.zeros(4), torch.ones(3, dtype=torch.bool), masks)
    # clients 0, 1 overlap on coordinate 0 only: (1 - 3)^2 / 1 * D = 16; 2 overlaps nobody
    assert float(d[0, 1]) == pytest.approx(16.0)
    assert torch.isinf(d[0, 2]) and torch.isinf(d[1, 2]) and torch.isinf(d[0, 0])


# --------------------------------------------------------------------------- modes, participants
def _partial_case(seed: int = 0, r: int = 3, k: int = 12, d: int = 40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(r, k, d, generator=g)
    masks = torch.rand(r, k, d, generator=g) < 0.5
    masks[..., -3:] = False  # nobody reports the last 3 coordinates
    gm = torch.randn(r, d, generator=g)
    return x, masks, gm


@pytest.mark.parametrize("name", ALL)
def test_fill_mode_equals_dense_rule_on_filled_vectors(name: str) -> None:
    x, masks, gm = _partial_case()
    agg = make(name)
    ours = agg(x, masks, gm, mode="fill")
    dense = agg(fill_unshared(x, masks, gm), None, gm)
    assert torch.allclose(ours, dense, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_unreported_coordinates_keep_global(name: str) -> None:
    x, masks, gm = _partial_case()
    for mode in ("fill", "reporters"):
        out = make(name)(x, masks, gm, mode=mode)
        assert torch.allclose(out[..., -3:], gm[..., -3:], atol=1e-6), mode
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("mode", ["fill", "reporters"])
def test_participants_mask_honored_and_runs_independent(name: str, mode: Mode) -> None:
    x, masks, gm = _partial_case(seed=2, k=14)
    part = torch.ones(3, 14, dtype=torch.bool)
    part[0, [0, 3]] = False  # runs with 12, 14 and 13 participants
    part[2, 5] = False
    poisoned = x.clone()
    poisoned[~part] = float("nan")  # a non-participant's row is ignored entirely
    agg = make(name)
    out = agg(poisoned, masks, gm, participants=part, mode=mode)
    for r in range(3):
        keep = part[r]
        ref = agg(x[r][keep], masks[r][keep], gm[r], mode=mode)
        assert torch.allclose(out[r], ref, atol=1e-5), r
    nobody = agg(x, masks, gm, participants=torch.zeros(3, 14, dtype=torch.bool), mode=mode)
    assert torch.equal(nobody, gm)


def test_dense_masks_all_true_equals_none() -> None:
    x, _, gm = _partial_case()
    full = torch.ones_like(x, dtype=torch.bool)
    for name in ALL:
        for mode in ("fill", "reporters"):
            a = make(name)(x, full, gm, mode=mode)
            b = make(name)(x, None, gm, mode=mode)
            assert torch.allclose(a, b, atol=1e-6), (name, mode)


def test_reporters_trimmed_mean_per_coordinate_count() -> None:
    # coordinate 0: 5 reporters -> b = floor(0.2*5) = 1 -> mean(2, 3, 4) = 3
    # coordinate 1: 2 reporters -> b = 0 -> mean(1, 100) = 50.5
    x = torch.tensor([[1.0, 1.0], [2.0, 100.0], [3.0, 0.0], [4.0, 0.0], [100.0, 0.0]])
    masks = torch.tensor([[True, True], [True, True], [True, False], [True, False], [True, False]])
    out = get_defense("trimmed_mean", beta=0.2)(x, masks, torch.zeros(2), mode="reporters")
    assert torch.allclose(out, torch.tensor([3.0, 50.5]))


def test_bulyan_trims_and_selects_without_replacement() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, 8, generator=g)
    info: dict = {}
    out = get_defense("bulyan", f=2)(x, None, torch.zeros(8), info=info)
    sel = info["selected"]
    assert int(sel.sum()) == 7  # theta = n - 2f distinct clients
    vals = x[sel].sort(0).values  # 7 values per coordinate, beta = 3 closest to the median
    med = vals[3]
    dist = (vals - med).abs()
    idx = dist.argsort(0)[:3]
    ref = vals.gather(0, idx).mean(0)
    assert torch.allclose(out, ref, atol=1e-6)
    assert not torch.allclose(out, vals.mean(0))  # FLPoison's untrimmed Bulyan would give this


# --------------------------------------------------------------------------- kernels
def test_batcher_network_sorts() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 8, 13, 31, 100):
        v = torch.rand(50, n, generator=g)
        w = v.clone()
        for a, b in batcher_network(n):
            lo, hi = torch.minimum(w[:, a], w[:, b]), torch.maximum(w[:, a], w[:, b])
            w[:, a], w[:, b] = lo, hi
        assert torch.equal(w, v.sort(-1).values)


def test_window_mean_torch_chunks() -> None:
    import defenses._kernels as kk

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, kk._CHUNK + 37, generator=g)
    valid = torch.rand(x.shape, generator=g) < 0.8
    c = valid.sum(-2)
    out = window_mean(x, (c - 1).clamp_min(0) // 2, c // 2 + 1, valid, backend="torch")
    ref = torch.tensor(
        np.ma.median(np.ma.masked_array(x.numpy(), ~valid.numpy()), axis=-2).filled(np.inf)
    )
    ok = c > 0
    assert torch.allclose(out[ok], ref[ok].float(), atol=1e-6)


@pytest.mark.slow
def test_cpp_kernel_matches_torch() -> None:
    if not cpp_kernel_available():
        pytest.skip("no C++ toolchain for the optional sorting-network kernel")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 37, 1000, generator=g, dtype=dtype)
        valid = torch.rand(x.shape, generator=g) < 0.7
        a = sort_columns(x, valid, backend="cpp")
        b = sort_columns(x, valid, backend="torch")
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)  # invalid -> NaN
        c = valid.sum(-2)
        lo, hi = (c - 1).clamp_min(0) // 2, c // 2 + 1
        wa = window_mean(x, lo, hi, valid, backend="cpp")
        wb = window_mean(x, lo, hi, valid, backend="torch")
        ok = c > 0
        assert torch.allclose(wa[ok], wb[ok], atol=1e-6)
