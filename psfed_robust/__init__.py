"""psfed-robust: a poisoning-robustness testbed built on partial model sharing (PSO-Fed/PSFed).

The core (masks, flat models, selectors, wire codec, aggregation math) imports without Flower;
``PSFedAvg`` and ``PSFedClient`` are loaded from :mod:`psfed_robust.flower` on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from psfed_robust.core import (
    ClientSpecificMaskSelector,
    CompositeMaskSelector,
    FixedMaskSelector,
    FlattenedModel,
    GradientBasedSelector,
    Mask,
    MaskSelector,
    RandomMaskSelector,
    RoundRobinMaskSelector,
    SeedSpec,
    StructuredMaskSelector,
    TopKMagnitudeSelector,
    stable_seed,
)

try:
    __version__ = version("psfed-robust")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
    "ClientSpecificMaskSelector",
    "CompositeMaskSelector",
    "FixedMaskSelector",
    "FlattenedModel",
    "GradientBasedSelector",
    "Mask",
    "MaskSelector",
    "PSFedAvg",
    "PSFedClient",
    "RandomMaskSelector",
    "RoundRobinMaskSelector",
    "SeedSpec",
    "StructuredMaskSelector",
    "TopKMagnitudeSelector",
    "__version__",
    "stable_seed",
]

_LAZY = {"PSFedAvg": "psfed_robust.flower", "PSFedClient": "psfed_robust.flower"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'psfed_robust' has no attribute {name!r}")
