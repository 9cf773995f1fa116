"""Server-side adversary for omniscient/colluding attacks (ALIE, IPM, min-max, ...).

**Simulation only.** In a real deployment an omniscient attacker would have to observe the honest
clients' updates; here the adversary sits inside the ServerApp, sees the round's *validated*
replies before aggregation and rewrites the rows of the malicious clients (by stable client id)
through the round core's attack seam (:func:`psfed_robust.core.round.local_deltas`,
:func:`psfed_robust.core.round.attack_step`), exactly as the batched engine does. Non-omniscient
attacks also work here (server-side injection), but the faithful place for them is the client
(see ``PSFedClient``'s attack seam).

Attacks act on deltas relative to the round's global model: ``delta_k = u_k − g`` on client k's
uplink mask; the attacked values sent to the aggregator are ``g + delta'_k`` (contract:
docs/contracts.md, "Attacks"). The attack's run state is this adversary's explicit ``state``
dict (one adversary per run), never the attack object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from psfed_robust.core.round import attack_step, local_deltas
from psfed_robust.core.seeding import torch_generator
from psfed_robust.flower._attack import attack_context, build_attack
from psfed_robust.flower.validation import ClientId

__all__ = ["ServerAdversary"]


class ServerAdversary:
    """Rewrites malicious clients' validated updates before aggregation (simulation only).

    ``persistent=True`` (the attacker keeps its poisoned model) cannot be honoured here: the
    server cannot write into a client's local model, so it is refused; persistent attacks run
    in the client seam (``ThreatSettings.client_attacks`` with ``persistent``).
    """

    def __init__(
        self,
        attack: Any,
        malicious: Iterable[ClientId],
        *,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        persistent: bool = False,
    ) -> None:
        if isinstance(attack, str):
            attack = build_attack(attack, params or {})
        elif params:
            raise ValueError("params= is only used when attack is given by name")
        if not callable(attack):
            raise TypeError(f"attack must be a name or an Attack, got {type(attack).__name__}")
        if persistent:
            raise ValueError("ServerAdversary cannot run a persistent attack (the server cannot "
                             "change a client's local model); use a client-side attack with "
                             "ThreatSettings(persistent=True)")
        self.attack = attack
        self.malicious = frozenset(malicious)
        self.seed = int(seed)
        self.persistent = False
        self.state: dict[str, Any] = {}  # the attack's explicit run state
        self.last_info: dict[str, Any] = {}  # the last round's diagnostics
        # malicious rows among each call's replies (a run's log: the attack really took place)
        self.attacked_rows: list[int] = []

    def apply(
        self,
        server_round: int,
        updates: Tensor,
        masks: Tensor,
        global_model: Tensor,
        client_ids: Sequence[ClientId],
        aggregator: Any = None,
    ) -> Tensor:
        """Return ``updates`` ``[K, D]`` (fill view) with the malicious rows attacked."""
        mal = torch.tensor([c in self.malicious for c in client_ids], dtype=torch.bool)
        self.attacked_rows.append(int(mal.sum()))
        if not bool(mal.any()):
            return updates
        honest = local_deltas(updates, global_model)  # 0 off each mask (fill view)
        info: dict[str, Any] = {}
        ctx = attack_context(
            self.state, info,
            round=server_round,
            generator=torch_generator("flower.server-adversary", self.seed, server_round),
            reference=global_model,
            masks=masks,
            malicious=mal,
            participants=None,
            honest=honest.clone(),
            aggregator=aggregator,
        )
        sent, _ = attack_step(self.attack, honest, ctx, persistent=False)
        self.last_info = info
        return torch.where(mal.unsqueeze(-1) & masks, global_model.unsqueeze(0) + sent, updates)

    def __repr__(self) -> str:
        return f"ServerAdversary({self.attack!r}, malicious={sorted(map(str, self.malicious))})"
