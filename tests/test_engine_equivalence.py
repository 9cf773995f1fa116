"""With M = D the batched engine is Online-Fed, bit for bit (psofed-model.md; P1 arXiv 2110.06556).

The reference below is a plain per-iteration, per-run, per-client loop. It consumes the same
random streams as the engine (documented in ``psfed_robust.engine.online``): the ``schedule``
generator's ``rand [B, K]`` keys per iteration (the ``participants`` smallest keys, stable order,
take part) and the data stream of ``psfed_robust.engine.data`` built from the ``init``/``data``
generators of run block 0. The LMS prediction ``wᵀc`` (and the global model's test prediction)
is summed in the engine's documented order
(``psfed_robust.engine._kernels``: 32 lane accumulators, lane ``j`` adding the products of entries
``j, j+32, …`` in turn, then folded by halving), written out here with numpy, elementwise; the
update ``w + (μ s e) c`` rounds the product and the sum separately (no fused multiply-add).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psfed_robust.engine.online import (
    OnlineConfig,
    block_generator,
    make_stream,
    resolve_run_block,
    run_online,
)

LANES = 32


def lane_dot(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``Σ_d w_d c_d`` in the documented order: lane ``j`` sums ``w_d c_d`` for ``d ≡ j`` (mod 32)
    in increasing ``d``, then lanes fold by halving, ``a[j] + a[j + h]`` for h = 16, 8, 4, 2, 1."""
    prod = w.numpy() * c.numpy()
    acc = np.zeros(LANES, dtype=prod.dtype)
    for s in range(0, prod.shape[0], LANES):  # entries s..s+31 go to lanes 0..31
        width = min(LANES, prod.shape[0] - s)
        acc[:width] = acc[:width] + prod[s : s + width]
    h = LANES // 2
    while h >= 1:
        acc = acc[:h] + acc[h : 2 * h]
        h //= 2
    return torch.from_numpy(acc[:1].copy())[0]


def reference_online_fed(cfg: OnlineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Online-Fed written plainly; returns per-run global test MSE [R, T] and final models."""
    R, K, D, P = cfg.runs, cfg.num_clients, cfg.dim, cfg.participants
    dtype = cfg.torch_dtype
    mu = float(cfg.stepsize)
    stream = make_stream(cfg, R, 0, torch.device("cpu"))
    sched = block_generator(cfg.seed, "schedule", 0)
    local = [[torch.zeros(D, dtype=dtype) for _ in range(K)] for _ in range(R)]
    glob = [torch.zeros(D, dtype=dtype) for _ in range(R)]
    mse = np.zeros((R, cfg.iterations))
    for n in range(cfg.iterations):
        keys = torch.rand((R, K), generator=sched, dtype=dtype)
        c, y = stream.next()  # regressors z = scale * c (the engine folds the scale into scalars)
        scale = stream.feature_scale
        for r in range(R):
            chosen = sorted(torch.argsort(keys[r], stable=True)[:P].tolist())
            for k in chosen:  # downlink: the participant's model becomes the global model
                local[r][k] = glob[r].clone()
            for k in range(K):  # every client: one LMS step on its new sample
                pred = lane_dot(local[r][k], c[r, k])
                e = y[r, k] - (pred if scale == 1.0 else pred * scale)
                local[r][k] = local[r][k] + (e * (mu * scale)) * c[r, k]
            omega = torch.tensor(1.0, dtype=dtype) / len(chosen)  # 1/|K_n|
            step = torch.stack([local[r][k] - glob[r] for k in chosen]).sum(0) * omega
            glob[r] = glob[r] + step
            pred = torch.stack([lane_dot(glob[r], z) for z in stream.test_features[r]])
            res = (stream.test_targets[r] - pred).double()
            mse[r, n] = float((res * res).mean())
    return mse, torch.stack(glob).double().numpy()


@pytest.mark.parametrize(
    ("task", "dtype", "dim"),
    [("rff", "float32", 24), ("rff", "float64", 24), ("linear", "float32", 24),
     ("rff", "float32", 200), ("rff", "float32", 37)],
)
def test_online_fed_bit_for_bit(task: str, dtype: str, dim: int) -> None:
    cfg = OnlineConfig(task=task, num_clients=7, dim=dim, input_dim=4, iterations=25, runs=3,
                       participants=3, share_count=dim, stepsize=0.5 if task == "rff" else 0.05,
                       dtype=dtype, seed=11)
    assert resolve_run_block(cfg, torch.device("cpu")) == cfg.runs  # one block
    ref_mse, ref_g = reference_online_fed(cfg)
    res = run_online(cfg)
    assert np.array_equal(res.final_global_model, ref_g)
    assert np.array_equal(res.global_mse, ref_mse)


def test_same_seed_same_trajectory_and_blocks_are_independent_streams() -> None:
    cfg = OnlineConfig(num_clients=10, dim=32, iterations=30, runs=5, participants=4,
                       share_count=8, run_block=2, record_every=3, seed=3)
    a, b = run_online(cfg), run_online(cfg)
    assert np.array_equal(a.global_mse, b.global_mse)
    assert np.array_equal(a.local_mse, b.local_mse)
    c = run_online(cfg.replace(seed=4))
    assert not np.array_equal(a.global_mse, c.global_mse)
    # runs 0-1 (block 0) do not depend on how many runs follow
    d = run_online(cfg.replace(runs=2))
    assert np.array_equal(d.global_mse, a.global_mse[:2])
