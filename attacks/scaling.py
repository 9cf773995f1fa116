"""Boosting / scaling of the own update: ``lambda * delta``.

Threat model: non-omniscient, mask-oblivious. The boosting step of model replacement
(Bhagoji et al., ICML 2019, "Analyzing Federated Learning through an Adversarial Lens"; Bagdasaryan
et al., AISTATS 2020): a single client can dominate a plain mean by scaling its update by ~n.
"""

from __future__ import annotations

from torch import Tensor

from attacks._params import check_real
from attacks.base import Attack, AttackContext, register_attack


@register_attack("scaling")
class Scaling(Attack):
    """Send ``factor * delta``."""

    def __init__(self, *, factor: float = 10.0, persistent: bool = False) -> None:
        super().__init__(persistent=persistent)
        self.factor = check_real(self._owner(), "factor", factor)

    def craft(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        return self.factor * deltas
