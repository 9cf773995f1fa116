"""Validate attack/defense names and parameters of a scenario against the registries.

When a sweep varies ``attack.name`` (or ``defense.name``), the shared ``params`` table may hold
parameters of several of them: each point passes an attack only the keys it accepts, and a key that
no attack of the scenario accepts is an error (so a typo never passes silently).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from experiments.keys import RENAMED, ScenarioError

__all__ = ["accepted_params", "attack_params", "check_attack", "check_defense", "check_name",
           "check_param_keys", "defense_params"]


def accepted_params(kind: str, name: str) -> tuple[str, ...]:
    """Keyword parameters the registered attack/defense ``name`` accepts."""
    if kind == "attack":
        from attacks import attack_class

        return tuple(attack_class(name).param_names())
    from defenses import defense_class

    cls = defense_class(name)
    return tuple(cls.param_names()) if hasattr(cls, "param_names") else ()


def attack_params(name: str, params: dict[str, Any], p_a: float) -> dict[str, Any]:
    """The parameters of attack ``name``: the accepted keys of ``params`` plus ``attack.p_a``."""
    acc = accepted_params("attack", name)
    out = {k: v for k, v in params.items() if k in acc}
    if "p_a" in acc and "p_a" not in out:
        out["p_a"] = p_a
    return out


def defense_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The accepted keys of ``params`` for defense ``name``."""
    acc = accepted_params("defense", name)
    return {k: v for k, v in params.items() if k in acc}


def check_param_keys(kind: str, names: Iterable[str], params: dict[str, Any]) -> None:
    """Every key of ``params`` must be accepted by at least one of ``names``."""
    for key in params:
        new = RENAMED.get(f"{kind}.params.{key}")
        if new is not None:
            raise ScenarioError(f"{kind}.params.{key}: is now a scenario key; use {new!r}")
    names = [n for n in names if n != "none"]
    if not names or not params:
        return
    accepted = set().union(*(set(accepted_params(kind, n)) for n in names))
    for key in params:
        if key not in accepted:
            raise ScenarioError(
                f"{kind}.params.{key}: not a parameter of {', '.join(repr(n) for n in names)}; "
                f"allowed: {', '.join(sorted(accepted)) or '(none)'}"
            )


def check_name(kind: str, name: str, where: str) -> None:
    """``name`` is a registered attack/defense (attacks also allow ``'none'``)."""
    if kind == "attack":
        from attacks import list_attacks

        allowed = ["none", *list_attacks()]
    else:
        from defenses import list_defenses

        allowed = list(list_defenses())
    if name not in allowed:
        raise ScenarioError(
            f"{kind}.name: {where}: {name!r} is not registered; allowed values: "
            f"{', '.join(repr(a) for a in allowed)}"
        )


def check_attack(name: str, params: dict[str, Any], where: str) -> None:
    """``name`` is registered and builds with ``params`` (the point's resolved parameters)."""
    from attacks import get_attack

    check_name("attack", name, where)
    if name == "none":
        return
    try:
        get_attack(name, **params)
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"attack.params: {where}: {exc}") from exc


def check_defense(name: str, params: dict[str, Any], where: str,
                  participant_counts: Iterable[int] = ()) -> None:
    """``name`` is registered, builds with ``params`` and accepts every participant count a round
    can have (the rule's ``check_participants(n)``, where it has one)."""
    from defenses import get_defense

    check_name("defense", name, where)
    try:
        rule = get_defense(name, **params)
    except (ValueError, TypeError) as exc:
        raise ScenarioError(f"defense.params: {where}: {exc}") from exc
    check = getattr(rule, "check_participants", None)
    if check is None:
        return
    for n in participant_counts:
        try:
            check(int(n))
        except (ValueError, TypeError) as exc:
            raise ScenarioError(
                f"defense.name: {where}: rule {name!r} cannot aggregate n = {n} participants "
                f"(f = {params.get('f', 'default')}): {exc}"
            ) from exc
