"""Bucketing (Karimireddy, He & Jaggi, "Byzantine-Robust Learning on Heterogeneous Datasets via
Bucketing", ICLR 2022).

A pre-aggregator: the participants are shuffled and split into ``ceil(n/s)`` buckets of ``s``
(the last one holds the remainder), each bucket is replaced by its members' mean, and any rule
runs on the bucket means (``defenses.compose``). Averaging ``s`` random rows divides the honest
rows' heterogeneity by about ``s`` while a Byzantine client contaminates at most one bucket, which
makes non-iid-sensitive rules (Krum, median, ...) robust again (the paper's Theorem I). The
composed rule then sees ``ceil(n/s)`` rows, of which at most ``f`` are contaminated; its
preconditions are checked on that count.

Randomness: the shuffle draws from the round's explicit generator (``Aggregator.__call__(...,
generator=...)``, ``psfed_robust.core.round.server_step(..., generator=...)``): engines pass
``torch_generator(seed, "defense", round)``. Without one the shuffle is still deterministic: a
generator seeded by ``stable_seed("bucketing", seed, <SHA-256 of the global model's bytes>)``,
which changes every round with the model (documented fallback, not a secret from the clients).

fill: bucket means of the filled vectors. reporters: a bucket's coordinate is the mean over its
members that reported it, and the bucket reports the union of its members' coordinates.
``weights``: a bucket's weight is the sum of its members' (None stays uniform over buckets, as
in ByzFL). ``info["buckets"]`` receives the ``[..., K]`` bucket index of each row (-1: not a
participant).
"""

from __future__ import annotations

import hashlib

import torch

from defenses.base import RoundInputs, register_defense
from defenses.compose import PreAggregator, masked_mix, new_rows, rows_view
from psfed_robust.core.seeding import torch_generator
from psfed_robust.params import check_int


def model_generator(seed: int, global_model: torch.Tensor, purpose: str) -> torch.Generator:
    """A CPU generator seeded by ``(purpose, seed, SHA-256 of the global model's bytes)``."""
    digest = hashlib.sha256(global_model.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
    return torch_generator(purpose, seed, digest)


@register_defense("bucketing")
class Bucketing(PreAggregator):
    """Random buckets of ``s`` participants, each replaced by its mean."""

    uses_f = False

    def __init__(self, *, s: int = 2, seed: int = 0) -> None:
        o = self._owner()
        self.s = check_int(o, "s", s, low=1)
        self.seed = check_int(o, "seed", seed, low=0)

    def out_count(self, n: int) -> int:
        return -(-n // self.s)

    def assignment(self, part: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``[..., K]`` bucket index per row (-1 for non-participants): participants in a
        uniformly random order, ``s`` per bucket."""
        keys = torch.rand(part.shape, generator=gen, device=gen.device, dtype=torch.float64)
        keys = torch.where(part.to(keys.device), keys, 2.0)
        order = torch.sort(keys, dim=-1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(part.shape[-1], device=order.device).expand_as(order))
        rank = rank.to(part.device)
        return torch.where(part, torch.div(rank, self.s, rounding_mode="floor"), -1)

    def transform(self, a: RoundInputs, f: int) -> RoundInputs:
        x, valid = rows_view(a)
        gen = a.generator
        if gen is None:
            gen = model_generator(self.seed, a.global_model, "bucketing")
        bucket = self.assignment(a.part, gen)
        a.info["buckets"] = bucket
        n_buckets = self.out_count(x.shape[-2])
        ids = torch.arange(n_buckets, device=x.device).unsqueeze(-1)
        member = bucket.unsqueeze(-2) == ids  # [..., R, K]
        means, new_valid = masked_mix(member.to(x.dtype), x, valid)
        part = member.any(-1)
        means = torch.where(part.unsqueeze(-1), means, a.global_model.unsqueeze(-2))
        weights = None
        if a.weights is not None:
            w = torch.where(a.part, a.weights, torch.zeros((), dtype=a.weights.dtype,
                                                           device=a.weights.device))
            weights = (member.to(w.dtype) @ w.unsqueeze(-1)).squeeze(-1)
        return new_rows(a, means, new_valid, part, weights)
