"""Mean and mean-square theory of PSO-Fed under Gaussian model poisoning (linear, white inputs).

The analysis of Lari et al. (IEEE TSIPN 2025, arXiv 2403.13108) for PSO-Fed (Gogineni et al.,
ICASSP 2022, arXiv 2110.06556), re-derived for the configuration below (derivation:
docs/theory.md). With white Gaussian inputs, uniformly random uncoordinated selection and the
attack noise isotropic, every second moment of the error vectors is a multiple of the identity, so
four scalars per coordinate — global ``g = E ε_i²``, local ``l = E ε_{k,i}²``, global–local
``c = E ε_i ε_{k,i}`` and local–local ``h = E ε_{k,i} ε_{j,i}`` (``ε = w° − w``) — obey an exact
affine recursion ``s_{n+1} = F s_n + f``. The global test MSE is ``σ_ν² + σ_x² D g``.

Covered exactly (:func:`check_supported` raises otherwise): task ``linear``; selection
``random`` with ``coordinated=False`` (or ``M = D``); uplink ``same`` or ``independent``
(``next`` correlates the uplink at ``n`` with the downlink at ``n+1`` and breaks the scalar
closure; any uplink when ``M = D``); constant server weight ω — fixed scheduling (any weight
scheme) or Bernoulli scheduling with ``"expected"``/``"all"`` weights; non-participant updates
on; attack ``none`` or ``gaussian`` transmit-only (``persistent=False``); defense ``mean`` in
fill mode; zero initial models, ``w° ~ N(0, σ_w² I)``. Inputs are i.i.d. over time, so the
"independence assumption" holds exactly here and the recursion has no approximation (the
Gaussian fourth moment ``E[xxᵀAxxᵀ] = σ⁴(A + Aᵀ + tr(A) I)`` is exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from psfed_robust.engine.online import OnlineConfig

__all__ = [
    "Recursion",
    "check_supported",
    "learning_curve",
    "max_stable_stepsize",
    "mean_stability_bound",
    "optimal_stepsize",
    "recursion",
    "spectral_radius",
    "steady_state",
]


def mean_stability_bound(covariances: float | Sequence[float] | np.ndarray) -> float:
    """``2 / max_k λ_max(R_k)``: LMS-type mean stability needs ``0 < μ`` below this bound.

    ``covariances``: one variance (white inputs ``R = σ² I``), a sequence of per-client
    variances, or an array ``[K, L, L]`` (or ``[L, L]``) of input covariance matrices. Zero-mean
    attack noise does not enter the mean recursion ``E ε_{n+1} = (I − μR) E ε̂_n`` (P2).
    """
    arr = np.asarray(covariances, dtype=float)
    if arr.ndim <= 1:
        lam = float(np.max(arr))
    else:
        mats = arr.reshape((-1, *arr.shape[-2:]))
        lam = max(float(np.linalg.eigvalsh(0.5 * (m + m.T)).max()) for m in mats)
    if lam <= 0:
        raise ValueError(f"input covariance must have a positive eigenvalue, got max {lam}")
    return 2.0 / lam


def check_supported(config: OnlineConfig) -> None:
    """Raise ``NotImplementedError`` naming the option when ``config`` is outside the theory."""
    full = config.share_count == config.dim

    def no(msg: str) -> None:
        raise NotImplementedError(f"theory does not cover {msg} (see psfed_robust.engine.theory)")

    if config.task != "linear":
        no(f"task={config.task!r} (needs 'linear')")
    if not full:
        if config.selection != "random":
            no(f"selection={config.selection!r} with M < D (needs 'random')")
        if config.coordinated:
            no("coordinated=True with M < D")
        if config.uplink == "next":
            no("uplink='next' with M < D (use 'same' or 'independent')")
    if config.scheduling == "bernoulli" and config.server_weight == "participants":
        no("server_weight='participants' (random 1/|K_n|) with bernoulli scheduling")
    if not config.nonparticipant_updates:
        no("nonparticipant_updates=False")
    if config.defense != "mean" or config.aggregation_mode != "fill":
        no(f"defense={config.defense!r} mode={config.aggregation_mode!r} (needs mean, fill)")
    if config.attack not in ("none", "gaussian"):
        no(f"attack={config.attack!r}")
    if config.attack == "gaussian":
        extra = set(config.attack_params) - {"p_a", "sigma", "persistent"}
        if extra:
            no(f"attack params {sorted(extra)}")
        if config.attack_params.get("persistent", False):
            no("a persistent attack")


def _attack(config: OnlineConfig) -> tuple[float, float]:
    """(p_a, σ_δ²) of the Gaussian attack (0 when there is none)."""
    if config.attack != "gaussian" or config.num_malicious == 0:
        return 0.0, 0.0
    p_a = float(config.attack_params.get("p_a", 1.0))
    sigma = float(config.attack_params.get("sigma", 1.0))
    return p_a, sigma * sigma


def _omega(config: OnlineConfig) -> float:
    K = config.num_clients
    if config.server_weight == "all":
        return 1.0 / K
    if config.scheduling == "fixed":
        if config.server_weight == "participants":
            return 1.0 / config.participants
        return 1.0 / (config.participation * K)
    return 1.0 / (config.participation * K)


@dataclass(frozen=True)
class Recursion:
    """``s_{n+1} = F s_n + f`` for ``s = (g, l, c, h)`` (per-coordinate second moments)."""

    F: np.ndarray  # [4, 4]
    f: np.ndarray  # [4]
    s0: np.ndarray  # [4] initial moments
    dim: int
    input_var: float
    noise_var: float
    test_noise: bool

    def mse(self, s: np.ndarray) -> np.ndarray:
        """Global test MSE ``σ_ν² + σ_x² D g`` for moments ``s [..., 4]``."""
        floor = self.noise_var if self.test_noise else 0.0
        return floor + self.input_var * self.dim * np.asarray(s)[..., 0]


def recursion(config: OnlineConfig, stepsize: float | None = None) -> Recursion:
    """The affine second-moment recursion of ``config`` (``stepsize`` overrides μ)."""
    check_supported(config)
    mu = float(config.stepsize if stepsize is None else stepsize)
    D, K, M = config.dim, config.num_clients, config.share_count
    sx, sn = float(config.input_var), float(config.noise_var)
    p = M / D
    p2 = M * (M - 1) / (D * (D - 1)) if D > 1 else p
    if M == D or config.uplink == "same":
        r1, r2 = p, p2
    else:  # independent uplink draw
        r1, r2 = p * p, p * p
    if config.scheduling == "fixed":
        P = config.participants
        q, q2 = P / K, (P * (P - 1) / (K * (K - 1)) if K > 1 else P / K)
    else:
        q = config.participation
        q2 = q * q
    w = _omega(config)
    p_a, sd2 = _attack(config)
    Nm = config.num_malicious
    phi = 1.0 - mu * sx
    kurt = mu * mu * sx * sx  # μ²σ⁴
    gam = 1.0 - 2.0 * mu * sx + 2.0 * kurt
    rho = gam + D * kurt
    eta = mu * mu * sx * sn
    e0, e1 = p - r1, r1
    # linear forms as coefficient rows over (g, l, c, h)
    Psi = np.array([r1, 0.0, p - r1, 0.0])  # p c + r1 (g − c)
    Lt = np.array([r1, p - r1, 0.0, 0.0])  # p l + r1 (g − l)
    Lo = np.array([r2, p - r2, 0.0, 0.0])  # p l + r2 (g − l)
    Qd = gam * Lt + kurt * (Lt + (D - 1) * Lo)  # + p η (constant)
    Qd_c = p * eta
    cross = phi * phi * np.array([e1 * e1, 0.0, 2 * e0 * e1, e0 * e0])
    F = np.zeros((4, 4))
    f = np.zeros(4)
    # global
    F[0, 0] = 1.0 - 2 * K * w * q * p + K * w * w * q * p + K * (K - 1) * w * w * q2 * p * p
    F[0] += 2 * K * phi * Psi * (w * q - w * w * q - (K - 1) * w * w * q2 * p)
    F[0] += K * w * w * q * Qd + K * (K - 1) * w * w * q2 * cross
    f[0] = K * w * w * q * Qd_c + w * w * sd2 * Nm * q * p * p_a
    # local
    F[1] = rho * np.array([q * p, 1.0 - q * p, 0.0, 0.0])
    f[1] = eta
    # global-local
    F[2] = phi * np.array([q * p, 0.0, 1.0 - q * p, 0.0])
    F[2] -= w * q * phi * Psi
    F[2] -= (K - 1) * w * phi * p * np.array([q2 * p, 0.0, q - q2 * p, 0.0])
    F[2] += w * q * Qd
    F[2] += (K - 1) * w * phi * phi * np.array(
        [q2 * p * e1, 0.0, q2 * p * e0 + (q - q2 * p) * e1, (q - q2 * p) * e0])
    f[2] = w * q * Qd_c
    # local-local
    F[3] = phi * phi * np.array([q2 * p * p, 0.0, 2 * (q * p - q2 * p * p),
                                 1.0 - 2 * q * p + q2 * p * p])
    wv = 1.0 / D if config.wstar_var is None else float(config.wstar_var)
    return Recursion(F=F, f=f, s0=np.full(4, wv), dim=D, input_var=sx, noise_var=sn,
                     test_noise=config.test_noise)


def spectral_radius(config: OnlineConfig, stepsize: float | None = None) -> float:
    """Spectral radius of ``F``: mean-square stable iff < 1."""
    return float(np.abs(np.linalg.eigvals(recursion(config, stepsize).F)).max())


def steady_state(config: OnlineConfig, stepsize: float | None = None) -> float:
    """Predicted steady-state global MSE (linear scale; ``inf`` if not mean-square stable)."""
    rec = recursion(config, stepsize)
    if float(np.abs(np.linalg.eigvals(rec.F)).max()) >= 1.0:
        return math.inf
    s = np.linalg.solve(np.eye(4) - rec.F, rec.f)
    return float(rec.mse(s))


def learning_curve(config: OnlineConfig, iterations: int | None = None,
                   stepsize: float | None = None) -> np.ndarray:
    """Predicted global MSE after ``t = 0..iterations`` iterations (``[iterations + 1]``)."""
    rec = recursion(config, stepsize)
    n = config.iterations if iterations is None else iterations
    out = np.empty((n + 1, 4))
    s = rec.s0.copy()
    out[0] = s
    for t in range(1, n + 1):
        s = rec.F @ s + rec.f
        out[t] = s
    return np.asarray(rec.mse(out))


def max_stable_stepsize(config: OnlineConfig, tol: float = 1e-6) -> float:
    """Largest μ with spectral radius < 1 (bisection below the mean bound ``2/σ_x²``)."""
    lo, hi = 0.0, mean_stability_bound(config.input_var)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if spectral_radius(config, mid) < 1.0:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol * hi:
            break
    return lo


def optimal_stepsize(config: OnlineConfig) -> tuple[float, float]:
    """``(μ*, MSE(μ*))`` minimising the predicted steady-state MSE (scipy, bounded on log μ)."""
    mu_max = max_stable_stepsize(config)

    def obj(logmu: float) -> float:
        v = steady_state(config, math.exp(logmu))
        return 1e300 if not math.isfinite(v) else 10 * math.log10(v)

    res = minimize_scalar(obj, bounds=(math.log(mu_max) - 12.0, math.log(mu_max * 0.999)),
                          method="bounded", options={"xatol": 1e-6})
    mu_star = math.exp(float(res.x))
    return mu_star, steady_state(config, mu_star)
