"""Results of the batched online engine: learning curves, steady state and metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from psfed_robust.engine.config import CHOICES, RNG_NAMESPACE, OnlineConfig

__all__ = ["OnlineResult", "SteadyState", "metadata"]


@dataclass(frozen=True)
class SteadyState:
    """Steady-state summary over the last ``window`` fraction of the recorded iterations."""

    global_mse_db: float  # 10 log10 of the run- and window-averaged linear global MSE
    local_mse_db: float
    global_mse: float
    global_mse_sem_db: float  # standard error across runs, propagated to dB
    first_iteration: int  # first recorded iteration in the window


@dataclass
class OnlineResult:
    """Learning curves of one config (dB of run-averaged linear MSE) and per-run linear arrays."""

    iterations: np.ndarray  # [T] completed iterations at each record
    global_mse_db: np.ndarray  # [T]
    local_mse_db: np.ndarray  # [T]
    global_mse: np.ndarray  # [R, T] linear
    local_mse: np.ndarray  # [R, T] linear
    final_global_model: np.ndarray  # [R, D]
    metadata: dict[str, Any]
    seconds: float = 0.0

    def steady_state(self, window: float = 0.1) -> SteadyState:
        """Average over the last ``window`` fraction (0 < window ≤ 1) of the records."""
        if not 0 < window <= 1:
            raise ValueError(f"window must be in (0, 1], got {window}")
        T = len(self.iterations)
        start = max(0, min(T - 1, T - math.ceil(window * T)))
        per_run = self.global_mse[:, start:].mean(axis=1)
        mean = float(per_run.mean())
        local = float(self.local_mse[:, start:].mean())
        sem = float(per_run.std(ddof=1) / math.sqrt(len(per_run))) if len(per_run) > 1 else 0.0
        return SteadyState(
            global_mse_db=10 * math.log10(mean),
            local_mse_db=10 * math.log10(local),
            global_mse=mean,
            global_mse_sem_db=10 / math.log(10) * sem / mean,
            first_iteration=int(self.iterations[start]),
        )


def metadata(config: OnlineConfig, attack: Any, defense: Any, blk: int,
             dev: torch.device) -> dict[str, Any]:
    """What a result records about its config, choices, attack, defense and device."""
    persistent = config.attack_persistent if attack is not None else None
    return {
        "config": config.to_dict(),
        "choices": {
            "scheduling": config.scheduling,
            "participants": config.participants if config.scheduling == "fixed" else None,
            "p_c": config.participation,
            "selection": config.selection,
            "coordinated": config.coordinated,
            "uplink": config.uplink,
            "server_weight": config.server_weight,
            "attack_persistent": persistent,
            "aggregation_mode": config.aggregation_mode,
            "nonparticipant_updates": config.nonparticipant_updates,
            "malicious_clients": f"clients 0..{config.num_malicious - 1}"
            if config.num_malicious else "none",
            "kernel_width": config.kernel_width if config.task == "rff" else None,
            "ar_init": config.ar_init if config.task == "rff" else None,
            "test_noise": config.test_noise,
            "test_mse": config.test_mse,
            "local_mse": config.local_mse,
            "initial_models": "zeros",
        },
        "choice_defaults": {k: v[0] for k, v in CHOICES.items()},
        "attack": None if attack is None else {"name": config.attack, **attack.params},
        "defense": {"name": config.defense, **defense.params},
        "server_step": "psfed_robust.core.round.server_step",
        "p_e": config.p_e,
        "values_per_link": config.share_count,
        "communication_saving": 1.0 - config.p_e,
        "run_block": blk,
        "device": str(dev),
        "torch": torch.__version__,
        "local_mse_definition": (
            "mean over clients of the squared a-priori error e = y - w^T z of each client's LMS "
            "step on its own new sample (participants: merged model), averaged over the "
            "record_every iterations of the record" if config.local_mse == "apriori" else
            "test MSE of each local model on the run's test set, averaged over clients"),
        "global_mse_definition": (
            "mean squared error of the global model on the run's N_t test points"
            if config.test_mse == "sample" else "sigma_nu^2 + sigma_x^2 ||w* - w||^2"),
        "db": "10 log10 of the run-averaged linear MSE",
        "rng": f"stable_seed(seed, {RNG_NAMESPACE!r}, purpose, block); purposes init, "
               "init-masks, data, schedule, mask, attack",
    }
