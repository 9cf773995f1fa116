"""Mimic (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022, Section 3 and Appendix).

Every active malicious row sends the delta of one honest client. Under heterogeneous data this
over-weights that client and under-represents the others, a bias no outlier test can detect
because the sent vector *is* an honest one. Two variants:

- ``warmup = 0``: copy the ``target``-th honest participant of the round (in row order, modulo
  their number; ByzFL's ``Mimic(epsilon)``).
- ``warmup = T > 0`` (the paper's heuristic, its reference code's ``MimicVariantAttacker``):
  during the first ``T`` calls the attacker tracks the honest mean ``mu`` and a unit direction
  ``z`` of largest honest variance (one averaged power-iteration step per round, ``z`` starting
  from a Gaussian draw of ``ctx.generator``) and copies the honest participant maximising
  ``<delta_i, z>``; afterwards it keeps copying that client. If that client is not an honest
  participant of a later round (partial participation), the round's maximiser of
  ``<delta_i, z>`` is copied instead.

Omniscient (honest deltas of the round; the direction uses full deltas), mask-aware writing: the
copied delta is sent on the attacker's shared coordinates. Run state (``t``, ``mu``, ``z``,
``target``) lives in ``ctx.state``; ``ctx.info["target"]`` receives the ``[...]`` copied row
(-1 in runs without an honest participant, which send their own deltas).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.base import Attack, AttackContext, register_attack, write_shared
from psfed_robust.params import check_int


def _unit(v: Tensor) -> Tensor:
    n = v.norm(dim=-1, keepdim=True)
    return v / torch.where(n > 0, n, torch.ones_like(n))


@register_attack("mimic")
class Mimic(Attack):
    """Every active malicious row copies one honest client's delta (see module doc)."""

    omniscient = True
    mask_aware = True

    def __init__(self, *, target: int = 0, warmup: int = 0) -> None:
        o = self._owner()
        self.target = check_int(o, "target", target, low=0)
        self.warmup = check_int(o, "warmup", warmup, low=0)

    def _fixed(self, hon: Tensor) -> Tensor:
        """Row of the ``target``-th honest participant (modulo their number)."""
        cnt = hon.sum(-1, keepdim=True)
        want = self.target % cnt.clamp_min(1)
        pos = hon.long().cumsum(-1) - 1
        return (hon & (pos == want)).long().argmax(-1)

    def _directional(self, x: Tensor, hon: Tensor, ctx: AttackContext) -> Tensor:
        """Update ``mu``, ``z`` in ``ctx.state`` (warm-up) and return the target row."""
        st = ctx.state
        t = int(st.get("t", 0))
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        h = hon.unsqueeze(-1)
        cnt = hon.sum(-1, keepdim=True).to(x.dtype)
        some = cnt > 0
        avg = torch.where(h, x, zero).sum(-2) / cnt.clamp_min(1.0)
        if t < self.warmup:
            if t == 0:
                lead = x.shape[:-2] + x.shape[-1:]
                z0 = torch.randn(lead, generator=ctx.generator, device=ctx.generator.device,
                                 dtype=torch.float64).to(device=x.device, dtype=x.dtype)
                mu = avg
                z_old = z0
            else:
                mu = (t * st["mu"] + avg) / (t + 1)
                z_old = st["z"]
            c = torch.where(h, x - mu.unsqueeze(-2), zero)
            cumu = _unit(((c @ z_old.unsqueeze(-1)) * c).sum(-2))
            z = cumu if t == 0 else _unit((t * z_old + cumu) / (t + 1))
            st["mu"] = torch.where(some, mu, st.get("mu", mu))
            st["z"] = torch.where(some, z, z_old)
        z = st["z"]
        score = (x @ z.unsqueeze(-1)).squeeze(-1)
        best = torch.where(hon, score, -torch.inf).argmax(-1)
        if t >= self.warmup and "target" in st:
            kept = st["target"]
            ok = hon.gather(-1, kept.clamp_min(0).unsqueeze(-1)).squeeze(-1) & (kept >= 0)
            best = torch.where(ok, kept, best)
        else:
            st["target"] = torch.where(some.squeeze(-1), best, -1)
        st["t"] = t + 1
        return best

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        rows = self.active_rows(deltas, ctx)
        if not bool(rows.any()):
            return deltas
        x = self.honest_deltas(deltas, ctx)
        hon = self.honest_rows(deltas, ctx)
        row = self._fixed(hon) if self.warmup == 0 else self._directional(x, hon, ctx)
        some = hon.any(-1)
        ctx.info["target"] = torch.where(some, row, -1)
        idx = row.view(*row.shape, 1, 1).expand(*row.shape, 1, x.shape[-1])
        copied = x.gather(-2, idx)
        where = some.view(*some.shape, 1, 1).expand(deltas.shape)
        return write_shared(deltas, copied, ctx, where)
