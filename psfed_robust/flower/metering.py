"""Byte metering from the real serialized Flower messages, next to the analytic floor.

``message_bytes(msg)`` is what the message costs on the wire: the sum of ``len(o.deflate())`` over
every object of the message tree (Message → RecordDict → records → Array → ArrayChunk), the unit
in which Flower 1.42 stores and transfers messages (content addressed; shared objects travel
once). ``unique_bytes(msgs)`` counts each distinct object once, i.e. what the ServerApp pushes
when several messages share an object (a broadcast payload is uploaded once).

The analytic floor of a partial update is ``count · itemsize`` for the values plus the information
content of the mask: 0 for a seeded mask (the receiver regenerates it from a few integers, counted
as 8 bytes), otherwise ``ceil(log2 C(D, count) / 8)`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import Message
from flwr.supercore.inflatable import inflatable_object as _inflatable
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    get_all_nested_objects,
    no_object_id_recompute,
)

from psfed_robust.core.mask import Mask

__all__ = ["mask_floor_bytes", "message_bytes", "unique_bytes", "update_floor_bytes"]


def _objects(msg: Message) -> dict[str, InflatableObject]:
    """The message's object tree, hashing each object once (Flower recomputes ids per access).

    Inside an enclosing ``no_object_id_recompute()`` (the strategy wraps a round's metering in
    one) ids computed for shared objects are reused across messages.
    """
    enabled = getattr(_inflatable, "_is_recompute_enabled", lambda: True)()
    if not enabled:
        return get_all_nested_objects(msg)
    with no_object_id_recompute():
        return get_all_nested_objects(msg)


def message_bytes(msg: Message, cache: dict[str, int] | None = None) -> int:
    """Bytes of one message as serialized by Flower (every object of its tree once).

    ``cache`` maps object ids (SHA-256 of the content) to their deflated size, so objects shared
    by many messages (a broadcast payload) are serialized once for metering, not once per message.
    """
    total = 0
    for oid, o in _objects(msg).items():
        if cache is not None and oid in cache:
            total += cache[oid]
            continue
        n = len(o.deflate())
        if cache is not None:
            cache[oid] = n
        total += n
    return total


def unique_bytes(msgs: Iterable[Message], cache: dict[str, int] | None = None) -> int:
    """Bytes of several messages when identical objects are sent once (Flower's dedup)."""
    seen: dict[str, int] = {}
    for m in msgs:
        for oid, o in _objects(m).items():
            if oid not in seen:
                seen[oid] = cache[oid] if cache is not None and oid in cache else len(o.deflate())
    return sum(seen.values())


def mask_floor_bytes(mask: Mask) -> int:
    """Information-theoretic bytes of a mask: 8 for a seeded mask, else ``log2 C(D, k) / 8``."""
    if mask.seed_spec is not None:
        return 8
    d, k = mask.size, mask.count
    if k in (0, d):
        return 0
    bits = (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)
    return math.ceil(bits / 8)


def update_floor_bytes(mask: Mask, itemsize: int, *, dense: bool = False) -> int:
    """Analytic floor of one partial update: values ``count·itemsize`` plus the mask's floor."""
    if dense:
        return mask.size * itemsize
    return mask.count * itemsize + mask_floor_bytes(mask)
