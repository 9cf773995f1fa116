"""Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018, "The Hidden Vulnerability of Distributed
Learning in Byzantium").

1. Select ``theta = n - 2f`` clients by iterated Krum *without replacement*: each step recomputes
   Krum scores (``max(1, n' - f - 2)`` neighbours) over the ``n'`` clients not yet selected
   (Flower ``aggregate_bulyan``; FLPoison's index drift and no-trim bugs are avoided). Missing or
   non-finite distances count against a client (``defenses._distance``): a client whose score is
   ``+inf`` is never selected, so a round may select fewer than ``theta`` clients.
2. Per coordinate, average the ``beta = theta - 2f`` selected values closest to the selected values'
   median (even counts: mean of the two middle values). Those form a contiguous window of the sorted
   column; the window with the smallest radius around the median is found vectorised.

Precondition (the paper's): ``n >= 4f + 3`` participants, checked by ``check_participants`` on
every call (``ParamError`` naming n and f). Per coordinate the second stage needs ``c > 2f``
selected values (``beta = c - 2f``); a coordinate with fewer (reporters mode, or a round whose
selection lost clients to non-finite scores) keeps the global value. fill: Krum over filled
vectors. reporters: overlap-normalised Krum distances (pairs sharing fewer than ``min_overlap``
coordinates have none; Krum scores as in ``defenses.krum``, ``min_neighbours``), then per
coordinate over the ``c`` selected reporters. No client row at
all returns the global model. Ignores ``weights``. ``info["selected"]`` receives the selected rows.
The selection loop runs ``theta`` steps over ``[..., K, K]`` score matrices (all runs at once),
never over coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from defenses._distance import krum_scores, sq_distances
from defenses._kernels import sort_columns
from defenses.base import Aggregator, RoundInputs, register_defense
from psfed_robust.params import check_int


@register_defense("bulyan")
class Bulyan(Aggregator):
    """Iterated-Krum selection of ``n - 2f`` clients, then a median-centred trimmed mean."""

    def __init__(self, *, f: int = 0, min_overlap: int = 1, min_neighbours: int = 3) -> None:
        o = self._owner()
        self.f = check_int(o, "f", f, low=0)
        self.min_overlap = check_int(o, "min_overlap", min_overlap, low=1)
        self.min_neighbours = check_int(o, "min_neighbours", min_neighbours, low=1)

    def check_participants(self, n: int) -> None:
        if n < 4 * self.f + 3:
            raise self._needs(
                n, f"n >= 4f + 3 = {4 * self.f + 3}", "lower 'f' or use 'multi_krum'"
            )

    def select(self, d: Tensor, part: Tensor) -> Tensor:
        """``[..., K]`` bool: the (up to) ``n - 2f`` clients picked by iterated Krum."""
        theta = part.sum(-1) - 2 * self.f
        comparable = torch.isfinite(d).any(-1)  # has at least one finite distance
        remaining = part.clone()
        selected = torch.zeros_like(part)
        k = part.shape[-1]
        for t in range(int(theta.max().clamp_min(0)) if theta.numel() else 0):
            scores = krum_scores(d, remaining, self.f, self.min_neighbours)
            scores = torch.where(comparable, scores, torch.inf)
            best = torch.nn.functional.one_hot(scores.argmin(-1), k).to(torch.bool)
            pick = best & remaining & torch.isfinite(scores) & (theta > t).unsqueeze(-1)
            selected = selected | pick
            remaining = remaining & ~pick
        return selected

    def _trim_around_median(self, x: Tensor, valid: Tensor, global_model: Tensor) -> Tensor:
        f = self.f
        count = valid.sum(-2)  # [..., D]
        beta = (count - 2 * f).clamp_min(1)  # columns with count <= 2f are replaced below
        srt = sort_columns(x, valid)
        lo_m = ((count - 1).clamp_min(0) // 2).unsqueeze(-2)
        hi_m = (count // 2).unsqueeze(-2)
        med = 0.5 * (srt.gather(-2, lo_m) + srt.gather(-2, hi_m))  # [..., 1, D]
        cand = torch.arange(2 * f + 1, device=x.device).view(-1, 1)  # window starts
        start = cand.expand(*count.shape[:-1], 2 * f + 1, count.shape[-1])
        end = start + beta.unsqueeze(-2) - 1
        ok = end < count.unsqueeze(-2)
        kmax = x.shape[-2] - 1
        left = srt.gather(-2, start.clamp_max(kmax))
        right = srt.gather(-2, end.clamp_max(kmax))
        radius = torch.maximum(med - left, right - med)
        radius = torch.where(ok, radius, torch.full((), float("inf"), dtype=x.dtype))
        a = radius.argmin(dim=-2, keepdim=True)  # first minimal window
        ranks = torch.arange(x.shape[-2], device=x.device).view(-1, 1)
        keep = (ranks >= a) & (ranks < a + beta.unsqueeze(-2))
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        out = torch.where(keep, srt, zero).sum(-2) / beta.to(x.dtype)
        return torch.where(count > 2 * f, out, global_model)

    def dense(self, a: RoundInputs) -> Tensor:
        sel = self.select(sq_distances(a.x, a.global_model, a.part), a.part)
        a.info["selected"] = sel
        return self._trim_around_median(a.x, sel.unsqueeze(-1).expand(a.x.shape), a.global_model)

    def reporters(self, a: RoundInputs) -> Tensor:
        assert a.valid is not None
        x, valid, global_model = a.x, a.valid, a.global_model
        sel = self.select(sq_distances(x, global_model, a.part, valid, self.min_overlap), a.part)
        a.info["selected"] = sel
        return self._trim_around_median(x, valid & sel.unsqueeze(-1), global_model)
