"""Nearest-neighbour mixing, NNM (Allouah, Farhadkhani, Guerraoui, Gupta, Pinot & Stephan,
"Fixing by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity", AISTATS 2023).

A pre-aggregator: every participant's row is replaced by the average of its ``n - f`` nearest
rows (itself included, Euclidean distance), then any rule runs on the mixed rows
(``defenses.compose``). Mixing shrinks the honest rows' spread and bounds each Byzantine row's
pull, which turns rules such as Krum, median or trimmed mean into optimal ones under
heterogeneity (the paper's Theorem 1). Ties are broken by row index; ``f`` None = the composed
rule's ``f``. Precondition: ``n > f``.

fill: distances and means over the participants' filled vectors (ByzFL's ``NNM(f)`` on them).
reporters: distances between two rows are overlap-normalised as for Krum
(``defenses._distance.sq_distances``: ``D / o_ij`` times the squared difference over the ``o_ij``
coordinates both reported; ``+inf`` below ``min_overlap``), and a mixed row's coordinate is the
mean over the neighbours that reported it; the mixed row reports the union of its neighbours'
coordinates. Rows with no finite distance (no overlap, inf/NaN values) are never mixed in, so a
row may mix fewer than ``n - f`` rows; each row always mixes itself. ``info["nnm_neighbours"]``
receives the ``[..., K]`` number of rows each row mixed.
"""

from __future__ import annotations

import torch

from defenses._distance import sq_distances
from defenses.base import ParamError, RoundInputs, register_defense
from defenses.compose import PreAggregator, masked_mix, new_rows, rows_view
from psfed_robust.params import check_int


@register_defense("nnm")
class NNM(PreAggregator):
    """Nearest-neighbour mixing: each row becomes the mean of its ``n - f`` nearest rows."""

    def __init__(self, *, f: int | None = None, min_overlap: int = 1) -> None:
        o = self._owner()
        self.f = None if f is None else check_int(o, "f", f, low=0)
        self.min_overlap = check_int(o, "min_overlap", min_overlap, low=1)

    def check_rows(self, n: int, f: int) -> None:
        if n <= f:
            raise ParamError(f"{self._owner()}: needs n > f participants (f={f}), got n={n}; "
                             "lower 'f'")

    def neighbours(self, d: torch.Tensor, part: torch.Tensor, f: int) -> torch.Tensor:
        """``[..., K, K]`` bool: row i mixes row j (its ``n - f`` nearest with finite
        distance, itself first)."""
        k_rows = d.shape[-1]
        eye = torch.eye(k_rows, dtype=torch.bool, device=d.device)
        self_first = torch.full((), -1.0, dtype=d.dtype, device=d.device)
        d = torch.where(eye & part.unsqueeze(-1), self_first, d)
        order = torch.sort(d, dim=-1, stable=True).indices
        rank = torch.empty_like(order)
        ar = torch.arange(k_rows, device=d.device).expand_as(order)
        rank.scatter_(-1, order, ar)
        k = (part.sum(-1, keepdim=True) - f).clamp_min(1).unsqueeze(-1)
        pair = part.unsqueeze(-1) & part.unsqueeze(-2)
        return pair & (rank < k) & torch.isfinite(d)

    def transform(self, a: RoundInputs, f: int) -> RoundInputs:
        x, valid = rows_view(a)
        d = sq_distances(x, a.global_model, a.part, valid, self.min_overlap)
        sel = self.neighbours(d, a.part, f)
        a.info["nnm_neighbours"] = sel.sum(-1)
        mixed, new_valid = masked_mix(sel.to(x.dtype), x, valid)
        mixed = torch.where(a.part.unsqueeze(-1), mixed, a.global_model.unsqueeze(-2))
        return new_rows(a, mixed, new_valid, a.part, a.weights)
