"""PSO-Fed's server step, the no-defense baseline (Gogineni et al., ICASSP 2022; Lari et al., 2025).

fill: ``g + Σ_k w_k m_k (u_k − g)`` (``weights`` = PSO-Fed's ω, default ``1/|K_n|``);
reporters: per-coordinate weighted mean over the reporters. Both come from
``psfed_robust.core.aggregation`` so the engines and the Flower strategy share one implementation.
"""

from __future__ import annotations

from torch import Tensor

from attacks._params import check_choice
from defenses.base import MODES, Aggregator, Mode, _check_inputs, register_defense
from psfed_robust.core.aggregation import psofed_server_step, reporters_mean


@register_defense("mean")
class Mean(Aggregator):
    """Plain (weighted) mean; with partial sharing in fill mode it is exactly PSO-Fed's step."""

    uses_weights = True

    def __call__(
        self,
        updates: Tensor,
        masks: Tensor | None,
        global_model: Tensor,
        *,
        participants: Tensor | None = None,
        weights: Tensor | None = None,
        mode: Mode = "fill",
    ) -> Tensor:
        check_choice(self._owner(), "mode", mode, MODES)
        _check_inputs(updates, masks, global_model, participants, weights)
        fn = psofed_server_step if mode == "fill" else reporters_mean
        return fn(updates, masks, global_model, weights=weights, participants=participants)
