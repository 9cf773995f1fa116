"""Gaussian model poisoning of PSO-Fed (Lari et al., IEEE TSIPN 11:388-400, 2025, arXiv 2403.13108).

Threat model: non-omniscient, mask-oblivious. A participating malicious client attacks with
probability ``p_a``; when it does it adds ``delta ~ N(0, sigma^2 I)`` to its whole delta. Only the
shared coordinates reach the server, which is why partial sharing attenuates this attack (expected
injected energy ``p_e * sigma^2 * D``). A persistent attacker (the engine's threat-model setting)
keeps the noise in its local model, so it leaks out in later rounds; the default is transmit-only.
The rows where the attack fired go to ``ctx.info["fired"]``.

Random draws (from ``ctx.generator`` only, in this order): ``u ~ U[0,1)`` of shape ``[..., K]``
(the attack fires where ``u < p_a``), then ``N(0,1)`` noise of shape ``[..., K, D]``. Both are drawn
for every row so the stream does not depend on who is malicious.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack
from psfed_robust.params import check_real


@register_attack("gaussian")
class GaussianAttack(Attack):
    """Additive Gaussian noise with attack probability ``p_a`` and std ``sigma`` (σ_δ)."""

    def __init__(self, *, p_a: float = 1.0, sigma: float = 1.0) -> None:
        self.p_a = check_real(self._owner(), "p_a", p_a, low=0.0, high=1.0)
        self.sigma = check_real(self._owner(), "sigma", sigma, low=0.0)

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        g = ctx.generator
        u = torch.rand(deltas.shape[:-1], generator=g, device=deltas.device, dtype=deltas.dtype)
        noise = torch.randn(deltas.shape, generator=g, device=deltas.device, dtype=deltas.dtype)
        fired = self.active_rows(deltas, ctx) & (u < self.p_a)
        ctx.info["fired"] = fired
        return torch.where(fired.unsqueeze(-1), deltas + self.sigma * noise, deltas)
