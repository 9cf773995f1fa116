"""Byte metering of the real serialized Flower messages, next to the analytic floor.

``message_bytes(msg)`` is what the message costs on the wire: the sum of ``len(o.deflate())`` over
every distinct object of the message tree (Message → RecordDict → records → Array → ArrayChunk),
the unit in which Flower 1.42 stores and transfers messages (content addressed; shared objects
travel once). ``unique_bytes(msgs)`` counts each distinct object once over several messages, i.e.
what the ServerApp pushes when they share an object (a broadcast payload is uploaded once).

The sizes are computed **without serializing the data**: an object's deflated length depends on
its content only through the lengths of its parts and the *number* of distinct children (child
ids are 64-character SHA-256 hex strings whatever their value), so each object is sized with
placeholder ids from the exact same formats Flower writes (npy metadata JSON, record JSON, the
Message protobuf, the ``type ids len`` header). Identical objects — which Flower deduplicates by
id — are found by content: small objects by their placeholder serialization, array chunks by
comparing their bytes. Hashing and copying megabytes per message (what ``deflate`` + SHA-256
cost) is avoided; tests check the result equals ``Σ len(o.deflate())`` over
``get_all_nested_objects`` (:func:`deflated_bytes`) for every message shape the library sends,
and any object type this sizer does not know is measured the slow, real way.

The analytic floor of a partial update is ``count · itemsize`` for the values plus the information
content of the mask: 0 for a seeded mask (the receiver regenerates it from a few integers, counted
as 8 bytes), otherwise ``ceil(log2 C(D, count) / 8)`` bytes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message import array as _array_mod
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.serde_utils import error_to_proto, metadata_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.serverapp import Grid
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_object import InflatableObject, get_all_nested_objects
from flwr.supercore.run import Run

from psfed_robust.core.mask import Mask

__all__ = [
    "ByteMeter",
    "InProcessGrid",
    "MeteredGrid",
    "deflated_bytes",
    "mask_floor_bytes",
    "message_bytes",
    "unique_bytes",
    "update_floor_bytes",
]

_ID_LEN = 64  # SHA-256 hex digest
_SIG = 64  # bytes compared first when two equal-length chunks are checked for identity


class _Unknown(Exception):
    """An object type the sizer does not model: measure the slow, real way."""


def _framed(cls_name: str, child_ids: Iterable[str], body_len: int) -> int:
    """``len(add_header_to_object_body(body, obj))`` for a body of ``body_len`` bytes."""
    head = f"{cls_name}{HEAD_VALUE_DIVIDER}{','.join(child_ids)}{HEAD_VALUE_DIVIDER}{body_len}"
    return len(head.encode("utf-8")) + len(HEAD_BODY_DIVIDER) + body_len


class ByteMeter:
    """Sizes of Flower objects without deflating their data (see the module docstring).

    One meter may size many messages: objects seen before (by identity or content) are sized
    once, and :meth:`unique_bytes` deduplicates across messages. Keep a meter for one batch of
    messages that are not modified meanwhile (the strategy uses one per round and direction).
    """

    def __init__(self) -> None:
        self._by_obj: dict[int, tuple[Any, str, dict[str, int]]] = {}  # -> (obj, sid, subtree)
        self._by_key: dict[Any, str] = {}
        self._chunks: dict[int, list[tuple[memoryview, str]]] = {}
        self._counter = 0

    # ---------------------------------------------------------------- surrogate ids
    def _new_id(self) -> str:
        self._counter += 1
        return format(self._counter, f"0{_ID_LEN}x")

    def _sid_for_key(self, key: Any) -> str:
        sid = self._by_key.get(key)
        if sid is None:
            sid = self._by_key[key] = self._new_id()
        return sid

    def _chunk_sid(self, data: memoryview) -> str:
        """Placeholder id of an ArrayChunk with these bytes (equal bytes → equal id)."""
        same_len = self._chunks.setdefault(len(data), [])
        for other, sid in same_len:
            if (
                other[:_SIG].tobytes() == data[:_SIG].tobytes()
                and other[-_SIG:].tobytes() == data[-_SIG:].tobytes()
                and np.array_equal(np.frombuffer(other, np.uint8), np.frombuffer(data, np.uint8))
            ):
                return sid
        sid = self._new_id()
        same_len.append((data, sid))
        return sid

    # ---------------------------------------------------------------- objects
    def _visit(self, obj: Any, out: dict[str, int]) -> str:
        """Add ``obj``'s subtree to ``out`` (sid -> deflated size); return ``obj``'s sid."""
        hit = self._by_obj.get(id(obj))
        if hit is not None and hit[0] is obj:
            out.update(hit[2])
            return str(hit[1])
        sub: dict[str, int] = {}
        sid, size = self._size(obj, sub)
        sub[sid] = size
        self._by_obj[id(obj)] = (obj, sid, sub)  # keeps obj alive: ids stay unique
        out.update(sub)
        return sid

    def _array_chunks(self, arr: Array) -> list[tuple[str, int]]:
        step = int(_array_mod.FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)
        data = memoryview(arr.data)
        out = []
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            out.append((self._chunk_sid(chunk), _framed(ArrayChunk.__qualname__, (), len(chunk))))
        return out

    def _size(self, obj: Any, out: dict[str, int]) -> tuple[str, int]:
        if isinstance(obj, Message):
            if type(obj) is not Message:
                raise _Unknown(type(obj).__qualname__)
            meta = metadata_to_proto(obj.metadata)
            meta.message_id = ""
            body = ProtoMessage(
                metadata=meta,
                content=None,
                error=error_to_proto(obj.error) if obj.has_error() else None,
            ).SerializeToString(deterministic=True)
            kids = [self._visit(obj.content, out)] if obj.has_content() else []
            return self._sid_for_key(("Message", body, tuple(kids))), _framed(
                "Message", kids, len(body)
            )
        if type(obj) in (RecordDict, ArrayRecord):
            refs: dict[str, str] = {}
            for name, child in obj.items():
                refs[name] = self._visit(child, out)
            uniq = list(dict.fromkeys(refs.values()))
            body_len = len(json.dumps(refs).encode("utf-8"))
            name = type(obj).__qualname__
            return self._sid_for_key((name, tuple(refs.items()))), _framed(name, uniq, body_len)
        if type(obj) is Array:
            chunks = self._array_chunks(obj)
            for ch_sid, ch_size in chunks:
                out[ch_sid] = ch_size
            ids = [c for c, _ in chunks]
            uniq = list(dict.fromkeys(ids))
            meta_json = {
                "dtype": obj.dtype,
                "shape": obj.shape,
                "stype": obj.stype,
                "arraychunk_ids": [uniq.index(c) for c in ids],
            }
            body = json.dumps(meta_json).encode("utf-8")
            return self._sid_for_key(("Array", body, tuple(uniq))), _framed(
                "Array", uniq, len(body)
            )
        if type(obj) in (ConfigRecord, MetricRecord):
            content = obj.deflate()  # no children: cheap and exact
            return self._sid_for_key((type(obj).__qualname__, content)), len(content)
        raise _Unknown(type(obj).__qualname__)

    # ---------------------------------------------------------------- public
    def objects(self, msg: InflatableObject) -> dict[str, int]:
        """``{placeholder id: deflated size}`` of every distinct object of ``msg``'s tree."""
        out: dict[str, int] = {}
        self._visit(msg, out)
        return out

    def message_bytes(self, msg: Message) -> int:
        """Bytes of one message as serialized by Flower (every distinct object once)."""
        try:
            return sum(self.objects(msg).values())
        except _Unknown:
            return deflated_bytes(msg)

    def unique_bytes(self, msgs: Iterable[Message]) -> int:
        """Bytes of several messages when identical objects are sent once (Flower's dedup)."""
        msgs = list(msgs)
        try:
            seen: dict[str, int] = {}
            for m in msgs:
                seen.update(self.objects(m))
            return sum(seen.values())
        except _Unknown:
            real: dict[str, int] = {}
            for m in msgs:
                for oid, o in get_all_nested_objects(m).items():
                    if oid not in real:
                        real[oid] = len(o.deflate())
            return sum(real.values())


def deflated_bytes(msg: InflatableObject) -> int:
    """The reference measurement: ``Σ len(o.deflate())`` over ``get_all_nested_objects(msg)``.

    Serializes and hashes everything (what Flower does to send the message); slow for large
    payloads. :func:`message_bytes` returns the same number without that work.
    """
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def message_bytes(msg: Message, meter: ByteMeter | None = None) -> int:
    """Bytes of one message as serialized by Flower (every distinct object of its tree once).

    ``meter`` (a :class:`ByteMeter`) lets many messages share the sizing of shared objects.
    """
    return (meter if meter is not None else ByteMeter()).message_bytes(msg)


def unique_bytes(msgs: Iterable[Message], meter: ByteMeter | None = None) -> int:
    """Bytes of several messages when identical objects are sent once (Flower's dedup)."""
    return (meter if meter is not None else ByteMeter()).unique_bytes(msgs)


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


class InProcessGrid(Grid):
    """What every in-process ``Grid`` here shares: building a message needs no runtime."""

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)


class MeteredGrid(InProcessGrid):
    """Counts the bytes of every message another runtime's ``Grid`` moves (not a runtime).

    Delegates to ``inner`` (the Grid of ``flwr run`` in simulation or deployment, or a
    :class:`~psfed_robust.flower.testing.LocalGrid`); ``bytes_per_type[message_type] =
    {"down": int, "up": int}`` with :func:`message_bytes` of each instruction and reply, so a
    ServerApp reports bytes the same way for PSFedAvg and for Flower's FedAvg in every runtime.
    """

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bytes_per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
        self._type_of: dict[str, str] = {}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def _count(self, msg: Message, direction: str, mtype: str) -> None:
        self.bytes_per_type[mtype][direction] += message_bytes(msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        for m in msgs:
            self._count(m, "down", m.metadata.message_type)
        ids = list(self.inner.push_messages(msgs))
        for m, i in zip(msgs, ids, strict=False):
            self._type_of[i] = m.metadata.message_type
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for r in replies:
            mtype = self._type_of.pop(r.metadata.reply_to_message_id, r.metadata.message_type)
            if r.has_content():
                self._count(r, "up", mtype)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        msgs = list(messages)
        for m in msgs:
            self._count(m, "down", m.metadata.message_type)
        replies = list(self.inner.send_and_receive(msgs, timeout=timeout))
        for r in replies:
            if r.has_content():
                self._count(r, "up", r.metadata.message_type)
        return replies

    def totals(self, prefix: str = "") -> dict[str, int]:
        """Total ``{"down", "up"}`` bytes over message types starting with ``prefix``."""
        out = {"down": 0, "up": 0}
        for mtype, d in self.bytes_per_type.items():
            if mtype.startswith(prefix):
                out["down"] += d["down"]
                out["up"] += d["up"]
        return out
