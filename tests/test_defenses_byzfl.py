"""Robust aggregators against ByzFL (``byzfl==0.0.11``) as an independent oracle.

ByzFL's Krum scores each client by its ``n - f - 1`` nearest neighbours, the paper (and this
project) by ``n - f - 2``: our ``krum(f)`` is ByzFL's ``Krum(f + 1)``, and our
``multi_krum(f, m=n-f-1)`` its ``MultiKrum(f + 1)``. ByzFL's geometric median starts at 0 (our
``z0="global"`` with a zero global model) and drops rows holding inf, the policy our
``geometric_median`` follows for any non-finite row. Install: ``pip install --no-deps
byzfl==0.0.11`` (its own pins would replace torch).
"""

from __future__ import annotations

import pytest
import torch

from defenses import get_defense

byzfl = pytest.importorskip("byzfl")

CASES = [(7, 1), (10, 2), (13, 3), (20, 4)]


def _x(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)  # ByzFL computes in float32


def close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, torch.as_tensor(ref).to(ours.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "f"), CASES)
def test_krum_and_multi_krum_match_byzfl(n: int, f: int) -> None:
    for seed in range(5):
        x = _x(n, 30, seed)
        gm = torch.zeros(30, dtype=x.dtype)
        ref = byzfl.Krum(f=f + 1)(x)
        close(get_defense("krum", f=f)(x, None, gm), ref)
        ref_m = byzfl.MultiKrum(f=f + 1)(x)
        ours = get_defense("multi_krum", f=f, m=n - f - 1)(x, None, gm)
        close(ours, ref_m)


@pytest.mark.parametrize(("n", "f"), CASES)
def test_coordinatewise_rules_match_byzfl(n: int, f: int) -> None:
    x = _x(n, 40, n + f)
    gm = torch.zeros(40, dtype=x.dtype)
    close(get_defense("median")(x, None, gm), byzfl.Median()(x))
    close(get_defense("trimmed_mean", f=f)(x, None, gm), byzfl.TrMean(f=f)(x))
    close(get_defense("mean")(x, None, gm), byzfl.Average()(x))


@pytest.mark.parametrize(("n", "f"), CASES)
def test_geometric_median_and_centered_clipping_match_byzfl(n: int, f: int) -> None:
    x = _x(n, 25, 100 + n)
    gm = torch.zeros(25, dtype=x.dtype)
    ours = get_defense("geometric_median", nu=0.1, iterations=5, z0="global")(x, None, gm)
    close(ours, byzfl.GeometricMedian(nu=0.1, T=5)(x))
    cc = get_defense("centered_clipping", tau=1.5, iterations=3)(x, None, gm)
    close(cc, byzfl.CenteredClipping(tau=1.5, L=3)(x))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_geometric_median_with_an_infinite_row_matches_byzfl(bad: float) -> None:
    x = _x(9, 12, 7)
    x[4, 3] = bad
    gm = torch.zeros(12, dtype=x.dtype)
    ours = get_defense("geometric_median", nu=0.1, iterations=6, z0="global")(x, None, gm)
    assert bool(torch.isfinite(ours).all())
    close(ours, byzfl.GeometricMedian(nu=0.1, T=6)(x))


def test_krum_precondition_is_byzfl_s_with_f_plus_one() -> None:
    """Our ``n > 2f + 2`` is ByzFL's ``2 f' < n`` with ``f' = f + 1``: both refuse n = 2f + 2."""
    x = _x(8, 5, 0)
    with pytest.raises(ValueError):
        byzfl.Krum(f=4)(x)
    with pytest.raises(ValueError, match="n=8"):
        get_defense("krum", f=3)(x, None, torch.zeros(5, dtype=x.dtype))
