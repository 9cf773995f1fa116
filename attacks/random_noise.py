"""Crash-like "random" client: replaces its delta by ``N(0, sigma^2 I)`` noise.

Threat model: non-omniscient, mask-oblivious (FedMLSecurity's ``ByzantineAttack("random")``,
ByzFL's ``Gaussian``; Blanchard et al., NeurIPS 2017). Unlike ``gaussian`` the honest delta is
discarded. Draws ``N(0,1)`` of shape ``[..., K, D]`` from ``ctx.generator`` (every row, one call).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack
from psfed_robust.params import check_real


@register_attack("random")
class RandomUpdate(Attack):
    """Send pure Gaussian noise with std ``sigma``."""

    def __init__(self, *, sigma: float = 1.0) -> None:
        self.sigma = check_real(self._owner(), "sigma", sigma, low=0.0)

    def craft(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        noise = torch.randn(
            deltas.shape, generator=ctx.generator, device=deltas.device, dtype=deltas.dtype
        )
        return self.sigma * noise
