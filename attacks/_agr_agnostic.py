"""Shared machinery of the AGR-agnostic Min-Max / Min-Sum attacks (Shejwalkar & Houmansadr,
NDSS 2021, "Manipulating the Byzantine: Optimizing Model Poisoning Attacks and Defenses for
Federated Learning"; reference code ``vrt1shjwlkr/NDSS21-Model-Poisoning``).

Malicious delta ``mu + gamma * p`` with ``p`` one of ``unit_vec`` (``-mu/||mu||``), ``std``
(``-sigma``) or ``sign`` (``-sign(mu)``); ``gamma`` is the largest value the paper's search finds
such that

- Min-Max: ``max_i ||mal - x_i||^2 <= max_{i,j} ||x_i - x_j||^2``;
- Min-Sum: ``sum_i ||mal - x_i||^2 <= min_j sum_i ||x_j - x_i||^2``
  (NDSS's min, not FLPoison's max),

over the honest participants ``x_i``. Search (NDSS ``our_attack_dist``): ``gamma = gamma_init``,
``step = gamma_init / 2``, ``gamma_succ = 0``; while ``|gamma_succ - gamma| > threshold`` (and at
most ``max_iter`` times): on success ``gamma_succ = gamma; gamma += step`` else ``gamma -= step``;
``step /= 2``. Returns ``gamma_succ``.

Partial sharing: distances are taken in the server's *fill* view (a client's delta is 0 on the
coordinates it does not share), ``mu``/``sigma`` per coordinate over the honest reporters, and each
attacker's vector is ``mask_k * (mu + gamma_k p)``, so every attacker row gets its own ``gamma_k``.
``||mask_k (mu + gamma p) - x_i||^2`` is a quadratic in gamma whose coefficients come from three
matmuls, so the search runs on ``[..., K]`` scalars (float64), vectorised over runs and attackers.
The chosen gamma per row (NaN for inactive rows) goes to ``ctx.info["gamma"]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import (
    Attack,
    AttackContext,
    honest_statistics,
    shared_masks,
    write_shared,
)
from psfed_robust.params import check_choice, check_int, check_real

DIRECTIONS = ("unit_vec", "std", "sign")


class AGRAgnostic(Attack):
    """Base of ``min_max`` and ``min_sum`` (set ``criterion``)."""

    omniscient = True
    mask_aware = True
    criterion: str = "max"

    def __init__(
        self,
        *,
        direction: str = "unit_vec",
        gamma_init: float = 10.0,
        threshold: float = 1e-5,
        max_iter: int = 200,
        ddof: int = 0,
    ) -> None:
        o = self._owner()
        self.direction = check_choice(o, "direction", direction, DIRECTIONS)
        self.gamma_init = check_real(o, "gamma_init", gamma_init, low=0.0, low_open=True)
        self.threshold = check_real(o, "threshold", threshold, low=0.0, low_open=True)
        self.max_iter = check_int(o, "max_iter", max_iter, low=1)
        self.ddof = check_int(o, "ddof", ddof, low=0, high=1)

    def perturbation(self, mu: Tensor, sigma: Tensor) -> Tensor:
        """The direction ``p`` ``[..., D]``."""
        if self.direction == "unit_vec":
            norm = mu.norm(dim=-1, keepdim=True)
            return -mu / torch.where(norm > 0, norm, torch.ones_like(norm))
        if self.direction == "std":
            return -sigma
        return -torch.sign(mu)

    def quadratic(
        self, deltas: Tensor, ctx: AttackContext, mu: Tensor, p: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Coefficients ``a [...,K,K], b [...,K,K], c [...,K]`` of ``||m_k(mu+g p) - x_i||^2``,
        honest pairwise squared distances ``[...,K,K]`` and honest rows ``[...,K]`` (float64)."""
        dt = torch.float64
        h = self.honest_rows(deltas, ctx)
        mk = shared_masks(deltas, ctx)
        x = self.honest_deltas(deltas, ctx).to(dt)
        xt = torch.where(mk & h.unsqueeze(-1), x, torch.zeros((), dtype=dt, device=x.device))
        mf = mk.to(dt)
        mu64, p64 = mu.to(dt).unsqueeze(-2), p.to(dt).unsqueeze(-2)
        mmu, mp = mf * mu64, mf * p64  # [..., K, D]
        sq = xt.square().sum(-1)  # ||x_i||^2
        a = (mmu * mu64).sum(-1).unsqueeze(-1) - 2 * mmu @ xt.transpose(-1, -2) + sq.unsqueeze(-2)
        b = (mp * mu64).sum(-1).unsqueeze(-1) - mp @ xt.transpose(-1, -2)
        c = (mp * p64).sum(-1)
        gram = xt @ xt.transpose(-1, -2)
        pair = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * gram).clamp_min(0.0)
        return a, b, c, pair, h

    def search(self, a: Tensor, b: Tensor, c: Tensor, pair: Tensor, h: Tensor) -> Tensor:
        """NDSS's halving search of gamma, vectorised over ``[..., K]`` attacker rows."""
        hh = (h.unsqueeze(-1) & h.unsqueeze(-2)).to(a.dtype)
        hi = h.unsqueeze(-2).to(a.dtype)  # over the honest i, for each attacker row k
        if self.criterion == "max":
            thr = (pair * hh).amax(dim=(-1, -2)).unsqueeze(-1)
        else:
            sums = (pair * hh).sum(-1)
            thr = torch.where(h, sums, torch.full_like(sums, float("inf"))).amin(-1, keepdim=True)

        def ok(g: Tensor) -> Tensor:
            d = (a + 2 * g.unsqueeze(-1) * b + g.square().unsqueeze(-1) * c.unsqueeze(-1)) * hi
            lhs = d.amax(-1) if self.criterion == "max" else d.sum(-1)
            return lhs <= thr

        gamma = torch.full(c.shape, self.gamma_init, dtype=a.dtype, device=a.device)
        succ = torch.zeros_like(gamma)
        done = torch.zeros(c.shape, dtype=torch.bool, device=a.device)
        step = self.gamma_init / 2
        for _ in range(self.max_iter):
            good = ok(gamma)
            succ = torch.where(~done & good, gamma, succ)
            gamma = torch.where(done, gamma, torch.where(good, gamma + step, gamma - step))
            step /= 2
            done = done | ((succ - gamma).abs() <= self.threshold)
            if bool(done.all()):
                break
        return succ

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        act = self.active_rows(deltas, ctx)
        if not bool(act.any()):
            return deltas
        mu, sigma, count = honest_statistics(deltas, ctx, ddof=self.ddof)
        p = self.perturbation(mu, sigma)
        a, b, c, pair, h = self.quadratic(deltas, ctx, mu, p)
        gamma = self.search(a, b, c, pair, h)
        gamma = torch.where(h.any(-1, keepdim=True), gamma, torch.zeros_like(gamma))
        ctx.info["gamma"] = torch.where(act, gamma, torch.full_like(gamma, float("nan")))
        crafted = mu.unsqueeze(-2) + gamma.to(deltas.dtype).unsqueeze(-1) * p.unsqueeze(-2)
        return write_shared(deltas, crafted, ctx, count > 0)
