"""``MeteredGrid``: wrap any Flower ``Grid`` and count the bytes of every message it moves.

Bytes are :func:`psfed_robust.flower.metering.message_bytes` of each instruction (down) and each
reply (up): the sum of ``len(deflate())`` over the message's object tree, i.e. what Flower 1.42
serializes, counted per message (a payload shared by several messages is counted once per
message). The same wrapper works in every runtime (simulation, deployment, loopback), so the
ServerApp can report bytes the same way for PSFedAvg and for Flower's FedAvg.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from psfed_robust.flower.metering import message_bytes

__all__ = ["MeteredGrid"]


class MeteredGrid(Grid):
    """Delegates to ``inner``; ``bytes_per_type[message_type] = {"down": int, "up": int}``."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.bytes_per_type: dict[str, dict[str, int]] = defaultdict(lambda: {"down": 0, "up": 0})
        self._type_of: dict[str, str] = {}

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

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
