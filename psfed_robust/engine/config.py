"""The batched online engine's scenario: :class:`OnlineConfig` and its modelling choices.

PSO-Fed (Gogineni et al., ICASSP 2022, arXiv 2110.06556) with the model-poisoning threat model of
Lari et al. (IEEE TSIPN 2025, arXiv 2403.13108); every field is validated once, here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["CHOICES", "RNG_NAMESPACE", "OnlineConfig"]

RNG_NAMESPACE = "psfed_robust.engine"

#: The open modelling choices of the PSO-Fed model (docs/reproductions.md) and other knobs,
#: field -> (default, allowed values / meaning). Reported in every result's metadata.
CHOICES: dict[str, tuple[Any, str]] = {
    "scheduling": ("fixed", "'fixed' (P1: `participants` uniformly) | 'bernoulli' (P2: p_c)"),
    "selection": ("random", "'random' (M entries uniformly) | 'round_robin' (shift by M)"),
    "coordinated": (False, "True: all clients share one mask | False: per-client draws/offsets"),
    "uplink": ("next", "'next' (T=S_{k,n+1}, P1) | 'same' (T=S_{k,n}) | 'independent' draw"),
    "server_weight": ("participants",
                      "'participants' 1/|K_n| (P1) | 'expected' 1/(p_c K) | 'all' 1/K"),
    "attack_persistent": (False, "threat model: transmit-only (False) | persistent (True)"),
    "aggregation_mode": ("fill", "'fill' (PSO-Fed) | 'reporters' (per-coordinate reporters)"),
    "nonparticipant_updates": (True, "non-participants run LMS on their new sample"),
    "malicious clients": ("first num_malicious indices", "client stats are i.i.d. per run"),
    "kernel_width": (1.0, "RFF ω ~ N(0, σ_k^-2 I)"),
    "ar_init": ("stationary", "'stationary' | 'zeros' initial AR(1) state"),
    "test_noise": (True, "test targets include observation noise"),
    "test_mse": ("sample", "'sample' (N_t test points) | 'expected' (σ_ν²+σ_x²‖w°−w‖², linear)"),
    "local_mse": ("apriori", "'apriori' (mean e² of the LMS step) | 'test' (local models)"),
    "initial models": ("zeros", "w_0 = w_{k,0} = 0"),
}

_ALLOWED: dict[str, tuple[Any, ...]] = {
    "task": ("rff", "linear"),
    "scheduling": ("fixed", "bernoulli"),
    "selection": ("random", "round_robin"),
    "uplink": ("next", "same", "independent"),
    "server_weight": ("participants", "expected", "all"),
    "aggregation_mode": ("fill", "reporters"),
    "ar_init": ("stationary", "zeros"),
    "test_mse": ("sample", "expected"),
    "local_mse": ("apriori", "test"),
    "dtype": ("float32", "float64"),
}


def _err(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"OnlineConfig.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class OnlineConfig:
    """One online-FL scenario of the batched engine (defaults: P1's PSO-Fed, M = 40 of D = 200).

    Fields (allowed values are checked in ``__post_init__``):
    task ``"rff"`` (P1 nonlinear, RFF kernel LMS) | ``"linear"`` (white Gaussian, P2);
    num_clients K; dim D (RFF features / linear weights); input_dim L (RFF inputs, ≥ 4);
    kernel_width σ_k; iterations; runs R; seed; stepsize μ;
    scheduling ``"fixed"`` (``participants`` clients) | ``"bernoulli"`` (each with ``p_c``);
    p_c (bernoulli; for fixed it defaults to ``participants/K``, used by ``"expected"`` weights);
    share_count M (``M = D`` is Online-Fed); selection, coordinated, uplink, server_weight,
    nonparticipant_updates (see :data:`CHOICES`); attack (registry name or ``"none"``) with
    attack_params (e.g. ``{"p_a": 0.5, "sigma": 1.0}``), attack_persistent (the threat model:
    the attacker keeps its poisoned model, Lari et al. 2025 §II; ``attack_params["persistent"]``
    is still accepted and moved here), num_malicious (clients ``0..num_malicious-1``);
    defense (registry name) with defense_params,
    aggregation_mode ``"fill"`` | ``"reporters"``; linear-task input_var σ_x², noise_var σ_ν²,
    wstar_var σ_w² (None = 1/D); ar_init, test_noise, test_mse, local_mse, num_test N_t,
    record_every, dtype ``"float32"`` | ``"float64"``, run_block (None = auto).
    """

    task: str = "rff"
    num_clients: int = 100
    dim: int = 200
    input_dim: int = 4
    kernel_width: float = 1.0
    iterations: int = 1000
    runs: int = 100
    seed: int = 0
    stepsize: float = 0.75
    scheduling: str = "fixed"
    participants: int = 40
    p_c: float | None = None
    share_count: int = 40
    selection: str = "random"
    coordinated: bool = False
    uplink: str = "next"
    server_weight: str = "participants"
    nonparticipant_updates: bool = True
    attack: str = "none"
    attack_params: Mapping[str, Any] = field(default_factory=dict)
    attack_persistent: bool = False
    num_malicious: int = 0
    defense: str = "mean"
    defense_params: Mapping[str, Any] = field(default_factory=dict)
    aggregation_mode: str = "fill"
    input_var: float = 1.0
    noise_var: float = 0.01
    wstar_var: float | None = None
    ar_init: str = "stationary"
    test_noise: bool = True
    test_mse: str = "sample"
    local_mse: str = "apriori"
    num_test: int = 50
    record_every: int = 1
    dtype: str = "float32"
    run_block: int | None = None

    def __post_init__(self) -> None:
        params = dict(self.attack_params)
        if "persistent" in params:  # the older spelling: an attack parameter
            legacy = params.pop("persistent")
            if not isinstance(legacy, bool):
                raise _err("attack_params['persistent']", "a bool", legacy)
            if self.attack_persistent and not legacy:
                raise _err("attack_persistent", "consistent with attack_params['persistent']",
                           self.attack_persistent)
            object.__setattr__(self, "attack_persistent", self.attack_persistent or legacy)
            object.__setattr__(self, "attack_params", params)
        for name, allowed in _ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise _err(name, "one of " + ", ".join(repr(a) for a in allowed), value)
        for name, low in (("num_clients", 1), ("dim", 1), ("iterations", 1), ("runs", 1),
                          ("num_test", 1), ("record_every", 1), ("input_dim", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(name, f"an integer >= {low}", value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _err("seed", "an integer", self.seed)
        for name in ("coordinated", "nonparticipant_updates", "test_noise",
                     "attack_persistent"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, "a bool", getattr(self, name))
        if self.task == "rff" and self.input_dim < 4:
            raise _err("input_dim", "an integer >= 4 for task 'rff' (P1's target uses x1..x4)",
                       self.input_dim)
        if not isinstance(self.share_count, int) or not 1 <= self.share_count <= self.dim:
            raise _err("share_count", f"an integer in [1, dim={self.dim}]", self.share_count)
        if not isinstance(self.participants, int) or not 1 <= self.participants <= self.num_clients:
            raise _err("participants", f"an integer in [1, num_clients={self.num_clients}]",
                       self.participants)
        if self.p_c is not None and not (isinstance(self.p_c, int | float) and 0 < self.p_c <= 1):
            raise _err("p_c", "a number in (0, 1] or None", self.p_c)
        if self.scheduling == "bernoulli" and self.p_c is None:
            raise _err("p_c", "a number in (0, 1] when scheduling='bernoulli'", self.p_c)
        for name in ("stepsize", "kernel_width", "input_var"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v > 0):
                raise _err(name, "a finite number > 0", v)
        if isinstance(self.noise_var, bool) or not isinstance(self.noise_var, int | float) or not (
                math.isfinite(self.noise_var) and self.noise_var >= 0):
            raise _err("noise_var", "a finite number >= 0", self.noise_var)
        if self.wstar_var is not None and not (
                isinstance(self.wstar_var, int | float) and self.wstar_var >= 0):
            raise _err("wstar_var", "a number >= 0 or None", self.wstar_var)
        nm = self.num_malicious
        if isinstance(nm, bool) or not isinstance(nm, int) or not 0 <= nm <= self.num_clients:
            raise _err("num_malicious", f"an integer in [0, num_clients={self.num_clients}]",
                       self.num_malicious)
        if self.record_every > self.iterations:
            raise _err("record_every", f"an integer in [1, iterations={self.iterations}]",
                       self.record_every)
        if self.test_mse == "expected" and self.task != "linear":
            raise _err("test_mse", "'sample' for task 'rff' ('expected' needs the linear model)",
                       self.test_mse)
        if self.run_block is not None and (not isinstance(self.run_block, int)
                                           or self.run_block < 1):
            raise _err("run_block", "None or an integer >= 1", self.run_block)
        if not isinstance(self.attack, str):
            raise _err("attack", "a registered attack name or 'none'", self.attack)
        if not isinstance(self.defense, str):
            raise _err("defense", "a registered defense name", self.defense)

    # ------------------------------------------------------------------ derived quantities
    @property
    def p_e(self) -> float:
        """Probability that an entry is shared, ``M / D``."""
        return self.share_count / self.dim

    @property
    def participation(self) -> float:
        """Expected fraction of clients per iteration (``participants/K`` or ``p_c``)."""
        if self.scheduling == "bernoulli":
            assert self.p_c is not None
            return float(self.p_c)
        return self.participants / self.num_clients

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def replace(self, **changes: Any) -> OnlineConfig:
        """A copy with ``changes`` applied (validated again)."""
        data = {**asdict(self), **changes}
        return OnlineConfig(**data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attack_params"] = dict(self.attack_params)
        d["defense_params"] = dict(self.defense_params)
        return d
