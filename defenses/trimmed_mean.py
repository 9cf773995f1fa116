"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, ICML 2018).

Per coordinate with ``n`` valid values (participants in fill mode, reporters in reporters mode),
drop the ``b`` smallest and ``b`` largest and average the rest, with ``b = floor(beta * n)``
(Flower's ``aggregate_trimmed_avg`` / scipy ``trim_mean``) or, if ``f`` is given, ``b = f``
(ByzFL ``TrMean(f)``, Karimireddy TM(b=f)). ``b = 0`` is the plain mean (FLPoison returns 0 there
- a bug we test against). Ignores ``weights``.

Precondition: with ``f`` given, ``2f < n`` participants (``check_participants``: a violating round
raises ``ParamError`` naming n and f instead of trimming fewer values); with ``beta`` (< 1/2)
every ``n`` works. In reporters mode a coordinate reported by ``c <= 2f`` participants cannot be
trimmed by ``f`` per side and keeps the global value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from defenses._kernels import window_mean
from defenses.base import CoordinatewiseAggregator, register_defense
from psfed_robust.params import check_int, check_real


@register_defense("trimmed_mean")
class TrimmedMean(CoordinatewiseAggregator):
    """Drop ``floor(beta n)`` (or ``f``) values per side per coordinate, average the rest."""

    def __init__(self, *, beta: float = 0.1, f: int | None = None) -> None:
        o = self._owner()
        self.beta = check_real(o, "beta", beta, low=0.0, high=0.5, high_open=True)
        self.f = None if f is None else check_int(o, "f", f, low=0)

    def check_participants(self, n: int) -> None:
        if self.f is not None and 2 * self.f >= n:
            raise self._needs(n, f"2f < n, i.e. n >= {2 * self.f + 1}", "lower 'f' or use 'beta'")

    def min_count(self) -> int:
        return 1 if self.f is None else 2 * self.f + 1

    def trim_count(self, count: Tensor) -> Tensor:
        """``b`` per coordinate for ``count`` valid values (columns with ``count < min_count()``
        are replaced by the global value; the cap only keeps their window well formed)."""
        if self.f is not None:
            b = torch.full_like(count, self.f)
        else:
            b = torch.floor(count.to(torch.float64) * self.beta).to(count.dtype)
        return torch.minimum(b, (count - 1).clamp_min(0) // 2)

    def coordinatewise(self, x: Tensor, valid: Tensor | None, count: Tensor) -> Tensor:
        b = self.trim_count(count)
        hi = torch.maximum(count - b, b + 1)
        return window_mean(x, b, hi, valid)
