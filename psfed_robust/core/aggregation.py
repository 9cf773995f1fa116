"""Partial-aggregation math of PSO-Fed as pure torch functions.

Shapes follow docs/contracts.md: ``updates`` and ``masks`` are ``[..., K, D]`` (model values laid
out in the full vector, ``True`` = shared), ``global_model`` is ``[..., D]``, ``participants`` and
``weights`` are ``[..., K]``. Entries outside a client's mask are never read, so a client's unshared
values cannot leak into the aggregate, and no mask is ever inferred from zero values.

PSO-Fed's server step (Gogineni et al., ICASSP 2022; Lari et al., IEEE TSIPN 2025):
``w_{n+1} = w_n + ω Σ_{k∈K_n} T_k (u_k − w_n)`` — every unshared entry is filled with the server's
own value, so each coordinate moves part-way in proportion to how many participants shared it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "WeightScheme",
    "effective_masks",
    "fill_unshared",
    "psofed_server_step",
    "reporters_mean",
    "server_weights",
]

WeightScheme = Literal["participants", "expected", "all"]


def _check_shapes(updates: Tensor, masks: Tensor | None, global_model: Tensor) -> None:
    if updates.dim() < 2:
        raise ValueError(f"updates must be [..., K, D], got shape {tuple(updates.shape)}")
    if global_model.shape != updates.shape[:-2] + updates.shape[-1:]:
        raise ValueError(
            f"global_model shape {tuple(global_model.shape)} does not match updates "
            f"{tuple(updates.shape)} (expected {tuple(updates.shape[:-2] + updates.shape[-1:])})"
        )
    if masks is not None:
        if masks.shape != updates.shape:
            raise ValueError(
                f"masks shape {tuple(masks.shape)} must equal updates shape {tuple(updates.shape)}"
            )
        if masks.dtype != torch.bool:
            raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")


def effective_masks(
    updates: Tensor, masks: Tensor | None, participants: Tensor | None = None
) -> Tensor:
    """Masks restricted to participating clients (``None`` masks mean dense updates)."""
    m = torch.ones_like(updates, dtype=torch.bool) if masks is None else masks
    if participants is not None:
        if participants.shape != updates.shape[:-1]:
            raise ValueError(
                f"participants shape {tuple(participants.shape)} must be "
                f"{tuple(updates.shape[:-1])}"
            )
        m = m & participants.to(torch.bool).unsqueeze(-1)
    return m


def fill_unshared(updates: Tensor, masks: Tensor | None, global_model: Tensor) -> Tensor:
    """Replace every unshared entry by the global model's value (PSO-Fed's *fill* view)."""
    _check_shapes(updates, masks, global_model)
    if masks is None:
        return updates.clone()
    return torch.where(masks, updates, global_model.unsqueeze(-2))


def server_weights(
    participants: Tensor,
    scheme: WeightScheme = "participants",
    num_clients: int | None = None,
    p_c: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """PSO-Fed's server weight ω per client: ``1/|K_n|``, ``1/(p_c K)`` or ``1/K``.

    Non-participants get weight 0. With no participant in a run, the weights are all 0 (the
    global model then stays where it is).
    """
    part = participants.to(torch.bool)
    k = num_clients if num_clients is not None else part.shape[-1]
    if k <= 0:
        raise ValueError(f"num_clients must be positive, got {k}")
    if scheme == "participants":
        count = part.sum(dim=-1, keepdim=True).to(dtype)
        w = part.to(dtype) / count.clamp_min(1.0)
    elif scheme == "expected":
        if p_c is None or not 0.0 < p_c <= 1.0:
            raise ValueError(f"scheme 'expected' needs p_c in (0, 1], got {p_c!r}")
        w = part.to(dtype) / (p_c * k)
    elif scheme == "all":
        w = part.to(dtype) / k
    else:
        raise ValueError(
            f"unknown server weight scheme {scheme!r}; allowed: 'participants', 'expected', 'all'"
        )
    return w


def _weights_or_uniform(
    updates: Tensor, weights: Tensor | None, participants: Tensor | None
) -> Tensor:
    lead = updates.shape[:-1]
    if weights is None:
        if participants is None:
            participants = torch.ones(lead, dtype=torch.bool, device=updates.device)
        return server_weights(participants, "participants", dtype=updates.dtype)
    if weights.shape != lead:
        raise ValueError(f"weights shape {tuple(weights.shape)} must be {tuple(lead)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and non-negative")
    w = weights.to(updates.dtype)
    if participants is not None:
        w = w * participants.to(updates.dtype)
    return w


def psofed_server_step(
    updates: Tensor,
    masks: Tensor | None,
    global_model: Tensor,
    weights: Tensor | None = None,
    participants: Tensor | None = None,
) -> Tensor:
    """``g + Σ_k ω_k m_k (u_k − g)``: PSO-Fed's server update (fill mode mean).

    ``weights`` default to ``1/|K_n|`` over participants; pass :func:`server_weights` for the
    other schemes or example-count weights (normalised to sum 1) for FedAvg-style averaging.
    """
    _check_shapes(updates, masks, global_model)
    w = _weights_or_uniform(updates, weights, participants)
    diff = updates - global_model.unsqueeze(-2)
    if masks is not None or participants is not None:  # never read unshared/absent entries
        diff = diff.masked_fill_(~effective_masks(updates, masks, participants), 0.0)
    step = torch.einsum("...k,...kd->...d", w, diff)
    return global_model + step


def reporters_mean(
    updates: Tensor,
    masks: Tensor | None,
    global_model: Tensor,
    weights: Tensor | None = None,
    participants: Tensor | None = None,
) -> Tensor:
    """Per-coordinate (weighted) mean over the participants that reported the coordinate.

    Coordinates nobody reported keep the global value (FjORD-style; never divide by the number of
    clients that sent *something* when not all of them sent *this* coordinate).
    """
    _check_shapes(updates, masks, global_model)
    w = _weights_or_uniform(updates, weights, participants)
    m = effective_masks(updates, masks, participants)
    wm = w.unsqueeze(-1) * m.to(updates.dtype)
    total = wm.sum(dim=-2)
    vals = torch.where(m, updates, torch.zeros((), dtype=updates.dtype, device=updates.device))
    num = (wm * vals).sum(dim=-2)
    reported = total > 0
    return torch.where(reported, num / torch.where(reported, total, torch.ones_like(total)),
                       global_model)
