"""Mask-aware adaptive noise: the whole perturbation budget goes onto the shared coordinates.

PSO-Fed's resilience claim (Lari et al., IEEE TSIPN 2025) rests on only ``M`` of ``D`` noise
coordinates reaching the server (expected injected energy ``p_e sigma^2 D``). An attacker that
knows its uplink mask (seeded selectors are public, or the mask is simply the one it is asked to
send) can instead spend the same energy budget ``E = sigma^2 D`` on the ``M_k`` shared coordinates:
per-coordinate variance ``sigma^2 D / M_k``, so partial sharing no longer attenuates the attack.
Threat model: non-omniscient, mask-aware (``ctx.masks``); only shared coordinates change.

``base``: ``"gaussian"`` (``delta_d ~ N(0, E / M_k)`` on shared d) or ``"sign_flip"`` (the
perturbation ``-sqrt(E) * (m_k delta_k) / ||m_k delta_k||``, i.e. the same energy pointed against
the attacker's own honest update). ``budget`` overrides ``E`` (total squared norm per attack).
Draw order (``ctx.generator``): ``u ~ U[0,1)`` ``[..., K]`` (fires where ``u < p_a``), then, for
``"gaussian"``, ``N(0,1)`` ``[..., K, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack, shared_masks
from psfed_robust.params import check_choice, check_real

BASES = ("gaussian", "sign_flip")


@register_attack("mask_aware")
class MaskAware(Attack):
    """Concentrate a fixed perturbation energy on the shared coordinates."""

    mask_aware = True

    def __init__(
        self,
        *,
        sigma: float = 1.0,
        budget: float | None = None,
        p_a: float = 1.0,
        base: str = "gaussian",
    ) -> None:
        o = self._owner()
        self.sigma = check_real(o, "sigma", sigma, low=0.0)
        self.budget = None if budget is None else check_real(o, "budget", budget, low=0.0)
        self.p_a = check_real(o, "p_a", p_a, low=0.0, high=1.0)
        self.base = check_choice(o, "base", base, BASES)

    def energy(self, d: int) -> float:
        """Total squared norm of one perturbation (``sigma^2 D`` unless ``budget`` is set)."""
        return self.sigma**2 * d if self.budget is None else self.budget

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        g, dev, dt = ctx.generator, deltas.device, deltas.dtype
        u = torch.rand(deltas.shape[:-1], generator=g, device=dev, dtype=dt)
        fired = self.active_rows(deltas, ctx) & (u < self.p_a)
        ctx.info["fired"] = fired
        m = shared_masks(deltas, ctx)
        mf = m.to(dt)
        count = mf.sum(-1, keepdim=True)
        e = self.energy(deltas.shape[-1])
        if self.base == "gaussian":
            noise = torch.randn(deltas.shape, generator=g, device=dev, dtype=dt)
            pert = noise * torch.sqrt(e / count.clamp_min(1.0)) * mf
        else:
            own = deltas * mf
            norm = own.norm(dim=-1, keepdim=True)
            pert = -(e**0.5) * own / torch.where(norm > 0, norm, torch.ones_like(norm))
        sel = fired.unsqueeze(-1) & m
        return torch.where(sel, deltas + pert, deltas)
