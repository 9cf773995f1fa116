"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017).

Score of client i: sum of squared distances to its ``n - f - 2`` nearest other participants (the
paper, Flower ``aggregate_krum``, NDSS; not ByzFL's ``n - f - 1`` or Blades' ``||.||^4``). Krum
returns the lowest-score client's vector; Multi-Krum averages the ``m`` lowest (default
``m = n - f`` per run), weighted by ``weights`` if given (Flower weights by example counts), else
uniformly. Scores are computed once (Flower's ``to_keep``), not iteratively.

Preconditions (the paper's, checked by ``check_participants`` on every call): ``n > 2f + 2``
participants; Multi-Krum also ``m <= n - f``. A violating round raises ``ParamError`` instead of
clamping the neighbour count.

Missing or non-finite distances count against a client, never for it (``defenses._distance``):
a client with an inf/NaN update gets score ``+inf``; in reporters mode, where clients share
different coordinate sets, a pair's distance is normalised per overlapping coordinate (pairs
sharing fewer than ``min_overlap`` coordinates have none), a client with ``k_i < k = n - f - 2``
comparable neighbours scores ``k`` times the mean of its ``k_i`` distances, and one with fewer
than ``min(k, min_neighbours)`` scores ``+inf``. A ``+inf`` client is never selected; if no client
has a finite score the global model is kept. ``info["selected"]`` receives the selected rows.

fill: dense Krum over the participants' filled vectors (the aggregate is the selected clients'
filled vectors' mean). reporters: overlap-normalised distances and the reporters mean over the
selected clients. Vectorised over runs (participant counts may differ).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from defenses._distance import krum_scores, lowest, sq_distances
from defenses.base import Aggregator, RoundInputs, register_defense
from psfed_robust.core.aggregation import reporters_mean
from psfed_robust.params import check_int


def _select_weights(sel: Tensor, weights: Tensor | None, dtype: torch.dtype) -> Tensor:
    w = sel.to(dtype) if weights is None else weights.to(dtype) * sel.to(dtype)
    tot = w.sum(-1, keepdim=True)
    uniform = sel.to(dtype) / sel.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    return torch.where(tot > 0, w / torch.where(tot > 0, tot, torch.ones_like(tot)), uniform)


@register_defense("multi_krum")
class MultiKrum(Aggregator):
    """Average of the ``m`` clients with the lowest Krum scores (needs ``n > 2f + 2``,
    ``m <= n - f``)."""

    uses_weights = True

    def __init__(
        self, *, f: int = 0, m: int | None = None, min_overlap: int = 1, min_neighbours: int = 3
    ) -> None:
        o = self._owner()
        self.f = check_int(o, "f", f, low=0)
        self.m = None if m is None else check_int(o, "m", m, low=1)
        self.min_overlap = check_int(o, "min_overlap", min_overlap, low=1)
        self.min_neighbours = check_int(o, "min_neighbours", min_neighbours, low=1)

    def check_participants(self, n: int) -> None:
        if n <= 2 * self.f + 2:
            raise self._needs(n, f"n > 2f + 2 = {2 * self.f + 2}", "lower 'f'")
        if self.m is not None and self.m > n - self.f:
            raise self._needs(n, f"m <= n - f (m={self.m}, so n >= {self.m + self.f})",
                              "lower 'm' or 'f'")

    def _m(self, part: Tensor) -> Tensor:
        n = part.sum(-1, keepdim=True)
        return (n - self.f) if self.m is None else torch.full_like(n, self.m)

    def select(self, d: Tensor, part: Tensor, info: dict[str, Any]) -> Tensor:
        """``[..., K]`` bool: the selected rows (also stored as ``info["selected"]``)."""
        sel = lowest(krum_scores(d, part, self.f, self.min_neighbours), part, self._m(part))
        info["selected"] = sel
        return sel

    def dense(self, a: RoundInputs) -> Tensor:
        x = a.x
        d = sq_distances(x, a.global_model, a.part)
        sel = self.select(d, a.part, a.info)
        w = _select_weights(sel, a.weights, x.dtype)
        # weight 0 times an inf/NaN row would be NaN: zero the unselected rows that may hold
        # one. A row with a finite distance is finite, so this rewrite of x is rarely needed.
        maybe_bad = ~sel & ~torch.isfinite(d).any(-1)
        xs = x
        if bool(maybe_bad.any()):
            xs = torch.where(maybe_bad.unsqueeze(-1),
                             torch.zeros((), dtype=x.dtype, device=x.device), x)
        out = torch.einsum("...k,...kd->...d", w, xs)
        return torch.where(sel.any(-1, keepdim=True), out, a.global_model)

    def reporters(self, a: RoundInputs) -> Tensor:
        assert a.valid is not None
        d = sq_distances(a.x, a.global_model, a.part, a.valid, self.min_overlap)
        sel = self.select(d, a.part, a.info)
        w = _select_weights(sel, a.weights, a.x.dtype)
        return reporters_mean(a.x, a.valid, a.global_model, weights=w, participants=sel)


@register_defense("krum")
class Krum(MultiKrum):
    """The single client with the lowest Krum score (Multi-Krum with ``m = 1``; needs
    ``n > 2f + 2``)."""

    uses_weights = False

    def __init__(self, *, f: int = 0, min_overlap: int = 1, min_neighbours: int = 3) -> None:
        super().__init__(f=f, m=1, min_overlap=min_overlap, min_neighbours=min_neighbours)
