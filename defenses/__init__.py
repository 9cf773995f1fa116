"""Robust aggregators, one module per rule, registered by name.

Importing this package imports every defense module so the registry is complete::

    from defenses import get_defense
    agg = get_defense("trimmed_mean", beta=0.1)
    new_global = agg(updates, masks, global_model, participants=part, mode="reporters")
"""

from defenses import (  # noqa: F401  (each import registers its defense)
    arc,
    bucketing,
    bulyan,
    centered_clipping,
    geometric_median,
    krum,
    mean,
    median,
    nnm,
    norm_clipping,
    trimmed_mean,
)
from defenses.base import (
    Aggregator,
    CoordinatewiseAggregator,
    Mode,
    ParamError,
    defense_class,
    list_defenses,
    register_defense,
)
from defenses.compose import Composed, PreAggregator, compose, get_defense
from psfed_robust.registry import import_submodules

__all__ = [
    "Aggregator",
    "Composed",
    "CoordinatewiseAggregator",
    "Mode",
    "ParamError",
    "PreAggregator",
    "compose",
    "defense_class",
    "get_defense",
    "list_defenses",
    "register_defense",
]


import_submodules(__name__, __path__)  # files dropped into this folder register too
