"""Sweep points on the batched NN engine: ``engine = "batched"`` with an image task.

:func:`nn_config` maps a point's keys onto :class:`psfed_robust.nn.NNConfig` (the declaration in
:mod:`experiments.keys` says which keys the ``nn`` engine honours; validation refuses the
others); :func:`run_nn_point` runs every Monte Carlo run of the point at once through
:func:`psfed_robust.nn.run_nn` and returns the driver's :class:`PointResult` — per recorded round
``accuracy``, ``loss``, ``bytes_down``, ``bytes_up`` and, for data attacks, ``asr`` (the same
metric names as the Flower engine, so summary.csv rows read alike). :func:`check_nn_resources`
refuses a point whose state would not fit in memory, before any work.

Seeds: the point seed is the engine's scenario seed; run ``r`` is seeded as the Flower engine
seeds it, so both engines draw the same split, initial model, masks and batches for a point.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.configs import attack_params_of, build_config, defense_params_of
from experiments.keys import ScenarioError, key
from experiments.results import PointResult

if TYPE_CHECKING:
    from experiments.schema import SweepPoint
    from psfed_robust.nn import NNConfig

__all__ = ["FIELD_KEYS", "check_nn_resources", "estimate_nn_bytes", "nn_config", "run_nn_point"]

#: NNConfig field -> the scenario key that sets it (error messages name the key)
FIELD_KEYS: dict[str, str] = {
    "task": "task.kind", "data_dir": "task.data_dir", "model": "task.model",
    "hidden": "task.hidden", "clients": "federation.clients",
    "participants": "federation.participants", "runs": "runs", "seed": "seed",
    "rounds": "rounds", "partition": "task.partition", "dirichlet_alpha": "task.dirichlet_alpha",
    "lr": "task.lr", "momentum": "task.momentum", "momentum_scope": "task.momentum_scope",
    "weight_decay": "task.weight_decay", "local_epochs": "task.local_epochs",
    "local_steps": "task.local_steps", "batch_size": "task.batch_size",
    "lr_schedule": "task.lr_schedule", "lr_gamma": "task.lr_gamma",
    "lr_step_rounds": "task.lr_step_rounds", "selector": "sharing.selector",
    "fraction": "sharing.fraction", "attack": "attack.name", "attack_params": "attack.params",
    "malicious": "attack.malicious", "persistent": "attack.persistent",
    "defense": "defense.name", "defense_params": "defense.params", "mode": "defense.mode",
    "record_every": "output.record_every", "device": "device",
}
_DIRECT = {f: k for f, k in FIELD_KEYS.items()
           if f not in ("seed", "runs", "attack", "attack_params", "malicious", "defense_params")}


def nn_config(point: SweepPoint, seed: int = 0, runs: int | None = None) -> NNConfig:
    """The :class:`~psfed_robust.nn.NNConfig` of ``point`` (``seed``: the point seed)."""
    from psfed_robust.nn import NNConfig

    kw: dict[str, Any] = {f: point.get(k) for f, k in _DIRECT.items()}
    where = f"sweep point {point.index} ({point.label})"
    task = point.config["task"]
    unused = [  # (key, condition under which it would be silently ignored, why)
        ("task.hidden", kw["model"] != "mlp", f"it sizes the MLP only, task.model is "
         f"{kw['model']!r}"),
        ("task.local_epochs", kw["local_steps"] > 0, "task.local_steps > 0 replaces epochs"),
        ("task.lr_gamma", kw["lr_schedule"] != "step", "only the step schedule uses it"),
        ("task.lr_step_rounds", kw["lr_schedule"] != "step", "only the step schedule uses it"),
    ]
    for name, ignored, why in unused:
        if ignored and task[name.split(".", 1)[1]] != key(name).default:
            raise ScenarioError(f"{name}: {where}: would be ignored ({why}); remove it")
    attack = str(point.get("attack.name"))
    malicious = int(point.get("attack.malicious"))
    armed = attack != "none" and malicious > 0
    kw.update(seed=int(seed), runs=int(runs if runs is not None else point.get("runs")),
              attack=attack if armed else "none",
              attack_params=attack_params_of(point) if armed else {},
              malicious=malicious if armed else 0,
              defense_params=defense_params_of(point))
    return build_config(NNConfig, kw, point, FIELD_KEYS)


def estimate_nn_bytes(point: SweepPoint) -> int:
    """Lower-bound memory of the point: every client's state and round working set (about
    ``28 P`` bytes per client, ``+4 P`` with worker momentum; docs/nn.md) plus the training
    chunk budget."""
    from psfed_robust.core.flatten import FlattenedModel
    from psfed_robust.nn import build_model
    from psfed_robust.nn.data import IMAGE_SHAPES

    cfg = nn_config(point)
    shape = IMAGE_SHAPES[cfg.task]
    P = FlattenedModel(build_model(cfg.model, shape, 10, hidden=cfg.hidden)).num_parameters
    per_client = 28 * P + (4 * P if cfg.momentum_scope == "persistent" else 0)
    return int(cfg.runs * cfg.clients * per_client + cfg.memory_budget_mb * 2**20)


def check_nn_resources(point: SweepPoint) -> None:
    """Refuse a point that cannot run here: no CUDA for ``device = 'cuda'``, too little memory."""
    from experiments.resources import require_memory

    require_memory(point, estimate_nn_bytes(point), "federation.clients",
                   f"model {point.get('task.model')}", "lower federation.clients or runs")


def run_nn_point(point: SweepPoint, seed: int, *, progress: bool = False) -> PointResult:
    """Run every Monte Carlo run of ``point`` on the batched NN engine."""
    from psfed_robust.nn import run_nn

    res = run_nn(nn_config(point, seed), progress=progress)
    metrics = {name: np.asarray(v, dtype=np.float64) for name, v in res.metrics.items()}
    lower = {"accuracy": False, "loss": True, "bytes_down": True, "bytes_up": True, "asr": True}
    return PointResult(rounds=np.asarray(res.rounds), metrics=metrics,
                       lower_is_better={k: v for k, v in lower.items() if k in metrics},
                       info=dict(res.info))
