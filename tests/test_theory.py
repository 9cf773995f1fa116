"""Theory of PSO-Fed under Gaussian poisoning (Lari et al., IEEE TSIPN 2025, arXiv 2403.13108)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from psfed_robust.engine import OnlineConfig, run_online, theory

#: P2's linear setting (Lari et al.): the shipped scenario experiments/scenarios/p2_theory.toml
P2_BASE = OnlineConfig(
    task="linear", num_clients=50, dim=32, participants=10, share_count=4, stepsize=0.02,
    iterations=1500, runs=100, selection="random", coordinated=False, uplink="independent",
    server_weight="participants", attack="gaussian",
    attack_params={"p_a": 0.5, "sigma": 1.0, "persistent": False}, num_malicious=5,
    noise_var=0.01, input_var=1.0, test_mse="sample", record_every=10, seed=2024,
)
STEADY_WINDOW = 0.6  # fraction of the records averaged for the steady state


def validation_configs(runs: int = 100, iterations: int = 1500) -> list[OnlineConfig]:
    """The 6 attacked settings (M = 4, 8, 32 = D; mu = 0.02, 0.05) of p2_theory.toml."""
    return [P2_BASE.replace(share_count=m, stepsize=mu, runs=runs, iterations=iterations)
            for m in (4, 8, 32) for mu in (0.02, 0.05)]


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
    # the mean-square limit of LMS: μ < 2 / (σ²(D + 2))
    assert theory.max_stable_stepsize(cfg) == pytest.approx(2 / (sx * (D + 2)), rel=1e-4)


def test_learning_curve_starts_at_prior_and_ends_at_steady_state() -> None:
    cfg = P2_BASE.replace(iterations=3000)
    lc = theory.learning_curve(cfg)
    assert lc.shape == (3001,)
    assert lc[0] == pytest.approx(cfg.noise_var + cfg.input_var * cfg.dim * (1 / cfg.dim))
    assert lc[-1] == pytest.approx(theory.steady_state(cfg), rel=1e-6)


def test_unsupported_configurations_are_named() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"task": "rff", "dim": 32, "share_count": 4}, "task='rff'"),
        ({"uplink": "next"}, "uplink='next'"),
        ({"coordinated": True}, "coordinated"),
        ({"selection": "round_robin"}, "round_robin"),
        ({"attack_params": {"p_a": 0.5, "sigma": 1.0, "persistent": True}}, "persistent"),
        ({"defense": "median"}, "defense='median'"),
        ({"scheduling": "bernoulli", "p_c": 0.2}, "participants"),
        ({"nonparticipant_updates": False}, "nonparticipant_updates"),
    ]
    for changes, needle in cases:
        with pytest.raises(NotImplementedError, match=needle):
            theory.recursion(P2_BASE.replace(**changes))
    # M = D makes selection and uplink irrelevant
    theory.recursion(P2_BASE.replace(share_count=32, uplink="next", coordinated=True))


def test_partial_sharing_attenuates_only_with_a_fresh_uplink() -> None:
    """Uplink independent: MSE falls with M; uplink same: M barely matters; no attack: flat."""
    ind = [theory.steady_state(P2_BASE.replace(share_count=m)) for m in (1, 4, 32)]
    same = [theory.steady_state(P2_BASE.replace(share_count=m, uplink="same"))
            for m in (1, 4, 32)]
    clean = [theory.steady_state(P2_BASE.replace(share_count=m, attack="none"))
             for m in (1, 4, 32)]
    assert ind[0] < ind[1] < ind[2] and 10 * math.log10(ind[2] / ind[0]) > 10
    assert abs(10 * math.log10(same[2] / same[0])) < 0.5
    assert abs(10 * math.log10(clean[2] / clean[0])) < 0.5


def test_optimal_stepsize_is_interior_minimum() -> None:
    cfg = P2_BASE.replace(share_count=4)
    mu_star, mse_star = theory.optimal_stepsize(cfg)
    mu_max = theory.max_stable_stepsize(cfg)
    assert 0.05 * mu_max < mu_star < 0.99 * mu_max
    for f in (0.5, 0.9, 1.1):
        assert theory.steady_state(cfg, mu_star * f) >= mse_star
    assert theory.steady_state(cfg, mu_max * 1.01) == math.inf


def test_bernoulli_expected_weights_supported() -> None:
    cfg = P2_BASE.replace(scheduling="bernoulli", p_c=0.2, server_weight="expected")
    assert math.isfinite(theory.steady_state(cfg))


@pytest.mark.slow
def test_theory_matches_simulation_within_0p3_db() -> None:
    """6 attacked settings (M = 4, 8, 32 = D; μ = 0.02, 0.05) plus uplink 'same' and Bernoulli
    scheduling: predicted steady-state global MSE within 0.3 dB of the engine (test MSE taken
    as its expectation over test inputs, σ_ν² + σ_x²‖w° − w‖², to cut estimator noise)."""
    extra = [P2_BASE.replace(share_count=4, uplink="same"),
             P2_BASE.replace(share_count=8, scheduling="bernoulli", p_c=0.2,
                             server_weight="expected")]
    configs = validation_configs(runs=60, iterations=1200) + [
        c.replace(runs=60, iterations=1200) for c in extra]
    worst = 0.0
    for cfg in configs:
        cfg = cfg.replace(test_mse="expected", seed=7)
        res = run_online(cfg)
        ss = res.steady_state(STEADY_WINDOW)
        pred = 10 * math.log10(theory.steady_state(cfg))
        diff = ss.global_mse_db - pred
        worst = max(worst, abs(diff))
        assert abs(diff) < 0.3, (cfg.share_count, cfg.stepsize, ss.global_mse_db, pred)
        # the transient too: mean MSE over iterations 50-150 and 250-350
        lc = theory.learning_curve(cfg, 400)
        sim = res.global_mse.mean(0)
        for lo, hi in ((50, 150), (250, 350)):
            sel = (res.iterations >= lo) & (res.iterations <= hi)
            d = 10 * math.log10(sim[sel].mean() / lc[res.iterations[sel]].mean())
            assert abs(d) < 0.5, (cfg.share_count, cfg.stepsize, lo, d)
    assert worst < 0.3
