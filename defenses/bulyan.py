"""Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018, "The Hidden Vulnerability of Distributed
Learning in Byzantium").

1. Select ``theta = n - 2f`` clients by iterated Krum *without replacement*: each step recomputes
   Krum scores (``max(1, n' - f - 2)`` neighbours) over the ``n'`` clients not yet selected
   (Flower ``aggregate_bulyan``; FLPoison's index drift and no-trim bugs are avoided).
2. Per coordinate, average the ``beta = theta - 2f`` selected values closest to the selected values'
   median (even counts: mean of the two middle values). Those form a contiguous window of the sorted
   column; the window with the smallest radius around the median is found vectorised.

Requires ``n >= 4f + 3`` participants (raises otherwise). fill: Krum over filled vectors,
``beta = theta - 2f``. reporters: overlap-normalised Krum distances, then per coordinate over the
``c`` selected reporters with ``beta = max(c - 2f, 1)``. Ignores ``weights``. The selection loop
runs ``theta`` steps over ``[..., K, K]`` score matrices (all runs at once), never over coordinates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks._params import ParamError, check_int
from defenses._distance import krum_scores, sq_distances
from defenses._kernels import sort_columns
from defenses.base import Aggregator, register_defense


@register_defense("bulyan")
class Bulyan(Aggregator):
    """Iterated-Krum selection of ``n - 2f`` clients, then a median-centred trimmed mean."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = check_int(self._owner(), "f", f, low=0)
        self.last_selected: Tensor | None = None

    def _check(self, part: Tensor) -> None:
        n = part.sum(-1)
        bad = (n > 0) & (n < 4 * self.f + 3)
        if bool(bad.any()):
            worst = int(n[bad].min())
            raise ParamError(
                f"{self._owner()}: needs n >= 4f + 3 participants (f={self.f} needs "
                f"n >= {4 * self.f + 3}), got n={worst}; lower 'f' or use 'multi_krum'"
            )

    def select(self, d: Tensor, part: Tensor) -> Tensor:
        """``[..., K]`` bool: the ``n - 2f`` clients picked by iterated Krum."""
        theta = part.sum(-1) - 2 * self.f
        remaining = part.clone()
        selected = torch.zeros_like(part)
        k = part.shape[-1]
        for t in range(int(theta.max().clamp_min(0)) if theta.numel() else 0):
            scores = krum_scores(d, remaining, self.f)
            best = torch.nn.functional.one_hot(scores.argmin(-1), k).to(torch.bool)
            pick = best & remaining & (theta > t).unsqueeze(-1)
            selected = selected | pick
            remaining = remaining & ~pick
        self.last_selected = selected
        return selected

    def _trim_around_median(self, x: Tensor, valid: Tensor, global_model: Tensor) -> Tensor:
        f = self.f
        count = valid.sum(-2)  # [..., D]
        beta = (count - 2 * f).clamp_min(1)
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
        return torch.where(count > 0, out, global_model)

    def dense(
        self, x: Tensor, part: Tensor, global_model: Tensor, weights: Tensor | None
    ) -> Tensor:
        self._check(part)
        sel = self.select(sq_distances(x, global_model, part), part)
        return self._trim_around_median(x, sel.unsqueeze(-1).expand(x.shape), global_model)

    def reporters(
        self,
        x: Tensor,
        valid: Tensor,
        part: Tensor,
        global_model: Tensor,
        weights: Tensor | None,
    ) -> Tensor:
        self._check(part)
        sel = self.select(sq_distances(x, global_model, part, valid), part)
        return self._trim_around_median(x, valid & sel.unsqueeze(-1), global_model)
