"""Norm-bound clipping then mean (Sun, Kairouz, Suresh & McMahan, 2019, "Can You Really Backdoor
Federated Learning?").

Each participant's update ``Delta_i = m_i (u_i - g)`` (its shared coordinates) is scaled to norm
at most ``tau``; then fill: PSO-Fed's step ``g + sum_i w_i clip(Delta_i)`` (``weights`` = omega,
default ``1/n``); reporters: the per-coordinate weighted mean of ``g + clip(Delta_i)`` over the
reporters. A single-pass defense against boosted (scaled) updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import Aggregator, RoundInputs, register_defense
from defenses.centered_clipping import clip_rows
from psfed_robust.core.aggregation import psofed_server_step, reporters_mean
from psfed_robust.params import check_real


@register_defense("norm_clipping")
class NormClipping(Aggregator):
    """Clip every update's norm to ``tau``, then average (PSO-Fed's step)."""

    uses_weights = True

    def __init__(self, *, tau: float = 1.0) -> None:
        self.tau = check_real(self._owner(), "tau", tau, low=0.0, low_open=True)

    def aggregate(self, a: RoundInputs) -> Tensor:
        updates, masks, participants = a.x, a.masks, a.participants
        g = a.global_model.unsqueeze(-2)
        zero = torch.zeros((), dtype=updates.dtype, device=updates.device)
        delta = updates - g if masks is None else torch.where(masks, updates - g, zero)
        if participants is not None:
            delta = torch.where(participants.unsqueeze(-1), delta, zero)
        clipped = g + clip_rows(delta, self.tau)
        fn = psofed_server_step if a.mode == "fill" else reporters_mean
        return fn(clipped, masks, a.global_model, weights=a.weights, participants=participants)
