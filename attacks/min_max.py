"""AGR-agnostic Min-Max (Shejwalkar & Houmansadr, NDSS 2021): the malicious delta's largest
distance to an honest delta stays below the largest honest pairwise distance.

Threat model: omniscient (honest deltas of the round), colluding, mask-aware (see
``attacks._agr_agnostic``). The chosen gamma per attacker row goes to ``ctx.info["gamma"]``.
"""

from __future__ import annotations

from attacks._agr_agnostic import AGRAgnostic
from attacks.base import register_attack


@register_attack("min_max")
class MinMax(AGRAgnostic):
    """``mu + gamma p`` with ``max_i ||mal - x_i||^2 <= max_{i,j} ||x_i - x_j||^2``."""

    criterion = "max"
