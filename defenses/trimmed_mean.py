"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, ICML 2018).

Per coordinate with ``n`` valid values (participants in fill mode, reporters in reporters mode),
drop the ``b`` smallest and ``b`` largest and average the rest, with ``b = floor(beta * n)``
(Flower's ``aggregate_trimmed_avg`` / scipy ``trim_mean``) or, if ``f`` is given, ``b = f``
(ByzFL ``TrMean(f)``, Karimireddy TM(b=f)), capped at ``(n-1)//2`` so a value always remains.
``b = 0`` is the plain mean (FLPoison returns 0 there - a bug we test against). Ignores ``weights``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks._params import check_int, check_real
from defenses._kernels import window_mean
from defenses.base import CoordinatewiseAggregator, register_defense


@register_defense("trimmed_mean")
class TrimmedMean(CoordinatewiseAggregator):
    """Drop ``floor(beta n)`` (or ``f``) values per side per coordinate, average the rest."""

    def __init__(self, *, beta: float = 0.1, f: int | None = None) -> None:
        o = self._owner()
        self.beta = check_real(o, "beta", beta, low=0.0, high=0.5, high_open=True)
        self.f = None if f is None else check_int(o, "f", f, low=0)

    def trim_count(self, count: Tensor) -> Tensor:
        """``b`` per coordinate for ``count`` valid values."""
        if self.f is not None:
            b = torch.full_like(count, self.f)
        else:
            b = torch.floor(count.to(torch.float64) * self.beta).to(count.dtype)
        return torch.minimum(b, (count - 1).clamp_min(0) // 2)

    def coordinatewise(self, x: Tensor, valid: Tensor | None, count: Tensor) -> Tensor:
        b = self.trim_count(count)
        hi = torch.maximum(count - b, b + 1)
        return window_mean(x, b, hi, valid)
