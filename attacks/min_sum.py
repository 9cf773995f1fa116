"""AGR-agnostic Min-Sum (Shejwalkar & Houmansadr, NDSS 2021): the malicious delta's summed squared
distance to the honest deltas stays below the smallest such sum of an honest delta.

Threat model: omniscient (honest deltas of the round), colluding, mask-aware (see
``attacks._agr_agnostic``). The chosen gamma per attacker row goes to ``ctx.info["gamma"]``.
"""

from __future__ import annotations

from attacks._agr_agnostic import AGRAgnostic
from attacks.base import register_attack


@register_attack("min_sum")
class MinSum(AGRAgnostic):
    """``mu + gamma p`` with ``sum_i ||mal - x_i||^2 <= min_j sum_i ||x_j - x_i||^2``."""

    criterion = "sum"
