"""Mean and mean-square theory of PSO-Fed under Gaussian model poisoning (linear, white inputs).

The analysis of Lari et al. (IEEE TSIPN 2025, arXiv 2403.13108) for PSO-Fed (Gogineni et al.,
ICASSP 2022, arXiv 2110.06556), re-derived for the engine's algorithm (derivation:
docs/theory.md). With white Gaussian inputs, uniformly random masks and isotropic attack noise the
second moments of the error vectors are diagonal, and an exact affine recursion
``s_{n+1} = F s_n + f`` on per-coordinate moments gives the learning curve, the steady state
``(I − F)⁻¹ f``, the mean-square stability limit and the optimal stepsize. Two recursions
(:func:`method`):

* ``"scalar"`` — four scalars ``g = E ε_i²``, ``l = E ε_{k,i}²``, ``c = E ε_i ε_{k,i}``,
  ``h = E ε_{k,i} ε_{j,i}`` (``ε = w° − w``): uplink ``same``/``independent`` (or ``M = D``),
  constant ω, non-participant updates, transmit-only attack;
* ``"classes"``/``"coordinated"`` (:mod:`psfed_robust.engine.theory_next`) — moments conditioned
  on each coordinate's class (pending-in / pending-out / free) for one or two tagged clients:
  P1's uplink ``next`` (``T_{k,n} = S_{k,n+1}``), coordinated or not, Bernoulli scheduling with
  any weight, frozen non-participants, persistent attacks.

Covered: task ``linear``; ``defense="mean"`` in fill mode; attack ``none`` or ``gaussian``
(transmit-only or persistent); random selection (round robin with ``M < D`` is modelled as random:
an approximation, :func:`is_exact`); zero initial models, ``w° ~ N(0, σ_w² I)``. Inputs are i.i.d.
over time, so the "independence assumption" holds exactly and the recursions have no
approximation (the Gaussian fourth moment ``E[xxᵀAxxᵀ] = σ⁴(A + Aᵀ + tr(A) I)`` is exact).
:func:`check_supported` raises ``NotImplementedError`` naming the option otherwise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from psfed_robust.engine import theory_next
from psfed_robust.engine.online import OnlineConfig

__all__ = [
    "Recursion",
    "check_supported",
    "is_exact",
    "learning_curve",
    "local_learning_curve",
    "max_stable_stepsize",
    "mean_stability_bound",
    "method",
    "optimal_stepsize",
    "recursion",
    "spectral_radius",
    "steady_moments",
    "steady_state",
    "steady_state_local",
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


def _persistent(config: OnlineConfig) -> bool:
    """Whether the attack noise stays in the attacker's local model (field or attack param)."""
    field_value = getattr(config, "attack_persistent", None)
    return bool(field_value) or bool(config.attack_params.get("persistent", False))


def method(config: OnlineConfig) -> str:
    """Which exact recursion covers ``config``: ``"scalar"`` (four scalars, uplink same /
    independent, or M = D), ``"classes"`` (per-client coordinate classes, uplink next or the
    options the scalar one lacks), ``"coordinated"`` (one common pending mask, uplink next) or
    ``"rr"`` (coordinated round robin: deterministic windows, any uplink).

    Raises ``NotImplementedError`` naming the first option outside the theory.
    """
    full = config.share_count == config.dim

    def no(msg: str) -> None:
        raise NotImplementedError(f"theory does not cover {msg} (see docs/theory.md)")

    if config.task != "linear":
        no(f"task={config.task!r} (needs 'linear')")
    if config.defense != "mean" or config.aggregation_mode != "fill":
        no(f"defense={config.defense!r} mode={config.aggregation_mode!r} (needs mean, fill)")
    if config.attack not in ("none", "gaussian"):
        no(f"attack={config.attack!r}")
    if config.attack == "gaussian":
        extra = set(config.attack_params) - {"p_a", "sigma", "persistent"}
        if extra:
            no(f"attack params {sorted(extra)}")
    scalar_ok = (not (config.scheduling == "bernoulli" and config.server_weight == "participants")
                 and config.nonparticipant_updates
                 and not (config.attack == "gaussian" and _persistent(config)))
    if full:
        return "scalar" if scalar_ok else "classes"
    if config.selection == "round_robin" and config.coordinated:
        return "rr"  # deterministic common windows: exact per-coordinate recursion
    # uncoordinated round robin is modelled as random masks (an approximation: is_exact False)
    if config.coordinated:
        if config.uplink != "next":
            no(f"coordinated=True with uplink={config.uplink!r} and M < D (needs 'next')")
        return "coordinated"
    if config.uplink == "next":
        return "classes"
    if scalar_ok:
        return "scalar"
    if config.uplink == "independent":
        return "classes"
    no("uplink='same' with M < D together with Bernoulli scheduling and 'participants' "
       "weights, nonparticipant_updates=False or a persistent attack")
    raise AssertionError("unreachable")


def is_exact(config: OnlineConfig) -> bool:
    """Whether the theory of ``config`` is exact (False: uncoordinated round-robin selection
    with M < D, modelled as random selection; measured error in docs/reproductions.md)."""
    kind = method(config)
    return config.selection == "random" or config.share_count == config.dim or kind == "rr"


def check_supported(config: OnlineConfig) -> None:
    """Raise ``NotImplementedError`` naming the option when ``config`` is outside the theory."""
    method(config)


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
    """``s_{n+1} = F s_n + f`` for the per-coordinate second moments ``s`` of one method.

    ``scalar``: ``s = (g, l, c, h)``; ``classes``/``coordinated``: the blocks of
    :func:`psfed_robust.engine.theory_next.layout`. ``rows`` ``[3, S]`` read out (linearly)
    the global ``E e²``, the client-averaged a-priori ``E ê_k²`` and the post-step ``E e_k²``.
    """

    F: np.ndarray  # [S, S] (round robin: over one period of the windows)
    f: np.ndarray  # [S]
    s0: np.ndarray  # [S] initial moments
    rows: np.ndarray  # [3, S]
    dim: int
    input_var: float
    noise_var: float
    test_noise: bool
    local_mse: str  # "apriori" | "test" (as OnlineConfig.local_mse)
    method: str
    #: round robin: the maps ``(F_n, f_n)`` of the ``L`` phases of the windows and their rows
    steps: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    phase_rows: np.ndarray | None = None  # [L, 3, S]

    @property
    def period(self) -> int:
        """Iterations after which the maps repeat (1 unless round robin)."""
        return max(1, len(self.steps))

    def advance(self, s: np.ndarray, n: int) -> np.ndarray:
        """The moments after iteration ``n`` (0-based) from the moments ``s`` before it."""
        if self.steps:
            F, f = self.steps[n % len(self.steps)]
            return np.asarray(F @ s + f)
        return np.asarray(self.F @ s + self.f)

    def mse(self, s: np.ndarray) -> np.ndarray:
        """Global test MSE ``σ_ν² + σ_x² D E e²`` for moments ``s [..., S]``."""
        floor = self.noise_var if self.test_noise else 0.0
        return floor + self.input_var * self.dim * (np.asarray(s) @ self.rows[0])

    def local(self, s: np.ndarray, n: int = 0) -> np.ndarray:
        """Local MSE as the engine records it: a-priori ``σ_ν² + σ_x² D E ê_k²`` of iteration
        ``n`` taken from state ``s``, or (``local_mse="test"``) the local models' test MSE."""
        rows = self.rows if self.phase_rows is None else self.phase_rows[n % self.period]
        if self.local_mse == "apriori":
            return self.noise_var + self.input_var * self.dim * (np.asarray(s) @ rows[1])
        floor = self.noise_var if self.test_noise else 0.0
        return floor + self.input_var * self.dim * (np.asarray(s) @ rows[2])


def _scalar_recursion(config: OnlineConfig, mu: float) -> tuple[np.ndarray, np.ndarray,
                                                               np.ndarray]:
    """``(F, f, rows)`` of the four-scalar recursion (uplink same / independent, or M = D)."""
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
    qp = q * p
    rows = np.array([[1.0, 0.0, 0.0, 0.0], [qp, 1.0 - qp, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    return F, f, rows


def _params(config: OnlineConfig, mu: float) -> theory_next.Params:
    """The constants of the class-resolved recursions (docs/theory.md, "Constants")."""
    D, K = config.dim, config.num_clients
    sx, sn = float(config.input_var), float(config.noise_var)
    kurt = mu * mu * sx * sx
    p_a, sd2 = _attack(config)
    nm = config.num_malicious if p_a * sd2 > 0 or (config.attack == "gaussian"
                                                    and _persistent(config)) else 0
    law = theory_next.participation_law(K, config.scheduling, config.participants,
                                        config.participation, config.server_weight)
    return theory_next.Params(
        p=config.share_count / D, phi=1.0 - mu * sx,
        rho=1.0 - 2.0 * mu * sx + (D + 2) * kurt, eta=mu * mu * sx * sn,
        nonpart=config.nonparticipant_updates, pa_sd2=p_a * sd2,
        persistent=config.attack == "gaussian" and _persistent(config),
        counts=(K - nm, nm), pending=config.uplink == "next" and config.share_count < D,
        law=law)


_POLY_CACHE: dict[str, tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]] = {}


def _class_map(config: OnlineConfig, kind: str, mu: float) -> tuple[np.ndarray, np.ndarray]:
    """``(F, f)`` of the class-resolved recursion at stepsize ``mu`` (one step on a basis)."""
    coord = kind == "coordinated"
    pr = _params(config, mu)
    step = theory_next.coordinated_step if coord else theory_next.uncoordinated_step
    S = theory_next.exists_mask(pr.counts, coord).size
    out = step(pr, np.vstack([np.zeros((1, S)), np.eye(S)]))
    return (out[1:] - out[0]).T, out[0]


def _class_polynomial(config: OnlineConfig, kind: str) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                   np.ndarray, np.ndarray]:
    """``F(μ) = A0 + μ A1 + μ² A2`` and ``f(μ)`` likewise, exactly: μ enters only through
    ``φ`` (degree 1), ``φ²``, ``ρ`` and ``η`` (degree 2), never multiplied together (eq. P).
    Interpolated from three stepsizes; cached per configuration (stepsize excluded)."""
    key = kind + repr(config.replace(stepsize=1.0))
    hit = _POLY_CACHE.get(key)
    if hit is not None:
        return hit
    h = 0.1 / float(config.input_var)
    (F0, f0), (F1, f1), (F2, f2) = (_class_map(config, kind, m) for m in (0.0, h, 2 * h))
    A = np.stack([F0, (4 * F1 - F2 - 3 * F0) / (2 * h), (F2 - 2 * F1 + F0) / (2 * h * h)])
    a = np.stack([f0, (4 * f1 - f2 - 3 * f0) / (2 * h), (f2 - 2 * f1 + f0) / (2 * h * h)])
    pr = _params(config, 0.0)
    coord = kind == "coordinated"
    S = f0.size
    rows = theory_next.readouts(pr, coord, np.eye(S)).T
    wv = 1.0 / config.dim if config.wstar_var is None else float(config.wstar_var)
    s0 = theory_next.initial_state(wv, pr.counts, coord, pr.p)
    if len(_POLY_CACHE) > 64:
        _POLY_CACHE.clear()
    _POLY_CACHE[key] = ((A, a), rows, s0)
    return _POLY_CACHE[key]


_RR_CACHE: dict[str, tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]] = {}


def _rr_polynomial(config: OnlineConfig) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                                  np.ndarray, np.ndarray]:
    """Coordinated round robin: per phase ``n`` of the windows (period ``D / gcd(D, M)``)
    the quadratic-in-μ map of eq. RR (``S_n`` = window ``n``; ``T_n`` = window ``n + 1``
    (next), window ``n`` (same) or a fresh common mask (independent)), the readout rows per
    phase and the initial state. Cached per configuration (stepsize excluded)."""
    key = repr(config.replace(stepsize=1.0))
    hit = _RR_CACHE.get(key)
    if hit is not None:
        return hit
    D, M = config.dim, config.share_count
    L = D // math.gcd(D, M)
    h = 0.1 / float(config.input_var)
    pr0 = _params(config, 0.0)
    S = D * theory_next.RR_SIZE
    basis = np.vstack([np.zeros((1, S)), np.eye(S)])
    polys, rows = [], []
    for n in range(L):
        sb = theory_next.rr_bits(D, M, n)
        if config.uplink == "next":
            tp = theory_next.rr_bits(D, M, n + 1)
        elif config.uplink == "same":
            tp = sb
        else:
            tp = np.full(D, M / D)
        maps = []
        for m in (0.0, h, 2 * h):
            out = theory_next.rr_step(_params(config, m), basis, sb, tp)
            maps.append(((out[1:] - out[0]).T, out[0]))
        (F0, f0), (F1, f1), (F2, f2) = maps
        polys.append((np.stack([F0, (4 * F1 - F2 - 3 * F0) / (2 * h),
                                (F2 - 2 * F1 + F0) / (2 * h * h)]),
                      np.stack([f0, (4 * f1 - f2 - 3 * f0) / (2 * h),
                                (f2 - 2 * f1 + f0) / (2 * h * h)])))
        rows.append(theory_next.rr_readouts(pr0, D, np.eye(S), sb).T)
    wv = 1.0 / D if config.wstar_var is None else float(config.wstar_var)
    s0 = theory_next.rr_initial_state(wv, pr0.counts, D)
    if len(_RR_CACHE) > 16:
        _RR_CACHE.clear()
    _RR_CACHE[key] = (polys, np.stack(rows), s0)
    return _RR_CACHE[key]


def recursion(config: OnlineConfig, stepsize: float | None = None, *,
              force: str | None = None) -> Recursion:
    """The affine second-moment recursion of ``config`` (``stepsize`` overrides μ).

    ``force="classes"`` runs the class-resolved recursion on a configuration the scalar one
    covers (a consistency check: both are exact, so they agree to rounding).
    """
    kind = method(config)
    if force is not None:
        if force not in ("classes", "scalar") or (force == "scalar" and kind != "scalar"):
            raise ValueError(f"force must be 'classes' or (when covered) 'scalar', got {force!r}")
        kind = force if kind not in ("coordinated", "rr") else kind
    mu = float(config.stepsize if stepsize is None else stepsize)
    D = config.dim
    wv = 1.0 / D if config.wstar_var is None else float(config.wstar_var)
    steps: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    phase_rows = None
    if kind == "rr":
        polys, phase_rows, s0 = _rr_polynomial(config)
        steps = tuple((A[0] + mu * A[1] + mu * mu * A[2], a[0] + mu * a[1] + mu * mu * a[2])
                      for A, a in polys)
        F, f = np.eye(s0.size), np.zeros(s0.size)
        for Fn, fn in steps:  # the period map
            F, f = Fn @ F, Fn @ f + fn
        rows = phase_rows[0]
    elif kind == "scalar":
        F, f, rows = _scalar_recursion(config, mu)
        s0 = np.full(4, wv)
    else:
        (A, a), rows, s0 = _class_polynomial(config, kind)
        F = A[0] + mu * A[1] + mu * mu * A[2]
        f = a[0] + mu * a[1] + mu * mu * a[2]
    return Recursion(F=F, f=f, s0=s0, rows=rows, dim=D, input_var=float(config.input_var),
                     noise_var=float(config.noise_var), test_noise=config.test_noise,
                     local_mse=config.local_mse, method=kind, steps=steps,
                     phase_rows=phase_rows)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """Small dense eigenproblems (S ≈ 140) run ~10x faster on one BLAS thread than on a
    loaded machine's pool; threadpoolctl is optional (no limit without it)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional speed-up
        yield
        return
    with threadpool_limits(1):
        yield


def _radius(F: np.ndarray) -> float:
    with _one_blas_thread():
        return float(np.abs(np.linalg.eigvals(F)).max())


def spectral_radius(config: OnlineConfig, stepsize: float | None = None) -> float:
    """Spectral radius of ``F`` per iteration (round robin: of the period map, to the power
    ``1/L``): mean-square stable iff < 1."""
    rec = recursion(config, stepsize)
    return _radius(rec.F) ** (1.0 / rec.period)


def steady_moments(config: OnlineConfig, stepsize: float | None = None) -> np.ndarray | None:
    """Fixed point ``s* = (I − F)⁻¹ f`` of the recursion (``None`` if not mean-square stable);
    round robin: the periodic steady state at the phase of iteration 0."""
    rec = recursion(config, stepsize)
    if _radius(rec.F) >= 1.0:
        return None
    with _one_blas_thread():
        return np.asarray(np.linalg.solve(np.eye(rec.f.size) - rec.F, rec.f))


def _steady_cycle(config: OnlineConfig,
                  stepsize: float | None) -> tuple[Recursion, np.ndarray] | None:
    """The steady moments at every phase of one period ``[L, S]``."""
    rec = recursion(config, stepsize)
    s = steady_moments(config, stepsize)
    if s is None:
        return None
    cyc = [s]
    for n in range(rec.period - 1):
        cyc.append(rec.advance(cyc[-1], n))
    return rec, np.stack(cyc)


def steady_state(config: OnlineConfig, stepsize: float | None = None) -> float:
    """Predicted steady-state global MSE (linear scale; ``inf`` if not mean-square stable;
    round robin: averaged over one period of the windows)."""
    out = _steady_cycle(config, stepsize)
    return math.inf if out is None else float(np.mean(out[0].mse(out[1])))


def steady_state_local(config: OnlineConfig, stepsize: float | None = None) -> float:
    """Predicted steady-state local MSE as the engine records it (``config.local_mse``)."""
    out = _steady_cycle(config, stepsize)
    if out is None:
        return math.inf
    rec, cyc = out
    return float(np.mean([rec.local(cyc[n], n) for n in range(rec.period)]))


def _moments(config: OnlineConfig, iterations: int | None,
             stepsize: float | None) -> tuple[Recursion, np.ndarray]:
    rec = recursion(config, stepsize)
    n = config.iterations if iterations is None else iterations
    out = np.empty((n + 1, rec.f.size))
    s = rec.s0.copy()
    out[0] = s
    for t in range(1, n + 1):
        s = rec.advance(s, t - 1)
        out[t] = s
    return rec, out


def learning_curve(config: OnlineConfig, iterations: int | None = None,
                   stepsize: float | None = None) -> np.ndarray:
    """Predicted global MSE after ``t = 0..iterations`` iterations (``[iterations + 1]``)."""
    rec, out = _moments(config, iterations, stepsize)
    return np.asarray(rec.mse(out))


def local_learning_curve(config: OnlineConfig, iterations: int | None = None,
                         stepsize: float | None = None) -> np.ndarray:
    """Predicted local MSE ``[iterations + 1]`` indexed like the engine's records with
    ``record_every=1``: entry ``t ≥ 1`` is the a-priori MSE of iteration ``t`` (state
    ``s_{t−1}``; ``local_mse="apriori"``) or the local models' test MSE after ``t`` iterations
    (``"test"``); entry 0 uses ``s_0``."""
    rec, out = _moments(config, iterations, stepsize)
    if rec.local_mse == "apriori":
        vals = [rec.local(out[0], 0)] + [rec.local(out[t - 1], t - 1)
                                         for t in range(1, len(out))]
    else:
        vals = [rec.local(out[t], t) for t in range(len(out))]
    return np.asarray(vals, dtype=float)


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
