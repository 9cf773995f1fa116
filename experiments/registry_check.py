"""Validate attack/defense names and parameters of a scenario against the registries."""

from __future__ import annotations

from typing import Any


def attack_params(name: str, params: dict[str, Any], p_a: float) -> dict[str, Any]:
    """The attack's parameters, with the scenario's ``attack.p_a`` added when it takes one."""
    from attacks import attack_class

    out = dict(params)
    if "p_a" in attack_class(name).param_names() and "p_a" not in out:
        out["p_a"] = p_a
    return out


def check_attack(name: str, params: dict[str, Any], p_a: float, where: str) -> None:
    from attacks import get_attack, list_attacks

    from experiments.schema import ScenarioError

    if name == "none":
        if params:
            raise ScenarioError(f"{where}: attack.params given but attack.name is 'none'")
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
        get_defense(name, **params)
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"{where}: defense.params: {exc}") from exc
