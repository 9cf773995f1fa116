"""Data streams of the online engine: P1's RFF benchmark and the linear model."""

from __future__ import annotations

import math

import pytest
import torch

from psfed_robust.engine.data import LinearStream, RFFStream, p1_target, rff_features


def _gens(seed: int = 0) -> tuple[torch.Generator, torch.Generator]:
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)


def test_p1_target_known_values() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0, 0.5], [1.0, 0.0, 2.0, 0.0], [3.0, 1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    expect = [1.0, 1.0 + 0.3 * 2.0, 3.0 + 0.8 - 0.5 * math.exp(-1.0)]
    assert torch.allclose(p1_target(x), torch.tensor(expect, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="input_dim"):
        p1_target(torch.zeros(2, 3))


def test_rff_features_formula() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    om = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    b = torch.rand(2, 8, generator=g, dtype=torch.float64)
    z = rff_features(x, om, b)
    ref = math.sqrt(2 / 8) * torch.cos(torch.einsum("bnl,bld->bnd", x, om) + b[:, None, :])
    assert torch.allclose(z, ref, atol=1e-12)
    assert torch.allclose(rff_features(x, om, b, scaled=False) * math.sqrt(2 / 8), z)


def test_rff_stream_parameters_in_p1_ranges_and_shared_features() -> None:
    init, data = _gens()
    s = RFFStream(runs=3, clients=50, input_dim=4, dim=16, kernel_width=1.0, num_test=20,
                  init_gen=init, data_gen=data)
    assert float(s.theta.min()) >= 0.2 and float(s.theta.max()) <= 0.9
    assert float(s.mean.abs().max()) <= 0.2
    assert float(s.var.min()) >= 0.2 and float(s.var.max()) <= 1.2
    assert float(s.noise_var.min()) >= 0.005 and float(s.noise_var.max()) <= 0.03
    assert s.omega.shape == (3, 4, 16) and s.b.shape == (3, 16)  # one (ω, b) per run
    c, y = s.next()
    assert c.shape == (3, 50, 16) and y.shape == (3, 50)
    assert s.test_features.shape == (3, 20, 16) and s.test_targets.shape == (3, 20)
    # every client's features use the run's single (omega, b)
    z = rff_features(s.x, s.omega, s.b)
    assert torch.allclose(c * s.feature_scale, z)


def test_rff_stream_ar1_statistics() -> None:
    """Stationary per-client law: mean μ sqrt((1+θ)/(1-θ)), variance σ_u², lag-1 corr θ."""
    init, data = _gens(2)
    s = RFFStream(runs=1, clients=4, input_dim=4, dim=8, kernel_width=1.0, num_test=5,
                  init_gen=init, data_gen=data, dtype=torch.float64)
    xs = []
    for _ in range(6000):
        s.next()
        xs.append(s.x.clone())
    X = torch.stack(xs)[:, 0]  # [T, K, L]
    mean = X.mean((0, 2))
    var = X.var((0, 2))
    assert torch.allclose(mean, s.stat_mean[0], atol=0.12)
    assert torch.allclose(var, s.var[0], rtol=0.15)
    x0, x1 = X[:-1] - mean[None, :, None], X[1:] - mean[None, :, None]
    rho = (x0 * x1).mean((0, 2)) / var
    assert torch.allclose(rho, s.theta[0], atol=0.06)


def test_rff_stream_deterministic() -> None:
    a = RFFStream(runs=2, clients=3, input_dim=4, dim=8, kernel_width=1.0, num_test=5,
                  init_gen=_gens(5)[0], data_gen=_gens(5)[1])
    b = RFFStream(runs=2, clients=3, input_dim=4, dim=8, kernel_width=1.0, num_test=5,
                  init_gen=_gens(5)[0], data_gen=_gens(5)[1])
    for _ in range(3):
        assert torch.equal(a.next()[1], b.next()[1])
    assert torch.equal(a.test_features, b.test_features)


def test_rff_stream_rejects_small_inputs_and_zero_init() -> None:
    init, data = _gens()
    with pytest.raises(ValueError, match="input_dim"):
        RFFStream(runs=1, clients=1, input_dim=3, dim=4, kernel_width=1.0, num_test=1,
                  init_gen=init, data_gen=data)
    s = RFFStream(runs=1, clients=2, input_dim=4, dim=4, kernel_width=1.0, num_test=1,
                  init_gen=init, data_gen=data, ar_init="zeros")
    assert float(s.x.abs().max()) == 0.0


def test_linear_stream_model() -> None:
    init, data = _gens(3)
    s = LinearStream(runs=2, clients=4000, dim=6, num_test=10, init_gen=init, data_gen=data,
                     input_var=2.0, noise_var=0.25, dtype=torch.float64)
    x, y = s.next()
    assert s.feature_scale == 1.0
    resid = y - (x * s.wstar[:, None, :]).sum(-1)
    assert abs(float(resid.var()) - 0.25) < 0.03
    assert abs(float(x.var()) - 2.0) < 0.1
    clean = LinearStream(runs=2, clients=1, dim=6, num_test=10, init_gen=_gens(3)[0],
                         data_gen=_gens(3)[1], test_noise=False, dtype=torch.float64)
    assert torch.allclose(clean.test_targets,
                          (clean.test_features * clean.wstar[:, None, :]).sum(-1))
