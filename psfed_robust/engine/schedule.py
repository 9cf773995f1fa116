"""Run blocks, their generators, the participant schedule and the selection masks S and T.

Each run block has its own generators, ``stable_seed(seed, "psfed_robust.engine", purpose,
block)`` for ``purpose`` in ``init`` (problem instance, test set), ``init-masks`` (round-robin
offsets), ``data`` (per-iteration samples), ``schedule`` (one ``rand [B, K]`` per iteration:
fixed = the ``participants`` smallest keys, ties to the lower client; bernoulli = ``key < p_c``),
``mask`` (random selection masks) and ``attack`` (``AttackContext.generator``). Streams do not
depend on ``share_count``, the attack or the defense, so configs that differ only there see the
same data and schedules (common random numbers); seeds never depend on Python ``hash()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from psfed_robust.core.seeding import stable_seed
from psfed_robust.engine.config import RNG_NAMESPACE, OnlineConfig
from psfed_robust.engine.data import DataStream, LinearStream, RFFStream
from psfed_robust.engine.masks import MaskPool

__all__ = [
    "LinkMasks",
    "block_generator",
    "block_ranges",
    "dense_masks",
    "make_stream",
    "needs_random",
    "resolve_run_block",
    "schedule",
]

#: CPU auto run blocks: at most this many runs per block
CPU_BLOCK_RUNS = 128


def resolve_run_block(config: OnlineConfig, device: torch.device) -> int:
    """Runs per block: ``config.run_block``, else all runs on CUDA; on CPU at most
    ``CPU_BLOCK_RUNS`` runs per block and at least two blocks from 32 runs on (blocks run in
    parallel threads). Depends only on the config and the device type, never on thread counts.
    """
    if config.run_block is not None:
        return min(config.run_block, config.runs)
    if device.type != "cpu":
        return config.runs
    n_blocks = max(math.ceil(config.runs / CPU_BLOCK_RUNS), 2 if config.runs >= 32 else 1)
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


def schedule(keys: Tensor, config: OnlineConfig) -> tuple[Tensor, Tensor | None]:
    """Participant slots from one iteration's keys ``[B, K]``.

    Returns ``idx [B, P]`` (participants in ascending client order first) and ``valid [B, P]``
    (``None`` when every slot is a participant, i.e. fixed scheduling).
    """
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


def needs_random(config: OnlineConfig) -> bool:
    """Whether the config draws random masks (random selection or an independent uplink)."""
    if config.share_count == config.dim:
        return False
    return config.selection == "random" or config.uplink == "independent"


def dense_masks(index: Tensor, dim: int) -> Tensor:
    """Index lists ``[..., M]`` → bool masks ``[..., dim]``."""
    out = torch.zeros((*index.shape[:-1], dim), dtype=torch.bool, device=index.device)
    return out.scatter_(-1, index, True)


class LinkMasks:
    """Downlink masks S and uplink masks T of the participant slots as index lists
    ``[B, P, M]`` (int64; with ``M = D`` every list is ``0..D-1``: Online-Fed).

    Random masks come from one :class:`MaskPool` per block (generator ``mask``), taken in this
    order each iteration: downlink rows that have no pending mask (uplink ``next``) or all slot
    rows (``same``/``independent``), then the uplink rows (``next``/``independent``). Coordinated
    selection takes one row per run instead of one per slot. Round-robin offsets are drawn from
    generator ``init-masks`` (``rand [B, K]``; all zero when coordinated); the round-robin mask of
    offset ``o`` at iteration ``n`` is ``{(o + nM + j) mod D : j < M}``. ``sampler``: the
    pool's Floyd back end (:func:`~psfed_robust.engine.masks.floyd_indices`; same masks).
    """

    def __init__(self, config: OnlineConfig, B: int, gen: torch.Generator, device: torch.device,
                 init_gen: torch.Generator, prefetch: bool = False,
                 sampler: str = "auto") -> None:
        self.cfg, self.B, self.device = config, B, device
        D, M, K = config.dim, config.share_count, config.num_clients
        self.dense = M == D
        self.pool = MaskPool(D, M, gen, device, chunk=max(4096, min(65536, 4 * B * K)),
                             prefetch=prefetch and needs_random(config), indices=True,
                             backend=sampler if device.type == "cpu" else "auto")
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

    def close(self) -> None:
        """Stop the mask pool's prefetch worker."""
        self.pool.close()

    def _all(self, P: int) -> Tensor:
        return self.arange_m.expand(self.B, P, self.cfg.dim)

    def _rr(self, n: int, idx: Tensor) -> Tensor:
        cfg = self.cfg
        start = (self.offsets.gather(1, idx) + n * cfg.share_count) % cfg.dim
        return (start[..., None] + self.arange_m) % cfg.dim

    def _fresh(self, shape: tuple[int, int]) -> Tensor:
        """Fresh random index lists for ``[B, P]`` slots (coordinated: one per run, expanded)."""
        B, P = shape
        M = self.cfg.share_count
        if self.cfg.coordinated:
            return self.pool.take(B)[:, None, :].expand(B, P, M)
        return self.pool.take(B * P).view(B, P, M)

    def downlink(self, n: int, idx: Tensor) -> Tensor:
        """``S [B, P, M]`` of the slots ``idx [B, P]`` at iteration ``n``."""
        B, P = idx.shape
        if self.dense:
            return self._all(P)
        if self.rr:
            return self._rr(n, idx)
        M = self.cfg.share_count
        if self.cfg.uplink != "next":
            return self._fresh((B, P))
        if self.cfg.coordinated:  # S_n was drawn at n-1 for everybody
            if self.pending is None:
                return self._fresh((B, P))
            return self.pending[:, None, :].expand(B, P, M)
        if self.prev_T is None or self.prev_slot is None:
            return self._fresh((B, P))
        src = self.prev_slot.gather(1, idx)
        need = src < 0
        S = self.prev_T.index_select(0, src.clamp(min=0).view(-1)).view(B, P, M)
        n_need = int(need.sum())
        if n_need:
            S[need] = self.pool.take(n_need)
        return S

    def uplink(self, n: int, idx: Tensor, S: Tensor, valid: Tensor | None) -> Tensor:
        """``T [B, P, M]``; records the masks pending for uplink ``next`` (Bernoulli padding
        slots, ``valid`` False, are not participants and hold none)."""
        B, P = idx.shape
        if self.dense:
            return self._all(P)
        up = self.cfg.uplink
        if up == "same":
            return S
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
        slots = torch.arange(B * P, device=self.device).view(B, P)
        if valid is not None:
            slots = slots.masked_fill(~valid, -1)
        self.prev_slot.fill_(-1)
        self.prev_slot.scatter_(1, idx, slots)
        return T
