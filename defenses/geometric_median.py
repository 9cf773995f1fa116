"""Geometric median by smoothed Weiszfeld iterations - RFA (Pillutla, Kakade & Harchaoui,
IEEE TSP 2022, "Robust Aggregation for Federated Learning").

``z <- sum_i b_i x_i / sum_i b_i`` with ``b_i = a_i / max(nu, ||x_i - z||)``, ``a_i`` the client
weights (``weights`` normalised over participants; uniform by default), ``iterations`` times,
starting from ``z0 = "mean"`` (weighted mean, RFA/Blades) or ``"global"`` (the global model, i.e.
the zero update of Karimireddy/ByzFL's ``z0 = 0``). Works in update space ``x_i - g``. If ``nu``
exceeds every distance the rule is the mean.

Precondition: none beyond ``n >= 1`` (breakdown point 1/2: robust while fewer than half of the
weight is Byzantine). Non-finite input: a participant whose update holds inf/NaN (on its shared
coordinates in reporters mode) is left out and the geometric median of the finite rows is
returned (one such reply used to turn every distance weight to 0 and freeze the global model);
with no finite row the global model is kept.

reporters: distances use each client's shared coordinates rescaled to the full dimension
(``||m_i (x_i - z)|| * sqrt(D / |m_i|)``), and ``z`` is, per coordinate, the ``b``-weighted mean of
its reporters; coordinates nobody reported keep the global value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import Aggregator, RoundInputs, register_defense
from psfed_robust.params import check_choice, check_int, check_real


@register_defense("geometric_median")
class GeometricMedian(Aggregator):
    """Smoothed Weiszfeld geometric median of the participants' updates."""

    uses_weights = True

    def __init__(self, *, nu: float = 1e-6, iterations: int = 8, z0: str = "mean") -> None:
        o = self._owner()
        self.nu = check_real(o, "nu", nu, low=0.0, low_open=True)
        self.iterations = check_int(o, "iterations", iterations, low=0)
        self.z0 = check_choice(o, "z0", z0, ("mean", "global"))

    @staticmethod
    def _alpha(part: Tensor, weights: Tensor | None, dtype: torch.dtype) -> Tensor:
        a = part.to(dtype) if weights is None else weights.to(dtype) * part.to(dtype)
        return a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)

    def _run(self, y: Tensor, m: Tensor | None, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Weiszfeld in update space; ``m`` None = dense (every row valid everywhere)."""
        tiny = torch.finfo(y.dtype).tiny
        if m is None:
            mf = None
            scale = torch.ones((), dtype=y.dtype)
        else:
            mf = m.to(y.dtype)
            scale = (y.shape[-1] / mf.sum(-1).clamp_min(1.0)).sqrt()  # [..., K]

        def wmean(b: Tensor) -> tuple[Tensor, Tensor]:
            num = torch.einsum("...k,...kd->...d", b, y)
            if mf is None:
                den = b.sum(-1, keepdim=True)
                return num / den.clamp_min(tiny), (den > 0).expand_as(num)
            den = torch.einsum("...k,...kd->...d", b, mf)
            return num / den.clamp_min(tiny), den > 0

        if self.z0 == "mean":
            z, has = wmean(alpha)
        else:
            z, has = wmean(alpha)
            z = torch.zeros_like(z)
        for _ in range(self.iterations):
            diff = y - z.unsqueeze(-2)
            if mf is not None:
                diff = diff * mf
            dist = diff.norm(dim=-1) * scale
            b = alpha / dist.clamp_min(self.nu)
            z, has = wmean(b)
        return z, has

    def dense(self, a: RoundInputs) -> Tensor:
        x, part, global_model = a.x, a.part, a.global_model
        y = x - global_model.unsqueeze(-2)
        finite = torch.isfinite(y).all(-1)
        if not bool((finite | ~part).all()):
            part = part & finite  # aggregate the finite rows
        if not bool(part.all()):
            y = torch.where(part.unsqueeze(-1), y, torch.zeros((), dtype=x.dtype))
        z, has = self._run(y, None, self._alpha(part, a.weights, x.dtype))
        return torch.where(has, global_model + z, global_model)

    def reporters(self, a: RoundInputs) -> Tensor:
        assert a.valid is not None
        x, valid, part, global_model = a.x, a.valid, a.part, a.global_model
        y = x - global_model.unsqueeze(-2)
        finite = (torch.isfinite(y) | ~valid).all(-1)
        if not bool((finite | ~part).all()):
            part = part & finite  # aggregate the finite rows
            valid = valid & finite.unsqueeze(-1)
        y = torch.where(valid, y, torch.zeros((), dtype=x.dtype))
        z, has = self._run(y, valid, self._alpha(part, a.weights, x.dtype))
        return torch.where(has, global_model + z, global_model)
