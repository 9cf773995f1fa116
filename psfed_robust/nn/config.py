"""``NNConfig``: one batched NN study point (frozen, validated on construction).

Field names follow the scenario keys (``task.model`` → ``model``, ``federation.clients`` →
``clients``, ``sharing.fraction`` → ``fraction`` ...); docs/nn.md lists the mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from psfed_robust.nn.data import TASKS
from psfed_robust.nn.models import MODELS

__all__ = ["SELECTORS", "NNConfig"]

SELECTORS = ("random", "round_robin", "round_robin_per_client", "client_specific", "topk",
             "structured")
_SCHEDULES = ("constant", "cosine", "step")


def _int(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"NNConfig.{name} must be an int, got {type(v).__name__} {v!r}")
    if v < low:
        raise ValueError(f"NNConfig.{name} must be >= {low}, got {v}")


def _real(name: str, v: Any, low: float, high: float = math.inf, *,
          open_low: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TypeError(f"NNConfig.{name} must be a finite number, got {v!r}")
    if v < low or v > high or (open_low and v == low):
        lo = "(" if open_low else "["
        raise ValueError(f"NNConfig.{name} must be in {lo}{low}, {high}], got {v}")


def _choice(name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ValueError(f"NNConfig.{name} must be one of {', '.join(allowed)}; got {v!r}")


@dataclass(frozen=True)
class NNConfig:
    """A batched image-classification study point (every Monte Carlo run at once)."""

    task: str = "digits"
    data_dir: str = ""
    model: str = "mlp"
    hidden: int = 64
    clients: int = 10
    participants: int = 0  # 0: every client, every round
    runs: int = 1
    seed: int = 0
    rounds: int = 15
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    lr: float = 0.05
    momentum: float = 0.9
    momentum_scope: str = "round"  # "round": fresh each round (Flower); "persistent": worker
    weight_decay: float = 0.0
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many minibatch steps per round instead of epochs
    batch_size: int = 32
    shuffle: bool = True
    lr_schedule: str = "constant"
    lr_gamma: float = 0.1  # "step": factor every lr_step_rounds rounds
    lr_step_rounds: int = 0
    selector: str = "random"
    fraction: float = 1.0
    attack: str = "none"
    attack_params: dict[str, Any] = field(default_factory=dict)
    malicious: int = 0
    persistent: bool = False
    defense: str = "mean"
    defense_params: dict[str, Any] = field(default_factory=dict)
    mode: str = "fill"
    record_every: int = 1
    device: str = "auto"
    memory_budget_mb: float = 1024.0
    max_chunk: int = 0  # > 0: at most this many client rows per vmap call
    threads: int = 0  # > 0: torch intra-op threads during the run (restored after); 0: as set
    fused: bool = True  # hand-derived batched kernels (nn.fused) when the model allows; False:
    # the torch.func reference path (vmap(grad) with functional_call)

    def __post_init__(self) -> None:
        _choice("task", self.task, TASKS)
        _choice("model", self.model, MODELS)
        for name, low in (("hidden", 1), ("clients", 1), ("participants", 0), ("runs", 1),
                          ("seed", 0), ("rounds", 1), ("local_epochs", 1), ("local_steps", 0),
                          ("batch_size", 1), ("lr_step_rounds", 0), ("malicious", 0),
                          ("record_every", 1), ("max_chunk", 0), ("threads", 0)):
            _int(name, getattr(self, name), low)
        if self.participants > self.clients:
            raise ValueError(f"NNConfig.participants ({self.participants}) exceeds clients "
                             f"({self.clients})")
        if self.malicious > self.clients:
            raise ValueError(f"NNConfig.malicious ({self.malicious}) exceeds clients "
                             f"({self.clients})")
        _choice("partition", self.partition, ("iid", "dirichlet"))
        _real("dirichlet_alpha", self.dirichlet_alpha, 0.0, open_low=True)
        _real("lr", self.lr, 0.0, open_low=True)
        _real("momentum", self.momentum, 0.0, 1.0)
        _choice("momentum_scope", self.momentum_scope, ("round", "persistent"))
        _real("weight_decay", self.weight_decay, 0.0)
        _choice("lr_schedule", self.lr_schedule, _SCHEDULES)
        _real("lr_gamma", self.lr_gamma, 0.0, 1.0, open_low=True)
        if self.lr_schedule == "step" and self.lr_step_rounds < 1:
            raise ValueError("NNConfig.lr_schedule 'step' needs lr_step_rounds >= 1")
        _choice("selector", self.selector, SELECTORS)
        _real("fraction", self.fraction, 0.0, 1.0)
        _choice("mode", self.mode, ("fill", "reporters"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        _real("memory_budget_mb", self.memory_budget_mb, 0.0, open_low=True)
        for name in ("shuffle", "persistent", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"NNConfig.{name} must be a bool, got {getattr(self, name)!r}")
        import attacks
        import defenses

        if self.attack != "none" and self.attack not in attacks.list_attacks():
            raise ValueError(f"NNConfig.attack {self.attack!r} is not registered; allowed: none, "
                             f"{', '.join(attacks.list_attacks())}")
        if self.defense not in defenses.list_defenses():
            raise ValueError(f"NNConfig.defense {self.defense!r} is not registered; allowed: "
                             f"{', '.join(defenses.list_defenses())}")
        for name in ("attack_params", "defense_params"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"NNConfig.{name} must be a dict")
        # build both once so a bad parameter fails here, naming the parameter
        if self.attack != "none":
            attacks.get_attack(self.attack, **self.attack_params)
        defenses.get_defense(self.defense, **self.defense_params)

    @property
    def num_participants(self) -> int:
        """Participants per round (``participants``, or every client when 0)."""
        return self.participants or self.clients

    def lr_at(self, round_num: int) -> float:
        """The client learning rate of round ``round_num`` (1-based) under ``lr_schedule``."""
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "step":
            return self.lr * self.lr_gamma ** ((round_num - 1) // self.lr_step_rounds)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * (round_num - 1) / self.rounds))
