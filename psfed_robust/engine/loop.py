"""One run block of the batched engine: schedule -> merge -> local update -> attack -> server.

The round's math comes from :mod:`psfed_robust.core.round` (``merge_``, ``gather``,
``local_deltas``, ``attack_step``, ``server_step``, the latter dispatching to the defense; for
``mean`` that is PSO-Fed's step on index lists). Only the local update — one LMS step per client
on its new sample, :class:`LocalStep` — is the engine's own. The loop works on local models
``[B, K, D]`` and global models ``[B, D]`` of ``B`` runs; participants are slots ``[B, P]``
(Bernoulli scheduling pads with non-participants marked ``valid = False``).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from psfed_robust.core.aggregation import WeightScheme, server_weights
from psfed_robust.core.round import attack_step, gather, local_deltas, merge_, server_step
from psfed_robust.engine import kernels
from psfed_robust.engine.config import OnlineConfig
from psfed_robust.engine.data import DataStream, LinearStream, RFFStream
from psfed_robust.engine.schedule import (
    LinkMasks,
    block_generator,
    block_ranges,
    dense_masks,
    make_stream,
    schedule,
)

__all__ = ["LocalStep", "run_block"]

#: CPU LMS step: elements of one run chunk (regressors and models stay in the L2 cache)
LMS_CHUNK_ELEMENTS = 200 * 1024


class LocalStep:
    """The local update of every client: ``e = y − s wᵀc``, ``w ← w + μ s e c`` (LMS / RFF-KLMS,
    regressors ``z = s c`` with ``s`` the stream's feature scale).

    Torch is the reference: on CPU one cache-sized chunk of runs at a time (``baddbmm`` + ``cos``
    for the RFF regressors, ``linalg.vecdot``, ``addcmul_``). ``compiled``: the float32 RFF step
    of :func:`psfed_robust.engine.kernels.lms_rff_step` (same math within float32 rounding).
    """

    def __init__(self, config: OnlineConfig, stream: DataStream, B: int, device: torch.device,
                 compiled: bool) -> None:
        K, D = config.num_clients, config.dim
        dtype = config.torch_dtype
        self.stream = stream
        self.scale = float(stream.feature_scale)
        self.mu_s = float(config.stepsize) * self.scale
        self.compiled = (compiled and device.type == "cpu" and isinstance(stream, RFFStream)
                         and dtype == torch.float32)
        cb = B if device.type != "cpu" else max(1, min(B, LMS_CHUNK_ELEMENTS // max(1, K * D)))
        self.chunks = block_ranges(B, cb)
        self.zbuf = torch.empty((0 if self.compiled else cb, K, D), device=device, dtype=dtype)
        self.e = torch.empty((B, K), device=device, dtype=dtype)

    def step(self, W: Tensor, y: Tensor, part: Tensor | None) -> Tensor:
        """Update ``W [B, K, D]`` in place on targets ``y [B, K]``; ``part [B, K]`` (0/1) freezes
        the clients with 0. Returns the a-priori errors ``e [B, K]`` (a buffer)."""
        e = self.e
        if self.compiled:
            assert isinstance(self.stream, RFFStream)
            x, omega, b = self.stream.rff_inputs()
            kernels.lms_rff_step(W, x, omega, b, y.contiguous(), self.mu_s, self.scale,
                                 None if part is None else part.contiguous(), e)
            return e
        for r0, r1 in self.chunks:
            c = self.stream.features(r0, r1, self.zbuf[: r1 - r0])
            Wc, ec = W[r0:r1], e[r0:r1]
            pred = torch.linalg.vecdot(Wc, c)
            torch.sub(y[r0:r1], pred * self.scale if self.scale != 1.0 else pred, out=ec)
            coef = ec * self.mu_s
            if part is not None:
                coef.mul_(part[r0:r1])
            Wc.addcmul_(c, coef.unsqueeze(-1))
        return e


def _test_mse(stream: DataStream, config: OnlineConfig, g: Tensor) -> Tensor:
    """Per-run global test MSE ``[B]`` (linear, float64)."""
    if config.test_mse == "expected":
        assert isinstance(stream, LinearStream)
        err = (stream.wstar - g).double()
        return config.noise_var + config.input_var * (err * err).sum(-1)
    pred = torch.linalg.vecdot(stream.test_features, g[:, None, :])
    r = (stream.test_targets - pred).double()
    return (r * r).mean(-1)


def _local_test_mse(stream: DataStream, W: Tensor) -> Tensor:
    pred = torch.bmm(W, stream.test_features.transpose(1, 2))  # [B, K, N_t]
    r = (stream.test_targets[:, None, :] - pred).double()
    return (r * r).mean((-1, -2))


def _attack_context(**kw: Any) -> Any:
    """An ``AttackContext`` with the fields this version of ``attacks`` declares."""
    from attacks import AttackContext

    names = {f.name for f in fields(AttackContext)}
    return AttackContext(**{k: v for k, v in kw.items() if k in names})


def run_block(config: OnlineConfig, block: int, B: int, device: torch.device, attack: Any,
              defense: Any, bar: Any = None, prefetch: bool = False,
              compiled: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run block ``block`` (``B`` runs): ``(global MSE [B, T], local MSE [B, T], final g [B, D])``.

    Everything random comes from the block's own generators (:mod:`psfed_robust.engine.schedule`)
    and the attack's run state is one dict created here, so a block's results do not depend on
    the other blocks or on the thread that runs it.
    """
    links = LinkMasks(config, B, block_generator(config.seed, "mask", block, device), device,
                      block_generator(config.seed, "init-masks", block, device), prefetch,
                      sampler="auto" if compiled else "numpy")
    try:
        return _loop(config, block, B, device, attack, defense, bar, links, compiled)
    finally:
        links.close()


def _loop(config: OnlineConfig, block: int, B: int, dev: torch.device, attack: Any,
          defense: Any, bar: Any, links: LinkMasks,
          compiled: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    K, D = config.num_clients, config.dim
    dtype = config.torch_dtype
    stream = make_stream(config, B, block, dev)
    local = LocalStep(config, stream, B, dev, compiled)
    g_sched = block_generator(config.seed, "schedule", block, dev)
    g_attack = block_generator(config.seed, "attack", block, dev)
    g_defense = block_generator(config.seed, "defense", block, dev)  # e.g. bucketing's shuffle
    W = torch.zeros((B, K, D), device=dev, dtype=dtype)
    Wflat = W.view(-1)
    g = torch.zeros((B, D), device=dev, dtype=dtype)
    malicious = torch.zeros((B, K), dtype=torch.bool, device=dev)
    malicious[:, : config.num_malicious] = True
    attack_state: dict[str, Any] = {}  # the attack's explicit run state for this block
    re = config.record_every
    T_rec = config.iterations // re
    g_rec = torch.zeros((B, T_rec), dtype=torch.float64, device=dev)
    l_rec = torch.zeros((B, T_rec), dtype=torch.float64, device=dev)
    l_acc = torch.zeros((B,), dtype=torch.float64, device=dev)
    apriori = config.local_mse == "apriori"
    scheme = cast(WeightScheme, config.server_weight)
    row0 = (torch.arange(B, device=dev) * K)[:, None]
    for n in range(config.iterations):
        # 1. schedule: participant slots idx [B, P] (valid: Bernoulli padding is False)
        keys = torch.rand((B, K), generator=g_sched, device=dev, dtype=dtype)
        idx, valid = schedule(keys, config)
        P = idx.shape[1]
        rows = row0 + idx  # rows of W.view(B * K, D)
        # 2. downlink merge at the participants: w_k[S] = g[S]
        if P:
            S = links.downlink(n, idx)
            pos = (rows * D).unsqueeze(-1) + S  # [B, P, M] offsets in W.view(-1)
            down = gather(g, S)
            if valid is not None:  # padding slots keep their own values
                down = torch.where(valid.unsqueeze(-1), down, gather(Wflat, pos.view(-1))
                                   .view(pos.shape))
            merge_(Wflat, pos.view(-1), down.reshape(-1))
        # 3. local update: one LMS step at every client (participants on the merged model)
        part: Tensor | None = None
        if not config.nonparticipant_updates:
            part = torch.zeros((B, K), dtype=dtype, device=dev)
            part.scatter_(1, idx, 1.0 if valid is None else valid.to(dtype))
        e = local.step(W, stream.advance(), part)
        if apriori:
            l_acc += (e * e).mean(-1, dtype=torch.float64)
        if P:
            # 4. uplink and attack seam: sent values u_k = g + δ'_k on T_k
            Tk = links.uplink(n, idx, S, valid)
            posT = ((rows * D).unsqueeze(-1) + Tk).view(-1)
            if attack is None:
                values = gather(Wflat, posT).view(Tk.shape)
            else:
                flat = rows.view(-1)
                Wp = W.view(B * K, D).index_select(0, flat).view(B, P, D)
                honest = local_deltas(Wp, g)
                ctx = _attack_context(
                    round=n, generator=g_attack, reference=g,
                    masks=None if links.dense else dense_masks(Tk, D),
                    malicious=malicious.gather(1, idx), participants=valid,
                    honest=honest if attack.omniscient else None, aggregator=defense,
                    state=attack_state, info={})
                sent, changed = attack_step(attack, honest, ctx,
                                            persistent=config.attack_persistent)
                upd = g.unsqueeze(1) + sent
                if changed is not None and bool(changed.any()):  # the attacker keeps it
                    keep = torch.where(changed.unsqueeze(-1), upd, Wp)
                    W.view(B * K, D).index_copy_(0, flat, keep.view(B * P, D))
                values = upd.gather(-1, Tk)
            # 5. server step: the defense over the sent values (mean: PSO-Fed)
            omega = server_weights(torch.ones_like(idx, dtype=torch.bool) if valid is None
                                   else valid, scheme, K, config.participation, dtype=dtype)
            g = server_step(defense, values, g, index=Tk, participants=valid, weights=omega,
                            mode=cast(Any, config.aggregation_mode), generator=g_defense)
        if (n + 1) % re == 0:
            t = (n + 1) // re - 1
            g_rec[:, t] = _test_mse(stream, config, g)
            if apriori:
                l_rec[:, t] = l_acc / re
                l_acc.zero_()
            else:
                l_rec[:, t] = _local_test_mse(stream, W)
        if bar is not None:
            bar.update(B)
    return g_rec.cpu().numpy(), l_rec.cpu().numpy(), g.double().cpu().numpy()
