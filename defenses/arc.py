"""Adaptive robust clipping, ARC (Allouah, Guerraoui, Gupta, Jellouli, Rizk & Stephan, "The Vital
Role of Gradient Clipping in Byzantine-Resilient Distributed Learning", NeurIPS 2024).

A pre-aggregator: with ``n`` participants and ``f`` Byzantine, the ``k = floor(2 f (n - f) / n)``
updates of largest norm are clipped to the norm of the ``(k+1)``-th largest, i.e. every update
``Delta_i = u_i - g`` becomes ``min(1, C / ||Delta_i||) Delta_i`` with ``C`` that norm; then any
rule runs on the clipped rows (``defenses.compose``; on its own: the mean). The threshold adapts
to the round, so honest updates are hardly touched while up to ``f`` boosted ones are bounded
(the paper's Theorem 5.2); ``k`` uses integer arithmetic (ByzFL computes it in floating point).
``f`` None = the composed rule's ``f``; ``k = 0`` (e.g. ``f = 0``) leaves every row unchanged.

Updates are clipped as deltas from the global model (ByzFL clips the vectors it is given,
gradients). fill: norms of the filled deltas, i.e. over each client's shared coordinates.
reporters: norms over the coordinates each client reported, the same numbers; masks unchanged.
A non-finite update has no direction: if it is among the ``k`` clipped it becomes the zero delta
(ByzFL would return NaN); with ``k = 0`` it passes unchanged. ``info["arc_clipped"]`` receives
the ``[..., K]`` rows that were scaled down.
"""

from __future__ import annotations

import torch

from defenses.base import RoundInputs, register_defense
from defenses.compose import PreAggregator, new_rows, rows_view
from psfed_robust.params import check_int


def arc_count(n: torch.Tensor, f: int) -> torch.Tensor:
    """Number of clipped rows ``floor(2 f (n - f) / n)`` (0 when ``n <= f`` or ``n = 0``)."""
    k = torch.div(2 * f * (n - f), n.clamp_min(1), rounding_mode="floor")
    return k.clamp_min(0)


@register_defense("arc")
class ARC(PreAggregator):
    """Clip the ``floor(2f(n-f)/n)`` largest updates to the next largest norm."""

    def __init__(self, *, f: int | None = None) -> None:
        self.f = None if f is None else check_int(self._owner(), "f", f, low=0)

    def transform(self, a: RoundInputs, f: int) -> RoundInputs:
        x, valid = rows_view(a)
        g = a.global_model.unsqueeze(-2)
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        keep = a.part.unsqueeze(-1) if valid is None else valid
        delta = torch.where(keep, x - g, zero)
        norm = delta.norm(dim=-1)
        finite = torch.isfinite(norm)
        key = torch.where(finite, norm, float("inf"))
        key = torch.where(a.part, key, -float("inf"))
        srt, order = torch.sort(key, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(key.shape[-1], device=key.device).expand_as(order))
        k = arc_count(a.part.sum(-1, keepdim=True), f)
        thr = srt.gather(-1, k.clamp_max(key.shape[-1] - 1))  # [..., 1] the (k+1)-th largest
        top = a.part & (rank < k)
        scale = torch.where(finite & (norm > thr), thr / torch.where(finite, norm, 1.0), 1.0)
        scale = torch.where(top, scale, 1.0)
        clipped = torch.where((top & ~finite).unsqueeze(-1), zero, delta * scale.unsqueeze(-1))
        a.info["arc_clipped"] = top & (~finite | (scale < 1))
        out = torch.where(keep, g + clipped, x)
        return new_rows(a, out, valid, a.part, a.weights)
