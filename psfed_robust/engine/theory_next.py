"""Class-resolved second-moment recursion of PSO-Fed for the uplink ``next`` (and its relatives).

With ``uplink = "next"`` (P1, Gogineni et al., ICASSP 2022, arXiv 2110.06556) a participant
uploads at ``n`` the coordinates ``T_{k,n} = S_{k,n+1}`` it is overwritten on if it takes part at
``n + 1``: the mask it merges with is correlated with the global error it helped to form. The
four-scalar closure of :mod:`psfed_robust.engine.theory` then fails; this module carries the
second moments of the global error ``e``, the local errors ``e_k`` and their cross terms
*conditioned on the coordinate's class* for one or two tagged clients of each type (honest /
malicious), which closes exactly. Derivation and symbol names: docs/theory.md, section
"Uplink next"; every function below is one numbered equation there.

Two mask structures:

* uncoordinated (``coordinated=False``): client ``k``'s class of coordinate ``i`` is ``F`` (k
  did not take part at ``n − 1``: its next downlink mask is a fresh draw), ``I`` (it took part
  and ``i ∈ T_{k,n−1}``: ``i`` will be overwritten) or ``O`` (took part, ``i ∉ T_{k,n−1}``).
  ``uplink="independent"`` is the special case where every class is ``F``.
* coordinated (``coordinated=True``): one common pending mask; the class is one bit per
  coordinate (``i`` in the pending mask or not), shared by all clients.
* coordinated round robin: deterministic common windows, so no class at all — each coordinate
  keeps its own moments and the LMS trace term sums over coordinates (eq. RR, RR2).

Participation enters through the exact law of the participant count ``N`` (fixed: ``N = P``;
Bernoulli: binomial), participants being a uniform ``N``-subset and ``ω = ω(N)``; ``N = 0``
(Bernoulli only) keeps every pending mask, as the engine does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

__all__ = ["Law", "Params", "coordinated_step", "initial_state", "layout", "participation_law",
           "uncoordinated_step"]

H, MAL = 0, 1  # client types
F_, I_, O_ = 0, 1, 2  # uncoordinated classes: free, pending-in, pending-out
SIGMA_CLASS = ("F", "I", "O")


def _ff(n: float, k: int) -> float:
    """Falling factorial ``n (n−1) … (n−k+1)`` (``1`` for ``k = 0``)."""
    out = 1.0
    for i in range(k):
        out *= n - i
    return out


@dataclass(frozen=True)
class Law:
    """Law of the participant count ``N`` and the server weight ``ω(N)`` (eq. N1)."""

    K: int
    probs: np.ndarray  # [K + 1] P(N = n)
    omega: np.ndarray  # [K + 1] ω(n) (0 for n = 0)

    @property
    def p0(self) -> float:
        """``P(N = 0)``: an iteration without participants (Bernoulli scheduling only)."""
        return float(self.probs[0])

    def W(self, r: int, n_in: int, n_out: int) -> float:
        """``E[ω^r 1{N ≥ 1} Π_{n_in} χ Π_{n_out} (1 − χ)]`` for distinct clients (eq. N2)."""
        tot = n_in + n_out
        if tot > self.K:
            return 0.0
        den = _ff(self.K, tot)
        s = 0.0
        for n in range(1, self.K + 1):
            pn = self.probs[n]
            if pn == 0.0:
                continue
            s += pn * self.omega[n] ** r * _ff(n, n_in) * _ff(self.K - n, n_out) / den
        return s


def participation_law(K: int, scheduling: str, participants: int, p_c: float,
                      server_weight: str) -> Law:
    """The law of ``(N, ω(N))`` of one iteration (engine: ``schedule`` + ``server_weights``)."""
    probs = np.zeros(K + 1)
    if scheduling == "fixed":
        probs[participants] = 1.0
    else:
        probs[:] = binom.pmf(np.arange(K + 1), K, p_c)
    n = np.arange(K + 1, dtype=float)
    if server_weight == "participants":
        omega = np.where(n > 0, 1.0 / np.maximum(n, 1.0), 0.0)
    elif server_weight == "expected":
        omega = np.full(K + 1, 1.0 / (p_c * K))
    else:
        omega = np.full(K + 1, 1.0 / K)
    omega[0] = 0.0
    return Law(K=K, probs=probs, omega=omega)


@dataclass(frozen=True)
class Params:
    """Scalars of one configuration (docs/theory.md, "Constants")."""

    p: float  # M / D
    phi: float  # 1 − μσ_x²
    rho: float  # 1 − 2μσ_x² + (D + 2) μ²σ_x⁴
    eta: float  # μ²σ_x²σ_ν²
    nonpart: bool  # non-participants take an LMS step
    pa_sd2: float  # p_a σ_δ² (0 without attack)
    persistent: bool  # the attack noise stays in the attacker's local model
    counts: tuple[int, int]  # (honest, malicious) clients
    pending: bool  # uplink next (True) or independent (False: every class is F)
    law: Law


# ----------------------------------------------------------------------------- state layout
#: uncoordinated state blocks and their shapes after the batch axis (eq. S1)
_UNC = (("pi1", (3,)), ("pi2", (3, 3)), ("G1", (2, 3)), ("G2", (2, 3, 2, 3)),
        ("C1", (2, 3)), ("C2", (2, 3, 2, 3)), ("L1", (2, 3)), ("H2", (2, 3, 2, 3)))
#: coordinated state blocks (eq. S2): class bit c ∈ {out, in} last
_COO = (("pi", (2,)), ("G", (2,)), ("C1", (2, 2)), ("L1", (2, 2)), ("H2", (2, 2, 2)))


def layout(coordinated: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Names and shapes of the state blocks, in the order they are packed."""
    return _COO if coordinated else _UNC


def pack(blocks: dict[str, np.ndarray], coordinated: bool) -> np.ndarray:
    """Blocks ``[B, *shape]`` → state ``[B, S]``."""
    return np.concatenate([blocks[n].reshape(blocks[n].shape[0], -1)
                           for n, _ in layout(coordinated)], axis=1)


def unpack(s: np.ndarray, coordinated: bool) -> dict[str, np.ndarray]:
    """State ``[B, S]`` → blocks ``[B, *shape]`` (views)."""
    out, i = {}, 0
    for name, shape in layout(coordinated):
        size = int(np.prod(shape))
        out[name] = s[:, i:i + size].reshape((s.shape[0], *shape))
        i += size
    return out


def exists_mask(counts: tuple[int, int], coordinated: bool) -> np.ndarray:
    """1 for state entries that describe existing clients / pairs of clients, else 0."""
    c = np.array(counts)
    one = (c > 0).astype(float)  # [2] a client of this type exists
    pair = np.array([[float(c[a] - (a == b) > 0 and c[a] > 0) for b in range(2)]
                     for a in range(2)])  # [2, 2] a second, distinct client exists
    anyone = float(c.sum() > 0)
    anypair = float(c.sum() > 1)
    blocks: dict[str, np.ndarray] = {}
    if coordinated:
        blocks = {"pi": np.full((1, 2), anyone), "G": np.full((1, 2), anyone),
                  "C1": np.broadcast_to(one[None, :, None], (1, 2, 2)).copy(),
                  "L1": np.broadcast_to(one[None, :, None], (1, 2, 2)).copy(),
                  "H2": np.broadcast_to(pair[None, :, :, None], (1, 2, 2, 2)).copy()}
    else:
        pr = pair[:, None, :, None] * np.ones((2, 3, 2, 3))
        blocks = {"pi1": np.full((1, 3), anyone), "pi2": np.full((1, 3, 3), anypair),
                  "G1": np.broadcast_to(one[:, None], (2, 3))[None].copy(), "G2": pr[None],
                  "C1": np.broadcast_to(one[:, None], (2, 3))[None].copy(), "C2": pr[None],
                  "L1": np.broadcast_to(one[:, None], (2, 3))[None].copy(), "H2": pr[None]}
    return pack(blocks, coordinated)[0]


def initial_state(wvar: float, counts: tuple[int, int], coordinated: bool,
                  p: float) -> np.ndarray:
    """All models zero: every error equals ``w°`` (variance ``σ_w²``) (eq. S3).

    Uncoordinated: every client is free (class F). Coordinated: no pending mask yet; the first
    downlink is a fresh draw, so coordinate ``i`` is "in" with probability ``p``.
    """
    blocks: dict[str, np.ndarray] = {}
    for name, shape in layout(coordinated):
        blocks[name] = np.zeros((1, *shape))
    if coordinated:
        share = np.array([1.0 - p, p])
        blocks["pi"][0] = share
        blocks["G"][0] = wvar * share
        blocks["C1"][0] = wvar * share
        blocks["L1"][0] = wvar * share
        blocks["H2"][0] = wvar * share
    else:
        blocks["pi1"][0, F_] = 1.0
        blocks["pi2"][0, F_, F_] = 1.0
        for n in ("G1", "C1", "L1"):
            blocks[n][0, :, F_] = wvar
        for n in ("G2", "C2", "H2"):
            blocks[n][0, :, F_, :, F_] = wvar
    return pack(blocks, coordinated)[0] * exists_mask(counts, coordinated)


# ---------------------------------------------------------------- shared per-client moments
@dataclass
class _Moments:
    """Moments of one iteration's merged/updated errors, batch ``[B]`` per entry (eqs. M1-M4).

    ``ey[t, x]`` = E[e y_k | χ_k = x]; ``yy[t, x]`` = E[y_k² | χ_k = x] (before attack noise);
    ``yy2[t, x, t', x']`` = E[y_k y_j | χ_k = x, χ_j = x'] (k ≠ j); ``g`` = E[e²].
    """

    g: np.ndarray
    ey: np.ndarray  # [B, 2, 2]
    yy: np.ndarray  # [B, 2, 2]
    yy2: np.ndarray  # [B, 2, 2, 2, 2]


def _update_moments(pr: Params, g: np.ndarray, ae: np.ndarray, bl: np.ndarray,
                    dd: np.ndarray) -> _Moments:
    """LMS step (eq. M4): ``ae[t, x] = E[e ê]``, ``bl[t, x] = E[ê²]``, ``dd`` = E[ê_k ê_j]."""
    phi_x = np.array([pr.phi if pr.nonpart else 1.0, pr.phi])
    ey = ae * phi_x[None, None, :]
    rho0, eta0 = (pr.rho, pr.eta) if pr.nonpart else (1.0, 0.0)
    yy = np.stack([rho0 * bl[:, :, 0] + eta0, pr.rho * bl[:, :, 1] + pr.eta], axis=-1)
    yy2 = dd * phi_x[None, None, :, None, None] * phi_x[None, None, None, None, :]
    return _Moments(g=g, ey=ey, yy=yy, yy2=yy2)


def _others(counts: tuple[int, int], tagged: list[tuple[int, int, int]]) -> np.ndarray:
    """Clients of each type that are not tagged."""
    n = np.array(counts, dtype=float)
    for t, _, _ in tagged:
        n[t] -= 1
    return n


def _global_sq(pr: Params, m: _Moments, tagged: list[tuple[int, int, int]],
               t_common: bool = False) -> np.ndarray:
    """``E[e'² 1{tagged pattern}]`` over ``N ≥ 1`` (eq. G).

    ``tagged``: ``(type, χ, t)`` of distinct tagged clients. ``t_common`` (coordinated): one
    uplink bit for everybody, already fixed to 1 by the caller, so others upload with prob. 1.
    """
    W, p = pr.law.W, (1.0 if t_common else pr.p)
    n_in = sum(x for _, x, _ in tagged)
    n_out = len(tagged) - n_in
    no = _others(pr.counts, tagged)
    up = [ty for ty, x, t in tagged if x and t]  # tagged uploaders
    ez = m.ey[:, :, 1] - m.g[:, None]  # E[e z_l] [B, 2]
    zz = m.yy[:, :, 1] - 2 * m.ey[:, :, 1] + m.g[:, None]  # E[z_l²]
    zz2 = (m.yy2[:, :, 1, :, 1] - m.ey[:, :, 1][:, :, None] - m.ey[:, :, 1][:, None, :]
           + m.g[:, None, None])  # E[z_l z_m] [B, 2, 2]
    w0, w1, w2 = W(0, n_in, n_out), W(1, n_in, n_out), W(2, n_in, n_out)
    w1o, w2o = W(1, n_in + 1, n_out), W(2, n_in + 1, n_out)
    w2oo = W(2, n_in + 2, n_out)
    out = m.g * w0
    for ty in up:
        out = out + 2 * w1 * ez[:, ty] + w2 * zz[:, ty] + w2 * pr.pa_sd2 * (ty == MAL)
    for ty in range(2):
        out = out + no[ty] * p * (2 * w1o * ez[:, ty] + w2o * zz[:, ty])
    out = out + no[MAL] * p * w2o * pr.pa_sd2
    for a, ta in enumerate(up):
        for b, tb in enumerate(up):
            if a != b:
                out = out + w2 * zz2[:, ta, tb]
        for ty in range(2):
            out = out + 2 * no[ty] * p * w2o * zz2[:, ta, ty]
    for ta in range(2):
        for tb in range(2):
            pairs = no[ta] * (no[tb] - (ta == tb))
            if pairs > 0:
                out = out + pairs * p * p * w2oo * zz2[:, ta, tb]
    return out


def _cross(pr: Params, m: _Moments, tagged: list[tuple[int, int, int]], k: int,
           t_common: bool = False) -> np.ndarray:
    """``E[e' e_k'' 1{tagged pattern}]`` over ``N ≥ 1`` for tagged client ``k`` (eq. C)."""
    W, p = pr.law.W, (1.0 if t_common else pr.p)
    n_in = sum(x for _, x, _ in tagged)
    n_out = len(tagged) - n_in
    no = _others(pr.counts, tagged)
    tk, xk, uk = tagged[k]
    w0, w1, w1o = W(0, n_in, n_out), W(1, n_in, n_out), W(1, n_in + 1, n_out)
    eyk = m.ey[:, tk, xk]
    out = w0 * eyk
    for j, (tj, xj, uj) in enumerate(tagged):
        if j != k and xj and uj:  # E[z_j y_k]
            out = out + w1 * (m.yy2[:, tj, 1, tk, xk] - eyk)
    if xk and uk:  # E[z_k y_k] and, persistent, the attacker's own noise
        out = out + w1 * (m.yy[:, tk, 1] - eyk)
        if pr.persistent and tk == MAL:
            out = out + w1 * pr.pa_sd2
    for ty in range(2):
        out = out + no[ty] * p * w1o * (m.yy2[:, ty, 1, tk, xk] - eyk)
    return out


def _pattern_prob(pr: Params, tagged: list[tuple[int, int, int]], p: float) -> float:
    """Probability of the tagged uplink bits given their participation (``t`` i.i.d. ``p``)."""
    out = 1.0
    for _, x, t in tagged:
        if x:
            out *= p if t else 1.0 - p
    return out


def _class_pattern(a: int) -> tuple[int, int]:
    """Uncoordinated class at ``n + 1`` → (χ_k, t_k) at ``n`` (F: χ=0; I: χ=1,t=1; O: t=0)."""
    return ((0, 0), (1, 1), (1, 0))[a]


def uncoordinated_step(pr: Params, s: np.ndarray) -> np.ndarray:
    """One iteration of the uncoordinated recursion on a batch of states ``[B, S]`` (eq. U)."""
    b = unpack(s, False)
    B = s.shape[0]
    sig = np.array([pr.p, 1.0, 0.0])  # E[s_k | class]: fresh draw, pending-in, pending-out
    ty0 = H if pr.counts[H] > 0 else MAL
    g = b["G1"][:, ty0, :].sum(-1)
    # eq. M1-M3: merged moments by (type, χ)
    ae = np.stack([b["C1"].sum(-1),
                   ((1 - sig) * b["C1"] + sig * b["G1"]).sum(-1)], axis=-1)  # [B, 2, 2]
    bl = np.stack([b["L1"].sum(-1),
                   ((1 - sig) * b["L1"] + sig * b["G1"]).sum(-1)], axis=-1)
    # eq. M3: E[ê_k ê_j] with ê = (1 − s) e_k + s e, s ~ class (a fresh draw for F)
    c2_swap = b["C2"].transpose(0, 3, 4, 1, 2)  # [B, τk, a, τj, b] → E[e e_j 1{a, b}]
    dd = np.zeros((B, 2, 2, 2, 2))

    def wt(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.outer(u, v)[None, None, :, None, :]

    for xk in range(2):
        sk = xk * sig
        for xj in range(2):
            sj = xj * sig
            v = (wt(1 - sk, 1 - sj) * b["H2"] + wt(1 - sk, sj) * b["C2"]
                 + wt(sk, 1 - sj) * c2_swap + wt(sk, sj) * b["G2"])
            dd[:, :, xk, :, xj] = v.sum((2, 4))
    m = _update_moments(pr, g, ae, bl, dd)
    new = {name: np.zeros((B, *shape)) for name, shape in _UNC}
    pa = pr.pa_sd2
    for a in range(3):
        xa, ta = _class_pattern(a)
        for t1 in range(2):
            tag1 = [(t1, xa, ta)]
            w = _pattern_prob(pr, tag1, pr.p)
            n_in = xa
            w0 = pr.law.W(0, n_in, 1 - n_in) * w
            if t1 == ty0:
                new["pi1"][:, a] = w0
            new["G1"][:, t1, a] = w * _global_sq(pr, m, tag1)
            new["C1"][:, t1, a] = w * _cross(pr, m, tag1, 0)
            noise = pa if (pr.persistent and t1 == MAL and xa) else 0.0
            new["L1"][:, t1, a] = w0 * (m.yy[:, t1, xa] + noise)
            for c in range(3):
                xc, tc = _class_pattern(c)
                for t2 in range(2):
                    tag2 = [(t1, xa, ta), (t2, xc, tc)]
                    w2 = _pattern_prob(pr, tag2, pr.p)
                    w20 = pr.law.W(0, xa + xc, 2 - xa - xc) * w2
                    if t1 == ty0 and t2 == ty0:
                        new["pi2"][:, a, c] = w20
                    new["G2"][:, t1, a, t2, c] = w2 * _global_sq(pr, m, tag2)
                    new["C2"][:, t1, a, t2, c] = w2 * _cross(pr, m, tag2, 0)
                    new["H2"][:, t1, a, t2, c] = w20 * m.yy2[:, t1, xa, t2, xc]
    if pr.law.p0 > 0:  # eq. U0: no participant, every pending mask is kept
        p0 = pr.law.p0
        phu, rhu, etu = (pr.phi, pr.rho, pr.eta) if pr.nonpart else (1.0, 1.0, 0.0)
        new["pi1"] += p0 * b["pi1"]
        new["pi2"] += p0 * b["pi2"]
        new["G1"] += p0 * b["G1"]
        new["G2"] += p0 * b["G2"]
        new["C1"] += p0 * phu * b["C1"]
        new["C2"] += p0 * phu * b["C2"]
        new["L1"] += p0 * (rhu * b["L1"] + etu * b["pi1"][:, None, :])
        new["H2"] += p0 * phu * phu * b["H2"]
    if not pr.pending:  # uplink independent: nothing is pending, fold I and O into F
        for name, _ in _UNC:
            arr = new[name]
            if name == "pi2" or arr.ndim == 5:
                ax = (1, 2) if name == "pi2" else (2, 4)
                for axis in ax:
                    moved = np.moveaxis(arr, axis, -1)  # a view: class axis last
                    moved[..., F_] = moved[..., F_] + moved[..., 1:].sum(-1)
                    moved[..., 1:] = 0.0
            else:
                arr[..., F_] = arr[..., F_] + arr[..., 1:].sum(-1)
                arr[..., 1:] = 0.0
    return pack(new, False) * exists_mask(pr.counts, False)[None, :]


def coordinated_step(pr: Params, s: np.ndarray) -> np.ndarray:
    """One iteration of the coordinated recursion (class bit c = 1: in the pending mask)."""
    b = unpack(s, True)
    B = s.shape[0]
    g = b["G"].sum(-1)
    # eq. K1: every participant merges on the common pending mask (ê = e where c = 1)
    ae = np.stack([b["C1"].sum(-1), b["C1"][:, :, 0] + b["G"][:, None, 1]], axis=-1)
    bl = np.stack([b["L1"].sum(-1), b["L1"][:, :, 0] + b["G"][:, None, 1]], axis=-1)
    dd = np.zeros((B, 2, 2, 2, 2))
    dd[:, :, 0, :, 0] = b["H2"].sum(-1)
    dd[:, :, 1, :, 1] = b["H2"][..., 0] + b["G"][:, None, None, 1]
    dd[:, :, 1, :, 0] = b["H2"][..., 0] + b["C1"][:, None, :, 1]  # c=1: ê_k = e
    dd[:, :, 0, :, 1] = b["H2"][..., 0] + b["C1"][:, :, None, 1]
    m = _update_moments(pr, g, ae, bl, dd)
    new = {name: np.zeros((B, *shape)) for name, shape in _COO}
    p, law = pr.p, pr.law
    q1 = 1.0 - law.p0  # P(N ≥ 1)
    # eq. K2: uplink bit t = 0 (nobody sends i) or 1 (every participant sends i)
    new["pi"][:, 0] = (1 - p) * q1
    new["pi"][:, 1] = p * q1
    new["G"][:, 0] = (1 - p) * q1 * g
    new["G"][:, 1] = p * _global_sq(pr, m, [], t_common=True)
    for t1 in range(2):
        for x in range(2):
            tag = [(t1, x, 1)]
            wx = law.W(0, x, 1 - x)
            new["C1"][:, t1, 0] += (1 - p) * wx * m.ey[:, t1, x]
            new["C1"][:, t1, 1] += p * _cross(pr, m, tag, 0, t_common=True)
            noise = pr.pa_sd2 if (pr.persistent and t1 == MAL and x) else 0.0
            for c in range(2):
                new["L1"][:, t1, c] += (p if c else 1 - p) * wx * (m.yy[:, t1, x] + noise)
            for t2 in range(2):
                for x2 in range(2):
                    w2 = law.W(0, x + x2, 2 - x - x2)
                    for c in range(2):
                        new["H2"][:, t1, t2, c] += (p if c else 1 - p) * w2 * \
                            m.yy2[:, t1, x, t2, x2]
    if law.p0 > 0:  # no participant: the pending mask and the global model are kept
        p0 = law.p0
        phu, rhu, etu = (pr.phi, pr.rho, pr.eta) if pr.nonpart else (1.0, 1.0, 0.0)
        new["pi"] += p0 * b["pi"]
        new["G"] += p0 * b["G"]
        new["C1"] += p0 * phu * b["C1"]
        new["L1"] += p0 * (rhu * b["L1"] + etu * b["pi"][:, None, :])
        new["H2"] += p0 * phu * phu * b["H2"]
    return pack(new, True) * exists_mask(pr.counts, True)[None, :]


def readouts(pr: Params, coordinated: bool, s: np.ndarray) -> np.ndarray:
    """``[B, 3]``: per coordinate ``E e²`` (global), the client-averaged a-priori ``E ê_k²``
    (the merged model the LMS step sees) and the client-averaged ``E e_k²`` (eq. R)."""
    b = unpack(s, coordinated)
    K = float(sum(pr.counts))
    q = float((pr.law.probs * np.arange(pr.law.K + 1)).sum()) / K  # P(χ_k = 1)
    frac = np.array(pr.counts, dtype=float) / K
    if coordinated:
        g = b["G"].sum(-1)
        bl1 = b["L1"][:, :, 0] + b["G"][:, None, 1]
        bl0 = b["L1"].sum(-1)
    else:
        sig = np.array([pr.p, 1.0, 0.0])
        ty0 = H if pr.counts[H] > 0 else MAL
        g = b["G1"][:, ty0, :].sum(-1)
        bl1 = ((1 - sig) * b["L1"] + sig * b["G1"]).sum(-1)
        bl0 = b["L1"].sum(-1)
    apriori = ((q * bl1 + (1 - q) * bl0) * frac).sum(-1)
    post = (bl0 * frac).sum(-1)
    return np.stack([g, apriori, post], axis=-1)


# ------------------------------------------------------- coordinated round robin (eq. RR)
#: per-coordinate blocks of the round-robin state (no classes: the masks are deterministic)
_RR = (("G", ()), ("C1", (2,)), ("L1", (2,)), ("H2", (2, 2)))
RR_SIZE = 9  # numbers per coordinate


def rr_bits(D: int, M: int, n: int) -> np.ndarray:
    """Coordinated round-robin window of iteration ``n``: ``1{(i − nM) mod D < M}`` ``[D]``."""
    return (((np.arange(D) - n * M) % D) < M).astype(float)


def rr_exists(counts: tuple[int, int], D: int) -> np.ndarray:
    """Existence mask ``[D * 9]`` of the round-robin state (types and pairs that exist)."""
    c = np.array(counts)
    one = (c > 0).astype(float)
    pair = np.array([[float(c[a] > 0 and c[b] - (a == b) > 0) for b in range(2)]
                     for a in range(2)])
    row = np.concatenate([[float(c.sum() > 0)], one, one, pair.ravel()])
    return np.tile(row, D)


def rr_initial_state(wvar: float, counts: tuple[int, int], D: int) -> np.ndarray:
    """All models zero: every moment of every coordinate is ``σ_w²``."""
    return np.full(D * RR_SIZE, wvar) * rr_exists(counts, D)


def rr_step(pr: Params, s: np.ndarray, sbits: np.ndarray, tprob: np.ndarray) -> np.ndarray:
    """One iteration of coordinated round robin on states ``[B, D * 9]`` (eq. RR).

    ``sbits [D]``: the common downlink window (0/1); ``tprob [D]``: the common uplink bit (0/1
    for uplink next/same, ``p`` for a fresh independent mask). Each coordinate keeps its own
    moments (its mask history is deterministic); the LMS trace term couples them (eq. RR2).
    """
    B = s.shape[0]
    D = sbits.size
    st = s.reshape(B, D, RR_SIZE)
    G, C1, L1 = st[..., 0], st[..., 1:3], st[..., 3:5]
    H2 = st[..., 5:9].reshape(B, D, 2, 2)
    sb = sbits[None, :]
    s1, s3, s4 = sb[..., None], sb[..., None], sb[..., None, None]
    ae = np.stack([C1, s1 * G[..., None] + (1 - s1) * C1], axis=-1)  # [B, D, τ, x]
    bl = np.stack([L1, s3 * G[..., None] + (1 - s3) * L1], axis=-1)
    dd = np.zeros((B, D, 2, 2, 2, 2))
    dd[:, :, :, 0, :, 0] = H2
    dd[:, :, :, 1, :, 1] = s4 * G[..., None, None] + (1 - s4) * H2
    dd[:, :, :, 1, :, 0] = s4 * C1[:, :, None, :] + (1 - s4) * H2  # k merged: ê_k = e
    dd[:, :, :, 0, :, 1] = s4 * C1[:, :, :, None] + (1 - s4) * H2
    # eq. RR2: E[y_k²] = γ E[ê_{k,i}²] + μ²σ⁴ Σ_{i'} E[ê_{k,i'}²] + η (no symmetry across i)
    a = 1.0 - pr.phi  # μσ_x²
    gam, kap = 1.0 - 2 * a + 2 * a * a, a * a
    g0, k0, e0 = (gam, kap, pr.eta) if pr.nonpart else (1.0, 0.0, 0.0)
    tr = bl.sum(1, keepdims=True)  # [B, 1, τ, x]
    yy = np.stack([g0 * bl[..., 0] + k0 * tr[..., 0] + e0,
                   gam * bl[..., 1] + kap * tr[..., 1] + pr.eta], axis=-1)
    phi_x = np.array([pr.phi if pr.nonpart else 1.0, pr.phi])
    ey = ae * phi_x
    yy2 = dd * phi_x[:, None, None] * phi_x[None, None, :]
    BD = B * D
    m = _Moments(g=G.reshape(BD), ey=ey.reshape(BD, 2, 2), yy=yy.reshape(BD, 2, 2),
                 yy2=yy2.reshape(BD, 2, 2, 2, 2))
    tp = np.broadcast_to(tprob[None, :], (B, D)).reshape(BD)
    law, p0 = pr.law, pr.law.p0
    out = np.zeros((BD, RR_SIZE))
    out[:, 0] = tp * (_global_sq(pr, m, [], t_common=True) + p0 * m.g) + (1 - tp) * m.g
    for t1 in range(2):
        x1 = sum(_cross(pr, m, [(t1, x, 1)], 0, t_common=True) for x in range(2))
        x0 = sum(law.W(0, x, 1 - x) * m.ey[:, t1, x] for x in range(2))
        out[:, 1 + t1] = tp * x1 + (1 - tp) * x0 + p0 * m.ey[:, t1, 0]
        noise = pr.pa_sd2 if (pr.persistent and t1 == MAL) else 0.0
        out[:, 3 + t1] = (law.W(0, 0, 1) + p0) * m.yy[:, t1, 0] \
            + law.W(0, 1, 0) * (m.yy[:, t1, 1] + noise)
        for t2 in range(2):
            h = p0 * m.yy2[:, t1, 0, t2, 0]
            for x in range(2):
                for x2 in range(2):
                    h = h + law.W(0, x + x2, 2 - x - x2) * m.yy2[:, t1, x, t2, x2]
            out[:, 5 + 2 * t1 + t2] = h
    return out.reshape(B, D * RR_SIZE) * rr_exists(pr.counts, D)[None, :]


def rr_readouts(pr: Params, D: int, s: np.ndarray, sbits: np.ndarray) -> np.ndarray:
    """``[B, 3]`` as :func:`readouts`, coordinates averaged, for window ``sbits``."""
    B = s.shape[0]
    st = s.reshape(B, D, RR_SIZE)
    G, L1 = st[..., 0], st[..., 3:5]
    K = float(sum(pr.counts))
    q = float((pr.law.probs * np.arange(pr.law.K + 1)).sum()) / K
    frac = np.array(pr.counts, dtype=float) / K
    sb = sbits[None, :, None]
    bl1 = sb * G[..., None] + (1 - sb) * L1
    apriori = ((q * bl1 + (1 - q) * L1) * frac).sum(-1).mean(-1)
    return np.stack([G.mean(-1), apriori, (L1 * frac).sum(-1).mean(-1)], axis=-1)
