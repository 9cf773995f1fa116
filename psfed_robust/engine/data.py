"""Seeded on-the-fly data streams for the batched online engine.

Two tasks, both batched as ``[B, K, ...]`` (``B`` Monte Carlo runs of one run block, ``K`` clients)
and generated one iteration at a time (no precomputed ``[iterations, ...]`` arrays):

* :class:`RFFStream` — the nonlinear benchmark of P1 (Gogineni et al., ICASSP 2022,
  arXiv 2110.06556): per-client AR(1) non-IID inputs ``x_{k,n} = θ_k x_{k,n-1} + sqrt(1-θ_k²)
  u_{k,n}``, ``u ~ N(μ_k, σ²_{u,k} I_L)``, ``θ_k ~ U(0.2, 0.9)``, ``μ_k ~ U(-0.2, 0.2)``,
  ``σ²_{u,k} ~ U(0.2, 1.2)``; target ``y = sqrt(x₁² + sin²(πx₄)) + (0.8 − 0.5 exp(−x₂²)) x₃ + ν``,
  ``ν ~ N(0, σ²_{ν,k})``, ``σ²_{ν,k} ~ U(0.005, 0.03)``; regressors are random Fourier features
  ``z = sqrt(2/D) cos(ωᵀx + b)`` with ONE set ``(ω, b)`` per run shared by every client and the
  server (``ω ~ N(0, σ_k^{-2} I_L)``, ``b ~ U[0, 2π)``).
* :class:`LinearStream` — the white-Gaussian linear model of P2 (Lari et al., IEEE TSIPN 2025,
  arXiv 2403.13108): ``y = xᵀw° + ν``, ``x ~ N(0, σ_x² I_D)``, ``ν ~ N(0, σ_ν²)``,
  ``w° ~ N(0, σ_w² I_D)`` per run (default ``σ_w² = 1/D``).

Random draws (all from explicit ``torch.Generator`` objects, in this order):

* construction, from ``init_gen``: RFF — ``θ, μ_u, σ²_u, σ²_ν`` (each ``U[0,1)`` of shape ``[B,K]``
  mapped affinely to its range), ``ω`` (``randn [B,L,D]``), ``b`` (``rand [B,D]``), the initial AR
  state (``randn [B,K,L]``, a draw from the stationary law unless ``ar_init="zeros"``), then the
  test set: client index per test point (``rand [B,N_t]``), inputs (``randn [B,N_t,L]``) and noise
  (``randn [B,N_t]``). Linear — ``w°`` (``randn [B,D]``), test inputs (``randn [B,N_t,D]``),
  test noise (``randn [B,N_t]``).
* each :meth:`next` call, from ``data_gen``: RFF — innovations ``randn [B,K,L]`` then observation
  noise ``randn [B,K]``; linear — inputs ``randn [B,K,D]`` then noise ``randn [B,K]``.

Regressors are computed with torch (``baddbmm`` for ``ωᵀx + b``, then ``cos``), the reference
for the engine's optional compiled LMS step. ``advance()`` + ``features(start, stop, out)`` split
:meth:`next` so that the engine computes the regressors one cache-sized chunk of runs at a time
(same draws, same values).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

__all__ = [
    "P1_MEAN_RANGE",
    "P1_NOISE_VAR_RANGE",
    "P1_THETA_RANGE",
    "P1_VAR_RANGE",
    "DataStream",
    "LinearStream",
    "RFFStream",
    "p1_target",
    "rff_args",
    "rff_features",
]

P1_THETA_RANGE = (0.2, 0.9)
P1_MEAN_RANGE = (-0.2, 0.2)
P1_VAR_RANGE = (0.2, 1.2)
P1_NOISE_VAR_RANGE = (0.005, 0.03)


class DataStream(Protocol):
    """What the engine needs from a task: regressors, targets and a fixed test set per run."""

    dim: int
    feature_scale: float  # regressor = feature_scale * the tensor returned by next()
    test_features: Tensor  # [B, N_t, D] (scaled regressors)
    test_targets: Tensor  # [B, N_t]

    def next(self) -> tuple[Tensor, Tensor]:
        """Unscaled regressors ``[B, K, D]`` and targets ``[B, K]`` of the next iteration."""
        ...

    def advance(self) -> Tensor:
        """Draw the next iteration (same draws as :meth:`next`); return its targets ``[B, K]``.

        The regressors of runs ``start:stop`` then come from :meth:`features`, identical to
        ``next()[0][start:stop]`` (so the engine can compute them one cache-sized run chunk at a
        time).
        """
        ...

    def features(self, start: int, stop: int, out: Tensor) -> Tensor:
        """Unscaled regressors of runs ``start:stop`` of the current iteration (into ``out``)."""
        ...

def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float,
             device: torch.device, dtype: torch.dtype) -> Tensor:
    u = torch.rand(shape, generator=gen, device=device, dtype=dtype)
    return u.mul_(hi - lo).add_(lo)


def p1_target(x: Tensor) -> Tensor:
    """P1's nonlinear map ``sqrt(x₁² + sin²(πx₄)) + (0.8 − 0.5 exp(−x₂²)) x₃`` over the last dim."""
    if x.shape[-1] < 4:
        raise ValueError(f"p1_target needs input_dim >= 4, got inputs of shape {tuple(x.shape)}")
    x1, x2, x3, x4 = x[..., 0], x[..., 1], x[..., 2], x[..., 3]
    s = torch.sin(x4 * math.pi)
    a = torch.sqrt(x1 * x1 + s * s)
    return a + (0.8 - 0.5 * torch.exp(-(x2 * x2))) * x3


def rff_args(x: Tensor, omega: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """RFF arguments ``ωᵀx + b`` → ``[B, N, D]``.

    ``x [B, N, L]``, ``ω [B, L, D]``, ``b [B, D]``; one batched ``baddbmm`` (the result of a run
    does not depend on the other runs of the batch).
    """
    return torch.baddbmm(b[:, None, :], x, omega, out=out)


def rff_features(x: Tensor, omega: Tensor, b: Tensor, out: Tensor | None = None,
                 scaled: bool = True) -> Tensor:
    """Random Fourier features ``sqrt(2/D) cos(ωᵀx + b)`` (``scaled=False``: without the factor).

    ``x``: ``[B, N, L]``, ``omega``: ``[B, L, D]``, ``b``: ``[B, D]`` → ``[B, N, D]``
    (:func:`rff_args` then ``cos``).
    """
    D = omega.shape[-1]
    out = rff_args(x, omega, b, out=out).cos_()
    if scaled:
        out.mul_(math.sqrt(2.0 / D))
    return out


class RFFStream:
    """P1's non-IID AR(1) clients with RFF regressors (see module docstring for the RNG order).

    ``ar_init``: ``"stationary"`` (default: ``x_{k,0}`` drawn from the AR process's stationary law
    ``N(μ_k sqrt((1+θ_k)/(1-θ_k)), σ²_{u,k} I)``, so inputs have no start-up transient) or
    ``"zeros"``. Test set: ``num_test`` points per run, each from the stationary law of a client
    drawn uniformly, targets with that client's observation noise when ``test_noise`` (default)
    else noise-free.
    """

    def __init__(
        self,
        *,
        runs: int,
        clients: int,
        input_dim: int,
        dim: int,
        kernel_width: float,
        num_test: int,
        init_gen: torch.Generator,
        data_gen: torch.Generator,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        ar_init: str = "stationary",
        test_noise: bool = True,
        theta_range: tuple[float, float] = P1_THETA_RANGE,
        mean_range: tuple[float, float] = P1_MEAN_RANGE,
        var_range: tuple[float, float] = P1_VAR_RANGE,
        noise_var_range: tuple[float, float] = P1_NOISE_VAR_RANGE,
    ) -> None:
        if input_dim < 4:
            raise ValueError(f"input_dim must be >= 4 for the P1 target, got {input_dim}")
        if ar_init not in ("stationary", "zeros"):
            raise ValueError(f"ar_init must be 'stationary' or 'zeros', got {ar_init!r}")
        dev = torch.device(device)
        self.device, self.dtype, self.dim = dev, dtype, dim
        self.feature_scale = math.sqrt(2.0 / dim)
        self.data_gen = data_gen
        B, K, L = runs, clients, input_dim
        g = init_gen
        self.theta = _uniform(g, (B, K), *theta_range, dev, dtype)
        self.mean = _uniform(g, (B, K), *mean_range, dev, dtype)
        self.var = _uniform(g, (B, K), *var_range, dev, dtype)
        self.noise_var = _uniform(g, (B, K), *noise_var_range, dev, dtype)
        self.omega = torch.randn((B, L, dim), generator=g, device=dev, dtype=dtype)
        self.omega.div_(kernel_width)
        self.b = _uniform(g, (B, dim), 0.0, 2.0 * math.pi, dev, dtype)
        self.std = self.var.sqrt()
        self.noise_std = self.noise_var.sqrt()
        self.innov = (1.0 - self.theta * self.theta).sqrt()  # sqrt(1 - θ²)
        self.stat_mean = self.mean * ((1.0 + self.theta) / (1.0 - self.theta)).sqrt()
        x0 = torch.randn((B, K, L), generator=g, device=dev, dtype=dtype)
        if ar_init == "stationary":
            self.x = x0.mul_(self.std[..., None]).add_(self.stat_mean[..., None])
        else:
            self.x = torch.zeros_like(x0)
        # test set: per point a client c, x ~ stationary law of c, y = f(x) + ν_c
        Nt = num_test
        pick = (torch.rand((B, Nt), generator=g, device=dev, dtype=dtype) * K).long().clamp_(
            max=K - 1)
        xt = torch.randn((B, Nt, L), generator=g, device=dev, dtype=dtype)
        nt = torch.randn((B, Nt), generator=g, device=dev, dtype=dtype)
        xt = xt * self.std.gather(1, pick)[..., None] + self.stat_mean.gather(1, pick)[..., None]
        yt = p1_target(xt)
        if test_noise:
            yt = yt + nt * self.noise_std.gather(1, pick)
        self.test_inputs = xt
        self.test_targets = yt
        self.test_features = rff_features(xt, self.omega, self.b)
        self._z = torch.empty((B, K, dim), device=dev, dtype=dtype)
        self._views: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}

    def next(self) -> tuple[Tensor, Tensor]:
        """Advance every client's AR(1) input one step; return ``(c [B,K,D], y [B,K])``.

        ``c = cos(ωᵀx + b)``; the regressor is ``z = feature_scale * c`` (the engine folds the
        scale into scalars). ``c`` is a buffer reused by the next call (copy it to keep it).
        """
        y = self.advance()
        return self.features(0, self.x.shape[0], self._z), y

    def advance(self) -> Tensor:
        """Advance every client's AR(1) input one step (draws as :meth:`next`); return ``y``."""
        g = self.data_gen
        u = torch.randn(self.x.shape, generator=g, device=self.device, dtype=self.dtype)
        nu = torch.randn(self.x.shape[:-1], generator=g, device=self.device, dtype=self.dtype)
        u.mul_(self.std[..., None]).add_(self.mean[..., None]).mul_(self.innov[..., None])
        self.x.mul_(self.theta[..., None]).add_(u)
        return p1_target(self.x).add_(nu.mul_(self.noise_std))

    def features(self, start: int, stop: int, out: Tensor) -> Tensor:
        """``cos(ωᵀx + b)`` of runs ``start:stop`` (``[stop-start, K, D]``, into ``out``)."""
        key = (start, stop)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = (self.x[start:stop], self.omega[start:stop],
                                        self.b[start:stop])
        return rff_args(*views, out=out).cos_()

    def rff_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x [B,K,L], ω [B,L,D], b [B,D])``: the regressors are ``cos(ωᵀx + b)``."""
        return self.x, self.omega, self.b


class LinearStream:
    """White-Gaussian linear regression ``y = xᵀw° + ν`` (see module docstring for the RNG order).

    ``input_var`` σ_x², ``noise_var`` σ_ν² (the same for every client), ``wstar_var`` σ_w²
    (default ``1/D``). ``test_noise``: test targets include ν (default) or not.
    """

    def __init__(
        self,
        *,
        runs: int,
        clients: int,
        dim: int,
        num_test: int,
        init_gen: torch.Generator,
        data_gen: torch.Generator,
        input_var: float = 1.0,
        noise_var: float = 0.01,
        wstar_var: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        test_noise: bool = True,
    ) -> None:
        dev = torch.device(device)
        self.device, self.dtype, self.dim = dev, dtype, dim
        self.feature_scale = 1.0
        self.data_gen = data_gen
        self.runs, self.clients = runs, clients
        self.input_std = math.sqrt(input_var)
        self.noise_std = math.sqrt(noise_var)
        self.input_var, self.noise_var = input_var, noise_var
        self.wstar_var = 1.0 / dim if wstar_var is None else wstar_var
        g = init_gen
        self.wstar = torch.randn((runs, dim), generator=g, device=dev, dtype=dtype)
        self.wstar.mul_(math.sqrt(self.wstar_var))
        xt = torch.randn((runs, num_test, dim), generator=g, device=dev, dtype=dtype)
        xt.mul_(self.input_std)
        nt = torch.randn((runs, num_test), generator=g, device=dev, dtype=dtype)
        self.test_features = xt
        yt = (xt * self.wstar[:, None, :]).sum(-1)
        self.test_targets = yt + nt * self.noise_std if test_noise else yt
        self._x = torch.zeros((runs, clients, dim), device=dev, dtype=dtype)

    def next(self) -> tuple[Tensor, Tensor]:
        """Fresh white inputs ``x [B,K,D]`` and targets ``y [B,K]``."""
        y = self.advance()
        return self._x, y

    def advance(self) -> Tensor:
        """Draw the next inputs (kept for :meth:`features`) and return the targets ``[B, K]``."""
        g = self.data_gen
        shape = (self.runs, self.clients, self.dim)
        x = torch.randn(shape, generator=g, device=self.device, dtype=self.dtype)
        nu = torch.randn(shape[:-1], generator=g, device=self.device, dtype=self.dtype)
        x.mul_(self.input_std)
        self._x = x
        return (x * self.wstar[:, None, :]).sum(-1).add_(nu.mul_(self.noise_std))

    def features(self, start: int, stop: int, out: Tensor) -> Tensor:
        """The inputs of runs ``start:stop`` (a view of the drawn batch; ``out`` is not used)."""
        return self._x[start:stop]
