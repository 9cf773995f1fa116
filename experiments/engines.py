"""Adapters from a scenario's sweep point to the engines (batched online engine, Flower)."""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.driver import PointResult
from experiments.registry_check import attack_params, defense_params
from experiments.schema import ScenarioError, SweepPoint

__all__ = ["online_config", "run_batched_point", "run_flower_point", "theory_for_point"]


def share_count(point: SweepPoint) -> int:
    """M: ``sharing.count`` when set, else ``round(fraction·D)`` (at least 1)."""
    dim = int(point.get("task.dim"))
    count = int(point.get("sharing.count"))
    if count > 0:
        return count
    return max(1, min(dim, int(np.floor(float(point.get("sharing.fraction")) * dim + 0.5))))


def online_config(point: SweepPoint, seed: int, runs: int | None = None) -> Any:
    """The :class:`~psfed_robust.engine.OnlineConfig` of a batched sweep point."""
    from psfed_robust.engine import OnlineConfig

    selector = point.get("sharing.selector")
    if selector not in ("random", "round_robin"):
        raise ScenarioError(
            f"sweep point {point.index}: sharing.selector {selector!r} is not available in the "
            "batched engine; allowed values: 'random', 'round_robin'"
        )
    attack = point.get("attack.name")
    malicious = int(point.get("attack.malicious"))
    params = (
        attack_params(attack, dict(point.get("attack.params")), float(point.get("attack.p_a")))
        if attack != "none"
        else {}
    )
    defense = point.get("defense.name")
    sched = point.get("federation.scheduling")
    weight = point.get("federation.server_weight")
    p_c = float(point.get("federation.p_c")) if sched == "bernoulli" else None
    try:
        return OnlineConfig(
            task=point.get("task.kind"),
            num_clients=int(point.get("federation.clients")),
            dim=int(point.get("task.dim")),
            input_dim=int(point.get("task.input_dim")),
            kernel_width=float(point.get("task.kernel_width")),
            iterations=int(point.get("rounds")),
            runs=int(runs if runs is not None else point.get("runs")),
            seed=int(seed),
            stepsize=float(point.get("federation.stepsize")),
            scheduling=sched,
            participants=int(point.get("federation.participants")),
            p_c=p_c,
            share_count=share_count(point),
            selection=selector,
            coordinated=bool(point.get("sharing.coordinated")),
            uplink=point.get("sharing.uplink"),
            server_weight=weight,
            attack=attack if malicious > 0 else "none",
            attack_params=params if malicious > 0 else {},
            num_malicious=malicious if attack != "none" else 0,
            defense=defense,
            defense_params=defense_params(defense, dict(point.get("defense.params"))),
            aggregation_mode=point.get("defense.mode"),
            input_var=float(point.get("task.input_var")),
            noise_var=float(point.get("task.noise_var")),
            num_test=int(point.get("task.num_test")),
            record_every=int(point.get("output.record_every")),
        )
    except ValueError as exc:
        raise ScenarioError(f"sweep point {point.index} ({point.label}): {exc}") from exc


def _device(point: SweepPoint) -> str:
    dev = str(point.get("device"))
    if dev == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev


def theory_for_point(point: SweepPoint) -> dict[str, float] | None:
    """Theory prediction for a batched point, when the analysis covers its configuration.

    Covered (psfed_robust.engine.theory.check_supported): linear task, random uncoordinated
    selection, uplink same/independent, Gaussian transmit-only or no attack, mean in fill mode.
    """
    if point.get("engine") != "batched":
        return None
    import math

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
    }


def run_batched_point(point: SweepPoint, seed: int, *, progress: bool = False) -> PointResult:
    """Run one sweep point on the batched engine (all Monte Carlo runs at once)."""
    from psfed_robust.engine import run_online

    cfg = online_config(point, seed)
    res = run_online(cfg, device=_device(point), progress=progress)
    th = theory_for_point(point)
    info = {"seconds": round(res.seconds, 3), "share_count": cfg.share_count,
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

    return _run(point, seed, progress=progress)
