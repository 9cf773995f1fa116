"""Crash-like "zero" client: sends a zero delta (the reference model itself).

Threat model: non-omniscient, mask-oblivious; a free-rider / crashed worker (FedMLSecurity's
``ByzantineAttack(attack_mode="zero")``; Blanchard et al., NeurIPS 2017 list crashes as Byzantine).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack


@register_attack("zero")
class Zero(Attack):
    """Send ``0`` (the attacker's model equals the reference on every coordinate)."""

    def craft(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        return torch.zeros((), dtype=deltas.dtype, device=deltas.device)
