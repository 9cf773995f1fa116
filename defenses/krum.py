"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017).

Score of client i: sum of squared distances to its ``max(1, n - f - 2)`` nearest other
participants (the paper, Flower ``aggregate_krum``, NDSS; not ByzFL's ``n - f - 1`` or Blades'
``||.||^4``). Krum returns the lowest-score client's vector; Multi-Krum averages the ``m`` lowest
(default ``m = n - f`` per run), weighted by ``weights`` if given (Flower weights by example
counts), else uniformly. Scores are computed once (Flower's ``to_keep``), not iteratively.

fill: dense Krum over the participants' filled vectors (the aggregate is the selected clients'
filled vectors' mean). reporters: overlap-normalised distances (``defenses._distance``) and the
reporters mean over the selected clients. Vectorised over runs (participant counts may differ).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks._params import check_int
from defenses._distance import krum_scores, lowest, sq_distances
from defenses.base import Aggregator, register_defense
from psfed_robust.core.aggregation import reporters_mean


def _select_weights(sel: Tensor, weights: Tensor | None, dtype: torch.dtype) -> Tensor:
    w = sel.to(dtype) if weights is None else weights.to(dtype) * sel.to(dtype)
    tot = w.sum(-1, keepdim=True)
    uniform = sel.to(dtype) / sel.sum(-1, keepdim=True).clamp_min(1).to(dtype)
    return torch.where(tot > 0, w / torch.where(tot > 0, tot, torch.ones_like(tot)), uniform)


@register_defense("multi_krum")
class MultiKrum(Aggregator):
    """Average of the ``m`` clients with the lowest Krum scores."""

    uses_weights = True

    def __init__(self, *, f: int = 0, m: int | None = None) -> None:
        o = self._owner()
        self.f = check_int(o, "f", f, low=0)
        self.m = None if m is None else check_int(o, "m", m, low=1)
        self.last_selected: Tensor | None = None

    def _m(self, part: Tensor) -> Tensor:
        n = part.sum(-1, keepdim=True)
        m = (n - self.f) if self.m is None else torch.full_like(n, self.m)
        return torch.minimum(m.clamp_min(1), n)

    def select(self, d: Tensor, part: Tensor) -> Tensor:
        sel = lowest(krum_scores(d, part, self.f), part, self._m(part))
        self.last_selected = sel
        return sel

    def dense(
        self, x: Tensor, part: Tensor, global_model: Tensor, weights: Tensor | None
    ) -> Tensor:
        sel = self.select(sq_distances(x, global_model, part), part)
        w = _select_weights(sel, weights, x.dtype)
        xs = (
            x
            if bool(part.all())
            else torch.where(sel.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype))
        )
        out = torch.einsum("...k,...kd->...d", w, xs)
        return torch.where(part.any(-1, keepdim=True), out, global_model)

    def reporters(
        self,
        x: Tensor,
        valid: Tensor,
        part: Tensor,
        global_model: Tensor,
        weights: Tensor | None,
    ) -> Tensor:
        sel = self.select(sq_distances(x, global_model, part, valid), part)
        w = _select_weights(sel, weights, x.dtype)
        return reporters_mean(x, valid, global_model, weights=w, participants=sel)


@register_defense("krum")
class Krum(MultiKrum):
    """The single client with the lowest Krum score (Multi-Krum with ``m = 1``)."""

    uses_weights = False

    def __init__(self, *, f: int = 0) -> None:
        super().__init__(f=f, m=1)

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return ("f",)
