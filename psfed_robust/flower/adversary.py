"""Server-side adversary for omniscient/colluding attacks (ALIE, IPM, min-max, ...).

**Simulation only.** In a real deployment an omniscient attacker would have to observe the honest
clients' updates; here the adversary sits inside the ServerApp, sees the round's *validated*
replies before aggregation and rewrites the rows of the malicious clients (by stable client id),
exactly as the batched engine does. Non-omniscient attacks also work here (server-side injection),
but the faithful place for them is the client (see ``PSFedClient``'s attack seam).

Attacks act on deltas relative to the round's global model: ``delta_k = u_k − g`` on client k's
uplink mask; the attacked values sent to the aggregator are ``g + delta'_k`` (contract:
docs/contracts.md, "Attacks").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from psfed_robust.core.seeding import torch_generator
from psfed_robust.flower.validation import ClientId

__all__ = ["ServerAdversary"]


class ServerAdversary:
    """Rewrites malicious clients' validated updates before aggregation (simulation only)."""

    def __init__(
        self,
        attack: Any,
        malicious: Iterable[ClientId],
        *,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(attack, str):
            import attacks

            attack = attacks.get_attack(attack, **dict(params or {}))
        elif params:
            raise ValueError("params= is only used when attack is given by name")
        if not callable(attack):
            raise TypeError(f"attack must be a name or an Attack, got {type(attack).__name__}")
        self.attack = attack
        self.malicious = frozenset(malicious)
        self.seed = int(seed)

    def apply(
        self,
        server_round: int,
        updates: Tensor,
        masks: Tensor,
        global_model: Tensor,
        client_ids: Sequence[ClientId],
        aggregator: Any = None,
    ) -> Tensor:
        """Return ``updates`` ``[K, D]`` with the malicious rows attacked (others unchanged)."""
        from attacks import AttackContext

        mal = torch.tensor([c in self.malicious for c in client_ids], dtype=torch.bool)
        if not bool(mal.any()):
            return updates
        g = global_model.unsqueeze(0)
        deltas = torch.where(masks, updates - g, torch.zeros((), dtype=updates.dtype))
        ctx = AttackContext(
            round=server_round,
            generator=torch_generator("flower.server-adversary", self.seed, server_round),
            reference=global_model,
            masks=masks,
            malicious=mal,
            participants=None,
            honest=deltas.clone(),
            aggregator=aggregator,
        )
        attacked = self.attack(deltas, ctx).to(updates.dtype)
        out = torch.where(mal.unsqueeze(-1) & masks, g + attacked, updates)
        return out

    def __repr__(self) -> str:
        return f"ServerAdversary({self.attack!r}, malicious={sorted(map(str, self.malicious))})"
