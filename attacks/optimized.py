"""ALIE and IPM with the attack's scale optimised against the deployed aggregator (ByzFL's
``Optimal_ALittleIsEnough`` / ``Optimal_InnerProductManipulation``, used in Allouah et al.,
"Fixing by Mixing", AISTATS 2023; base attacks: Baruch et al., NeurIPS 2019, and Xie et al.,
UAI 2020).

The crafted vector is ALIE's ``mu + tau * sigma`` or IPM's ``-tau * mu`` (honest statistics of
the round, mask-aware as in ``attacks.alie``/``attacks.ipm``), with ``tau`` chosen each round by
ByzFL's derivative-free line search maximising the damage
``|| aggregator(round with the crafted rows) - (reference + mu) ||``:

1. expansion: from ``tau = start`` step by ``delta``, doubling the step while the damage grows;
   at the first non-improving step the step is multiplied by ``ratio`` and
2. contraction: try ``best + delta``, keep it if better, multiply ``delta`` by ``ratio``,

``evals`` aggregator evaluations in all (defaults ``evals=20, start=0, delta=10, ratio=0.8``,
ByzFL's). The aggregator is the server's rule in ``ctx.aggregator`` (the engines pass it),
evaluated with the round's masks and participants in the server's ``mode`` (the attacker's
assumption, a parameter), uniform weights and ``ctx.generator`` for randomised rules. Every run
of a batch gets its own ``tau`` (the search is vectorised over runs); the chosen values go to
``ctx.info["tau"]`` (``[...]``, float64). Omniscient and mask-aware; all active malicious rows
send the same vector on their shared coordinates.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, honest_statistics, register_attack, write_shared
from psfed_robust.params import check_choice, check_int, check_real


class OptimizedScale(Attack):
    """Base of the line-searched attacks: ``craft_at(stats, tau)`` gives the vector for a
    ``[...]`` tensor of scales."""

    omniscient = True
    mask_aware = True
    ddof: int = 1

    def __init__(
        self,
        *,
        evals: int = 20,
        start: float = 0.0,
        delta: float = 10.0,
        ratio: float = 0.8,
        mode: str = "fill",
    ) -> None:
        o = self._owner()
        self.evals = check_int(o, "evals", evals, low=1)
        self.start = check_real(o, "start", start)
        self.delta = check_real(o, "delta", delta)
        if self.delta == 0.0:
            raise ValueError(f"{o}: parameter 'delta' must be non-zero, got 0.0")
        self.ratio = check_real(o, "ratio", ratio, low=0.5, high=1.0, low_open=True,
                                high_open=True)
        self.mode = check_choice(o, "mode", mode, ("fill", "reporters"))

    def craft_at(self, mu: Tensor, sigma: Tensor, tau: Tensor) -> Tensor:
        raise NotImplementedError

    def damage(self, deltas: Tensor, ctx: AttackContext, crafted: Tensor, where: Tensor,
               target: Tensor) -> Tensor:
        """``[...]`` float64 distance of the aggregate from ``target`` (NaN counts as -inf)."""
        assert ctx.aggregator is not None
        sent = write_shared(deltas, crafted.unsqueeze(-2), ctx, where)
        ref = ctx.reference.to(deltas.dtype)
        agg = ctx.aggregator(ref.unsqueeze(-2) + sent, ctx.masks, ref,
                             participants=ctx.participants, mode=self.mode,  # type: ignore[arg-type]
                             info={}, generator=ctx.generator)
        y = (agg - target).to(torch.float64).norm(dim=-1)
        return torch.where(torch.isnan(y), -math.inf, y)

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        if not bool(self.active_rows(deltas, ctx).any()):
            return deltas
        if ctx.aggregator is None:
            raise ValueError(
                f"{self._owner()}: needs the deployed aggregator in ctx.aggregator (the batched "
                "engines and the Flower server-side adversary pass it)"
            )
        mu, sigma, count = honest_statistics(deltas, ctx, ddof=self.ddof)
        where = count > 0
        target = ctx.reference.to(deltas.dtype) + mu
        lead = deltas.shape[:-2]

        def evaluate(tau: Tensor) -> Tensor:
            crafted = self.craft_at(mu, sigma, tau.to(deltas.dtype).unsqueeze(-1))
            return self.damage(deltas, ctx, crafted, where, target)

        best_x = torch.full(lead, self.start, dtype=torch.float64, device=deltas.device)
        best_y = evaluate(best_x)
        step = torch.full(lead, self.delta, dtype=torch.float64, device=deltas.device)
        expanding = torch.ones(lead, dtype=torch.bool, device=deltas.device)
        for _ in range(self.evals - 1):
            prop = best_x + step
            y = evaluate(prop)
            better = y > best_y
            best_x = torch.where(better, prop, best_x)
            best_y = torch.where(better, y, best_y)
            step = torch.where(expanding & better, step * 2, step * self.ratio)
            expanding = expanding & better
        ctx.info["tau"] = best_x
        crafted = self.craft_at(mu, sigma, best_x.to(deltas.dtype).unsqueeze(-1))
        return write_shared(deltas, crafted.unsqueeze(-2), ctx, where)


@register_attack("alie_opt")
class OptimizedALIE(OptimizedScale):
    """ALIE ``mu + tau * sigma`` with ``tau`` line-searched against the deployed aggregator."""

    def __init__(
        self,
        *,
        evals: int = 20,
        start: float = 0.0,
        delta: float = 10.0,
        ratio: float = 0.8,
        mode: str = "fill",
        ddof: int = 1,
    ) -> None:
        super().__init__(evals=evals, start=start, delta=delta, ratio=ratio, mode=mode)
        self.ddof = check_int(self._owner(), "ddof", ddof, low=0, high=1)

    def craft_at(self, mu: Tensor, sigma: Tensor, tau: Tensor) -> Tensor:
        return mu + tau * sigma


@register_attack("ipm_opt")
class OptimizedIPM(OptimizedScale):
    """IPM ``-tau * mu`` with ``tau`` line-searched against the deployed aggregator."""

    def craft_at(self, mu: Tensor, sigma: Tensor, tau: Tensor) -> Tensor:
        return -tau * mu
