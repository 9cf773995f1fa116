"""Validate attack/defense names and parameters of a scenario against the registries.

When a sweep varies ``attack.name`` (or ``defense.name``), the shared ``params`` table may hold
parameters of several of them: each point passes an attack only the keys it accepts, and a key that
no attack of the scenario accepts is an error (so a typo never passes silently).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _accepted(kind: str, name: str) -> tuple[str, ...]:
    if kind == "attack":
        from attacks import attack_class

        return tuple(attack_class(name).param_names())
    from defenses import defense_class

    cls = defense_class(name)
    return tuple(cls.param_names()) if hasattr(cls, "param_names") else ()


def attack_params(name: str, params: dict[str, Any], p_a: float) -> dict[str, Any]:
    """The parameters of attack ``name``: the accepted keys of ``params`` plus ``attack.p_a``."""
    acc = _accepted("attack", name)
    out = {k: v for k, v in params.items() if k in acc}
    if "p_a" in acc and "p_a" not in out:
        out["p_a"] = p_a
    return out


def defense_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    acc = _accepted("defense", name)
    return {k: v for k, v in params.items() if k in acc}


def check_param_keys(kind: str, names: Iterable[str], params: dict[str, Any]) -> None:
    """Every key of ``params`` must be accepted by at least one of ``names``."""
    from experiments.schema import ScenarioError

    names = [n for n in names if n != "none"]
    if not names or not params:
        return
    accepted = set().union(*(set(_accepted(kind, n)) for n in names))
    for key in params:
        if key not in accepted:
            raise ScenarioError(
                f"{kind}.params.{key}: not a parameter of {', '.join(repr(n) for n in names)}; "
                f"allowed: {', '.join(sorted(accepted)) or '(none)'}"
            )


def check_attack(name: str, params: dict[str, Any], p_a: float, where: str) -> None:
    from attacks import get_attack, list_attacks
    from experiments.schema import ScenarioError

    if name == "none":
        return
    allowed = list_attacks()
    if name not in allowed:
        raise ScenarioError(
            f"{where}: attack.name {name!r} is not registered; allowed values: "
            f"'none', {', '.join(repr(a) for a in allowed)}"
        )
    try:
        get_attack(name, **attack_params(name, params, p_a))
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"{where}: attack.params: {exc}") from exc


def check_defense(name: str, params: dict[str, Any], where: str) -> None:
    from defenses import get_defense, list_defenses
    from experiments.schema import ScenarioError

    allowed = list_defenses()
    if name not in allowed:
        raise ScenarioError(
            f"{where}: defense.name {name!r} is not registered; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}"
        )
    try:
        get_defense(name, **defense_params(name, params))
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"{where}: defense.params: {exc}") from exc
