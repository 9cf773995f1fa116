"""Malicious-client models, one module per attack, registered by name.

Importing this package imports every attack module so the registry is complete::

    from attacks import get_attack, list_attacks
    atk = get_attack("alie", z_mode="paper")
    sent = atk(deltas, ctx)          # deltas [..., K, D], ctx: AttackContext
"""

from attacks import (  # noqa: F401  (each import registers its attack)
    alie,
    gaussian,
    ipm,
    label_flip,
    mask_aware,
    min_max,
    min_sum,
    random_noise,
    scaling,
    sign_flip,
    zero,
)
from attacks._params import ParamError
from attacks.base import (
    Attack,
    AttackContext,
    FunctionAttack,
    attack_class,
    get_attack,
    honest_statistics,
    list_attacks,
    register_attack,
    shared_masks,
    write_shared,
)

__all__ = [
    "Attack",
    "AttackContext",
    "FunctionAttack",
    "ParamError",
    "attack_class",
    "get_attack",
    "honest_statistics",
    "list_attacks",
    "register_attack",
    "shared_masks",
    "write_shared",
]


def _import_all_modules() -> None:
    """Import every module of this folder, so dropping a new file in registers it."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all_modules()
