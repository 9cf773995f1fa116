"""One PSO-Fed round, written once: downlink merge, local deltas, attack seam, server step.

Every engine calls these functions and nothing else for the round's math (README,
"Architecture"): the batched engine on ``[B, K, D]`` tensors and ``[B, K, M]`` index lists, the
Flower client on one local model, the Flower strategy on one round's replies. An engine may
*route* (choose the index form, skip absent clients) but never re-implements a step.

The round of PSO-Fed (Gogineni et al., ICASSP 2022; Lari et al., IEEE TSIPN 2025) at a
participant ``k`` with downlink selection ``S_k`` and uplink selection ``T_k``:

1. :func:`merge_` — ``ŵ_k = S_k w + (I − S_k) w_k`` (shared entries overwrite the local model);
2. local training (engine specific: LMS step, SGD on a network);
3. :func:`local_deltas` — ``δ_k = w_k − reference`` (the honest update);
4. :func:`attack_step` — the attack seam: ``δ'_k = attack(δ, ctx)`` on the malicious
   participants; a *persistent* attack (a threat-model setting, not an attack parameter) also
   writes ``reference + δ'_k`` into the attacker's local model, a transmit-only one does not;
5. :func:`server_step` — ``w ← defense(reference + δ', T, w)``; with ``defense = mean`` in fill
   mode this is PSO-Fed's ``w + Σ_k ω_k T_k (u_k − w)``.

Masks come in two forms, accepted by every function that takes them:

- *bool masks* ``[..., K, D]`` (``True`` = shared), values laid out in the full vector;
- *index lists* ``[..., K, M]`` (int coordinates, distinct within a row), values ``[..., K, M]``
  on those coordinates only — what the batched engine and the wire carry. The Flower strategy
  passes one round's replies as *sequences* of 1-D tensors (``M`` may differ per reply; ``None``
  index = every coordinate).

A defense that can aggregate index lists directly defines ``indexed(values, index, global_model,
*, participants, weights, mode) -> Tensor | None`` (``None``: not for these inputs); every other
defense sees the dense form built by :func:`densify`, so a rule is written once and works on both
engines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "Mode",
    "attack_step",
    "densify",
    "gather",
    "local_deltas",
    "merge_",
    "server_step",
]

Mode = Literal["fill", "reporters"]
_MODES = ("fill", "reporters")


# ----------------------------------------------------------------------------------- downlink
def gather(global_model: Tensor, index: Tensor | None) -> Tensor:
    """The global values on ``index`` (``[..., K, M]`` or ``[M]``); ``None`` = all of them.

    ``global_model`` is ``[..., D]``; batched index lists ``[..., K, M]`` give ``[..., K, M]``.
    """
    if index is None:
        return global_model
    idx = index.long()
    if idx.dim() == 1:
        return global_model.index_select(-1, idx) if global_model.dim() == 1 else \
            global_model[..., idx]
    lead = idx.shape[:-2]
    flat = idx.reshape(*lead, -1)
    return global_model.gather(-1, flat).view(idx.shape)


def merge_(local: Tensor, index: Tensor | None, values: Tensor) -> Tensor:
    """Downlink merge in place: ``local[..., index] = values`` (PSO-Fed's ``S w + (I − S) w_k``).

    ``local`` ``[..., D]`` (one client) or ``[..., K, D]`` with ``index``/``values``
    ``[..., K, M]``; ``index=None`` overwrites every coordinate. Returns ``local``.
    """
    if index is None:
        return local.copy_(values.expand_as(local) if values.dim() < local.dim() else values)
    if index.shape != values.shape:
        raise ValueError(
            f"merge_: index shape {tuple(index.shape)} must equal values shape "
            f"{tuple(values.shape)}"
        )
    return local.scatter_(-1, index.long(), values.to(local.dtype))


# ----------------------------------------------------------------------------------- uplink
def local_deltas(local: Tensor, reference: Tensor) -> Tensor:
    """Honest updates ``δ_k = w_k − reference``: ``local`` ``[..., K, D]`` (or ``[D]``),
    ``reference`` ``[..., D]`` (the model the round started from)."""
    if local.dim() == reference.dim():
        return local - reference
    return local - reference.unsqueeze(-2)


def attack_step(
    attack: Callable[[Tensor, Any], Tensor],
    honest: Tensor,
    ctx: Any,
    *,
    persistent: bool,
) -> tuple[Tensor, Tensor | None]:
    """The attack seam: ``(sent deltas, rows to persist)``.

    ``honest`` ``[..., K, D]`` are the honest deltas; ``ctx`` the round's ``AttackContext``
    (its ``state`` dict is the run's explicit attack state, its ``info`` dict the round's
    diagnostics). Only active rows (``malicious & participants``) may change. With
    ``persistent`` (the threat model's choice, Lari et al. 2025 §II: the attacker keeps its
    poisoned model) the second value is the ``[..., K]`` bool of rows the attack changed, whose
    local models the engine sets to ``reference + sent``; otherwise ``None`` (transmit-only).
    """
    sent = attack(honest, ctx)
    if not isinstance(sent, Tensor) or sent.shape != honest.shape:
        got = tuple(sent.shape) if isinstance(sent, Tensor) else type(sent).__name__
        raise ValueError(
            f"attack {getattr(attack, 'name', attack)!r} returned {got}, expected a tensor of "
            f"shape {tuple(honest.shape)}"
        )
    sent = sent.to(honest.dtype)
    if not persistent:
        return sent, None
    changed = (sent != honest).any(-1)  # NaN != NaN: a NaN row counts as changed
    return sent, changed


# ----------------------------------------------------------------------------------- server
def _check_mode(mode: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of 'fill', 'reporters', got {mode!r}")


def densify(
    values: Tensor | Sequence[Tensor],
    index: Tensor | Sequence[Tensor | None] | None,
    global_model: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """``(updates [..., K, D], masks [..., K, D] | None)`` from index-form values.

    Unshared entries hold the global value (the *fill* view; never read in reporters mode).
    ``index=None`` with stacked ``values`` means dense updates (masks ``None``).
    """
    D = global_model.shape[-1]
    if isinstance(values, Tensor):
        if index is None:
            return values, None
        if not isinstance(index, Tensor):
            raise TypeError("densify: stacked values need a stacked index tensor")
        if index.shape != values.shape:
            raise ValueError(
                f"densify: index shape {tuple(index.shape)} must equal values shape "
                f"{tuple(values.shape)}"
            )
        lead = index.shape[:-1]
        upd = global_model.unsqueeze(-2).expand(*lead, D).clone()
        upd.scatter_(-1, index.long(), values.to(upd.dtype))
        masks = torch.zeros((*lead, D), dtype=torch.bool, device=upd.device)
        masks.scatter_(-1, index.long(), True)
        return upd, masks
    vals = list(values)
    idxs: list[Tensor | None] = [None] * len(vals) if index is None else list(index)
    if len(idxs) != len(vals):
        raise ValueError(f"densify: {len(vals)} values but {len(idxs)} index entries")
    K = len(vals)
    upd = global_model.unsqueeze(0).repeat(K, 1)
    masks = torch.zeros((K, D), dtype=torch.bool, device=global_model.device)
    for k, (v, ix) in enumerate(zip(vals, idxs, strict=True)):
        if ix is None:
            upd[k] = v.to(upd.dtype)
            masks[k] = True
        else:
            upd[k].index_copy_(0, ix.long(), v.to(upd.dtype))
            masks[k, ix.long()] = True
    return upd, masks


def server_step(
    defense: Any,
    values: Tensor | Sequence[Tensor],
    global_model: Tensor,
    *,
    masks: Tensor | None = None,
    index: Tensor | Sequence[Tensor | None] | None = None,
    participants: Tensor | None = None,
    weights: Tensor | None = None,
    mode: Mode = "fill",
    info: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The new global model ``[..., D]``: ``defense`` over the round's sent values.

    Exactly one mask form: ``masks`` (bool ``[..., K, D]``, values ``[..., K, D]``), ``index``
    (index lists, values on them; stacked ``[..., K, M]`` or one 1-D tensor per reply), or
    neither (dense updates). ``weights`` ``[..., K]`` are the server weights ω (PSO-Fed's
    ``1/|K_n|``, ``1/(p_c K)``, ``1/K``, or normalised example counts); ``participants``
    ``[..., K]`` bool marks real participants (Bernoulli padding slots are ``False``).
    ``info`` receives the defense's diagnostics (e.g. Krum's selected rows); ``generator`` is
    the round's explicit RNG for randomised defenses (bucketing's shuffle), passed on only when
    given.
    """
    _check_mode(mode)
    if masks is not None and index is not None:
        raise ValueError("server_step: pass masks or index, not both")
    extra: dict[str, Any] = {} if info is None else {"info": info}
    if generator is not None:
        extra["generator"] = generator
    if index is not None:
        fast = getattr(defense, "indexed", None)
        if fast is not None:
            out = fast(values, index, global_model, participants=participants, weights=weights,
                       mode=mode)
            if out is not None:
                return out  # type: ignore[no-any-return]
        if participants is not None and not isinstance(values, Tensor):
            raise ValueError("server_step: participants need stacked values")
        upd, masks = densify(values, index, global_model)
        return defense(upd, masks, global_model, participants=participants,  # type: ignore[no-any-return]
                       weights=weights, mode=mode, **extra)
    if not isinstance(values, Tensor):
        values = torch.stack([v.to(global_model.dtype) for v in values])
    return defense(values, masks, global_model, participants=participants,  # type: ignore[no-any-return]
                   weights=weights, mode=mode, **extra)
