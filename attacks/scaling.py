"""Boosting / scaling of the own update: ``lambda * delta``.

Threat model: non-omniscient, mask-oblivious. The boosting step of model replacement
(Bhagoji et al., ICML 2019, "Analyzing Federated Learning through an Adversarial Lens"; Bagdasaryan
et al., AISTATS 2020): a single client can dominate a plain mean by scaling its update by ~n.
"""

from __future__ import annotations

from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack
from psfed_robust.params import check_real


@register_attack("scaling")
class Scaling(Attack):
    """Send ``factor * delta``."""

    def __init__(self, *, factor: float = 10.0) -> None:
        self.factor = check_real(self._owner(), "factor", factor)

    def craft(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        return self.factor * deltas
