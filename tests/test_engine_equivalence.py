"""With M = D the batched engine is Online-Fed, bit for bit (P1 arXiv 2110.06556).

The reference below is Online-Fed written plainly: a per-iteration, per-run, per-client loop for
the schedule, the downlink (the participant's model becomes the global model) and the server step
``g + Σ_k ω (w_k − g)`` with ``ω = 1/|K_n|``, summed in slot order. It consumes the same random
streams as the engine (documented in ``psfed_robust.engine.schedule``): the ``schedule``
generator's ``rand [B, K]`` keys per iteration (the ``participants`` smallest keys, stable order,
take part) and the data stream of ``psfed_robust.engine.data`` built from the ``init``/``data``
generators of run block 0. The LMS step is the engine's own arithmetic (the torch reference of
``LocalStep``: ``e = y − s·vecdot(w, c)``, ``w.addcmul_(c, μ s e)``), applied to the same
``[R, K, D]`` batch so that torch's vectorised loops round alike; the test MSE uses the same
batched ``vecdot``. Everything the round core does is written out here independently.
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


def reference_online_fed(cfg: OnlineConfig) -> tuple[np.ndarray, np.ndarray]:
    """Online-Fed written plainly; returns per-run global test MSE [R, T] and final models."""
    R, K, D, P = cfg.runs, cfg.num_clients, cfg.dim, cfg.participants
    dtype = cfg.torch_dtype
    mu = float(cfg.stepsize)
    stream = make_stream(cfg, R, 0, torch.device("cpu"))
    sched = block_generator(cfg.seed, "schedule", 0)
    local = torch.zeros((R, K, D), dtype=dtype)
    glob = [torch.zeros(D, dtype=dtype) for _ in range(R)]
    mse = np.zeros((R, cfg.iterations))
    scale = stream.feature_scale
    for n in range(cfg.iterations):
        keys = torch.rand((R, K), generator=sched, dtype=dtype)
        chosen = [sorted(torch.argsort(keys[r], stable=True)[:P].tolist()) for r in range(R)]
        for r in range(R):
            for k in chosen[r]:  # downlink: the participant's model becomes the global model
                local[r, k] = glob[r]
        y = stream.advance()
        c = stream.features(0, R, torch.empty((R, K, D), dtype=dtype))
        pred = torch.linalg.vecdot(local, c)  # every client: one LMS step on its new sample
        e = y - (pred * scale if scale != 1.0 else pred)
        local.addcmul_(c, (e * (mu * scale)).unsqueeze(-1))
        for r in range(R):
            omega = torch.tensor(1.0, dtype=dtype) / len(chosen[r])  # 1/|K_n|
            acc = torch.zeros(D, dtype=dtype)
            for k in chosen[r]:
                acc = acc + (local[r, k] - glob[r]) * omega
            glob[r] = glob[r] + acc
        g = torch.stack(glob)
        res = (stream.test_targets - torch.linalg.vecdot(stream.test_features, g[:, None, :]))
        mse[:, n] = (res.double() ** 2).mean(-1).numpy()
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
    res = run_online(cfg, use_kernels=False)  # one path: the torch reference
    assert res.metadata["engine_kernels"] == "torch"
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
