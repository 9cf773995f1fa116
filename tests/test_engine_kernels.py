"""Compiled engine kernels (psfed_robust.engine._kernels) against their torch/numpy twins.

Every compiled path has a plain fallback that must give the same bits, so results never depend
on whether a C++ compiler was available; the tests that need the compiled module skip without it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psfed_robust.engine import _kernels
from psfed_robust.engine.data import rff_cos
from psfed_robust.engine.masks import floyd_indices, floyd_masks
from psfed_robust.engine.online import OnlineConfig, run_online, schedule

needs_cpp = pytest.mark.skipif(not _kernels.available(), reason="no C++ compiler / kernel build")

SMALL = OnlineConfig(num_clients=12, dim=30, iterations=60, runs=4, participants=5,
                     share_count=6, record_every=5, seed=1)


@needs_cpp
@pytest.mark.parametrize(("rows", "dim", "count"),
                         [(1, 5, 2), (300, 20, 3), (300, 20, 17), (9000, 200, 40),
                          (600, 4096, 100), (5000, 30, 15), (40, 3000, 2999), (7, 7, 7)])
def test_floyd_cpp_draws_the_numpy_picks(rows: int, dim: int, count: int) -> None:
    for fn in (floyd_indices, floyd_masks):
        a = fn(rows, dim, count, torch.Generator().manual_seed(rows + dim), backend="numpy")
        b = fn(rows, dim, count, torch.Generator().manual_seed(rows + dim), backend="cpp")
        assert torch.equal(a, b)


def test_floyd_backend_is_validated() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        floyd_indices(3, 10, 2, torch.Generator(), backend="gpu")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_schedule_kernel_selects_like_torch(dtype: torch.dtype) -> None:
    cfg = SMALL.replace(num_clients=50, participants=17)
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        keys = (torch.rand((9, 50), generator=gen) * 8).floor().to(dtype)  # many ties
        idx_t, _ = schedule(keys, cfg)
        idx_k, _ = schedule(keys, cfg, _kernels.load())
        assert torch.equal(idx_t, idx_k)


@pytest.mark.parametrize("dim", [1, 31, 32, 33, 200])
def test_lane_dot_torch_is_the_documented_order(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    w, c = torch.randn((3, dim), generator=gen), torch.randn((3, dim), generator=gen)
    got = _kernels.lane_dot_torch(w, c)
    for r in range(3):
        prod = (w[r] * c[r]).numpy()
        acc = np.zeros(_kernels.LANES, dtype=np.float32)
        for d in range(dim):
            acc[d % _kernels.LANES] += prod[d]
        h = _kernels.LANES // 2
        while h:
            acc = acc[:h] + acc[h : 2 * h]
            h //= 2
        assert got[r].item() == acc[0]


def test_rff_cos_float32_accuracy_and_float64_is_torch() -> None:
    a = torch.linspace(-1e4, 1e4, 400_001)
    err = (rff_cos(a.clone()).double() - torch.cos(a.double())).abs().max().item()
    assert err < 3e-7
    small = torch.linspace(-7, 7, 10_001)
    assert (rff_cos(small.clone()).double() - torch.cos(small.double())).abs().max() < 2.5e-7
    b = torch.linspace(-50, 50, 1001, dtype=torch.float64)
    assert torch.equal(rff_cos(b.clone()), torch.cos(b))
    assert math.isclose(float(rff_cos(torch.zeros(1))[0]), 1.0)


@needs_cpp
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"selection": "round_robin"},
        {"selection": "round_robin", "coordinated": True, "uplink": "same"},
        {"selection": "round_robin", "attack": "gaussian", "num_malicious": 2,
         "attack_params": {"p_a": 1.0, "sigma": 0.1}},
        {"coordinated": True},
        {"uplink": "same"},
        {"uplink": "independent"},
        {"scheduling": "bernoulli", "p_c": 0.3},
        {"nonparticipant_updates": False},
        {"dtype": "float64"},
        {"task": "linear", "stepsize": 0.02},
        {"attack": "gaussian", "num_malicious": 3, "attack_params": {"p_a": 0.5, "sigma": 0.3}},
        {"defense": "median"},
        {"aggregation_mode": "reporters"},
        {"share_count": 30},
        {"input_dim": 7},
        {"local_mse": "test"},
        {"dim": 200, "share_count": 40, "num_clients": 30, "participants": 10, "runs": 9,
         "run_block": 5},
    ],
)
def test_compiled_and_torch_paths_give_the_same_bits(changes: dict[str, object]) -> None:
    cfg = SMALL.replace(**changes)
    a = run_online(cfg)
    b = run_online(cfg, use_kernels=False)
    assert a.metadata["engine_kernels"] == "cpp" and b.metadata["engine_kernels"] == "torch"
    assert np.array_equal(a.global_mse, b.global_mse)
    assert np.array_equal(a.local_mse, b.local_mse)
    assert np.array_equal(a.final_global_model, b.final_global_model)


@needs_cpp
def test_long_p1_like_run_same_bits_and_block_workers_do_not_matter() -> None:
    cfg = OnlineConfig(num_clients=40, dim=200, iterations=400, runs=6, participants=16,
                       share_count=40, record_every=20, seed=7, run_block=2)
    a = run_online(cfg, block_workers=2)
    b = run_online(cfg, block_workers=1)
    c = run_online(cfg, use_kernels=False)
    assert a.metadata["block_workers"] == 2 and b.metadata["block_workers"] == 1
    assert np.array_equal(a.global_mse, b.global_mse)
    assert np.array_equal(a.global_mse, c.global_mse)
    assert np.array_equal(a.final_global_model, c.final_global_model)


def test_disabled_kernels_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSFED_NO_CPP_KERNEL", "1")
    assert _kernels.load() is None
    res = run_online(SMALL)
    assert res.metadata["engine_kernels"] == "torch"
    assert np.isfinite(res.global_mse).all()


@pytest.mark.parametrize("backend", ["auto", "numpy", "torch"])
def test_compact_index_lists_hold_the_same_values(backend: str) -> None:
    for count in (3, 17):
        a = floyd_indices(500, 20, count, torch.Generator().manual_seed(2), backend=backend)
        b = floyd_indices(500, 20, count, torch.Generator().manual_seed(2), backend=backend,
                          dtype=torch.int16)
        assert b.dtype == torch.int16 and torch.equal(a, b.long())
    with pytest.raises(ValueError, match="int16 for dim <= 32767"):
        floyd_indices(2, 40000, 3, torch.Generator(), dtype=torch.int16)
