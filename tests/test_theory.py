"""Theory of PSO-Fed under Gaussian poisoning (Lari et al., IEEE TSIPN 2025, arXiv 2403.13108),
including P1's uplink ``next`` (Gogineni et al., ICASSP 2022, arXiv 2110.06556).

Oracles: exact LMS results for one client (by hand), the four-scalar recursion where it applies
(an independent derivation), and the batched engine on a reduced grid (the full grid:
benchmarks/theory_grid.py).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from psfed_robust.engine import OnlineConfig, run_online, theory
from psfed_robust.engine.theory_next import participation_law

#: P2-style linear setting (P2: K = 50, D = 32, 5 attackers, p_a = 0.5, σ_δ = 1)
P2 = OnlineConfig(
    task="linear", num_clients=50, dim=32, participants=10, share_count=4, stepsize=0.02,
    iterations=1500, runs=100, uplink="independent", attack="gaussian",
    attack_params={"p_a": 0.5, "sigma": 1.0}, num_malicious=5, noise_var=0.01,
    record_every=10, seed=2024)
#: the small setting of the simulation tests (as benchmarks/theory_grid.py's base)
SMALL = OnlineConfig(
    task="linear", num_clients=20, dim=16, participants=5, share_count=4, stepsize=0.05,
    iterations=600, runs=256, uplink="next", attack="gaussian",
    attack_params={"p_a": 0.5, "sigma": 1.0}, num_malicious=3, noise_var=0.01,
    test_mse="expected", record_every=10, seed=15)


def _persistent(cfg: OnlineConfig) -> OnlineConfig:
    if "attack_persistent" in OnlineConfig.__dataclass_fields__:
        return cfg.replace(attack_persistent=True)
    return cfg.replace(attack_params={**cfg.attack_params, "persistent": True})


def _db(x: float) -> float:
    return 10 * math.log10(x)


def test_mean_stability_bound() -> None:
    assert theory.mean_stability_bound(2.0) == pytest.approx(1.0)
    assert theory.mean_stability_bound([0.5, 4.0, 1.0]) == pytest.approx(0.5)
    R = np.stack([np.diag([1.0, 3.0]), np.array([[2.0, 1.0], [1.0, 2.0]])])
    assert theory.mean_stability_bound(R) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        theory.mean_stability_bound(0.0)


def test_single_client_reduces_to_exact_lms_with_gaussian_inputs() -> None:
    """K = 1, M = D: EMSE = μσ_ν² tr(R) / (2 − μ(tr(R) + 2σ²)) for white Gaussian x."""
    D, mu, sx, sn = 16, 0.02, 1.5, 0.1
    cfg = OnlineConfig(task="linear", num_clients=1, participants=1, dim=D, share_count=D,
                       stepsize=mu, input_var=sx, noise_var=sn)
    emse = mu * sn * D * sx / (2 - mu * sx * (D + 2))
    assert theory.steady_state(cfg) == pytest.approx(sn + emse, rel=1e-10)
    assert theory.max_stable_stepsize(cfg) == pytest.approx(2 / (sx * (D + 2)), rel=1e-4)


@pytest.mark.parametrize("coordinated,selection", [(False, "random"), (True, "random"),
                                                   (True, "round_robin")])
def test_uplink_next_single_client_is_plain_lms(coordinated: bool, selection: str) -> None:
    """K = 1, uplink next, any M: the client merges back exactly what it sent, so its model is
    plain LMS and every global coordinate is a past copy of it: global = local = LMS. A
    persistent attack adds p_a σ_δ² per step: l = (η + p_a σ_δ²)/(1 − ρ) (by hand)."""
    D, mu, sx, sn = 16, 0.03, 1.2, 0.05
    cfg = OnlineConfig(task="linear", num_clients=1, participants=1, dim=D, share_count=3,
                       stepsize=mu, input_var=sx, noise_var=sn, uplink="next",
                       coordinated=coordinated, selection=selection)
    emse = mu * sn * D * sx / (2 - mu * sx * (D + 2))
    kind = "rr" if selection == "round_robin" else "coordinated" if coordinated else "classes"
    assert theory.method(cfg) == kind and theory.is_exact(cfg)
    assert theory.steady_state(cfg) == pytest.approx(sn + emse, rel=1e-9)
    assert theory.steady_state_local(cfg) == pytest.approx(sn + emse, rel=1e-9)
    pa, sig = 0.3, 0.4
    att = _persistent(cfg.replace(attack="gaussian", attack_params={"p_a": pa, "sigma": sig},
                                  num_malicious=1))
    rho = 1 - 2 * mu * sx + (D + 2) * mu * mu * sx * sx
    l_post = (mu * mu * sx * sn + pa * sig * sig) / (1 - rho)
    assert theory.steady_state(att) == pytest.approx(sn + sx * D * l_post, rel=1e-9)
    if selection == "round_robin":  # the mean-square limit of LMS as well
        assert theory.max_stable_stepsize(cfg) == pytest.approx(2 / (sx * (D + 2)), rel=1e-4)


def test_class_recursion_equals_scalar_recursion_where_both_apply() -> None:
    """Uplink independent and M = D (today's four-scalar theory): the class-resolved recursion
    gives the same steady states, learning curves and local MSE to rounding."""
    cases = [P2, P2.replace(share_count=32), P2.replace(server_weight="all"),
             P2.replace(share_count=8, scheduling="bernoulli", p_c=0.2, server_weight="expected"),
             P2.replace(share_count=32, scheduling="bernoulli", p_c=0.2, server_weight="all"),
             P2.replace(num_clients=12, participants=3, local_mse="test")]
    for cfg in cases:
        a = theory.recursion(cfg)
        b = theory.recursion(cfg, force="classes")
        assert a.method == "scalar" and b.method == "classes"
        sa = np.linalg.solve(np.eye(4) - a.F, a.f)
        sb = np.linalg.solve(np.eye(b.f.size) - b.F, b.f)
        assert b.mse(sb) == pytest.approx(a.mse(sa), rel=1e-10)
        assert b.local(sb) == pytest.approx(a.local(sa), rel=1e-10)
        x, y = a.s0, b.s0
        for _ in range(200):
            x, y = a.F @ x + a.f, b.F @ y + b.f
            assert b.mse(y) == pytest.approx(a.mse(x), rel=1e-10)
        ra = np.abs(np.linalg.eigvals(a.F)).max()
        assert np.abs(np.linalg.eigvals(b.F)).max() == pytest.approx(ra, rel=1e-9)


def test_full_sharing_makes_uplink_and_coordination_irrelevant() -> None:
    """M = D: uplink next/same/independent, coordinated or not, give today's result."""
    ref = theory.steady_state(P2.replace(share_count=32))
    for up in ("next", "same", "independent"):
        for coord in (False, True):
            cfg = P2.replace(share_count=32, uplink=up, coordinated=coord)
            assert theory.steady_state(cfg) == pytest.approx(ref, rel=1e-12)
    # options only the class recursion covers, at M = D, agree with next at M = D
    cfg = P2.replace(share_count=32, nonparticipant_updates=False)
    assert theory.method(cfg) == "classes"
    assert theory.steady_state(cfg) == pytest.approx(
        theory.steady_state(cfg.replace(uplink="next")), rel=1e-12)


def test_stepsize_polynomial_is_exact() -> None:
    """F(μ) is quadratic in μ: the cached interpolation equals a direct build at any μ."""
    for cfg in (SMALL, SMALL.replace(coordinated=True),
                _persistent(SMALL.replace(scheduling="bernoulli", p_c=0.3,
                                          nonparticipant_updates=False))):
        kind = theory.method(cfg)
        for mu in (0.013, 0.0731, 0.21):
            rec = theory.recursion(cfg, mu)
            F, f = theory._class_map(cfg, kind, mu)
            np.testing.assert_allclose(rec.F, F, atol=1e-12)
            np.testing.assert_allclose(rec.f, f, atol=1e-14)


def test_participation_law_moments() -> None:
    """W(r, a, b) = E[ω^r 1{N≥1} Π_a χ Π_b (1 − χ)]: Bernoulli factorises, fixed is
    hypergeometric."""
    law = participation_law(10, "bernoulli", 1, 0.3, "all")
    assert law.W(0, 2, 1) == pytest.approx(0.3 * 0.3 * 0.7)
    assert law.W(2, 1, 0) == pytest.approx(0.3 / 100)
    assert law.p0 == pytest.approx(0.7 ** 10)
    fixed = participation_law(10, "fixed", 4, 0.4, "participants")
    assert fixed.W(1, 2, 1) == pytest.approx(4 * 3 * 6 / (10 * 9 * 8) / 4)
    assert fixed.W(0, 5, 0) == 0.0


def test_learning_curve_starts_at_prior_and_ends_at_steady_state() -> None:
    for cfg in (P2.replace(iterations=3000), SMALL.replace(iterations=3000),
                SMALL.replace(iterations=3000, coordinated=True)):
        lc = theory.learning_curve(cfg)
        assert lc.shape == (3001,)
        assert lc[0] == pytest.approx(cfg.noise_var + cfg.input_var)  # σ_w² = 1/D
        assert lc[-1] == pytest.approx(theory.steady_state(cfg), rel=1e-6)
        loc = theory.local_learning_curve(cfg)
        assert loc[-1] == pytest.approx(theory.steady_state_local(cfg), rel=1e-6)


def test_unsupported_configurations_are_named() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"task": "rff", "dim": 32, "share_count": 4}, "task='rff'"),
        ({"defense": "median"}, "defense='median'"),
        ({"attack": "sign_flip", "attack_params": {}}, "attack='sign_flip'"),
        ({"attack_params": {"p_a": 0.5, "sigma": 1.0, "extra": 1}}, "extra"),
        ({"coordinated": True, "uplink": "same"}, "coordinated=True with uplink='same'"),
        ({"uplink": "same", "nonparticipant_updates": False}, "uplink='same'"),
    ]
    for changes, needle in cases:
        with pytest.raises(NotImplementedError, match=needle):
            theory.check_supported(P2.replace(**changes))
    # covered now: uplink next (coordinated or not), Bernoulli with 'participants' weights,
    # no non-participant updates, persistent attacks, round robin (as an approximation)
    for changes in ({"uplink": "next"}, {"uplink": "next", "coordinated": True},
                    {"scheduling": "bernoulli", "p_c": 0.2},
                    {"nonparticipant_updates": False}, {"selection": "round_robin"}):
        theory.check_supported(P2.replace(**changes))
    theory.check_supported(_persistent(P2.replace(uplink="next")))
    assert not theory.is_exact(P2.replace(selection="round_robin"))
    assert theory.is_exact(P2.replace(selection="round_robin", coordinated=True))
    assert theory.is_exact(P2.replace(selection="round_robin", share_count=32))


def test_partial_sharing_attenuates_only_with_a_fresh_uplink() -> None:
    """Uplink independent/next: MSE falls with M; uplink same: M barely matters."""
    for up in ("independent", "next"):
        v = [theory.steady_state(P2.replace(share_count=m, uplink=up)) for m in (1, 4, 32)]
        assert v[0] < v[1] < v[2] and _db(v[2] / v[0]) > 10
    same = [theory.steady_state(P2.replace(share_count=m, uplink="same")) for m in (1, 4, 32)]
    assert abs(_db(same[2] / same[0])) < 0.5


def test_optimal_stepsize_is_interior_minimum() -> None:
    for cfg in (P2, P2.replace(uplink="next"), P2.replace(uplink="next", coordinated=True)):
        mu_star, mse_star = theory.optimal_stepsize(cfg)
        mu_max = theory.max_stable_stepsize(cfg)
        assert 0.05 * mu_max < mu_star < 0.99 * mu_max
        for f in (0.5, 0.9, 1.1):
            assert theory.steady_state(cfg, mu_star * f) >= mse_star
        assert theory.steady_state(cfg, mu_max * 1.01) == math.inf


def _sim_vs_theory(cfg: OnlineConfig) -> tuple[float, float, float]:
    res = run_online(cfg)
    ss = res.steady_state(0.5)
    diff = ss.global_mse_db - _db(theory.steady_state(cfg))
    ldiff = ss.local_mse_db - _db(theory.steady_state_local(cfg))
    lc = theory.learning_curve(cfg)
    sim = res.global_mse.mean(0)
    worst = 0.0  # transient: mean over windows of 10 records after the first 10 %
    for lo in range(60, cfg.iterations - 100 + 1, 100):
        sel = (res.iterations > lo) & (res.iterations <= lo + 100)
        worst = max(worst, abs(_db(sim[sel].mean() / lc[res.iterations[sel]].mean())))
    return diff, ldiff, worst


@pytest.mark.slow
@pytest.mark.parametrize("name,cfg", [
    ("next", SMALL),
    ("next coordinated", SMALL.replace(coordinated=True)),
    ("next bernoulli participants, no np updates",
     SMALL.replace(scheduling="bernoulli", p_c=0.3, nonparticipant_updates=False)),
    ("next persistent", _persistent(SMALL)),
    ("round robin coordinated next, M = 3", SMALL.replace(selection="round_robin",
                                                          coordinated=True, share_count=3)),
])
def test_theory_matches_simulation(name: str, cfg: OnlineConfig) -> None:
    """Reduced grid (full grid: benchmarks/theory_grid.py): steady state within 0.3 dB (global
    and local), transient windows within 0.5 dB."""
    diff, ldiff, worst = _sim_vs_theory(cfg)
    assert abs(diff) < 0.3, (name, diff)
    assert abs(ldiff) < 0.3, (name, ldiff)
    assert worst < 0.5, (name, worst)


@pytest.mark.slow
def test_optimal_stepsize_matches_simulated_best() -> None:
    """μ* of uplink next within one step of the best stepsize of a simulated sweep (common
    random numbers across the sweep)."""
    cfg = SMALL.replace(attack_params={"p_a": 0.5, "sigma": 0.5}, noise_var=0.5,
                        iterations=800, runs=64)
    grid = [0.01 * 1.5 ** i for i in range(2, 7)]
    sims = [run_online(cfg.replace(stepsize=m)).steady_state(0.5).global_mse_db for m in grid]
    mu_star, _ = theory.optimal_stepsize(cfg)
    best = int(np.argmin(sims))
    assert abs(math.log(mu_star / grid[best]) / math.log(1.5)) <= 1.0, (mu_star, sims)
