"""Compiled engine accelerators (psfed_robust.engine.kernels) against their torch/numpy references.

The mask sampler must draw the numpy sampler's picks exactly (integers); the float32 RFF LMS step
must match the torch step of ``LocalStep`` within float32 rounding and treat NaN/Inf alike; a run
with and without the accelerators gives statistically the same results. Tests that need the
compiled library skip without a compiler.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psfed_robust.engine import kernels
from psfed_robust.engine.config import OnlineConfig
from psfed_robust.engine.loop import LocalStep
from psfed_robust.engine.masks import MaskPool, floyd_indices, floyd_masks
from psfed_robust.engine.online import run_online
from psfed_robust.engine.schedule import make_stream

needs_cpp = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler / kernel build")

SMALL = OnlineConfig(num_clients=12, dim=30, iterations=60, runs=4, participants=5,
                     share_count=6, record_every=5, seed=1)

#: the stated tolerance of the compiled LMS step against the torch step (relative, per step)
LMS_RTOL = 2e-5


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
    with pytest.raises(ValueError, match="backend must be one of"):
        MaskPool(10, 2, torch.Generator(), backend="gpu")


def _stepper(cfg: OnlineConfig, compiled: bool) -> tuple[LocalStep, torch.Tensor]:
    stream = make_stream(cfg, cfg.runs, 0, torch.device("cpu"))
    return LocalStep(cfg, stream, cfg.runs, torch.device("cpu"), compiled), stream.advance()


@needs_cpp
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("input_dim", [4, 6])  # the one-pass rows (L = 4) and the any-L path
def test_lms_rff_step_matches_the_torch_step(frozen: bool, input_dim: int) -> None:
    cfg = SMALL.replace(num_clients=9, dim=37, runs=5, input_dim=input_dim)
    ref, y = _stepper(cfg, False)
    fast, y2 = _stepper(cfg, True)
    assert fast.compiled and not ref.compiled and torch.equal(y, y2)
    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn((5, 9, 37), generator=gen)
    part = (torch.rand((5, 9), generator=gen) < 0.5).float() if frozen else None
    Wa, Wb = W0.clone(), W0.clone()
    ea = ref.step(Wa, y, part).clone()
    eb = fast.step(Wb, y, part).clone()
    torch.testing.assert_close(eb, ea, rtol=LMS_RTOL, atol=1e-5)
    torch.testing.assert_close(Wb, Wa, rtol=LMS_RTOL, atol=1e-5)
    if part is not None:  # frozen clients keep their models exactly
        still = part == 0
        assert torch.equal(Wb[still], W0[still]) and torch.equal(Wa[still], W0[still])


@needs_cpp
@pytest.mark.parametrize("input_dim", [4, 6])
def test_lms_rff_step_treats_nan_and_inf_like_torch(input_dim: int) -> None:
    cfg = SMALL.replace(num_clients=4, participants=2, share_count=5, dim=20, runs=3,
                        input_dim=input_dim)
    ref, y = _stepper(cfg, False)
    fast, _ = _stepper(cfg, True)
    W0 = torch.zeros((3, 4, 20))
    W0[0, 1, 3] = float("nan")
    W0[1, 2, 0] = float("inf")
    x = ref.stream.rff_inputs()[0]  # type: ignore[attr-defined]
    x[2, 3, 1] = float("inf")  # cos(±inf) is NaN: the whole row's update becomes NaN
    fast.stream.rff_inputs()[0][2, 3, 1] = float("inf")  # type: ignore[attr-defined]
    Wa, Wb = W0.clone(), W0.clone()
    ea, eb = ref.step(Wa, y, None).clone(), fast.step(Wb, y, None).clone()
    assert torch.equal(torch.isnan(ea), torch.isnan(eb))
    assert torch.equal(torch.isnan(Wa), torch.isnan(Wb))
    assert torch.equal(torch.isinf(Wa), torch.isinf(Wb))
    assert bool(torch.isnan(eb[0, 1])) and bool(torch.isnan(eb[2, 3]))
    finite = torch.isfinite(Wa)
    torch.testing.assert_close(Wb[finite], Wa[finite], rtol=LMS_RTOL, atol=1e-5)


@needs_cpp
def test_lms_rff_step_validates_its_inputs() -> None:
    cfg = SMALL.replace(runs=2)
    fast, y = _stepper(cfg, True)
    with pytest.raises(ValueError, match="W must be a contiguous float32"):
        fast.step(torch.zeros((2, 12, 30), dtype=torch.float64), y, None)


def test_only_float32_rff_on_cpu_is_compiled() -> None:
    for changes in ({"dtype": "float64"}, {"task": "linear", "stepsize": 0.02}):
        step, _ = _stepper(SMALL.replace(**changes), True)  # type: ignore[arg-type]
        assert not step.compiled


@needs_cpp
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"selection": "round_robin"},
        {"scheduling": "bernoulli", "p_c": 0.3},
        {"nonparticipant_updates": False},
        {"attack": "gaussian", "num_malicious": 3, "attack_params": {"p_a": 0.5, "sigma": 0.3}},
        {"defense": "median"},
        {"dim": 200, "share_count": 40, "num_clients": 30, "participants": 10, "runs": 9,
         "run_block": 5},
    ],
)
def test_compiled_and_torch_paths_agree_within_tolerance(changes: dict[str, object]) -> None:
    cfg = SMALL.replace(**changes)
    a = run_online(cfg)
    b = run_online(cfg, use_kernels=False)
    assert a.metadata["engine_kernels"] == "cpp" and b.metadata["engine_kernels"] == "torch"
    # same masks, schedules and data; only float32 rounding of the LMS step differs, and it
    # grows slowly over 60 iterations
    np.testing.assert_allclose(a.global_mse, b.global_mse, rtol=1e-3)
    np.testing.assert_allclose(a.final_global_model, b.final_global_model, rtol=1e-3, atol=1e-4)


@needs_cpp
def test_long_p1_like_run_statistically_the_same_and_block_workers_do_not_matter() -> None:
    cfg = OnlineConfig(num_clients=40, dim=200, iterations=400, runs=6, participants=16,
                       share_count=40, record_every=20, seed=7, run_block=2)
    a = run_online(cfg, block_workers=2)
    b = run_online(cfg, block_workers=1)
    c = run_online(cfg, use_kernels=False)
    assert a.metadata["block_workers"] == 2 and b.metadata["block_workers"] == 1
    assert np.array_equal(a.global_mse, b.global_mse)
    # 400 iterations of chaotic-free LMS: the steady state agrees to a small fraction of a dB
    sa, sc = a.steady_state(0.25).global_mse_db, c.steady_state(0.25).global_mse_db
    assert math.isfinite(sa) and abs(sa - sc) < 0.05


def test_disabled_kernels_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSFED_NO_CPP_KERNEL", "1")
    assert kernels.load() is None
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
