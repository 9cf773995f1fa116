"""Attacks inf, mimic, alie_opt and ipm_opt: hand-computed cases, partial updates, explicit state,
batching, and ByzFL (0.0.11) as an independent oracle."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from attacks import AttackContext, ParamError, get_attack, list_attacks
from defenses import Aggregator, get_defense

T, F = True, False


def ctx(
    malicious: torch.Tensor,
    d: int,
    *,
    masks: torch.Tensor | None = None,
    participants: torch.Tensor | None = None,
    aggregator: Aggregator | None = None,
    state: dict[str, Any] | None = None,
    seed: int = 0,
) -> AttackContext:
    lead = malicious.shape[:-1]
    return AttackContext(
        round=0, generator=torch.Generator().manual_seed(seed),
        reference=torch.zeros(*lead, d, dtype=torch.float64), masks=masks, malicious=malicious,
        participants=participants, aggregator=aggregator,
        state={} if state is None else state,
    )


def test_registered_with_tags() -> None:
    assert {"inf", "mimic", "alie_opt", "ipm_opt"} <= set(list_attacks())
    for name in ("mimic", "alie_opt", "ipm_opt"):
        assert get_attack(name).omniscient and get_attack(name).mask_aware
    assert not get_attack("inf").omniscient and get_attack("inf").mask_aware
    with pytest.raises(ParamError, match="attack 'inf': parameter 'sign'"):
        get_attack("inf", sign="up")
    with pytest.raises(ParamError, match=r"'alie_opt': parameter 'ratio' must be .*\(0.5, 1\)"):
        get_attack("alie_opt", ratio=0.5)
    with pytest.raises(ValueError, match="'delta' must be non-zero"):
        get_attack("ipm_opt", delta=0.0)


# --------------------------------------------------------------------------- inf
def test_inf_on_shared_coordinates_only() -> None:
    x = torch.arange(12, dtype=torch.float64).view(3, 4)
    mal = torch.tensor([F, T, T])
    m = torch.tensor([[T, T, F, F], [T, F, T, F], [F, F, F, F]])
    out = get_attack("inf")(x, ctx(mal, 4, masks=m))
    assert torch.equal(out[0], x[0])
    assert out[1].tolist() == [math.inf, 5.0, math.inf, 7.0]  # unshared: its own delta
    assert torch.equal(out[2], x[2])
    dense = get_attack("inf", sign="minus")(x, ctx(mal, 4, participants=torch.tensor([T, T, F])))
    assert dense[1].tolist() == [-math.inf] * 4 and torch.equal(dense[2], x[2])


# --------------------------------------------------------------------------- mimic
def test_mimic_fixed_target() -> None:
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [9.0, 9.0], [8.0, 8.0]],
                     dtype=torch.float64)
    mal = torch.tensor([F, F, F, T, T])
    c = ctx(mal, 2)
    out = get_attack("mimic", target=1)(x, c)
    assert out[3:].tolist() == [[2.0, 0.0]] * 2 and torch.equal(out[:3], x[:3])
    assert int(c.info["target"]) == 1
    # the target-th honest *participant*, modulo their number; masks: shared coordinates only
    part = torch.tensor([T, F, T, T, T])
    m = torch.tensor([[T, T]] * 3 + [[T, F], [F, F]])
    c = ctx(mal, 2, participants=part, masks=m)
    out = get_attack("mimic", target=3)(x, c)  # honest participants: rows 0, 2 -> 3 % 2 = 1
    assert int(c.info["target"]) == 2
    assert out[3].tolist() == [3.0, 9.0] and out[4].tolist() == [8.0, 8.0]
    # no honest participant: nothing to copy, deltas unchanged
    c = ctx(mal, 2, participants=torch.tensor([F, F, F, T, T]))
    assert torch.equal(get_attack("mimic")(x, c), x) and int(c.info["target"]) == -1


def _mimic_oracle(rounds: list[torch.Tensor], warmup: int, z0: torch.Tensor) -> list[int]:
    """The paper's reference heuristic, written as plain loops (all rows honest here)."""
    out: list[int] = []
    target = -1
    mu = z = torch.zeros_like(z0)
    for t, grads in enumerate(rounds):
        avg = grads.mean(0)
        if t < warmup:
            if t == 0:
                mu, z = avg, z0
                cumu = sum(((g - mu) @ z) * (g - mu) for g in grads)
                z = cumu / cumu.norm()
            else:
                mu = t / (1 + t) * mu + avg / (1 + t)
                cumu = sum(((g - mu) @ z) * (g - mu) for g in grads)
                z = t / (1 + t) * z + cumu / cumu.norm() / (1 + t)
                z = z / z.norm()
            target = max(range(len(grads)), key=lambda i: float(grads[i] @ z))
        out.append(target)
    return out


def test_mimic_warmup_matches_the_reference_heuristic_and_keeps_state_explicit() -> None:
    gen = torch.Generator().manual_seed(3)
    k, d, warmup = 6, 5, 3
    mal = torch.tensor([F] * k + [T])
    rounds = [torch.randn(k, d, generator=gen, dtype=torch.float64)
              * torch.tensor([4.0, 1, 1, 1, 1], dtype=torch.float64) for _ in range(6)]
    z0 = torch.randn(d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = _mimic_oracle(rounds, warmup, z0)
    atk = get_attack("mimic", warmup=warmup)
    before = dict(vars(atk))
    state: dict[str, Any] = {}
    for t, r in enumerate(rounds):
        x = torch.cat([r, torch.zeros(1, d, dtype=torch.float64)])
        c = ctx(mal, d, state=state, seed=9)
        out = atk(x, c)
        assert int(c.info["target"]) == want[t], t
        assert torch.equal(out[-1], r[want[t]])
    assert state["t"] == len(rounds) and vars(atk) == before
    assert len(set(want[warmup - 1:])) == 1  # fixed after the warm-up


def test_mimic_batched_equals_per_run() -> None:
    gen = torch.Generator().manual_seed(0)
    b, k, d = 3, 6, 4
    x = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    mal = torch.tensor([F, F, F, F, T, T]).expand(b, k)
    part = torch.rand(b, k, generator=gen) < 0.8
    part[:, 4] = True
    atk = get_attack("mimic", target=2)
    out = atk(x, ctx(mal, d, participants=part))
    for r in range(b):
        one = atk(x[r], ctx(mal[r], d, participants=part[r]))
        assert torch.equal(out[r], one)


# --------------------------------------------------------------------------- optimised
def test_ipm_opt_against_the_mean_only_expands() -> None:
    """Against the mean the damage grows with tau, so the search only expands:
    tau = 0, 1, 3, 7 (steps 1, 2, 4) with evals = 4, delta = 1."""
    x = torch.tensor([[1.0, 2.0], [3.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    mal = torch.tensor([F, F, T])
    c = ctx(mal, 2, aggregator=get_defense("mean"))
    out = get_attack("ipm_opt", evals=4, delta=1.0)(x, c)
    assert float(c.info["tau"]) == 7.0
    assert out[2].tolist() == [-14.0, -14.0] and torch.equal(out[:2], x[:2])


def test_alie_opt_against_the_median_by_hand() -> None:
    """Honest 0, 2, 4 (mu = 2, sigma = 2), one attacker: the median of {0, 2, 4, 2 + 2 tau} is
    2 + min(tau, 1), so the damage is min(tau, 1) for tau >= 0: tau = 0 -> 10 (better) ->
    30 (not better, step 20 * 0.8 = 16) -> contraction ... keeps tau = 10."""
    x = torch.tensor([[0.0], [2.0], [4.0], [0.0]], dtype=torch.float64)
    c = ctx(torch.tensor([F, F, F, T]), 1, aggregator=get_defense("median"))
    out = get_attack("alie_opt", evals=6)(x, c)
    assert float(c.info["tau"]) == 10.0 and out[3].tolist() == [22.0]


def test_optimised_needs_the_aggregator() -> None:
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="attack 'alie_opt': needs the deployed aggregator"):
        get_attack("alie_opt")(x, ctx(torch.tensor([F, F, T]), 2))


@pytest.mark.parametrize("mode", ["fill", "reporters"])
def test_optimised_batched_equals_per_run(mode: str) -> None:
    gen = torch.Generator().manual_seed(4)
    b, k, d = 3, 8, 5
    x = torch.randn(b, k, d, generator=gen, dtype=torch.float64)
    m = torch.rand(b, k, d, generator=gen) < 0.7
    mal = (torch.arange(k) >= 6).expand(b, k)
    agg = get_defense("trimmed_mean", f=2, pre=["arc"])
    for name in ("alie_opt", "ipm_opt"):
        atk = get_attack(name, evals=8, mode=mode)
        c = ctx(mal, d, masks=m, aggregator=agg)
        out = atk(x, c)
        for r in range(b):
            cr = ctx(mal[r], d, masks=m[r], aggregator=agg)
            torch.testing.assert_close(out[r], atk(x[r], cr))
            assert float(c.info["tau"][r]) == float(cr.info["tau"])
        unshared = ~m & mal.unsqueeze(-1)
        assert torch.equal(out[unshared], x[unshared])


# --------------------------------------------------------------------------- ByzFL oracle
byzfl = pytest.importorskip("byzfl")


def test_inf_and_mimic_match_byzfl() -> None:
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mal = torch.tensor([F] * 5 + [T] * 2)
    out = get_attack("inf")(x, ctx(mal, 4))
    assert torch.equal(out[5:], torch.as_tensor(byzfl.Inf()(x[:5].numpy())).expand(2, 4))
    for eps in range(5):
        out = get_attack("mimic", target=eps)(x, ctx(mal, 4))
        ref = torch.as_tensor(byzfl.Mimic(epsilon=eps)(x[:5].numpy()))
        assert torch.equal(out[5], ref) and torch.equal(out[6], ref)


@pytest.mark.parametrize(("n_h", "f"), [(6, 1), (8, 2), (10, 3)])
def test_optimised_attacks_match_byzfl(n_h: int, f: int) -> None:
    """Same line search and objective: the same tau and vector against ByzFL's rules (no
    pre-aggregation; ByzFL's Krum(f + 1) is our krum(f))."""
    d = 6
    for seed in range(3):
        h = torch.randn(n_h, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        x = torch.cat([h, torch.zeros(f, d, dtype=torch.float64)])
        mal = torch.arange(n_h + f) >= n_h
        rules = [(get_defense("median"), byzfl.Median()),
                 (get_defense("trimmed_mean", f=f), byzfl.TrMean(f=f)),
                 (get_defense("krum", f=f), byzfl.Krum(f=f + 1)),
                 (get_defense("mean"), byzfl.Average())]
        for ours, theirs in rules:
            for name, cls in (("alie_opt", byzfl.Optimal_ALittleIsEnough),
                              ("ipm_opt", byzfl.Optimal_InnerProductManipulation)):
                out = get_attack(name)(x, ctx(mal, d, aggregator=ours))
                ref = torch.as_tensor(cls(agg=theirs, pre_agg_list=[], f=f)(h.numpy()))
                torch.testing.assert_close(out[-1], ref, msg=f"{name} vs {theirs}")
