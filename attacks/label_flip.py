"""Label flipping, a data-poisoning attack for C-class classification: ``y -> C - 1 - y``.

Threat model: non-omniscient, mask-oblivious, ``kind = "data"``: the attacker trains honestly on
poisoned labels (Biggio et al., ICML 2012; Fang et al., USENIX Security 2020; the ``9 - y`` of
Karimireddy et al., ICML 2021). Engines call ``poison_labels`` on the attacker's batches;
``__call__`` leaves deltas unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack
from psfed_robust.params import ParamError, check_real


@register_attack("label_flip")
class LabelFlip(Attack):
    """Flip each label with probability ``p`` (1.0 = every label, the usual form)."""

    kind = "data"

    def __init__(self, *, p: float = 1.0) -> None:
        self.p = check_real(self._owner(), "p", p, low=0.0, high=1.0)

    def poison_labels(
        self, y: Tensor, num_classes: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return ``C - 1 - y`` (on a random ``p`` fraction when ``p < 1``, drawn from
        ``generator``, which is then required)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ParamError(
                f"{self._owner()}: 'num_classes' must be an integer >= 2, got {num_classes!r}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ParamError(f"{self._owner()}: labels must lie in [0, {num_classes - 1}]")
        flipped = num_classes - 1 - y
        if self.p >= 1.0:
            return flipped
        if generator is None:
            raise ParamError(f"{self._owner()}: p < 1 needs an explicit 'generator'")
        u = torch.rand(y.shape, generator=generator, device=y.device)
        return torch.where(u < self.p, flipped, y)

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        return deltas
