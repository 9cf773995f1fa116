"""What an engine returns for one sweep point (shared by the engines and the driver)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DIVERGED_DB", "PointResult", "csv_cell"]

#: a steady-state MSE above this many dB (or a non-finite one) marks a diverged point
DIVERGED_DB = 60.0


@dataclass
class PointResult:
    """Per-run metric curves of one sweep point."""

    rounds: np.ndarray  # [T] recorded iterations/rounds
    metrics: dict[str, np.ndarray]  # name -> [R, T] per-run values (linear scale for MSE)
    lower_is_better: dict[str, bool] = field(default_factory=dict)
    theory_db: float | None = None  # steady-state theory prediction of global MSE (dB)
    info: dict[str, Any] = field(default_factory=dict)


def csv_cell(v: Any) -> str:
    """One CSV cell, the same bytes in every process: floats as ``.10g`` (``nan``/``inf``
    spelled out), booleans lower case, ``None`` empty."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return format(v, ".10g")
    return str(v)
