"""Coordinate-wise median (Yin, Chen, Ramchandran & Bartlett, ICML 2018).

Even counts average the two middle values (``np.median``, Flower's ``aggregate_median``), not
``torch.median``'s lower middle. fill: over the participants' filled vectors; reporters: over each
coordinate's reporters (count varies per coordinate). Ignores ``weights``. Sorting kernel:
``defenses._kernels`` (no ``torch.quantile``).
"""

from __future__ import annotations

from torch import Tensor

from defenses._kernels import window_mean
from defenses.base import CoordinatewiseAggregator, register_defense


@register_defense("median")
class Median(CoordinatewiseAggregator):
    """Per-coordinate median of the valid values."""

    def coordinatewise(self, x: Tensor, valid: Tensor | None, count: Tensor) -> Tensor:
        lo = (count - 1).clamp_min(0) // 2
        hi = count // 2 + 1
        return window_mean(x, lo, hi, valid)
