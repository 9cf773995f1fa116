"""Batched online federated learning: PSO-Fed / Online-Fed with attacks and defenses.

All ``K`` clients of ``B`` Monte Carlo runs advance as one tensor program (local models
``[B, K, D]``, global models ``[B, D]``) — PSO-Fed of Gogineni et al. (ICASSP 2022,
arXiv 2110.06556) with the model-poisoning threat model of Lari et al. (IEEE TSIPN 2025,
arXiv 2403.13108). With ``share_count == dim`` it is Online-Fed, bit for bit.

One iteration ``n`` (every option in :class:`OnlineConfig`; ``K_n`` participants):

1. scheduling: ``K_n`` = ``participants`` clients drawn uniformly (``"fixed"``) or each client
   with probability ``p_c`` (``"bernoulli"``);
2. downlink + merge at ``k ∈ K_n``: ``ŵ_k = S_{k,n} w_n + (I − S_{k,n}) w_k``;
3. every client (participants on ``ŵ_k``; non-participants unless ``nonparticipant_updates`` is
   off) takes one LMS step on its new sample: ``e = y − wᵀz``, ``w ← w + μ e z``;
4. uplink: ``δ_k = w_{k,n+1} − w_n`` (the honest delta) → ``attack(δ, ctx)`` → sent values
   ``T_{k,n}(w_n + δ'_k)``; a ``persistent`` attack also writes ``w_n + δ'_k`` into the attacker's
   local model, otherwise the noise is transmit-only;
5. server: ``w_{n+1} = w_n + Σ_k ω_k T_k δ'_k`` (``defense="mean"``, fill mode: PSO-Fed) or any
   registered defense (``defenses.get_defense``) in ``"fill"`` or ``"reporters"`` mode.

Runs are processed in blocks of ``run_block`` runs (on CPU at most 128 runs and at least two
blocks from 32 runs on, run in parallel threads; all runs on CUDA); within a block the LMS step
runs one cache-sized chunk of runs at a time (same values as one batched step).

On CPU the hot path runs compiled kernels (:mod:`psfed_robust.engine._kernels`: mask sampler,
schedule, data step, and merge + regressors + LMS + PSO-Fed server step fused row by row); each
has a torch/numpy twin that gives the same bits (``metadata["engine_kernels"]`` says which ran;
``run_online(..., use_kernels=False)`` forces the twins). The arithmetic is fixed so that both
agree: LMS and test predictions ``wᵀz`` sum in 32 lanes folded by halving
(:func:`~psfed_robust.engine._kernels.lane_dot_torch`), updates round product and sum separately,
RFF arguments and the float32 cosine follow :func:`~psfed_robust.engine.data.rff_args` and
:func:`~psfed_robust.engine.data.rff_cos`. Each
block has its own generators, ``stable_seed(seed, "psfed_robust.engine", purpose, block)`` for
``purpose`` in ``init`` (problem instance, test set, round-robin offsets), ``data`` (per-iteration
samples), ``schedule`` (one ``rand [B, K]`` per iteration: fixed = the ``participants`` smallest
keys (stable argsort), bernoulli = ``key < p_c``), ``mask`` (selection masks) and ``attack``
(``AttackContext.generator``). Streams do not depend on ``share_count``, the attack or the
defense, so configs that differ only there see the same data and schedules (common random
numbers). Seeds never depend on Python ``hash()``; a config and seed give the same numbers in any
process on the same device type.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from psfed_robust.core.aggregation import WeightScheme, server_weights
from psfed_robust.core.seeding import stable_seed
from psfed_robust.engine import _kernels
from psfed_robust.engine.data import DataStream, LinearStream, RFFStream
from psfed_robust.engine.masks import MaskPool

__all__ = [
    "CHOICES",
    "OnlineConfig",
    "OnlineResult",
    "SteadyState",
    "block_generator",
    "block_ranges",
    "resolve_run_block",
    "run_online",
]

RNG_NAMESPACE = "psfed_robust.engine"
#: CPU LMS step: elements of one run chunk (features, products, models stay in L2 cache)
_LMS_CHUNK_ELEMENTS = 96 * 1024
#: CPU auto run blocks: at most this many runs per block
_CPU_BLOCK_RUNS = 128

#: The open modelling choices (psofed-model.md "(choice)") and the engine's other knobs,
#: field -> (default, allowed values / meaning). Reported in every result's metadata.
CHOICES: dict[str, tuple[Any, str]] = {
    "scheduling": ("fixed", "'fixed' (P1: `participants` uniformly) | 'bernoulli' (P2: p_c)"),
    "selection": ("random", "'random' (M entries uniformly) | 'round_robin' (shift by M)"),
    "coordinated": (False, "True: all clients share one mask | False: per-client draws/offsets"),
    "uplink": ("next", "'next' (T=S_{k,n+1}, P1) | 'same' (T=S_{k,n}) | 'independent' draw"),
    "server_weight": ("participants",
                      "'participants' 1/|K_n| (P1) | 'expected' 1/(p_c K) | 'all' 1/K"),
    "attack persistent": (False, "attack param: transmit-only (False) | persistent (True)"),
    "aggregation_mode": ("fill", "'fill' (PSO-Fed) | 'reporters' (per-coordinate reporters)"),
    "nonparticipant_updates": (True, "non-participants run LMS on their new sample"),
    "malicious clients": ("first num_malicious indices", "client stats are i.i.d. per run"),
    "kernel_width": (1.0, "RFF ω ~ N(0, σ_k^-2 I)"),
    "ar_init": ("stationary", "'stationary' | 'zeros' initial AR(1) state"),
    "test_noise": (True, "test targets include observation noise"),
    "test_mse": ("sample", "'sample' (N_t test points) | 'expected' (σ_ν²+σ_x²‖w°−w‖², linear)"),
    "local_mse": ("apriori", "'apriori' (mean e² of the LMS step) | 'test' (local models)"),
    "initial models": ("zeros", "w_0 = w_{k,0} = 0"),
}

_ALLOWED: dict[str, tuple[Any, ...]] = {
    "task": ("rff", "linear"),
    "scheduling": ("fixed", "bernoulli"),
    "selection": ("random", "round_robin"),
    "uplink": ("next", "same", "independent"),
    "server_weight": ("participants", "expected", "all"),
    "aggregation_mode": ("fill", "reporters"),
    "ar_init": ("stationary", "zeros"),
    "test_mse": ("sample", "expected"),
    "local_mse": ("apriori", "test"),
    "dtype": ("float32", "float64"),
}


def _err(name: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"OnlineConfig.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class OnlineConfig:
    """One online-FL scenario of the batched engine (defaults: P1's PSO-Fed, M = 40 of D = 200).

    Fields (allowed values are checked in ``__post_init__``):
    task ``"rff"`` (P1 nonlinear, RFF kernel LMS) | ``"linear"`` (white Gaussian, P2);
    num_clients K; dim D (RFF features / linear weights); input_dim L (RFF inputs, ≥ 4);
    kernel_width σ_k; iterations; runs R; seed; stepsize μ;
    scheduling ``"fixed"`` (``participants`` clients) | ``"bernoulli"`` (each with ``p_c``);
    p_c (bernoulli; for fixed it defaults to ``participants/K``, used by ``"expected"`` weights);
    share_count M (``M = D`` is Online-Fed); selection, coordinated, uplink, server_weight,
    nonparticipant_updates (see :data:`CHOICES`); attack (registry name or ``"none"``) with
    attack_params (e.g. ``{"p_a": 0.5, "sigma": 1.0, "persistent": False}``), num_malicious
    (clients ``0..num_malicious-1``); defense (registry name) with defense_params,
    aggregation_mode ``"fill"`` | ``"reporters"``; linear-task input_var σ_x², noise_var σ_ν²,
    wstar_var σ_w² (None = 1/D); ar_init, test_noise, test_mse, local_mse, num_test N_t,
    record_every, dtype ``"float32"`` | ``"float64"``, run_block (None = auto).
    """

    task: str = "rff"
    num_clients: int = 100
    dim: int = 200
    input_dim: int = 4
    kernel_width: float = 1.0
    iterations: int = 1000
    runs: int = 100
    seed: int = 0
    stepsize: float = 0.75
    scheduling: str = "fixed"
    participants: int = 40
    p_c: float | None = None
    share_count: int = 40
    selection: str = "random"
    coordinated: bool = False
    uplink: str = "next"
    server_weight: str = "participants"
    nonparticipant_updates: bool = True
    attack: str = "none"
    attack_params: Mapping[str, Any] = field(default_factory=dict)
    num_malicious: int = 0
    defense: str = "mean"
    defense_params: Mapping[str, Any] = field(default_factory=dict)
    aggregation_mode: str = "fill"
    input_var: float = 1.0
    noise_var: float = 0.01
    wstar_var: float | None = None
    ar_init: str = "stationary"
    test_noise: bool = True
    test_mse: str = "sample"
    local_mse: str = "apriori"
    num_test: int = 50
    record_every: int = 1
    dtype: str = "float32"
    run_block: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in _ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise _err(name, "one of " + ", ".join(repr(a) for a in allowed), value)
        for name, low in (("num_clients", 1), ("dim", 1), ("iterations", 1), ("runs", 1),
                          ("num_test", 1), ("record_every", 1), ("input_dim", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise _err(name, f"an integer >= {low}", value)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise _err("seed", "an integer", self.seed)
        for name in ("coordinated", "nonparticipant_updates", "test_noise"):
            if not isinstance(getattr(self, name), bool):
                raise _err(name, "a bool", getattr(self, name))
        if self.task == "rff" and self.input_dim < 4:
            raise _err("input_dim", "an integer >= 4 for task 'rff' (P1's target uses x1..x4)",
                       self.input_dim)
        if not isinstance(self.share_count, int) or not 1 <= self.share_count <= self.dim:
            raise _err("share_count", f"an integer in [1, dim={self.dim}]", self.share_count)
        if not isinstance(self.participants, int) or not 1 <= self.participants <= self.num_clients:
            raise _err("participants", f"an integer in [1, num_clients={self.num_clients}]",
                       self.participants)
        if self.p_c is not None and not (isinstance(self.p_c, int | float) and 0 < self.p_c <= 1):
            raise _err("p_c", "a number in (0, 1] or None", self.p_c)
        if self.scheduling == "bernoulli" and self.p_c is None:
            raise _err("p_c", "a number in (0, 1] when scheduling='bernoulli'", self.p_c)
        for name in ("stepsize", "kernel_width", "input_var"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v > 0):
                raise _err(name, "a finite number > 0", v)
        if isinstance(self.noise_var, bool) or not isinstance(self.noise_var, int | float) or not (
                math.isfinite(self.noise_var) and self.noise_var >= 0):
            raise _err("noise_var", "a finite number >= 0", self.noise_var)
        if self.wstar_var is not None and not (
                isinstance(self.wstar_var, int | float) and self.wstar_var >= 0):
            raise _err("wstar_var", "a number >= 0 or None", self.wstar_var)
        nm = self.num_malicious
        if isinstance(nm, bool) or not isinstance(nm, int) or not 0 <= nm <= self.num_clients:
            raise _err("num_malicious", f"an integer in [0, num_clients={self.num_clients}]",
                       self.num_malicious)
        if self.record_every > self.iterations:
            raise _err("record_every", f"an integer in [1, iterations={self.iterations}]",
                       self.record_every)
        if self.test_mse == "expected" and self.task != "linear":
            raise _err("test_mse", "'sample' for task 'rff' ('expected' needs the linear model)",
                       self.test_mse)
        if self.run_block is not None and (not isinstance(self.run_block, int)
                                           or self.run_block < 1):
            raise _err("run_block", "None or an integer >= 1", self.run_block)
        if not isinstance(self.attack, str):
            raise _err("attack", "a registered attack name or 'none'", self.attack)
        if not isinstance(self.defense, str):
            raise _err("defense", "a registered defense name", self.defense)

    # ------------------------------------------------------------------ derived quantities
    @property
    def p_e(self) -> float:
        """Probability that an entry is shared, ``M / D``."""
        return self.share_count / self.dim

    @property
    def participation(self) -> float:
        """Expected fraction of clients per iteration (``participants/K`` or ``p_c``)."""
        if self.scheduling == "bernoulli":
            assert self.p_c is not None
            return float(self.p_c)
        return self.participants / self.num_clients

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def replace(self, **changes: Any) -> OnlineConfig:
        """A copy with ``changes`` applied (validated again)."""
        data = {**asdict(self), **changes}
        return OnlineConfig(**data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attack_params"] = dict(self.attack_params)
        d["defense_params"] = dict(self.defense_params)
        return d


@dataclass(frozen=True)
class SteadyState:
    """Steady-state summary over the last ``window`` fraction of the recorded iterations."""

    global_mse_db: float  # 10 log10 of the run- and window-averaged linear global MSE
    local_mse_db: float
    global_mse: float
    global_mse_sem_db: float  # standard error across runs, propagated to dB
    first_iteration: int  # first recorded iteration in the window


@dataclass
class OnlineResult:
    """Learning curves of one config (dB of run-averaged linear MSE) and per-run linear arrays."""

    iterations: np.ndarray  # [T] completed iterations at each record
    global_mse_db: np.ndarray  # [T]
    local_mse_db: np.ndarray  # [T]
    global_mse: np.ndarray  # [R, T] linear
    local_mse: np.ndarray  # [R, T] linear
    final_global_model: np.ndarray  # [R, D]
    metadata: dict[str, Any]
    seconds: float = 0.0

    def steady_state(self, window: float = 0.1) -> SteadyState:
        """Average over the last ``window`` fraction (0 < window ≤ 1) of the records."""
        if not 0 < window <= 1:
            raise ValueError(f"window must be in (0, 1], got {window}")
        T = len(self.iterations)
        start = max(0, min(T - 1, T - math.ceil(window * T)))
        per_run = self.global_mse[:, start:].mean(axis=1)
        mean = float(per_run.mean())
        local = float(self.local_mse[:, start:].mean())
        sem = float(per_run.std(ddof=1) / math.sqrt(len(per_run))) if len(per_run) > 1 else 0.0
        return SteadyState(
            global_mse_db=10 * math.log10(mean),
            local_mse_db=10 * math.log10(local),
            global_mse=mean,
            global_mse_sem_db=10 / math.log(10) * sem / mean,
            first_iteration=int(self.iterations[start]),
        )


# ---------------------------------------------------------------------------------- helpers
def resolve_run_block(config: OnlineConfig, device: torch.device) -> int:
    """Runs per block: ``config.run_block``, else all runs on CUDA; on CPU at most
    ``_CPU_BLOCK_RUNS`` runs per block and at least two blocks from 32 runs on (blocks run in
    parallel threads). Depends only on the config and the device type, never on thread counts.
    """
    if config.run_block is not None:
        return min(config.run_block, config.runs)
    if device.type != "cpu":
        return config.runs
    n_blocks = max(math.ceil(config.runs / _CPU_BLOCK_RUNS), 2 if config.runs >= 32 else 1)
    return math.ceil(config.runs / n_blocks)


def block_ranges(runs: int, block: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the run blocks."""
    return [(s, min(runs, s + block)) for s in range(0, runs, block)]


def block_generator(seed: int, purpose: str, block: int,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of ``purpose`` (init/data/schedule/mask/attack) for run block ``block``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stable_seed(seed, RNG_NAMESPACE, purpose, block))
    return gen


def make_stream(config: OnlineConfig, runs: int, block: int,
                device: torch.device) -> DataStream:
    """The data stream of one run block (generators ``init`` and ``data`` of that block)."""
    init = block_generator(config.seed, "init", block, device)
    data = block_generator(config.seed, "data", block, device)
    if config.task == "rff":
        return RFFStream(runs=runs, clients=config.num_clients, input_dim=config.input_dim,
                         dim=config.dim, kernel_width=config.kernel_width,
                         num_test=config.num_test, init_gen=init, data_gen=data, device=device,
                         dtype=config.torch_dtype, ar_init=config.ar_init,
                         test_noise=config.test_noise)
    return LinearStream(runs=runs, clients=config.num_clients, dim=config.dim,
                        num_test=config.num_test, init_gen=init, data_gen=data,
                        input_var=config.input_var, noise_var=config.noise_var,
                        wstar_var=config.wstar_var, device=device, dtype=config.torch_dtype,
                        test_noise=config.test_noise)


def schedule(keys: Tensor, config: OnlineConfig,
             kernels: Any = None) -> tuple[Tensor, Tensor | None]:
    """Participant slots from one iteration's keys ``[B, K]``.

    Returns ``idx [B, P]`` (participants in ascending client order first) and ``valid [B, P]``
    (``None`` when every slot is a participant, i.e. fixed scheduling). ``kernels``: the
    compiled engine kernels (CPU), which select the same fixed-scheduling participants.
    """
    if config.scheduling == "fixed" and kernels is not None and keys.device.type == "cpu":
        return kernels.schedule_fixed(keys.contiguous(), config.participants), None
    if config.scheduling == "fixed":
        # the P smallest keys, ties to the lower client index (= stable argsort), ascending:
        # below the P-th smallest key, plus the first P - (#below) of the keys equal to it
        P = config.participants
        thr = keys.kthvalue(P, dim=-1, keepdim=True).values
        below = keys < thr
        at = keys == thr
        room = P - below.sum(-1, keepdim=True)
        chosen = below | (at & (at.cumsum(-1) <= room))
        return chosen.nonzero()[:, 1].view(keys.shape[0], P), None
    assert config.p_c is not None
    part = keys < config.p_c
    counts = part.sum(-1)
    pmax = int(counts.max())
    idx = torch.argsort((~part).to(torch.uint8), dim=-1, stable=True)[:, :pmax]
    valid = torch.arange(pmax, device=keys.device)[None, :] < counts[:, None]
    return idx, valid


class _Masks:
    """Downlink masks S and uplink masks T of the participant slots as sorted index lists
    ``[B, P, M]`` (int64; ``None`` = dense, M = D).

    Random masks come from one :class:`MaskPool` per block (generator ``mask``), taken in this
    order each iteration: downlink rows that have no pending mask (uplink ``next``) or all slot
    rows (``same``/``independent``), then the uplink rows (``next``/``independent``). Coordinated
    selection takes one row per run instead of one per slot. Round-robin offsets are drawn from
    generator ``init-masks`` (``rand [B, K]``; all zero when coordinated); the round-robin mask of
    offset ``o`` at iteration ``n`` is ``{(o + nM + j) mod D : j < M}``.
    """

    def __init__(self, config: OnlineConfig, B: int, gen: torch.Generator, device: torch.device,
                 init_gen: torch.Generator, prefetch: bool = False, kern: Any = None,
                 compact: bool = False) -> None:
        self.cfg, self.B, self.device = config, B, device
        self.kern = kern  # compiled bookkeeping for uplink 'next' (same results)
        D, M, K = config.dim, config.share_count, config.num_clients
        self.dense = M == D
        # compact: int16 index lists (only the compiled kernels read them; same values)
        self.index_dtype = torch.int16 if compact and D <= 32767 else torch.long
        self.pool = MaskPool(D, M, gen, device, chunk=max(4096, min(65536, 4 * B * K)),
                             prefetch=prefetch and not self.dense and _needs_random(config),
                             indices=True, index_dtype=self.index_dtype)
        self.rr = config.selection == "round_robin"
        self.arange_m = torch.arange(M, device=device)
        if self.rr and not self.dense:
            if config.coordinated:
                self.offsets = torch.zeros((B, K), dtype=torch.long, device=device)
            else:
                u = torch.rand((B, K), generator=init_gen, device=device, dtype=torch.float64)
                self.offsets = (u * D).long().clamp_(max=D - 1)
        # uplink 'next': masks S_{k,n+1} sent at n (rows of prev_T), prev_slot[b, k] = row or -1
        self.pending: Tensor | None = None  # coordinated: [B, M]
        self.prev_T: Tensor | None = None
        self.prev_slot: Tensor | None = None
        self._s_buf: Tensor | None = None  # downlink index lists (preallocated)

    def _rr(self, n: int, idx: Tensor) -> Tensor:
        cfg = self.cfg
        if self.kern is not None and idx.is_contiguous():  # same lists, compiled
            return cast(Tensor, self.kern.rr_masks(self.offsets, idx, n * cfg.share_count,
                                                   cfg.share_count, cfg.dim,
                                                   self.index_dtype == torch.int16))
        start = (self.offsets.gather(1, idx) + n * cfg.share_count) % cfg.dim
        return ((start[..., None] + self.arange_m) % cfg.dim).to(self.index_dtype)

    def _fresh(self, shape: tuple[int, int]) -> Tensor:
        """Fresh random index lists for ``[B, P]`` slots (coordinated: one per run, expanded)."""
        B, P = shape
        M = self.cfg.share_count
        if self.cfg.coordinated:
            return self.pool.take(B)[:, None, :].expand(B, P, M)
        return self.pool.take(B * P).view(B, P, M)

    def downlink(self, n: int, idx: Tensor) -> Tensor | None:
        if self.dense:
            return None
        if self.rr:
            return self._rr(n, idx)
        B, P = idx.shape
        M = self.cfg.share_count
        if self.cfg.uplink != "next":
            return self._fresh((B, P))
        if self.cfg.coordinated:  # S_n was drawn at n-1 for everybody
            if self.pending is None:
                return self._fresh((B, P))
            return self.pending[:, None, :].expand(B, P, M)
        if self.prev_T is None or self.prev_slot is None:
            return self._fresh((B, P))
        if self._s_buf is None or self._s_buf.numel() < B * P * M:
            self._s_buf = torch.empty((B * P * M,), dtype=self.index_dtype, device=self.device)
        if self.kern is not None:
            n_need = self.kern.count_missing(self.prev_slot, idx)
            fresh = self.pool.take(n_need) if n_need else self._s_buf[:0].view(0, M)
            out = self._s_buf[: B * P * M].view(B, P, M)
            self.kern.resolve_downlink(self.prev_T.contiguous(), self.prev_slot, idx,
                                       fresh.contiguous(), out)
            return out
        src = self.prev_slot.gather(1, idx)
        need = src < 0
        S = torch.index_select(self.prev_T, 0, src.clamp(min=0).view(-1),
                               out=self._s_buf[: B * P * M].view(B * P, M)).view(B, P, M)
        n_need = int(need.sum())
        if n_need:
            S[need] = self.pool.take(n_need)
        return S

    def uplink(self, n: int, idx: Tensor, S: Tensor | None,
               defer_slots: bool = False) -> Tensor | None:
        """Uplink masks; ``defer_slots``: the caller records the uplink slots (random, 'next',
        uncoordinated: ``prev_slot``) itself, with the compiled ``set_slots`` order."""
        if self.dense:
            return None
        up = self.cfg.uplink
        if up == "same":
            return S
        B, P = idx.shape
        M = self.cfg.share_count
        if up == "independent":
            return self._fresh((B, P))
        if self.rr:  # next: T_{k,n} = S_{k,n+1}
            return self._rr(n + 1, idx)
        if self.cfg.coordinated:
            nxt = self.pool.take(B)
            self.pending = nxt
            return nxt[:, None, :].expand(B, P, M)
        T = self._fresh((B, P))
        if self.prev_slot is None:
            self.prev_slot = torch.empty((B, self.cfg.num_clients), dtype=torch.long,
                                         device=self.device)
        self.prev_T = T.reshape(B * P, M)
        if self.kern is not None:
            if not defer_slots:
                self.kern.set_slots(self.prev_slot, idx)
            return T
        self.prev_slot.fill_(-1)
        self.prev_slot.scatter_(1, idx, torch.arange(B * P, device=self.device).view(B, P))
        return T

    def mark_invalid(self, idx: Tensor, valid: Tensor | None) -> None:
        """Bernoulli padding slots are not participants: they hold no pending uplink mask."""
        if valid is None or self.prev_slot is None or self.cfg.coordinated or self.rr:
            return
        self.prev_slot.scatter_(1, idx, torch.where(valid, self.prev_slot.gather(1, idx), -1))


def dense_masks(index: Tensor, dim: int) -> Tensor:
    """Index lists ``[..., M]`` → bool masks ``[..., dim]``."""
    out = torch.zeros((*index.shape[:-1], dim), dtype=torch.bool, device=index.device)
    return out.scatter_(-1, index, True)


def _needs_random(config: OnlineConfig) -> bool:
    """Whether the config draws random masks (random selection or an independent uplink)."""
    if config.share_count == config.dim:
        return False
    return config.selection == "random" or config.uplink == "independent"


def _build_attack(config: OnlineConfig) -> Any:
    if config.attack in ("none", ""):
        return None
    import attacks

    atk = attacks.get_attack(config.attack, **dict(config.attack_params))
    if getattr(atk, "kind", "model") != "model":
        raise ValueError(f"OnlineConfig.attack {config.attack!r} is a {atk.kind!r} attack; the "
                         "online regression engine supports model-poisoning attacks only")
    return atk


def _build_defense(config: OnlineConfig) -> Any:
    import defenses

    return defenses.get_defense(config.defense, **dict(config.defense_params))


def _test_mse(stream: DataStream, config: OnlineConfig, g: Tensor, kern: Any = None) -> Tensor:
    """Per-run global test MSE ``[B]`` (linear, float64). Predictions ``gᵀz`` are summed in the
    kernels' lane order (:func:`psfed_robust.engine._kernels.lane_dot_torch`); ``kern``: the
    compiled kernels compute the same values."""
    if config.test_mse == "expected":
        assert isinstance(stream, LinearStream)
        err = (stream.wstar - g).double()
        return config.noise_var + config.input_var * (err * err).sum(-1)
    if kern is not None:
        return cast(Tensor, kern.test_mse(stream.test_features, stream.test_targets,
                                          g.contiguous()))
    pred = _kernels.lane_dot_torch(stream.test_features, g[:, None, :])
    r = (stream.test_targets - pred).double()
    return (r * r).mean(-1)


def _local_test_mse(stream: DataStream, W: Tensor) -> Tensor:
    pred = torch.bmm(W, stream.test_features.transpose(1, 2))  # [B, K, N_t]
    r = (stream.test_targets[:, None, :] - pred).double()
    return (r * r).mean((-1, -2))


# ---------------------------------------------------------------------------------- engine
def run_online(config: OnlineConfig, *, device: str | torch.device | None = None,
               progress: bool = False, server_fast_path: bool = True,
               mask_prefetch: bool | None = None,
               block_workers: int | None = None, use_kernels: bool = True) -> OnlineResult:
    """Run ``config`` (all runs, block by block) and return its learning curves.

    ``device``: torch device (default CPU); the same code runs on CUDA. ``progress``: tqdm bar.
    ``server_fast_path``: for ``defense="mean"`` in fill mode use the engine's fused server step
    ``g + Σ_k ω_k T_k δ'_k`` (same math as ``defenses.get_defense("mean")``, which is used
    otherwise and for every other defense). ``block_workers`` (CPU; default: torch's intra-op
    thread count): run blocks are independent (own generators), so up to this many run in
    parallel threads, each with one intra-op thread (torch's thread count is set to 1 for the
    call and restored after). ``mask_prefetch`` (default: on for CPU runs that draw random masks
    while torch uses ≥ 2 threads and only one block worker runs): a worker thread draws the next
    chunk of random masks while the engine computes, and torch's intra-op threads are lowered by
    one for the duration of the call (restored after). Results are identical either way.
    ``use_kernels`` (CPU; default on): run the compiled kernels when they build (else, and when
    off, their torch/numpy twins; same bits either way, ``metadata["engine_kernels"]``).
    """
    dev = torch.device(device if device is not None else "cpu")
    t0 = time.perf_counter()
    attack = _build_attack(config)
    defense = _build_defense(config)
    fast = server_fast_path and config.defense == "mean" and config.aggregation_mode == "fill"
    kern = _kernels.load() if dev.type == "cpu" and use_kernels else None
    blk = resolve_run_block(config, dev)
    blocks = block_ranges(config.runs, blk)
    T = config.iterations // config.record_every
    g_all = np.zeros((config.runs, T))
    l_all = np.zeros((config.runs, T))
    final = np.zeros((config.runs, config.dim))
    threads = torch.get_num_threads()
    if dev.type != "cpu":
        workers = 1
    elif block_workers is None:
        workers = min(threads, len(blocks))
    else:
        workers = max(1, min(block_workers, len(blocks)))
    if mask_prefetch is None:
        mask_prefetch = (dev.type == "cpu" and _needs_random(config) and threads > 1
                         and workers == 1)
    if dev.type == "cpu" and workers > 1:
        torch.set_num_threads(1)  # one intra-op thread per block worker
    elif mask_prefetch and dev.type == "cpu" and threads > 1:
        torch.set_num_threads(threads - 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.runs * config.iterations, unit="run-it", desc="online FL")

    def one(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, stop = blocks[b]
        return _run_block(config, b, stop - start, dev, attack, defense, fast, bar,
                          bool(mask_prefetch), kern)

    try:
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers,
                                    thread_name_prefix="psfed-block") as pool:
                outs = list(pool.map(one, range(len(blocks))))
        else:
            outs = [one(b) for b in range(len(blocks))]
        for (start, stop), (gm, lm, gfinal) in zip(blocks, outs, strict=True):
            g_all[start:stop] = gm
            l_all[start:stop] = lm
            final[start:stop] = gfinal
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    iters = np.arange(1, T + 1) * config.record_every
    meta = _metadata(config, attack, defense, blk, dev, fast)
    meta["mask_prefetch"] = bool(mask_prefetch)
    meta["engine_kernels"] = "cpp" if kern is not None else "torch"
    meta["block_workers"] = workers
    return OnlineResult(
        iterations=iters,
        global_mse_db=10 * np.log10(g_all.mean(axis=0)),
        local_mse_db=10 * np.log10(l_all.mean(axis=0)),
        global_mse=g_all,
        local_mse=l_all,
        final_global_model=final,
        metadata=meta,
        seconds=time.perf_counter() - t0,
    )


def _run_block(config: OnlineConfig, block: int, B: int, dev: torch.device, attack: Any,
               defense: Any, fast: bool, bar: Any, prefetch: bool = False,
               kern: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # compact (int16) masks when every consumer is compiled: the fused step (PSO-Fed mean, no
    # attack) on CPU
    compact = kern is not None and fast and attack is None
    masks = _Masks(config, B, block_generator(config.seed, "mask", block, dev), dev,
                   block_generator(config.seed, "init-masks", block, dev), prefetch, kern,
                   compact)
    try:
        return _block_loop(config, block, B, dev, attack, defense, fast, bar, masks, kern)
    finally:
        masks.pool.close()


def _block_loop(config: OnlineConfig, block: int, B: int, dev: torch.device, attack: Any,
                defense: Any, fast: bool, bar: Any, masks: _Masks,
                kern: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    K, D, mu = config.num_clients, config.dim, float(config.stepsize)
    dtype = config.torch_dtype
    stream = make_stream(config, B, block, dev)
    if kern is not None and isinstance(stream, RFFStream):
        stream.kernels = kern
    g_sched = block_generator(config.seed, "schedule", block, dev)
    g_attack = block_generator(config.seed, "attack", block, dev)
    W = torch.zeros((B, K, D), device=dev, dtype=dtype)
    g = torch.zeros((B, D), device=dev, dtype=dtype)
    malicious = torch.zeros((B, K), dtype=torch.bool, device=dev)
    malicious[:, : config.num_malicious] = True
    re = config.record_every
    T = config.iterations // re
    g_rec = torch.zeros((B, T), dtype=torch.float64, device=dev)
    l_rec = torch.zeros((B, T), dtype=torch.float64, device=dev)
    l_acc = torch.zeros((B,), dtype=torch.float64, device=dev)
    apriori = config.local_mse == "apriori"
    p_c = config.participation
    scale = float(stream.feature_scale)
    mu_s = mu * scale
    # LMS chunks: (r0, r1, W, features buffer, pred, y, e, coef [.., 1], coef)
    cb = B if dev.type != "cpu" else max(1, min(B, _LMS_CHUNK_ELEMENTS // max(1, K * D)))
    # the torch twin: regressors that do not depend on the chunking (float32 RFF, linear) are
    # computed 4 chunks at a time (fewer ops, still L2-sized); float64 RFF (torch's cosine)
    # keeps the kernel's chunks so that both give the same bits
    chunk_free = not (config.task == "rff" and dtype == torch.float64)
    cb_t = min(B, 4 * cb) if kern is None and chunk_free and dev.type == "cpu" else cb
    zbuf = torch.empty((cb if kern is not None else cb_t, K, D), device=dev, dtype=dtype)
    ybuf = torch.empty((B, K), device=dev, dtype=dtype)
    pbuf = torch.empty((B, K), device=dev, dtype=dtype)
    ebuf = torch.empty((B, K), device=dev, dtype=dtype)
    cbuf = torch.empty((B, K, 1), device=dev, dtype=dtype)
    lms_chunks = [(r0, r1, W[r0:r1], zbuf[: r1 - r0], pbuf[r0:r1], ybuf[r0:r1],
                   ebuf[r0:r1], cbuf[r0:r1], cbuf[r0:r1, :, 0])
                  for r0, r1 in block_ranges(B, cb_t)]
    pos_buf = torch.empty((B * K * max(1, config.share_count),), dtype=torch.long, device=dev)
    Wv = W.view(B * K, D)
    Wflat = W.view(-1)
    row0 = (torch.arange(B, device=dev) * K)[:, None]
    omega_fixed: Tensor | None = None
    om_fixed: Tensor | None = None
    scheme = cast(WeightScheme, config.server_weight)
    empty = torch.empty((0,), device=dev, dtype=dtype)
    no_valid = torch.empty((0,), device=dev, dtype=torch.bool)
    empty_idx = torch.empty((0,), device=dev, dtype=torch.long)
    empty_f64 = torch.empty((0,), device=dev, dtype=torch.float64)
    # compiled kernels: merge and the fused server step touch only the M shared entries
    sparse_kern = kern is not None and not masks.dense
    kern_server = sparse_kern and fast and attack is None
    def weights(valid: Tensor | None, P: int) -> tuple[Tensor, Tensor]:
        """Server weights ``ω [B, P]`` and their per-run value ``[B]`` (equal over slots)."""
        nonlocal omega_fixed, om_fixed
        if valid is None:  # fixed scheduling: one weight for every slot
            if omega_fixed is None or omega_fixed.shape[1] != P:
                omega_fixed = server_weights(torch.ones((B, P), dtype=torch.bool, device=dev),
                                             scheme, K, p_c, dtype=dtype)
                om_fixed = omega_fixed.amax(1).contiguous()
            assert om_fixed is not None
            return omega_fixed, om_fixed
        omega = server_weights(valid, scheme, K, p_c, dtype=dtype)
        return omega, omega.amax(1).contiguous()

    rff_regressors: tuple[Tensor, ...] | None = None
    if isinstance(stream, RFFStream):  # persistent tensors (x is updated in place)
        rff_regressors = tuple(empty if t is None else t for t in stream.kernel_inputs())

    def kernel_regressors() -> tuple[Tensor, ...]:
        if rff_regressors is not None:
            return rff_regressors
        return tuple(empty if t is None else t.contiguous() for t in stream.kernel_inputs())

    # compiled fixed scheduling: keys drawn and participants selected in one call
    kern_sched = kern is not None and config.scheduling == "fixed"
    for n in range(config.iterations):
        if kern_sched:
            idx = kern.schedule_draw(g_sched, B, K, config.participants,
                                     dtype == torch.float64)
            valid = None
        else:
            keys = torch.rand((B, K), generator=g_sched, device=dev, dtype=dtype)
            idx, valid = schedule(keys, config, kern)
            if kern is not None:
                idx = idx.contiguous()
        P = idx.shape[1]
        vmask = None if valid is None else valid[..., None]
        valid_k = no_valid if valid is None else valid  # for the kernels
        S = masks.downlink(n, idx) if P else None
        y = stream.advance()  # regressors z = scale * c, c from stream.features
        part_f: Tensor | None = None
        if not config.nonparticipant_updates:
            part_f = torch.zeros((B, K), dtype=dtype, device=dev)
            part_f.scatter_(1, idx, 1.0 if valid is None else valid.to(dtype))
        fused = bool(kern_server and P and S is not None)
        if fused:
            # merge, LMS, PSO-Fed's server step (and the a-priori error average) in one
            # compiled pass over the runs
            defer = valid is None  # the step records the uplink slots (after resolving S)
            Ti = masks.uplink(n, idx, S, defer_slots=defer)
            masks.mark_invalid(idx, valid)
            assert Ti is not None and S is not None
            _, om = weights(valid, P)
            slots = masks.prev_slot if defer and masks.prev_slot is not None else empty_idx
            g = kern.step(W, g, idx, S.contiguous(), Ti.contiguous(), om, valid_k,
                          *kernel_regressors(), y, ebuf,
                          empty if part_f is None else part_f, zbuf, mu_s, scale, cb,
                          l_acc if apriori else empty_f64, slots)
            P = 0  # done: nothing left for the steps below
        else:
            ybuf.copy_(y)
        if P and not sparse_kern:
            flat = (row0 + idx).view(-1)  # participant rows of W.view(B*K, D)
            flatD = flat * D  # their offsets in W.view(-1)
        else:
            flat = flatD = row0  # not used (computed below where needed)
        # downlink + merge at the participants
        if P and S is not None and sparse_kern:
            kern.merge(W, g, idx, S.contiguous(), valid_k)
        elif P:
            if S is None and vmask is None:
                Wv.index_copy_(0, flat, g[:, None, :].expand(B, P, D).reshape(B * P, D))
            elif S is None:  # lerp with 0/1 weights is exact: w (weight 0) or g (weight 1)
                assert vmask is not None
                Wp = Wv.index_select(0, flat).view(B, P, D)
                Wv.index_copy_(0, flat, Wp.lerp_(g[:, None, :], vmask.to(dtype)).view(B * P, D))
            else:  # overwrite the M shared entries of each participant with the global values
                M = S.shape[-1]
                pos = torch.add(S.reshape(B * P, M), flatD[:, None],
                                out=pos_buf[: B * P * M].view(B * P, M)).view(-1)
                vals = g.gather(1, S.reshape(B, P * M)).view(-1)
                if valid is not None:
                    keep = valid[..., None].expand(B, P, M).reshape(-1)
                    pos, vals = pos[keep], vals[keep]
                Wflat.scatter_(0, pos, vals)
        # one LMS step at every client on its new sample, one cache-sized chunk of runs at a time
        if not fused:
            if kern is not None:  # same values as the loop below, one compiled call
                kern.step(W, g, empty_idx, empty_idx, empty_idx, empty, no_valid,
                          *kernel_regressors(), ybuf, ebuf,
                          empty if part_f is None else part_f, zbuf, mu_s, scale, cb,
                          empty_f64, empty_idx)
            else:
                for r0, r1, Wc, zc, pc, yc, ec, cc, cc2 in lms_chunks:
                    c = stream.features(r0, r1, zc)
                    pc.copy_(_kernels.lane_dot_torch(Wc, c))  # the kernels' summation order
                    if scale == 1.0:
                        torch.sub(yc, pc, out=ec)
                    else:  # e = y - pred * scale
                        torch.sub(yc, torch.mul(pc, scale, out=ec), out=ec)
                    torch.mul(ec, mu_s, out=cc2)
                    if part_f is not None:
                        cc2.mul_(part_f[r0:r1])
                    Wc.add_(c * cc)  # two roundings, as the kernel (addcmul_ may fuse them)
        if apriori and not fused:
            l_acc += (ebuf * ebuf).mean(-1, dtype=torch.float64)
        # uplink, attack, server
        if P:
            Ti = masks.uplink(n, idx, S)
            masks.mark_invalid(idx, valid)
            omega, om = weights(valid, P)
            if fast and attack is None and Ti is not None:
                # g + ω Σ_k T_k (w_k − g), touching only the M sent entries of each participant
                M = Ti.shape[-1]
                cols = Ti.reshape(B, P * M)
                pos = torch.add(Ti.reshape(B * P, M), flatD[:, None],
                                out=pos_buf[: B * P * M].view(B * P, M)).view(-1)
                d = Wflat.index_select(0, pos).view(B, P * M).sub_(g.gather(1, cols))
                if valid is not None:
                    d.mul_(valid[..., None].expand(B, P, M).reshape(B, P * M))
                acc = torch.zeros_like(g).scatter_add_(1, cols, d)
                g = g + acc * om[:, None]
            else:
                if sparse_kern:  # the rows of the participants were not needed so far
                    flat = (row0 + idx).view(-1)
                delta = Wv.index_select(0, flat).view(B, P, D).sub_(g[:, None, :])
                Tb = None if Ti is None else dense_masks(Ti, D)  # bool masks for the seams
                if attack is not None:
                    delta = _apply_attack(attack, delta, n, g, Tb, malicious.gather(1, idx),
                                          valid, g_attack, defense, Wv, flat)
                if fast:  # g + Σ_k ω_k T_k δ'_k = g + ω Σ_k T_k δ'_k (ω equal over slots)
                    if Tb is not None:
                        delta = delta * Tb
                    if valid is not None:
                        delta = delta * valid[..., None]
                    g = g + delta.sum(1) * om[:, None]
                else:
                    g = defense(g[:, None, :] + delta, Tb, g, participants=valid,
                                weights=omega, mode=config.aggregation_mode)
        if (n + 1) % re == 0:
            t = (n + 1) // re - 1
            g_rec[:, t] = _test_mse(stream, config, g, kern)
            if apriori:
                l_rec[:, t] = l_acc / re
                l_acc.zero_()
            else:
                l_rec[:, t] = _local_test_mse(stream, W)
        if bar is not None:
            bar.update(B)
    return g_rec.cpu().numpy(), l_rec.cpu().numpy(), g.double().cpu().numpy()


def _apply_attack(attack: Any, delta: Tensor, n: int, g: Tensor, Tm: Tensor | None,
                  mal_slots: Tensor, valid: Tensor | None, gen: torch.Generator, defense: Any,
                  Wv: Tensor, flat: Tensor) -> Tensor:
    from attacks import AttackContext

    ctx = AttackContext(round=n, generator=gen, reference=g, masks=Tm, malicious=mal_slots,
                        participants=valid, honest=delta if attack.omniscient else None,
                        aggregator=defense)
    sent = attack(delta, ctx)
    if attack.persistent:
        changed = (sent != delta).any(-1)
        if bool(changed.any()):
            B, P, D = sent.shape
            old = Wv.index_select(0, flat).view(B, P, D)
            rows = torch.where(changed[..., None], g[:, None, :] + sent, old)
            Wv.index_copy_(0, flat, rows.reshape(B * P, D))
    return sent


def _metadata(config: OnlineConfig, attack: Any, defense: Any, blk: int, dev: torch.device,
              fast: bool) -> dict[str, Any]:
    persistent = bool(getattr(attack, "persistent", False)) if attack is not None else None
    return {
        "config": config.to_dict(),
        "choices": {
            "scheduling": config.scheduling,
            "participants": config.participants if config.scheduling == "fixed" else None,
            "p_c": config.participation,
            "selection": config.selection,
            "coordinated": config.coordinated,
            "uplink": config.uplink,
            "server_weight": config.server_weight,
            "attack_persistent": persistent,
            "aggregation_mode": config.aggregation_mode,
            "nonparticipant_updates": config.nonparticipant_updates,
            "malicious_clients": f"clients 0..{config.num_malicious - 1}"
            if config.num_malicious else "none",
            "kernel_width": config.kernel_width if config.task == "rff" else None,
            "ar_init": config.ar_init if config.task == "rff" else None,
            "test_noise": config.test_noise,
            "test_mse": config.test_mse,
            "local_mse": config.local_mse,
            "initial_models": "zeros",
        },
        "choice_defaults": {k: v[0] for k, v in CHOICES.items()},
        "attack": None if attack is None else {"name": config.attack, **attack.params},
        "defense": {"name": config.defense, **defense.params},
        "server_step": "engine fused mean" if fast else "defenses registry",
        "p_e": config.p_e,
        "values_per_link": config.share_count,
        "communication_saving": 1.0 - config.p_e,
        "run_block": blk,
        "device": str(dev),
        "torch": torch.__version__,
        "local_mse_definition": (
            "mean over clients of the squared a-priori error e = y - w^T z of each client's LMS "
            "step on its own new sample (participants: merged model), averaged over the "
            "record_every iterations of the record" if config.local_mse == "apriori" else
            "test MSE of each local model on the run's test set, averaged over clients"),
        "global_mse_definition": (
            "mean squared error of the global model on the run's N_t test points"
            if config.test_mse == "sample" else "sigma_nu^2 + sigma_x^2 ||w* - w||^2"),
        "db": "10 log10 of the run-averaged linear MSE",
        "rng": f"stable_seed(seed, {RNG_NAMESPACE!r}, purpose, block); purposes init, "
               "init-masks, data, schedule, mask, attack",
    }
