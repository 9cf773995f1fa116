"""Sign flipping of the own update, optionally scaled: ``-s * delta``.

Threat model: non-omniscient (own update only), mask-oblivious. Follows the "bit flipping"
Byzantine worker of Karimireddy, He & Jaggi (ICML 2021, ``codes/attacks/bitflipping.py``) and
FLPoison (``-own update``); ``scale`` > 1 gives Garfield's "reverse" (-100 g). Not ByzFL's ``-mean``
(that is ``ipm`` with ``epsilon=1``).
"""

from __future__ import annotations

from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack
from psfed_robust.params import check_real


@register_attack("sign_flip")
class SignFlip(Attack):
    """Send ``-scale * delta`` instead of ``delta``."""

    def __init__(self, *, scale: float = 1.0) -> None:
        self.scale = check_real(self._owner(), "scale", scale, low=0.0)

    def craft(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        return -self.scale * deltas
