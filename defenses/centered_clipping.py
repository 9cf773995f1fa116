"""Centered clipping (Karimireddy, He & Jaggi, ICML 2021, "Learning from History for Byzantine
Robust Optimization").

``v <- v + sum_i w_i clip_tau(x_i - v)``, ``clip_tau(u) = u min(1, tau / ||u||)``, repeated
``iterations`` times from the center ``v_0`` = the global model (the paper's history: the last
aggregate; in PSO-Fed the server's model is exactly that). ``w`` = ``weights`` (PSO-Fed's omega)
or ``1/n`` over participants. reporters: the clipped differences use each client's shared
coordinates (norm over them), and the step is their per-coordinate weighted mean over reporters.
Defaults tau = 10, 3 iterations (ICLR'22 setting; ICML'21 used tau = 100, L = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from defenses.base import Aggregator, RoundInputs, register_defense
from psfed_robust.params import check_int, check_real


def clip_rows(u: Tensor, tau: float) -> Tensor:
    """Scale each row ``u[..., k, :]`` to norm at most ``tau``."""
    norm = u.norm(dim=-1, keepdim=True)
    return u * (tau / norm.clamp_min(tau)).clamp_max(1.0)


def uniform_weights(part: Tensor, weights: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``weights`` restricted to participants, or ``1/n`` over participants."""
    if weights is not None:
        return weights.to(dtype) * part.to(dtype)
    return part.to(dtype) / part.sum(-1, keepdim=True).clamp_min(1).to(dtype)


@register_defense("centered_clipping")
class CenteredClipping(Aggregator):
    """Iterative clipping of the updates around the current center."""

    uses_weights = True

    def __init__(self, *, tau: float = 10.0, iterations: int = 3) -> None:
        o = self._owner()
        self.tau = check_real(o, "tau", tau, low=0.0, low_open=True)
        self.iterations = check_int(o, "iterations", iterations, low=1)

    def _run(self, x: Tensor, m: Tensor | None, g: Tensor, w: Tensor) -> Tensor:
        """``m`` None = dense (fill mode): ``v += sum_k w_k clip(y_k - v)``; else per-coordinate
        weighted mean over reporters."""
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        y = x - g.unsqueeze(-2)
        v = torch.zeros_like(g)
        if m is None:
            for _ in range(self.iterations):
                c = clip_rows(y - v.unsqueeze(-2), self.tau)
                v = v + torch.einsum("...k,...kd->...d", w, c)
            return g + v
        y = torch.where(m, y, zero)
        mf = m.to(x.dtype)
        wm = w.unsqueeze(-1) * mf
        den = wm.sum(-2)
        for _ in range(self.iterations):
            c = clip_rows((y - v.unsqueeze(-2)) * mf, self.tau)
            step = (wm * c).sum(-2)
            v = v + torch.where(den > 0, step / den.clamp_min(torch.finfo(x.dtype).tiny), zero)
        return g + v

    def dense(self, a: RoundInputs) -> Tensor:
        x = a.x
        if not bool(a.part.all()):  # non-participant rows may hold anything: replace them
            x = torch.where(a.part.unsqueeze(-1), x, a.global_model.unsqueeze(-2))
        return self._run(x, None, a.global_model, uniform_weights(a.part, a.weights, x.dtype))

    def reporters(self, a: RoundInputs) -> Tensor:
        w = uniform_weights(a.part, a.weights, a.x.dtype)
        return self._run(a.x, a.valid, a.global_model, w)
