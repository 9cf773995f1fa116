"""Engine settings of a sweep point, derived from the key declarations (:mod:`experiments.keys`).

:func:`online_config` builds the batched engine's :class:`~psfed_robust.engine.OnlineConfig`:
keys that declare an ``online`` field map one to one; the few derived settings (M from
``sharing.fraction``/``sharing.count``, ``p_c``, the attack and defense parameters) are computed
here. ``OnlineConfig`` validates itself; its errors are re-raised as :class:`ScenarioError`
naming the scenario key. :func:`attack_params_of` and :func:`defense_params_of` are the registry
parameters of a point for either engine.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from experiments.keys import KEYS, ScenarioError
from experiments.registry_check import accepted_params, attack_params, defense_params

if TYPE_CHECKING:
    from experiments.schema import SweepPoint

__all__ = ["attack_params_of", "build_config", "check_flower_point", "defense_params_of",
           "online_config", "share_count"]

T = TypeVar("T")

#: OnlineConfig field -> scenario key (for error messages)
FIELD_KEYS: dict[str, str] = {k.online: k.name for k in KEYS if k.online is not None}
FIELD_KEYS.update({"share_count": "sharing.count", "p_c": "federation.p_c",
                   "num_malicious": "attack.malicious", "attack": "attack.name",
                   "attack_params": "attack.params", "defense": "defense.name",
                   "defense_params": "defense.params", "attack_persistent": "attack.persistent"})


def share_count(point: SweepPoint) -> int:
    """M: ``sharing.count`` when set, else ``round(fraction·D)`` (at least 1, at most D)."""
    dim = int(point.get("task.dim"))
    count = int(point.get("sharing.count"))
    if count > 0:
        return count
    return max(1, min(dim, math.floor(float(point.get("sharing.fraction")) * dim + 0.5)))


def _engine_has(field_name: str) -> bool:
    from psfed_robust.engine import OnlineConfig

    return any(f.name == field_name for f in dataclasses.fields(OnlineConfig))


def attack_params_of(point: SweepPoint) -> dict[str, Any]:
    """Registry parameters of the point's attack: its keys of ``attack.params``, ``attack.p_a``
    for attacks that take ``p_a`` and ``attack.persistent`` for attacks that still take it (an
    engine with its own persistence setting gets it there instead)."""
    name = str(point.get("attack.name"))
    if name == "none":
        return {}
    params = attack_params(name, dict(point.get("attack.params")), float(point.get("attack.p_a")))
    if "persistent" in accepted_params("attack", name) and not _engine_has("attack_persistent"):
        params["persistent"] = bool(point.get("attack.persistent"))
    return params


def defense_params_of(point: SweepPoint) -> dict[str, Any]:
    """Registry parameters of the point's rule (with ``pre``: the ``defense.pre`` list); ``f`` is
    ``defense.f`` unless ``defense.params`` sets it. Rules whose ``f`` is optional (trimmed_mean
    trims ``beta n`` without it) get it only when the scenario sets ``defense.f``."""
    name = str(point.get("defense.name"))
    params = defense_params(name, dict(point.get("defense.params")))
    if "f" in accepted_params("defense", name) and "f" not in params:
        explicit = point.config["defense"]["f"] is not None
        if explicit or _f_required(name):
            params["f"] = int(point.get("defense.f"))
    pre = list(point.get("defense.pre"))
    if pre:  # defenses.get_defense(name, pre=...) composes them; they need the declared f
        params["pre"] = pre
        params.setdefault("f", int(point.get("defense.f")))
    return params


def _f_required(name: str) -> bool:
    """Whether rule ``name`` has an integer ``f`` (not an optional one that defaults to None)."""
    import inspect

    from defenses import defense_class

    p = inspect.signature(defense_class(name).__init__).parameters.get("f")
    return p is not None and p.default is not None


def build_config(cls: Callable[..., T], kw: dict[str, Any], point: SweepPoint,
                 field_keys: Mapping[str, str]) -> T:
    """``cls(**kw)`` for an engine config class; its ``ValueError``/``TypeError`` becomes a
    ``ScenarioError`` naming the scenario key (``field_keys[field]``) of the field it names."""
    try:
        return cls(**kw)
    except (ValueError, TypeError) as exc:
        m = re.search(rf"{getattr(cls, '__name__', '')}\.(\w+)", str(exc))
        name = field_keys.get(m.group(1), m.group(1)) if m else "scenario"
        raise ScenarioError(f"{name}: sweep point {point.index} ({point.label}): {exc}") from exc


def online_config(point: SweepPoint, seed: int = 0, runs: int | None = None) -> Any:
    """The :class:`~psfed_robust.engine.OnlineConfig` of a batched sweep point."""
    from psfed_robust.engine import OnlineConfig

    kw: dict[str, Any] = {k.online: point.get(k.name) for k in KEYS
                          if k.online is not None and "batched" in k.engines}
    malicious = int(point.get("attack.malicious"))
    attack = str(point.get("attack.name"))
    armed = attack != "none" and malicious > 0
    kw.update(
        seed=int(seed),
        runs=int(runs if runs is not None else point.get("runs")),
        p_c=(float(point.get("federation.p_c"))
             if point.get("federation.scheduling") == "bernoulli" else None),
        share_count=share_count(point),
        attack=attack if armed else "none",
        attack_params=attack_params_of(point) if armed else {},
        num_malicious=malicious if armed else 0,
        defense=point.get("defense.name"),
        defense_params=defense_params_of(point),
    )
    if _engine_has("attack_persistent"):
        kw["attack_persistent"] = bool(point.get("attack.persistent"))
    return build_config(OnlineConfig, kw, point, FIELD_KEYS)


def check_flower_point(point: SweepPoint) -> None:
    """What the Flower engine cannot honour beyond the key model's per-engine rules (a
    ScenarioError naming the key); scenario validation calls it for every Flower point."""
    device = str(point.get("device"))
    if device != "cpu":
        raise ScenarioError(f"device: the Flower engine runs on the CPU; {device!r} is not "
                            "honoured (remove the key or set 'cpu')")
    attack = str(point.get("attack.name"))
    if attack != "none" and int(point.get("attack.malicious")) > 0:
        from attacks import attack_class

        if attack_class(attack).omniscient and bool(point.get("attack.persistent")):
            raise ScenarioError(
                f"attack.persistent: the omniscient attack {attack!r} runs in the Flower "
                "engine's server-side adversary, which cannot change a client's local model; "
                "set attack.persistent = false or use the batched engine")
