"""Malicious-client models, one module per attack, registered by name.

Importing this package imports every attack module so the registry is complete::

    from attacks import get_attack, list_attacks
    atk = get_attack("alie", z_mode="paper")
"""

from attacks import gaussian  # noqa: F401  (registers "gaussian")
from attacks._params import ParamError
from attacks.base import (
    Attack,
    AttackContext,
    FunctionAttack,
    attack_class,
    get_attack,
    list_attacks,
    register_attack,
)

__all__ = [
    "Attack",
    "AttackContext",
    "FunctionAttack",
    "ParamError",
    "attack_class",
    "get_attack",
    "list_attacks",
    "register_attack",
]
