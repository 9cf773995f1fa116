"""Grouped settings of :class:`~psfed_robust.flower.strategy.PSFedAvg` (small frozen dataclasses).

``PSFedAvg`` takes Flower's FedAvg sampling arguments plus four groups, each validated here once:

- :class:`MaskSettings` — which coordinates each client shares (selector, fraction, seed, codec);
- :class:`AggregationSettings` — the ``defenses`` rule, fill/reporters mode, server weights and
  the plausibility bounds of what a reply claims (``max_num_examples``, ``max_metric``);
- :class:`ThreatSettings` — simulated attackers (server-side adversary, client-side attacks,
  persistence as the threat model's setting) and the expected client ids;
- :class:`ProtocolSettings` — uplink mask rule and budget, first-contact sync, identity queries,
  evaluation payload and timeouts.

See docs/flower.md ("Settings") for every field.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from psfed_robust.core.selectors import (
    MASK_STRATEGIES,
    MaskSelector,
    RandomMaskSelector,
    make_selector,
)
from psfed_robust.flower.adversary import ServerAdversary
from psfed_robust.flower.validation import ClientId

__all__ = [
    "MASK_STRATEGIES",
    "AggregationSettings",
    "Evaluation",
    "MaskSettings",
    "ProtocolSettings",
    "ThreatSettings",
    "Weighting",
    "make_selector",
]

Weighting = Literal["participants", "expected", "all", "num-examples"]
Evaluation = Literal["merged", "local", "global", "none"]

#: default bound on a reply's ``num-examples`` (a client claiming more is rejected)
DEFAULT_MAX_NUM_EXAMPLES = 1 << 31
#: default bound on |user metric| (larger values are dropped from the aggregate, never summed)
DEFAULT_MAX_METRIC = 1e30


def _fraction(owner: str, name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{owner}.{name} must be a number in [0, 1], got {v!r}")


def _choice(owner: str, name: str, v: Any, allowed: tuple[str, ...]) -> None:
    if v not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, allowed))}, "
                         f"got {v!r}")


@dataclass(frozen=True)
class MaskSettings:
    """Which coordinates each client shares.

    ``selector`` (any ``MaskSelector``) wins over ``strategy`` + ``fraction`` + ``seed``.
    ``gradient_fallback`` picks masks while a gradient selector has no client scores yet
    (default: random masks of the same fraction). ``score_source``: each client's own scores
    (``"client"``) or their mean (``"mean"``). ``encoding``: the wire codec's mask encoding.
    """

    fraction: float = 0.5
    strategy: str = "random"
    seed: int | None = None
    selector: MaskSelector | None = None
    gradient_fallback: MaskSelector | None = None
    score_source: Literal["client", "mean"] = "client"
    encoding: str = "auto"

    def __post_init__(self) -> None:
        _fraction("MaskSettings", "fraction", self.fraction)
        _choice("MaskSettings", "score_source", self.score_source, ("client", "mean"))
        if self.selector is not None and not isinstance(self.selector, MaskSelector):
            raise TypeError(f"MaskSettings.selector must be a MaskSelector, got "
                            f"{type(self.selector).__name__}")

    def build(self) -> tuple[MaskSelector, MaskSelector]:
        """``(selector, gradient fallback)``."""
        sel = self.selector or make_selector(self.strategy, self.fraction, self.seed)
        fb = self.gradient_fallback or RandomMaskSelector(sel.fraction or self.fraction,
                                                          self.seed)
        return sel, fb


@dataclass(frozen=True)
class AggregationSettings:
    """How valid replies become the new global model.

    ``rule``: a ``defenses`` name (with ``params``) or an Aggregator. ``mode``: ``"fill"``
    (PSO-Fed) or ``"reporters"``. ``weighting``: PSO-Fed's ``1/|K_n|`` (``"participants"``),
    ``1/(p_c K)`` (``"expected"``), ``1/K`` (``"all"``) or FedAvg's ``"num-examples"``.
    ``max_num_examples``: a reply claiming more examples is implausible and rejected (reason
    ``bad-num-examples``), so one client cannot take over a num-examples-weighted average.
    ``max_metric``: user metrics with ``|value| > max_metric`` are dropped from the aggregate
    (counted as ``metrics-dropped``), so aggregated metrics stay finite.
    """

    rule: Any = "mean"
    params: Mapping[str, Any] | None = None
    mode: Literal["fill", "reporters"] = "fill"
    weighting: Weighting = "participants"
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    max_metric: float = DEFAULT_MAX_METRIC

    def __post_init__(self) -> None:
        _choice("AggregationSettings", "mode", self.mode, ("fill", "reporters"))
        _choice("AggregationSettings", "weighting", self.weighting,
                ("participants", "expected", "all", "num-examples"))
        n = self.max_num_examples
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"AggregationSettings.max_num_examples must be a positive int, "
                             f"got {n!r}")
        m = self.max_metric
        if isinstance(m, bool) or not isinstance(m, int | float) or not (
                math.isfinite(m) and m > 0 and m <= 1e300):
            raise ValueError(f"AggregationSettings.max_metric must be a finite number in "
                             f"(0, 1e300], got {m!r}")
        if not isinstance(self.rule, str):
            if self.params:
                raise ValueError("AggregationSettings.params is only used when rule is a name")
            if not callable(self.rule):
                raise TypeError("AggregationSettings.rule must be a defenses name or an "
                                "Aggregator")

    def build(self) -> Any:
        """The aggregator object (``defenses.get_defense`` for a name)."""
        if not isinstance(self.rule, str):
            return self.rule
        import importlib

        import defenses

        name = self.rule
        if name not in defenses.list_defenses() and name.isidentifier():
            try:
                importlib.import_module(f"defenses.{name}")
            except ImportError:
                pass
        return defenses.get_defense(name, **dict(self.params or {}))


@dataclass(frozen=True)
class ThreatSettings:
    """Simulated attackers (the threat model) and the clients the server accepts.

    ``client_attacks``: ``{client id: (attack name, params)}`` run by those clients (the
    client-side seam, simulation and deployment); ``persistent``: whether a client attacker
    keeps its poisoned model (Lari et al. 2025 §II) — a threat-model setting, never an attack
    parameter. ``adversary``: a :class:`ServerAdversary` (omniscient attacks, simulation only).
    ``attack_seed`` seeds the client attacks. ``expected_clients``: replies from other client
    ids are rejected.
    """

    adversary: ServerAdversary | None = None
    client_attacks: Mapping[ClientId, tuple[str, Mapping[str, Any]]] | None = None
    persistent: bool = False
    attack_seed: int = 0
    expected_clients: Collection[ClientId] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.persistent, bool):
            raise TypeError(f"ThreatSettings.persistent must be a bool, got {self.persistent!r}")
        if self.adversary is not None and not isinstance(self.adversary, ServerAdversary):
            raise TypeError("ThreatSettings.adversary must be a ServerAdversary")
        for cid, spec in (self.client_attacks or {}).items():
            if (not isinstance(spec, tuple) or len(spec) != 2 or not isinstance(spec[0], str)
                    or not isinstance(spec[1], Mapping)):
                raise ValueError(f"ThreatSettings.client_attacks[{cid!r}] must be "
                                 f"(name, params), got {spec!r}")
            if "persistent" in spec[1]:
                raise ValueError(f"ThreatSettings.client_attacks[{cid!r}]: persistence is the "
                                 "threat model's setting (ThreatSettings.persistent), not an "
                                 "attack parameter")


@dataclass(frozen=True)
class ProtocolSettings:
    """What travels and how the server waits.

    ``uplink``: clients reply on the downlink mask (``"downlink"``) or pick their own
    (``"client"``, top-|Δ| of ``uplink_fraction``, default the downlink fraction); either way
    the server enforces it (``mask-mismatch`` / ``over-budget``). ``initial_sync``: send the
    dense global model on first contact. ``identify_clients``: query stable client ids before
    the first round (default: when masks or attacks depend on them). ``evaluation``: the
    evaluate payload (``merged``/``local``/``global``/``none``).
    """

    uplink: Literal["downlink", "client"] = "downlink"
    uplink_fraction: float | None = None
    initial_sync: bool = True
    identify_clients: bool | None = None
    evaluation: Evaluation = "merged"
    node_wait_timeout: float = 3600.0
    poll_interval: float = 1.0
    query_timeout: float = 600.0

    def __post_init__(self) -> None:
        _choice("ProtocolSettings", "uplink", self.uplink, ("downlink", "client"))
        _choice("ProtocolSettings", "evaluation", self.evaluation,
                ("merged", "local", "global", "none"))
        if self.uplink_fraction is not None:
            _fraction("ProtocolSettings", "uplink_fraction", self.uplink_fraction)
        for name in ("node_wait_timeout", "poll_interval", "query_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise ValueError(f"ProtocolSettings.{name} must be a number >= 0, got {v!r}")
