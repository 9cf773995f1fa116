"""Batched online FL engine (PSO-Fed / Online-Fed), data streams and theory.

PSO-Fed: Gogineni et al., ICASSP 2022, arXiv 2110.06556. Attack analysis: Lari et al., IEEE TSIPN
2025, arXiv 2403.13108. See :mod:`psfed_robust.engine.online` for the engine and its RNG layout.
"""

from psfed_robust.engine.online import (
    CHOICES,
    OnlineConfig,
    OnlineResult,
    SteadyState,
    run_online,
)

__all__ = ["CHOICES", "OnlineConfig", "OnlineResult", "SteadyState", "run_online"]
