"""Run config of the digits Flower App (``[tool.flwr.app.config]``), parsed and validated.

Every key has a default here, so the app also runs where no run config reaches it (e.g.
``run_simulation``); ``flwr run`` passes the pyproject values plus ``--run-config`` overrides.

Flower's run config is one flat table whose keys must all be declared in the pyproject (an
undeclared override is refused with ``[code: 15] Invalid run configuration``) and whose values
are scalars (``a = "x"`` next to ``a.b = 1`` is a TOML clash). So an attack's or a defense's
parameters travel as *one* string holding a JSON object or a TOML inline table
(``attack-params = '{"scale": 4.0}'`` or ``'{scale = 4.0}'``), next to ``attack-name``;
the threat model's own settings have their own keys (``attack-persistent``,
``malicious-clients``). :mod:`psfed_robust.flower.apps.digits_threat` turns them into attack,
defense and adversary objects and checks them against the federation.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

__all__ = [
    "NO_ATTACK",
    "STRATEGIES",
    "THREAT_KEYS",
    "DigitsRunConfig",
    "parse_malicious",
    "parse_mapping",
    "parse_sequence",
]

STRATEGIES = ("psfedavg", "fedavg")
NO_ATTACK = "none"

#: run-config keys the server interprets for the threat model (the clients never read them:
#: the server assigns each client attack in its train message)
THREAT_KEYS = ("attack-name", "attack-params", "attack-persistent", "malicious-clients")


def _parse_structured(key: str, raw: str) -> Any:
    """A JSON value, else a TOML value (``{scale = 4.0}``, ``["nnm"]``); ``""`` is None."""
    text = raw.strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as jerr:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            raise ValueError(
                f"run config {key!r} must be a JSON or TOML inline value such as "
                f"'{{\"scale\": 4.0}}' or '{{scale = 4.0}}', got {raw!r} ({jerr.msg})"
            ) from None


def parse_mapping(key: str, raw: str) -> dict[str, Any]:
    """``attack-params`` / ``defense-params``: a JSON object or TOML inline table."""
    value = _parse_structured(key, raw)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"run config {key!r} must be an object such as '{{\"f\": 1}}', got {raw!r}"
        )
    for k, v in value.items():
        if v is None:
            raise ValueError(f"run config {key!r}: {k!r} is null; omit it to use the default")
    return dict(value)


def parse_sequence(key: str, raw: str) -> list[Any]:
    """``defense-pre``: a JSON/TOML list of pre-aggregator specs, or comma-separated names."""
    text = raw.strip()
    if not text:
        return []
    if text[0] not in "[{\"'":
        return [s.strip() for s in text.split(",") if s.strip()]
    value = _parse_structured(key, raw)
    if isinstance(value, str | dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(
            f"run config {key!r} must be a list such as '[\"nnm\", [\"bucketing\", {{\"s\": "
            f"2}}]]' or 'nnm,bucketing', got {raw!r}"
        )
    return [tuple(v) if isinstance(v, list) else v for v in value]


def parse_malicious(raw: Any) -> int | tuple[int | str, ...]:
    """``malicious-clients``: an int is a *count* (client ids ``0 .. count-1``); a string is a
    comma-separated list of client ids (``"0,3"``; digits become ints); ``""`` is none."""
    if isinstance(raw, bool):
        raise ValueError(f"run config 'malicious-clients' must be a count or ids, got {raw!r}")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError(f"run config 'malicious-clients' count must be whole, got {raw}")
        raw = int(raw)
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError(f"run config 'malicious-clients' count must be >= 0, got {raw}")
        return raw
    ids: list[int | str] = []
    for item in str(raw).replace(";", ",").split(","):
        s = item.strip()
        if not s:
            continue
        cid: int | str = int(s) if s.lstrip("-").isdigit() else s
        if isinstance(cid, int) and cid < 0:
            raise ValueError(f"run config 'malicious-clients': client id {cid} is negative")
        if cid in ids:
            raise ValueError(f"run config 'malicious-clients': client id {cid!r} listed twice")
        ids.append(cid)
    return tuple(ids)


@dataclass(frozen=True)
class DigitsRunConfig:
    """The digits app's knobs; run-config keys are the field names with ``-`` for ``_``."""

    num_server_rounds: int = 3
    strategy: str = "psfedavg"  # "psfedavg" (partial sharing) or "fedavg" (Flower's FedAvg)
    fraction: float = 0.5  # share fraction of the model per round (PSFedAvg)
    selector: str = "random"  # mask selector name (PSFedAvg)
    aggregation_mode: str = "fill"  # "fill" (PSO-Fed) or "reporters"
    defense_name: str = "mean"  # server aggregation rule (defenses registry name)
    defense_params: str = "{}"  # its parameters: JSON object / TOML inline table
    defense_pre: str = ""  # pre-aggregators in front of it (JSON/TOML list or "nnm,bucketing")
    attack_name: str = NO_ATTACK  # attacks registry name, "none" = no attack
    attack_params: str = "{}"  # its parameters: JSON object / TOML inline table
    attack_persistent: bool = False  # client attackers keep their poisoned model
    malicious_clients: int | str = 0  # count (ids 0..count-1) or "0,3" (client ids)
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
                if f.name == "malicious_clients":
                    value: Any = raw if isinstance(raw, int | str) else int(raw)
                elif isinstance(default, bool):
                    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
                        value = raw.strip().lower() == "true"
                    elif isinstance(raw, bool):
                        value = raw
                    else:
                        raise ValueError
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

    @property
    def attacked(self) -> bool:
        """Whether the run config asks for an attack."""
        return self.attack_name != NO_ATTACK

    def validate(self) -> None:
        """Raise ValueError naming the key and the allowed values (registry names and
        parameters are checked by :func:`~psfed_robust.flower.apps.digits_threat.plan_threat`)."""
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
        parse_mapping("attack-params", self.attack_params)
        parse_mapping("defense-params", self.defense_params)
        parse_sequence("defense-pre", self.defense_pre)
        parse_malicious(self.malicious_clients)
