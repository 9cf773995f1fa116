"""A fake engine for driver tests: deterministic curves from the seed, no torch work.

Each run's curve is ``base * (1 + 0.1 u)`` with ``u`` uniform from the point's seed and ``base``
a function of the point's setting, so a row carrying another setting's data is detected; a point
whose ``attack.params.sigma`` is 99 diverges to NaN (run 0) and one with sigma 77 blows up to 1e9.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.results import PointResult


def fake_run_point(point: Any, seed: int, *, progress: bool = False) -> PointResult:
    del progress
    rng = np.random.default_rng(seed)
    runs, rounds, every = int(point.get("runs")), int(point.get("rounds")), int(
        point.get("output.record_every"))
    recorded = np.arange(every, rounds + 1, every)
    base = 0.01 * (1 + float(point.get("sharing.fraction"))) * (1 + int(point.get(
        "attack.malicious")))
    g = base * (1 + 0.1 * rng.random((runs, recorded.size)))
    loc = 2 * g
    sigma = (point.get("attack.params") or {}).get("sigma")
    if sigma == 99.0:
        g[0, recorded.size // 2:] = np.nan
    if sigma == 77.0:
        g[:] = 1e9
    return PointResult(rounds=recorded, metrics={"global_mse": g, "local_mse": loc},
                       info={"fake": True, "base": base})
