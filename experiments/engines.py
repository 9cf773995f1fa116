"""Run one sweep point on its engine: the batched online engine or Flower."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.configs import online_config
from experiments.keys import NN, engine_label
from experiments.resources import device_of
from experiments.results import PointResult

if TYPE_CHECKING:
    from experiments.schema import SweepPoint

__all__ = ["run_batched_point", "run_flower_point", "run_point", "theory_for_point"]


def theory_for_point(point: SweepPoint) -> dict[str, float] | None:
    """Theory prediction for a batched point, when the analysis covers its configuration.

    Covered (psfed_robust.engine.theory.check_supported, docs/theory.md): linear task, random
    selection (coordinated or not) or round-robin, every uplink (P1's ``next`` included),
    fixed/Bernoulli scheduling with any server weight, Gaussian or no attack (transmit-only or
    persistent), mean in fill mode. ``exact`` is False where the theory is an approximation
    (uncoordinated round-robin, modelled as random selection).
    """
    if engine_label(point.get("engine"), point.get("task.kind")) != "batched":
        return None
    from psfed_robust.engine import theory

    cfg = online_config(point, seed=0, runs=1)
    try:
        theory.check_supported(cfg)
    except (ValueError, NotImplementedError):
        return None
    steady = theory.steady_state(cfg)
    mu_opt, _ = theory.optimal_stepsize(cfg)
    return {
        "steady_db": 10 * math.log10(steady) if math.isfinite(steady) else math.inf,
        "mu_opt": float(mu_opt),
        "exact": bool(theory.is_exact(cfg)),
    }


def run_batched_point(point: SweepPoint, seed: int, *, progress: bool = False) -> PointResult:
    """Run one sweep point on the batched engine (all Monte Carlo runs at once)."""
    from psfed_robust.engine import run_online

    cfg = online_config(point, seed)
    res = run_online(cfg, device=device_of(point), progress=progress)
    th = theory_for_point(point)
    info: dict[str, Any] = {"seconds": round(res.seconds, 3), "share_count": cfg.share_count,
                            "p_e": cfg.p_e, "engine": dict(res.metadata)}
    return PointResult(
        rounds=np.asarray(res.iterations),
        metrics={"global_mse": np.asarray(res.global_mse), "local_mse": np.asarray(res.local_mse)},
        theory_db=None if th is None else th["steady_db"],
        info=info,
    )


def run_flower_point(point: SweepPoint, seed: int, *, progress: bool = False) -> PointResult:
    """Run one sweep point through the Flower engine (PSFedAvg + PSFedClient)."""
    from experiments.flower_engine import run_flower_point as _run

    result: PointResult = _run(point, seed, progress=progress)
    return result


def run_point(point: SweepPoint, seed: int, *, progress: bool = False) -> PointResult:
    """Run ``point`` on the engine its ``engine`` key names."""
    engine = engine_label(point.get("engine"), point.get("task.kind"))
    if engine == NN:  # engine = "batched" with an image task: the batched NN engine
        from experiments.nn_point import run_nn_point

        return run_nn_point(point, seed, progress=progress)
    if engine == "batched":
        return run_batched_point(point, seed, progress=progress)
    return run_flower_point(point, seed, progress=progress)
