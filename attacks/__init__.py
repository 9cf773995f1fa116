"""Malicious-client models, one module per attack, registered by name.

Importing this package imports every attack module so the registry is complete::

    from attacks import get_attack, list_attacks
    atk = get_attack("alie", z_mode="paper")
    sent = atk(deltas, ctx)          # deltas [..., K, D], ctx: AttackContext
"""

import attacks.base as _base
from attacks import (  # noqa: F401  (each import registers its attack)
    alie,
    gaussian,
    inf,
    ipm,
    label_flip,
    mask_aware,
    mimic,
    min_max,
    min_sum,
    optimized,
    random_noise,
    scaling,
    sign_flip,
    zero,
)
from attacks.base import (  # noqa: F401  (re-exported: __all__)
    Attack,
    AttackContext,
    FunctionAttack,
    ParamError,
    attack_class,
    get_attack,
    honest_statistics,
    list_attacks,
    register_attack,
    shared_masks,
    write_shared,
)
from psfed_robust.registry import import_submodules

__all__ = list(_base.__all__)


import_submodules(__name__, __path__)  # files dropped into this folder register too
