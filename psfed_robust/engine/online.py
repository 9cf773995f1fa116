"""Batched online federated learning: PSO-Fed / Online-Fed with attacks and defenses.

All ``K`` clients of ``B`` Monte Carlo runs advance as one tensor program (local models
``[B, K, D]``, global models ``[B, D]``) — PSO-Fed of Gogineni et al. (ICASSP 2022,
arXiv 2110.06556) with the model-poisoning threat model of Lari et al. (IEEE TSIPN 2025,
arXiv 2403.13108). With ``share_count == dim`` it is Online-Fed.

One iteration ``n`` (:mod:`psfed_robust.engine.loop`; every option in :class:`OnlineConfig`):

1. scheduling: ``K_n`` = ``participants`` clients drawn uniformly (``"fixed"``) or each client
   with probability ``p_c`` (``"bernoulli"``);
2. downlink + merge at ``k ∈ K_n``: ``ŵ_k = S_{k,n} w_n + (I − S_{k,n}) w_k``;
3. every client (participants on ``ŵ_k``; non-participants unless ``nonparticipant_updates`` is
   off) takes one LMS step on its new sample: ``e = y − wᵀz``, ``w ← w + μ e z``;
4. uplink: ``δ_k = w_{k,n+1} − w_n`` → ``attack(δ, ctx)`` → sent values ``T_{k,n}(w_n + δ'_k)``;
   with ``attack_persistent`` the attacker also keeps ``w_n + δ'_k`` as its local model;
5. server: ``w_{n+1} = defense(sent values, T, w_n)`` — ``"mean"`` in ``"fill"`` mode is
   PSO-Fed's ``w_n + Σ_k ω_k T_k δ'_k``; any registered defense in ``"fill"``/``"reporters"``.

Steps 2, 4 and 5 are the round core's functions (:mod:`psfed_robust.core.round`); step 3 is the
engine's own (:class:`~psfed_robust.engine.loop.LocalStep`). Runs are processed in blocks (on CPU
at most 128 runs and at least two blocks from 32 runs on, run in parallel threads; all runs on
CUDA), each with its own generators (:mod:`psfed_robust.engine.schedule`) and its own attack
state, so results do not depend on the number of threads. Torch is the reference; on CPU two
optional compiled accelerators (:mod:`psfed_robust.engine.kernels`: the mask sampler, equal
draws, and the float32 RFF LMS step, within float32 rounding) run when they build
(``metadata["engine_kernels"]``; ``run_online(..., use_kernels=False)`` runs torch only).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from psfed_robust.engine import kernels
from psfed_robust.engine.config import CHOICES, RNG_NAMESPACE, OnlineConfig
from psfed_robust.engine.loop import run_block
from psfed_robust.engine.result import OnlineResult, SteadyState, metadata
from psfed_robust.engine.schedule import (
    block_generator,
    block_ranges,
    make_stream,
    needs_random,
    resolve_run_block,
    schedule,
)

__all__ = [
    "CHOICES",
    "RNG_NAMESPACE",
    "OnlineConfig",
    "OnlineResult",
    "SteadyState",
    "block_generator",
    "block_ranges",
    "make_stream",
    "resolve_run_block",
    "run_online",
    "schedule",
]


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


def _block_ids(blocks: Sequence[int] | None, count: int) -> list[int]:
    """The sorted run-block indices to run (all when ``blocks`` is None), checked."""
    if blocks is None:
        return list(range(count))
    ids = sorted(set(int(b) for b in blocks))
    if not ids or ids[0] < 0 or ids[-1] >= count:
        raise ValueError(f"run_online: blocks must be a non-empty subset of 0..{count - 1}, got "
                         f"{list(blocks)!r}")
    return ids


def run_online(config: OnlineConfig, *, device: str | torch.device | None = None,
               progress: bool = False, mask_prefetch: bool | None = None,
               block_workers: int | None = None, use_kernels: bool = True,
               blocks: Sequence[int] | None = None) -> OnlineResult:
    """Run ``config`` (all runs, block by block) and return its learning curves.

    ``device``: torch device (default CPU); the same code runs on CUDA. ``progress``: tqdm bar.
    ``block_workers`` (CPU; default: torch's intra-op thread count): run blocks are independent
    (own generators, own attack state), so up to this many run in parallel threads, each with
    one intra-op thread (torch's thread count is set to 1 for the call and restored after).
    ``mask_prefetch`` (default: on for CPU runs that draw random masks while torch uses ≥ 2
    threads and only one block worker runs): a worker thread draws the next chunk of random
    masks while the engine computes (same masks). ``use_kernels`` (CPU; default on): run the
    compiled accelerators when they build (:mod:`psfed_robust.engine.kernels`).
    ``blocks`` (default: all): run only these run blocks (indices into ``block_ranges(runs,
    resolve_run_block(config, device))``); the per-run arrays hold their runs in ascending block
    order. A block draws only from its own generators, so it gives the same numbers in any call
    or process: a point split into blocks across machines merges, in run order, to the full run.
    """
    dev = torch.device(device if device is not None else "cpu")
    t0 = time.perf_counter()
    attack = _build_attack(config)
    defense = _build_defense(config)
    compiled = dev.type == "cpu" and use_kernels and kernels.available()
    blk = resolve_run_block(config, dev)
    ranges = block_ranges(config.runs, blk)
    ids = _block_ids(blocks, len(ranges))
    runs = sum(ranges[b][1] - ranges[b][0] for b in ids)
    T = config.iterations // config.record_every
    g_all = np.zeros((runs, T))
    l_all = np.zeros((runs, T))
    final = np.zeros((runs, config.dim))
    threads = torch.get_num_threads()
    if dev.type != "cpu":
        workers = 1
    elif block_workers is None:
        workers = min(threads, len(ids))
    else:
        workers = max(1, min(block_workers, len(ids)))
    if mask_prefetch is None:
        mask_prefetch = (dev.type == "cpu" and needs_random(config) and threads > 1
                         and workers == 1)
    if dev.type == "cpu" and workers > 1:
        torch.set_num_threads(1)  # one intra-op thread per block worker
    elif mask_prefetch and dev.type == "cpu" and threads > 1:
        torch.set_num_threads(threads - 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=runs * config.iterations, unit="run-it", desc="online FL")

    def one(b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        start, stop = ranges[b]
        return run_block(config, b, stop - start, dev, attack, defense, bar,
                         bool(mask_prefetch), compiled)

    try:
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers,
                                    thread_name_prefix="psfed-block") as pool:
                outs = list(pool.map(one, ids))
        else:
            outs = [one(b) for b in ids]
        at = 0
        for (gm, lm, gfinal) in outs:
            g_all[at:at + len(gm)] = gm
            l_all[at:at + len(gm)] = lm
            final[at:at + len(gm)] = gfinal
            at += len(gm)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    iters = np.arange(1, T + 1) * config.record_every
    meta = metadata(config, attack, defense, blk, dev)
    meta["mask_prefetch"] = bool(mask_prefetch)
    meta["engine_kernels"] = "cpp" if compiled else "torch"
    meta["block_workers"] = workers
    if blocks is not None:
        meta["blocks"] = ids
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
