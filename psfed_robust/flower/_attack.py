"""The Flower side of the attack seam: building attacks, their context and their explicit state.

The seam itself (honest deltas, the attack, persistence) is the round core's
(:func:`psfed_robust.core.round.local_deltas`, :func:`psfed_robust.core.round.attack_step`);
this module only adapts it to Flower: an attack's run state is an explicit ``dict`` (never kept
on the attack object, docs/contracts.md), carried by the client's ``context.state`` between
messages (a ClientApp is rebuilt for every message) or by the server adversary for its run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from psfed_robust.flower._arrays import array_from_numpy, array_view
from psfed_robust.flower.validation import ClientId

__all__ = [
    "AttackSpec",
    "attack_context",
    "build_attack",
    "load_state",
    "resolve_attack_spec",
    "store_state",
]

#: context.state records holding a client attack's state dict (tensors / plain values)
STATE_ATTACK_ARRAYS = "psfed.attack-state.arrays"
STATE_ATTACK_VALUES = "psfed.attack-state.values"


def build_attack(name: str, params: Mapping[str, Any]) -> Any:
    """``attacks.get_attack(name, **params)``; persistence is not an attack parameter."""
    import attacks

    if "persistent" in params:
        raise ValueError(f"attack {name!r}: 'persistent' is the threat model's setting "
                         "(ThreatSettings.persistent / 'attack-persistent'), not an attack "
                         "parameter")
    return attacks.get_attack(name, **dict(params))


def attack_context(state: dict[str, Any], info: dict[str, Any], **fields: Any) -> Any:
    """An ``AttackContext`` with the run's explicit ``state`` and the round's ``info`` dicts."""
    from attacks import AttackContext

    return AttackContext(**fields, state=state, info=info)


def load_state(records: RecordDict) -> dict[str, Any]:
    """The attack state dict stored by :func:`store_state` (empty on first contact)."""
    out: dict[str, Any] = {}
    if STATE_ATTACK_VALUES in records:
        rec = records[STATE_ATTACK_VALUES]
        if isinstance(rec, ConfigRecord):
            out.update(dict(rec.items()))
    if STATE_ATTACK_ARRAYS in records:
        rec = records[STATE_ATTACK_ARRAYS]
        if isinstance(rec, ArrayRecord):
            for k, arr in rec.items():
                out[k] = torch.from_numpy(np.array(array_view(arr), copy=True))
    return out


def store_state(records: RecordDict, state: Mapping[str, Any]) -> None:
    """Write ``state`` into ``records`` (tensors/arrays as an ArrayRecord, scalars, strings,
    bytes and lists of them as a ConfigRecord); anything else is a clear error."""
    arrays: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"attack state keys must be str, got {k!r}")
        if isinstance(v, torch.Tensor):
            arrays[k] = array_from_numpy(np.ascontiguousarray(v.detach().cpu().numpy()))
        elif isinstance(v, np.ndarray):
            arrays[k] = array_from_numpy(np.ascontiguousarray(v))
        elif isinstance(v, bool | int | float | str | bytes | list):
            values[k] = v
        else:
            raise TypeError(f"attack state entry {k!r} has type {type(v).__name__}; a Flower "
                            "client can carry tensors, arrays, numbers, str, bytes and lists")
    for key, rec in ((STATE_ATTACK_ARRAYS, ArrayRecord(arrays) if arrays else None),
                     (STATE_ATTACK_VALUES, ConfigRecord(values) if values else None)):
        if rec is not None:
            records[key] = rec
        elif key in records:
            del records[key]


class AttackSpec(NamedTuple):
    """A client-side attack: name, parameters, seed and the threat model's persistence."""

    name: str
    params: dict[str, Any]
    seed: int
    persistent: bool = False


#: keys of the server's ``psfed.attack`` record that are not attack parameters
_ATTACK_RESERVED = ("name", "seed", "persistent")


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def _listed(cid: ClientId, spec: Any) -> bool:
    if isinstance(spec, bool):
        return False
    if isinstance(spec, int):
        return cid == spec
    if isinstance(spec, str):
        items = [s.strip() for s in spec.replace(";", ",").split(",") if s.strip()]
        return str(cid) in items
    return False


def resolve_attack_spec(
    context: Context, cid: ClientId, server_attack: ConfigRecord | None
) -> AttackSpec | None:
    """Which attack (if any) this client runs, by priority:

    1. the server-assigned ``psfed.attack`` record in the message (``{"name", <params>, "seed",
       "persistent"}``);
    2. ``node_config["malicious"]`` true → ``attack`` name and ``attack.<param>`` entries from
       node_config, falling back to run_config;
    3. ``run_config["malicious-clients"]`` (``"0,3,7"``) lists this client id → same keys.

    Persistence (the attacker keeps its poisoned model) is the threat model's setting:
    ``"persistent"`` in the server record, else ``attack-persistent`` in node/run config.
    """
    if server_attack is not None:
        sparams = {k: v for k, v in server_attack.items() if k not in _ATTACK_RESERVED}
        sseed = server_attack.get("seed", 0)
        return AttackSpec(str(server_attack["name"]), sparams,
                          sseed if isinstance(sseed, int) else 0,
                          _truthy(server_attack.get("persistent", False)))
    nc, rc = context.node_config, context.run_config
    malicious = _truthy(nc.get("malicious", False)) or _listed(cid, rc.get("malicious-clients"))
    if not malicious:
        return None
    name = nc.get("attack", rc.get("attack"))
    if not isinstance(name, str) or not name:
        raise ValueError("malicious client without an 'attack' name in node_config or run_config")
    params: dict[str, Any] = {}
    for src in (rc, nc):  # node_config overrides run_config
        for k, v in src.items():
            if k.startswith("attack."):
                params[k.removeprefix("attack.")] = v
    seed = nc.get("attack-seed", rc.get("attack-seed", 0))
    persistent = _truthy(nc.get("attack-persistent", rc.get("attack-persistent", False)))
    return AttackSpec(name, params, int(seed) if isinstance(seed, int | float) else 0, persistent)
