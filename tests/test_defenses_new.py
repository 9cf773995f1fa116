"""NNM, bucketing and ARC as pre-aggregators: golden cases by hand, composition, both modes,
batching, and ByzFL (0.0.11) as an independent oracle (ByzFL's Krum uses ``n - f - 1``
neighbours, ours the paper's ``n - f - 2``: our ``krum(f)`` is ByzFL's ``Krum(f + 1)``)."""

from __future__ import annotations

import math

import pytest
import torch

from defenses import (
    Aggregator,
    Composed,
    ParamError,
    PreAggregator,
    compose,
    get_defense,
    list_defenses,
)
from defenses.base import Mode, RoundInputs
from psfed_robust.core.round import server_step

T, F = True, False
X3 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=torch.float64)
G3 = torch.zeros(3, dtype=torch.float64)


def rows(pre: Aggregator, x: torch.Tensor, g: torch.Tensor, *, masks: torch.Tensor | None = None,
         mode: str = "fill", part: torch.Tensor | None = None, f: int = 0,
         weights: torch.Tensor | None = None,
         gen: torch.Generator | None = None) -> RoundInputs:
    """The rows ``pre`` hands to the rule."""
    assert isinstance(pre, PreAggregator)
    p = torch.ones(x.shape[:-1], dtype=torch.bool) if part is None else part
    a = RoundInputs(x, masks, g, part, p, weights, mode, {}, generator=gen)  # type: ignore[arg-type]
    return pre.transform(a, f)


def test_registered_and_listed() -> None:
    names = set(list_defenses())
    assert {"nnm", "bucketing", "arc"} <= names
    for n in ("nnm", "bucketing", "arc"):
        assert isinstance(get_defense(n), PreAggregator)


# --------------------------------------------------------------------------- NNM
def test_nnm_golden_dense() -> None:
    """f = 1, n = 3: each row mixes itself and its nearest row (row 1 is equidistant: the lower
    index wins): [2.5 3.5 4.5], [2.5 3.5 4.5], [5.5 6.5 7.5] (ByzFL's docstring example)."""
    out = rows(get_defense("nnm"), X3, G3, f=1)
    want = torch.tensor([[2.5, 3.5, 4.5], [2.5, 3.5, 4.5], [5.5, 6.5, 7.5]], dtype=torch.float64)
    torch.testing.assert_close(out.x, want)
    assert out.masks is None
    assert out.info["nnm_neighbours"].tolist() == [2, 2, 2]
    # standalone: then the mean; composed: then the rule
    torch.testing.assert_close(get_defense("nnm", f=1)(X3, None, G3), want.mean(0))
    torch.testing.assert_close(get_defense("median", pre=[("nnm", {"f": 1})])(X3, None, G3),
                               torch.tensor([2.5, 3.5, 4.5], dtype=torch.float64))


def test_nnm_golden_reporters() -> None:
    """D = 2, rows (1, .) (., 2) (3, 3): overlap-normalised distances d01 = inf (no overlap),
    d02 = 2 * 4 / 1 = 8, d12 = 2 * 1 / 1 = 2; f = 1 mixes 2 rows per coordinate over reporters:
    row 0 -> (2, 3), row 1 -> (3, 2.5), row 2 -> (3, 2.5); all coordinates reported."""
    x = torch.tensor([[1.0, 99.0], [99.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    m = torch.tensor([[T, F], [F, T], [T, T]])
    g = torch.zeros(2, dtype=torch.float64)
    out = rows(get_defense("nnm"), x, g, masks=m, mode="reporters", f=1)
    torch.testing.assert_close(out.x, torch.tensor([[2.0, 3.0], [3.0, 2.5], [3.0, 2.5]],
                                                   dtype=torch.float64))
    assert out.masks is not None and bool(out.masks.all())
    agg = get_defense("mean", pre=[("nnm", {"f": 1})])
    new = agg(x, m, g, mode="reporters")
    torch.testing.assert_close(new, torch.tensor([8 / 3, 8 / 3], dtype=torch.float64))


def test_nnm_never_mixes_non_finite_rows_into_honest_ones() -> None:
    x = X3.clone()
    x[2] = math.inf
    out = rows(get_defense("nnm"), x, G3, f=1)
    torch.testing.assert_close(out.x[:2], torch.tensor([[2.5, 3.5, 4.5]] * 2, dtype=torch.float64))
    assert bool(torch.isinf(out.x[2]).all())
    assert torch.isfinite(get_defense("krum", f=0, pre=[("nnm", {"f": 1})])(
        torch.cat([x, X3[:2] + 0.5]), None, G3)).all()


def test_nnm_precondition() -> None:
    with pytest.raises(ParamError, match=r"needs n > f participants \(f=3\), got n=3"):
        get_defense("nnm", f=3)(X3, None, G3)
    with pytest.raises(ParamError, match="n > f"):
        get_defense("median", f=0, pre=["nnm"]).check_participants(0)


# --------------------------------------------------------------------------- bucketing
def test_bucketing_pairs_rows_and_is_seeded() -> None:
    """4 scalar rows 0..3, s = 2: two buckets of two, each the mean of a pair; same generator
    seed -> same buckets; over seeds, more than one pairing occurs."""
    x = torch.arange(4, dtype=torch.float64).unsqueeze(-1)
    g = torch.zeros(1, dtype=torch.float64)
    pairings = set()
    for seed in range(12):
        out = rows(get_defense("bucketing", s=2), x, g, gen=torch.Generator().manual_seed(seed))
        b = out.info["buckets"]
        assert sorted(b.tolist()) == [0, 0, 1, 1]
        assert out.x.shape == (2, 1) and bool(out.part.all())
        for k in range(2):
            torch.testing.assert_close(out.x[k, 0], x[b == k, 0].mean())
        again = rows(get_defense("bucketing", s=2), x, g, gen=torch.Generator().manual_seed(seed))
        assert torch.equal(again.x, out.x)
        pairings.add(tuple(sorted(out.x[:, 0].tolist())))
    assert len(pairings) > 1


def test_bucketing_remainder_weights_and_preconditions() -> None:
    x = torch.arange(5, dtype=torch.float64).unsqueeze(-1)
    g = torch.zeros(1, dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64)
    out = rows(get_defense("bucketing", s=2), x, g, weights=w, gen=torch.Generator().manual_seed(3))
    b = out.info["buckets"]
    assert sorted(b.tolist()) == [0, 0, 1, 1, 2]  # ceil(5/2) buckets, the last one holds 1 row
    assert out.weights is not None
    for k in range(3):
        torch.testing.assert_close(out.weights[k], w[b == k].sum())
    # s = 1: a permutation, invisible to permutation-invariant rules (weights move along)
    gm = torch.tensor([0.5], dtype=torch.float64)
    for name in ("mean", "median", "trimmed_mean"):
        plain = get_defense(name)(x, None, gm, weights=w)
        comp = get_defense(name, pre=[("bucketing", {"s": 1})])(
            x, None, gm, weights=w, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(comp, plain)
    # the rule's precondition holds on ceil(n/s) rows: krum(f=1) needs > 4 buckets
    agg = get_defense("krum", f=1, pre=[("bucketing", {"s": 2})])
    agg.check_participants(9)
    with pytest.raises(ParamError, match=r"defense 'krum': needs n > 2f \+ 2 = 4 .* got n=4"):
        agg.check_participants(8)


def test_bucketing_generator_through_server_step_and_fallback() -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.zeros(4, dtype=torch.float64)
    agg = get_defense("krum", f=0, pre=[("bucketing", {"s": 2})])
    direct = agg(x, None, g, generator=torch.Generator().manual_seed(7))
    via = server_step(agg, x, g, generator=torch.Generator().manual_seed(7))
    assert torch.equal(direct, via)
    # without a generator: deterministic, seeded by the global model (changes with it)
    a1, a2 = (rows(get_defense("bucketing", s=2), x, g).info["buckets"] for _ in range(2))
    assert torch.equal(a1, a2)
    seen = {tuple(rows(get_defense("bucketing", s=2), x, g + i).info["buckets"].tolist())
            for i in range(8)}
    assert len(seen) > 1


def test_bucketing_reporters_one_bucket_is_the_reporters_mean() -> None:
    x = torch.tensor([[1.0, 5.0], [3.0, 99.0], [8.0, 7.0]], dtype=torch.float64)
    m = torch.tensor([[T, T], [T, F], [F, T]])
    g = torch.tensor([100.0, 100.0], dtype=torch.float64)
    out = rows(get_defense("bucketing", s=3), x, g, masks=m, mode="reporters",
               gen=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x, torch.tensor([[2.0, 6.0]], dtype=torch.float64))
    assert out.masks is not None and out.masks.tolist() == [[T, T]]
    # fill mode: the filled vectors' mean (unshared entries hold the global value)
    filled = rows(get_defense("bucketing", s=3), x, g, masks=m, gen=torch.Generator())
    torch.testing.assert_close(filled.x, torch.tensor([[(1 + 3 + 100) / 3, (5 + 100 + 7) / 3]],
                                                      dtype=torch.float64))


# --------------------------------------------------------------------------- ARC
def test_arc_golden() -> None:
    """n = 3, f = 1: k = floor(2 * 1 * 2 / 3) = 1 row clipped, the largest (7, 8, 9), to the
    next norm sqrt(77): (7, 8, 9) * sqrt(77 / 194) (ByzFL's docstring: 4.41 5.04 5.67)."""
    out = rows(get_defense("arc"), X3, G3, f=1)
    want = X3.clone()
    want[2] = want[2] * math.sqrt(77 / 194)
    torch.testing.assert_close(out.x, want)
    assert out.info["arc_clipped"].tolist() == [F, F, T]
    torch.testing.assert_close(get_defense("arc", f=1)(X3, None, G3), want.mean(0))
    # clipping acts on deltas from the global model
    gm = torch.tensor([10.0, -3.0, 0.5], dtype=torch.float64)
    shifted = rows(get_defense("arc"), X3 + gm, gm, f=1)
    torch.testing.assert_close(shifted.x, want + gm)
    # f = 0: k = 0, nothing clipped
    assert torch.equal(rows(get_defense("arc"), X3, G3, f=0).x, X3)


def test_arc_partial_updates_both_modes() -> None:
    """Row 2 shares only coordinate 1 (40): its norm is 40 in both modes, clipped to 5."""
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0], [30.0, 40.0]], dtype=torch.float64)
    m = torch.tensor([[T, T], [T, T], [F, T]])
    g = torch.zeros(2, dtype=torch.float64)
    arc = get_defense("arc", f=1)
    torch.testing.assert_close(arc(x, m, g, mode="reporters"),
                               torch.tensor([1.5, 10 / 3], dtype=torch.float64))
    torch.testing.assert_close(arc(x, m, g, mode="fill"),
                               torch.tensor([1.0, 10 / 3], dtype=torch.float64))


def test_arc_non_finite_rows() -> None:
    x = X3.clone()
    x[2, 0] = math.inf
    out = rows(get_defense("arc"), x, G3, f=1)
    torch.testing.assert_close(out.x[2], torch.zeros(3, dtype=torch.float64))  # zero delta
    torch.testing.assert_close(out.x[:2], X3[:2])
    assert bool(torch.isinf(rows(get_defense("arc"), x, G3, f=0).x[2, 0]))  # k = 0: untouched


# --------------------------------------------------------------------------- composition
def test_compose_specs_and_f_inheritance() -> None:
    agg = get_defense("krum", f=2, pre=["nnm", ("bucketing", {"s": 2}), {"name": "arc", "f": 1}])
    assert isinstance(agg, Composed)
    assert [p.name for p in agg.pre] == ["nnm", "bucketing", "arc"]
    assert agg.f == 2 and agg.pre[0].resolve_f(2) == 2 and agg.pre[2].resolve_f(2) == 1
    same = compose(["nnm", {"name": "bucketing", "params": {"s": 2}}, ("arc", {"f": 1})],
                   get_defense("krum", f=2))
    assert repr(same) == repr(agg)
    assert compose([], "median").name == "median"
    assert isinstance(compose(("arc", {"f": 1}), "median"), Composed)
    nested = compose("nnm", compose("arc", "median", f=2))
    assert isinstance(nested, Composed) and [p.name for p in nested.pre] == ["nnm", "arc"]
    assert nested.f == 2
    # a rule without f: f goes to the pre-aggregators, and NNM/ARC never run without one
    med = get_defense("median", f=1, pre=["nnm"])
    assert isinstance(med, Composed) and med.f == 1
    torch.testing.assert_close(med(X3, None, G3), torch.tensor([2.5, 3.5, 4.5],
                                                               dtype=torch.float64))
    with pytest.raises(ParamError, match=r"defense 'nnm': needs f, and rule 'median' has none"):
        get_defense("median", pre=["nnm"])
    assert isinstance(get_defense("median", pre=[("bucketing", {"s": 2})]), Composed)
    with pytest.raises(ParamError, match="defense 'median' is not a pre-aggregator; "
                                         "pre-aggregators: arc, bucketing, nnm"):
        get_defense("krum", pre=["median"])
    with pytest.raises(ParamError, match="pre-aggregator spec must be"):
        get_defense("krum", pre=[42])
    with pytest.raises(ParamError, match="unknown parameter"):
        get_defense("krum", pre=[("bucketing", {"size": 2})])
    with pytest.raises(ParamError, match="the rule must be an aggregation rule"):
        compose("nnm", get_defense("arc"))


def test_composed_keeps_no_state_and_reports_info() -> None:
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    agg = get_defense("multi_krum", f=1, pre=["arc", "nnm"])
    before = repr(agg), dict(vars(agg))
    info: dict = {}
    agg(x, None, torch.zeros(5, dtype=torch.float64), info=info)
    assert (repr(agg), dict(vars(agg))) == before
    assert {"arc_clipped", "nnm_neighbours", "selected"} <= set(info)


@pytest.mark.parametrize("mode", ["fill", "reporters"])
@pytest.mark.parametrize("pre", [["nnm"], ["arc"], ["arc", "nnm"], [("bucketing", {"s": 1})]])
def test_batched_equals_per_run(mode: Mode, pre: list) -> None:
    """[B, K, D] with per-run participants and masks == each run alone on its participants."""
    gen = torch.Generator().manual_seed(5)
    b, k, d = 4, 7, 6
    x = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    m = torch.rand(b, k, d, generator=gen) < 0.7
    part = torch.rand(b, k, generator=gen) < 0.85
    part[:, :5] = True
    g = torch.randn(b, d, generator=gen, dtype=torch.float64)
    agg = get_defense("trimmed_mean", f=1, pre=pre)
    out = agg(x, m, g, participants=part, mode=mode, generator=torch.Generator().manual_seed(1))
    for r in range(b):
        p = part[r]
        one = agg(x[r][p], m[r][p], g[r], mode=mode, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out[r], one)


# --------------------------------------------------------------------------- ByzFL oracle
byzfl = pytest.importorskip("byzfl")
CASES = [(7, 1), (10, 2), (13, 3), (20, 4)]


def _x(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(("n", "f"), CASES)
def test_nnm_and_arc_match_byzfl(n: int, f: int) -> None:
    for seed in range(3):
        x = _x(n, 12, seed) * (1 + torch.arange(n, dtype=torch.float64)).unsqueeze(-1)
        g = torch.zeros(12, dtype=torch.float64)
        torch.testing.assert_close(rows(get_defense("nnm"), x, g, f=f).x,
                                   torch.as_tensor(byzfl.NNM(f=f)(x.numpy())))
        torch.testing.assert_close(rows(get_defense("arc"), x, g, f=f).x,
                                   torch.as_tensor(byzfl.ARC(f=f)(x.numpy().copy())))
        # composed rules: ByzFL's Krum(f + 1) is our krum(f)
        ours = get_defense("krum", f=f, pre=["nnm"])(x, None, g)
        ref = byzfl.Krum(f=f + 1)(byzfl.NNM(f=f)(x.numpy()))
        torch.testing.assert_close(ours, torch.as_tensor(ref))
        ours = get_defense("trimmed_mean", f=f, pre=["arc", "nnm"])(x, None, g)
        ref = byzfl.TrMean(f=f)(byzfl.NNM(f=f)(byzfl.ARC(f=f)(x.numpy().copy())))
        torch.testing.assert_close(ours, torch.as_tensor(ref))
        # dense masks: reporters mode is the same rule
        dense = torch.ones(x.shape, dtype=torch.bool)
        torch.testing.assert_close(
            get_defense("median", f=f, pre=["arc", "nnm"])(x, dense, g, mode="reporters"),
            torch.as_tensor(byzfl.Median()(byzfl.NNM(f=f)(byzfl.ARC(f=f)(x.numpy().copy())))))


def test_bucketing_matches_byzfl_on_one_bucket_and_as_a_multiset() -> None:
    x = _x(6, 5, 11)
    g = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(rows(get_defense("bucketing", s=6), x, g, gen=torch.Generator()).x,
                               torch.as_tensor(byzfl.Bucketing(s=6)(x.numpy())))
    # s = 4 on 6 rows: 2 buckets (4 + 2 rows) as in ByzFL; means of disjoint subsets whose
    # size-weighted mean is the overall mean
    ours = rows(get_defense("bucketing", s=4), x, g, gen=torch.Generator().manual_seed(0)).x
    ref = torch.as_tensor(byzfl.Bucketing(s=4)(x.numpy()))
    assert ours.shape == ref.shape == (2, 5)
    for out in (ours, ref):
        torch.testing.assert_close((4 * out[0] + 2 * out[1]) / 6, x.mean(0))
