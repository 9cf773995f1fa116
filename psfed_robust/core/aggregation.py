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

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "WeightScheme",
    "check_round_shapes",
    "effective_masks",
    "fill_unshared",
    "psofed_server_step",
    "psofed_server_step_indexed",
    "reporters_mean",
    "reporters_mean_indexed",
    "server_weights",
]

WeightScheme = Literal["participants", "expected", "all"]


def check_round_shapes(
    updates: Tensor,
    masks: Tensor | None,
    global_model: Tensor,
    participants: Tensor | None = None,
    weights: Tensor | None = None,
) -> None:
    """Validate one round's ``[..., K, D]`` inputs (docs/contracts.md, "Tensors and shapes")."""
    if updates.dim() < 2:
        raise ValueError(f"updates must be [..., K, D], got shape {tuple(updates.shape)}")
    expect_g = updates.shape[:-2] + updates.shape[-1:]
    if global_model.shape != expect_g:
        raise ValueError(
            f"global_model shape {tuple(global_model.shape)} must be {tuple(expect_g)} "
            f"for updates of shape {tuple(updates.shape)}"
        )
    if masks is not None:
        if masks.shape != updates.shape:
            raise ValueError(
                f"masks shape {tuple(masks.shape)} must equal updates shape {tuple(updates.shape)}"
            )
        if masks.dtype != torch.bool:
            raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")
    for name, t in (("participants", participants), ("weights", weights)):
        if t is not None and t.shape != updates.shape[:-1]:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} must be {tuple(updates.shape[:-1])}"
            )


_check_shapes = check_round_shapes


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
    return _indexed_weights(updates.shape[:-1], weights, participants, updates.dtype,
                            updates.device)


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


# ------------------------------------------------------------------ index-list forms
def _indexed_weights(lead: torch.Size, weights: Tensor | None, participants: Tensor | None,
                     dtype: torch.dtype, device: torch.device) -> Tensor:
    if weights is None:
        part = (torch.ones(lead, dtype=torch.bool, device=device) if participants is None
                else participants.to(torch.bool))
        return server_weights(part, "participants", dtype=dtype)
    if weights.shape != lead:
        raise ValueError(f"weights shape {tuple(weights.shape)} must be {tuple(lead)}")
    # one pass: NaN and -inf fail ``>= 0``, +inf fails ``< inf``
    if not bool(((weights >= 0) & (weights < float("inf"))).all()):
        raise ValueError("weights must be finite and non-negative")
    w = weights.to(dtype)
    if participants is not None:
        w = w * participants.to(dtype)
    return w


def _check_indexed(values: Tensor, index: Tensor, global_model: Tensor) -> None:
    if index.shape != values.shape or values.dim() < 2:
        raise ValueError(f"values {tuple(values.shape)} and index {tuple(index.shape)} must "
                         "both be [..., K, M]")
    if global_model.shape[:-1] != values.shape[:-2]:
        raise ValueError(f"global_model shape {tuple(global_model.shape)} does not match "
                         f"values {tuple(values.shape)}")


def _shared_columns(index: Tensor) -> Tensor | None:
    """The ``[..., M]`` coordinates of a stacked index ``[..., K, M]`` that is one row expanded
    over the clients (stride 0 along ``K``: coordinated masks), else ``None``."""
    if index.dim() < 2 or index.shape[-2] < 1 or index.shape[-1] < 1 or index.stride(-2) != 0:
        return None
    return index[..., 0, :].long()


def psofed_server_step_indexed(
    values: Tensor | Sequence[Tensor],
    index: Tensor | Sequence[Tensor | None],
    global_model: Tensor,
    weights: Tensor | None = None,
    participants: Tensor | None = None,
) -> Tensor:
    """PSO-Fed's step ``g + Σ_k ω_k T_k (u_k − g)`` from index lists, touching only sent entries.

    Stacked: ``values``/``index`` ``[..., K, M]`` (``participants`` ``[..., K]`` masks padding
    slots, whose values are never read). Sequences (one round's replies, ``M`` may differ;
    ``None`` index = dense): replies sharing one index tensor object are accumulated in the
    compact ``M``-long space and scattered once, and each reply costs one axpy pass
    (``(1 − Σω) g_m + Σ ω_k u_k``, the order of Flower's FedAvg); float32 models accumulate in
    float32 like FedAvg's numpy mean.
    """
    if isinstance(values, Tensor):
        if not isinstance(index, Tensor):
            raise TypeError("stacked values need a stacked index tensor")
        _check_indexed(values, index, global_model)
        lead = values.shape[:-1]
        w = _indexed_weights(lead, weights, participants, values.dtype, values.device)
        shared = _shared_columns(index)
        if shared is not None:  # every client sent the same coordinates
            diff = values - global_model.gather(-1, shared).unsqueeze(-2)
            idx = shared
        else:
            idx = index.long().reshape(*lead[:-1], -1)
            diff = values - global_model.gather(-1, idx).view(values.shape)
        if participants is not None:  # padding slots: never read (0 * inf would be NaN)
            diff = diff.masked_fill_(~participants.to(torch.bool).unsqueeze(-1), 0.0)
        diff.mul_(w.unsqueeze(-1))
        if shared is not None:
            # the clients' terms summed column by column in client order (index_add_ adds
            # slice after slice), the order in which scatter_add_ adds them on the CPU: the
            # same sums without a [..., K·M] index
            k = values.dim() - 2
            to_first = torch.zeros(values.shape[-2], dtype=torch.long, device=values.device)
            total = torch.zeros((*lead[:-1], 1, values.shape[-1]), dtype=diff.dtype,
                                device=diff.device).index_add_(k, to_first, diff).squeeze(k)
            acc = torch.zeros_like(global_model).scatter_add_(-1, idx, total)
        else:
            acc = torch.zeros_like(global_model).scatter_add_(-1, idx, diff.reshape(idx.shape))
        return global_model + acc
    vals = list(values)
    idxs = list(index)
    if len(idxs) != len(vals):
        raise ValueError(f"{len(vals)} values but {len(idxs)} index entries")
    if global_model.dim() != 1:
        raise ValueError("sequence form takes a 1-D global model")
    acc_dtype = torch.float32 if global_model.dtype == torch.float32 else torch.float64
    wl: list[float] = _indexed_weights(torch.Size([len(vals)]), weights, participants,
                                      torch.float64, global_model.device).tolist()
    g = global_model.to(acc_dtype)
    groups: dict[int, list[int]] = {}
    for k, ix in enumerate(idxs):
        if ix is not None and ix.numel() == 0:
            continue
        groups.setdefault(-1 if ix is None else id(ix), []).append(k)
    out: Tensor | None = None
    for key, members in groups.items():
        ix = idxs[members[0]]
        g_m = g if ix is None else g.index_select(0, ix.long())
        comp = g_m * (1.0 - sum(wl[k] for k in members))
        for k in members:
            comp.add_(vals[k].to(acc_dtype), alpha=wl[k])
        if key == -1:
            out = comp if out is None else out.add_(comp - g)
        else:
            if out is None:
                out = g.clone()
            out.index_add_(0, ix.long(), comp - g_m)  # type: ignore[union-attr]
    if out is None:
        out = g.clone()
    return out.to(global_model.dtype)


def reporters_mean_indexed(
    values: Tensor,
    index: Tensor,
    global_model: Tensor,
    weights: Tensor | None = None,
    participants: Tensor | None = None,
) -> Tensor:
    """:func:`reporters_mean` from stacked index lists ``[..., K, M]``."""
    _check_indexed(values, index, global_model)
    lead = values.shape[:-1]
    w = _indexed_weights(lead, weights, participants, values.dtype, values.device)
    idx = index.long().reshape(*lead[:-1], -1)
    wm = w.unsqueeze(-1).expand(values.shape)
    v = values
    if participants is not None:
        v = v.masked_fill(~participants.to(torch.bool).unsqueeze(-1), 0.0)
    num = torch.zeros_like(global_model).scatter_add_(-1, idx, (wm * v).reshape(idx.shape))
    den = torch.zeros_like(global_model).scatter_add_(-1, idx, wm.reshape(idx.shape))
    reported = den > 0
    return torch.where(reported, num / torch.where(reported, den, torch.ones_like(den)),
                       global_model)
