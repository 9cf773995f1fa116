"""The pure partial-sharing core: masks, flat models, selectors, seeds, aggregation math."""

from psfed_robust.core.aggregation import (
    fill_unshared,
    psofed_server_step,
    reporters_mean,
    server_weights,
)
from psfed_robust.core.flatten import FlattenedModel, TensorInfo
from psfed_robust.core.mask import Mask, SeedSpec, count_for_fraction
from psfed_robust.core.seeding import numpy_rng, stable_seed, torch_generator
from psfed_robust.core.selectors import (
    ClientSpecificMaskSelector,
    CompositeMaskSelector,
    FixedMaskSelector,
    GradientBasedSelector,
    MaskSelector,
    RandomMaskSelector,
    RoundRobinMaskSelector,
    StructuredMaskSelector,
    TopKMagnitudeSelector,
)

__all__ = [
    "ClientSpecificMaskSelector",
    "CompositeMaskSelector",
    "FixedMaskSelector",
    "FlattenedModel",
    "GradientBasedSelector",
    "Mask",
    "MaskSelector",
    "RandomMaskSelector",
    "RoundRobinMaskSelector",
    "SeedSpec",
    "StructuredMaskSelector",
    "TensorInfo",
    "TopKMagnitudeSelector",
    "count_for_fraction",
    "fill_unshared",
    "numpy_rng",
    "psofed_server_step",
    "reporters_mean",
    "server_weights",
    "stable_seed",
    "torch_generator",
]
