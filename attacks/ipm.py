"""Inner-product manipulation (Xie, Koyejo & Gupta, UAI 2020, "Fall of Empires"): ``-eps * mu``.

Threat model: omniscient (sees the honest deltas of the round), mask-aware statistics: ``mu`` is
computed per coordinate over the honest participants that report it. A small ``epsilon`` makes
the aggregate's inner product with the true gradient negative under Krum, a large one defeats
median-type rules. Defaults differ across testbeds (ByzFL 2.0, Blades 1.0, FLPoison and
Karimireddy 0.1);
we default to 0.1.
"""

from __future__ import annotations

from torch import Tensor

from attacks.base import Attack, AttackContext, honest_statistics, register_attack, write_shared
from psfed_robust.params import check_real


@register_attack("ipm")
class IPM(Attack):
    """Every active malicious row sends ``-epsilon * mean(honest)`` on its shared coordinates."""

    omniscient = True
    mask_aware = True

    def __init__(self, *, epsilon: float = 0.1) -> None:
        self.epsilon = check_real(self._owner(), "epsilon", epsilon, low=0.0)

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        mu, _, count = honest_statistics(deltas, ctx)
        return write_shared(deltas, (-self.epsilon * mu).unsqueeze(-2), ctx, count > 0)
