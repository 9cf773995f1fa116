"""Infinity attack (ByzFL's ``Inf``, Allouah et al., "Fixing by Mixing", AISTATS 2023 and the
ByzFL benchmark): every active malicious row sends ``+inf`` (``sign="minus"``: ``-inf``).

The crudest Byzantine update: it breaks the plain mean outright and checks that a rule's
handling of non-finite values is sound (Krum-type rules never select such a row, coordinate-wise
rules order it last, ARC zeroes it). Mask-aware: only the attacker's shared coordinates carry
the infinity; its unshared coordinates keep its own delta (they never reach the server, and a
persistent attacker keeps a finite local model there).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack, write_shared
from psfed_robust.params import check_choice


@register_attack("inf")
class Inf(Attack):
    """Every active malicious row sends ``+inf`` (or ``-inf``) on its shared coordinates."""

    mask_aware = True

    def __init__(self, *, sign: str = "plus") -> None:
        self.sign = check_choice(self._owner(), "sign", sign, ("plus", "minus"))

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        value = float("inf") if self.sign == "plus" else -float("inf")
        crafted = torch.full((), value, dtype=deltas.dtype, device=deltas.device)
        everywhere = torch.ones((), dtype=torch.bool, device=deltas.device).expand(deltas.shape)
        return write_shared(deltas, crafted, ctx, everywhere)
