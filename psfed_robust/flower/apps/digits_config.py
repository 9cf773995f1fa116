"""Run config of the digits Flower App (``[tool.flwr.app.config]``), parsed and validated.

Every key has a default here, so the app also runs where no run config reaches it (e.g.
``run_simulation``); ``flwr run`` passes the pyproject values plus ``--run-config`` overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["STRATEGIES", "DigitsRunConfig"]

STRATEGIES = ("psfedavg", "fedavg")


@dataclass(frozen=True)
class DigitsRunConfig:
    """The digits app's knobs; run-config keys are the field names with ``-`` for ``_``."""

    num_server_rounds: int = 3
    strategy: str = "psfedavg"  # "psfedavg" (partial sharing) or "fedavg" (Flower's FedAvg)
    fraction: float = 0.5  # share fraction of the model per round (PSFedAvg)
    selector: str = "random"  # mask selector name (PSFedAvg)
    aggregator: str = "mean"  # server aggregation rule (defenses registry name)
    aggregation_mode: str = "fill"  # "fill" (PSO-Fed) or "reporters"
    fraction_train: float = 1.0  # fraction of available nodes sampled per round
    fraction_evaluate: float = 0.0  # client-side evaluation (0 = central evaluation only)
    min_nodes: int = 2  # wait for this many nodes; also min_train_nodes
    initial_sync: bool = True  # PSFedAvg sends the dense model on first contact
    local_epochs: int = 2
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 32
    hidden: int = 64
    partitioning: str = "iid"  # "iid" or "dirichlet"
    dirichlet_alpha: float = 0.5
    test_size: int = 360
    seed: int = 0
    round_timeout: float = 3600.0

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> DigitsRunConfig:
        """Parse ``context.run_config``; unknown keys are ignored, bad values raise ValueError."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key not in run_config:
                continue
            raw = run_config[key]
            default = getattr(cls, f.name)
            try:
                if isinstance(default, bool):
                    value: Any = raw if isinstance(raw, bool) else str(raw).lower() == "true"
                elif isinstance(default, int):
                    if isinstance(raw, float) and not raw.is_integer():
                        raise ValueError
                    value = int(raw)
                elif isinstance(default, float):
                    value = float(raw)
                else:
                    value = str(raw)
            except (TypeError, ValueError):
                raise ValueError(
                    f"run config {key!r} must be a {type(default).__name__}, got {raw!r}"
                ) from None
            kwargs[f.name] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError naming the key and the allowed values."""
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"run config 'strategy' must be one of {STRATEGIES}, got {self.strategy!r}"
            )
        if self.num_server_rounds < 1:
            raise ValueError("run config 'num-server-rounds' must be >= 1")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"run config 'fraction' must be in (0, 1], got {self.fraction}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError("run config 'fraction-train' must be in (0, 1]")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise ValueError("run config 'fraction-evaluate' must be in [0, 1]")
        if self.min_nodes < 1:
            raise ValueError("run config 'min-nodes' must be >= 1")
        if self.local_epochs < 0 or self.batch_size < 1 or self.hidden < 1:
            raise ValueError("run config 'local-epochs' >= 0, 'batch-size' >= 1, 'hidden' >= 1")
        if not self.lr > 0:
            raise ValueError("run config 'lr' must be > 0")
        if self.partitioning not in ("iid", "dirichlet"):
            raise ValueError("run config 'partitioning' must be 'iid' or 'dirichlet'")
        if self.aggregation_mode not in ("fill", "reporters"):
            raise ValueError("run config 'aggregation-mode' must be 'fill' or 'reporters'")
