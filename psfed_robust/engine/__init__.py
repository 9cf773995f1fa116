"""Batched online FL engine (PSO-Fed / Online-Fed), data streams and theory.

PSO-Fed: Gogineni et al., ICASSP 2022, arXiv 2110.06556. Attack analysis: Lari et al., IEEE TSIPN
2025, arXiv 2403.13108. See :mod:`psfed_robust.engine.online` for the engine; the scenario is
:mod:`~psfed_robust.engine.config`, the iteration :mod:`~psfed_robust.engine.loop`, the RNG layout
:mod:`~psfed_robust.engine.schedule`.
"""

from psfed_robust.engine.config import CHOICES, OnlineConfig
from psfed_robust.engine.online import run_online
from psfed_robust.engine.result import OnlineResult, SteadyState

__all__ = ["CHOICES", "OnlineConfig", "OnlineResult", "SteadyState", "run_online"]
