"""PSO-Fed's server step, the no-defense baseline (Gogineni et al., ICASSP 2022; Lari et al., 2025).

fill: ``g + Σ_k w_k m_k (u_k − g)`` (``weights`` = PSO-Fed's ω, default ``1/|K_n|``);
reporters: per-coordinate weighted mean over the reporters. Both come from
``psfed_robust.core.aggregation``; :meth:`Mean.indexed` takes the index lists the batched
engine and the Flower strategy carry (``psfed_robust.core.round.server_step``), so every engine
runs this one step.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from defenses.base import MODES, Aggregator, Mode, RoundInputs, register_defense
from psfed_robust.core.aggregation import (
    psofed_server_step,
    psofed_server_step_indexed,
    reporters_mean,
    reporters_mean_indexed,
)
from psfed_robust.params import check_choice


@register_defense("mean")
class Mean(Aggregator):
    """Plain (weighted) mean; with partial sharing in fill mode it is exactly PSO-Fed's step."""

    uses_weights = True

    def aggregate(self, a: RoundInputs) -> Tensor:
        fn = psofed_server_step if a.mode == "fill" else reporters_mean
        return fn(a.x, a.masks, a.global_model, weights=a.weights, participants=a.participants)

    def indexed(
        self,
        values: Tensor | Sequence[Tensor],
        index: Tensor | Sequence[Tensor | None],
        global_model: Tensor,
        *,
        participants: Tensor | None = None,
        weights: Tensor | None = None,
        mode: Mode = "fill",
    ) -> Tensor | None:
        """The same step on index lists (``None``: use the dense form)."""
        check_choice(self._owner(), "mode", mode, MODES)
        if mode == "fill":
            return psofed_server_step_indexed(values, index, global_model, weights=weights,
                                              participants=participants)
        if isinstance(values, Tensor) and isinstance(index, Tensor):
            return reporters_mean_indexed(values, index, global_model, weights=weights,
                                          participants=participants)
        return None
