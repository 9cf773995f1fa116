"""Pairwise distances and Krum scores shared by ``krum``, ``multi_krum`` and ``bulyan``.

Squared Euclidean distances come from one Gram matmul on vectors centred at the global model
(``||a||^2 + ||b||^2 - 2 a.b``, clamped at 0) - never a Python loop over pairs.

Reporters mode (partial updates): the distance between clients i and j uses only the coordinates
both reported, rescaled to the full dimension:
``d_ij = D * sum_d m_i m_j (x_i - x_j)^2 / sum_d m_i m_j`` (``+inf`` with no overlap, i.e. never a
neighbour). The rescaling keeps pairs with small and large overlaps comparable; with dense masks it
is the plain squared distance.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sq_distances(
    x: Tensor, global_model: Tensor, part: Tensor, masks: Tensor | None = None
) -> Tensor:
    """``[..., K, K]`` squared distances between participants (``inf`` elsewhere and on the
    diagonal). ``masks`` given = reporters-mode overlap distances (see module doc)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    keep = part.unsqueeze(-1) if masks is None else (masks & part.unsqueeze(-1))
    y = x - global_model.unsqueeze(-2)
    if masks is not None or not bool(part.all()):
        y = torch.where(keep, y, zero)
    yt = y.transpose(-1, -2)
    if masks is None:
        gram = y @ yt
        sq = gram.diagonal(dim1=-2, dim2=-1)
        d = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * gram
    else:
        m = keep.to(x.dtype)
        y2 = y.square()
        a = y2 @ m.transpose(-1, -2)  # [i, j] = sum_d m_j y_i^2 ; its transpose is the j-term
        num = a + a.transpose(-1, -2) - 2 * (y @ yt)
        overlap = m @ m.transpose(-1, -2)
        d = torch.where(
            overlap > 0,
            num.clamp_min(0.0) * x.shape[-1] / overlap.clamp_min(1.0),
            torch.full((), float("inf"), dtype=x.dtype, device=x.device),
        )
    d = d.clamp_min(0.0)
    k = x.shape[-2]
    pair = part.unsqueeze(-1) & part.unsqueeze(-2)
    pair = pair & ~torch.eye(k, dtype=torch.bool, device=x.device)
    return torch.where(pair, d, torch.full((), float("inf"), dtype=x.dtype, device=x.device))


def krum_scores(d: Tensor, alive: Tensor, f: int) -> Tensor:
    """Krum score per row: sum of its ``max(1, n - f - 2)`` smallest distances to other alive rows
    (``n`` alive rows per run, as Flower's ``aggregate_krum``); ``inf`` for dead rows."""
    inf = torch.full((), float("inf"), dtype=d.dtype, device=d.device)
    pair = alive.unsqueeze(-1) & alive.unsqueeze(-2)
    dd = torch.where(pair, d, inf)
    srt = dd.sort(dim=-1).values
    n = alive.sum(-1, keepdim=True)
    k = (n - f - 2).clamp_min(1).unsqueeze(-1)
    ranks = torch.arange(d.shape[-1], device=d.device)
    take = (ranks < k) & torch.isfinite(srt)
    scores = torch.where(take, srt, torch.zeros((), dtype=d.dtype, device=d.device)).sum(-1)
    return torch.where(alive, scores, inf)


def lowest(scores: Tensor, alive: Tensor, m: Tensor) -> Tensor:
    """``[..., K]`` bool: the ``m`` (per run, ``[..., 1]``) alive rows with the lowest scores
    (ties broken by index)."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return alive & (rank < m)
