"""In-process Flower runtime for tests and quick experiments (no Ray, no SuperLink).

:class:`LocalGrid` is a ``flwr.serverapp.Grid`` that routes each message to a ClientApp with one
persistent :class:`flwr.app.Context` per node, so ``strategy.start(LocalGrid(...), ...)`` runs the
real strategy and client code paths. Like the real runtimes it (optionally) serializes every
message through Flower's object model (deflate → inflate) and pickles the Context around each call,
so nothing survives between messages except ``context.state``. A ClientApp exception becomes an
error reply, as in simulation/deployment.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LocalGrid", "ensure_task_identity", "roundtrip"]


def ensure_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Set ``TaskIdentity`` (needed to build instruction Messages outside a Flower runtime)."""
    for attr, val in (("run_id", run_id), ("node_id", node_id), ("task_id", task_id)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, val)


def roundtrip(msg: Message) -> Message:
    """Serialize a message to Flower's object contents and inflate it back (the wire path)."""
    objs = get_all_nested_objects(msg)
    contents = {oid: o.deflate() for oid, o in objs.items()}
    out = cast(Message, inflate_object_from_contents(msg.object_id, contents))
    out.metadata.__dict__["_message_id"] = msg.object_id
    return out


class LocalGrid(Grid):
    """A Grid that runs ``client_app`` in-process for ``num_nodes`` nodes.

    ``node_configs[i]`` is node i's ``node_config`` (default ``{"partition-id": i,
    "num-partitions": n}``). ``drop(node_id, msg) -> bool`` simulates a lost reply (dropout);
    ``tamper(node_id, reply) -> reply`` rewrites a reply (Byzantine tests). ``node_ids`` default to
    large random-looking ids, never equal to the partition ids.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        run_config: Mapping[str, Any] | None = None,
        node_ids: Sequence[int] | None = None,
        serialize: bool = True,
        drop: Callable[[int, Message], bool] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        ensure_task_identity()
        self.client_app = client_app
        ids = list(node_ids) if node_ids is not None else [
            (0x9E3779B97F4A7C15 * (i + 1)) % (1 << 63) for i in range(num_nodes)
        ]
        if len(ids) != num_nodes:
            raise ValueError("node_ids must have num_nodes entries")
        self.contexts: dict[int, Context] = {}
        for i, nid in enumerate(ids):
            nc: dict[str, Any] = (
                dict(node_configs[i]) if node_configs is not None
                else {"partition-id": i, "num-partitions": num_nodes}
            )
            self.contexts[nid] = Context(
                run_id=1, node_id=nid, node_config=nc, state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self.serialize = serialize
        self.drop = drop
        self.tamper = tamper
        self.online: set[int] = set(ids)
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._pending: dict[str, Message] = {}
        self._run: Any = None

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError("build Message(...) directly")

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.online)

    def _call(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        if nid not in self.online:
            return None
        if self.serialize:
            msg = roundtrip(msg)
        self.sent.append(msg)
        ctx = self.contexts[nid]
        work = pickle.loads(pickle.dumps(ctx)) if self.serialize else ctx
        try:
            reply = self.client_app(msg, work)
        except Exception as e:
            reply = Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"),
                reply_to=msg,
            )
        else:
            self.contexts[nid] = work
        if self.drop is not None and self.drop(nid, msg):
            return None
        if self.tamper is not None and not reply.has_error():
            reply = self.tamper(nid, reply)
        if self.serialize:
            reply = roundtrip(reply)
        self.replies.append(reply)
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            key = f"m{len(self._pending)}-{id(m)}"
            self._pending[key] = m
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for key in message_ids:
            m = self._pending.pop(key, None)
            if m is not None and (r := self._call(m)) is not None:
                out.append(r)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        out = []
        for m in messages:
            r = self._call(m)
            if r is not None:
                out.append(r)
        return out


def build_train_reply(
    instruction: Message,
    mask: Any,
    values: Any,
    *,
    client_id: int | str = 0,
    num_examples: int = 1,
    metrics: Mapping[str, float] | None = None,
    scores: Any = None,
    encoding: str = "auto",
) -> Message:
    """A well-formed ``train.psfed`` reply to ``instruction`` (for strategy unit tests)."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

    from psfed_robust.flower import _wire
    from psfed_robust.flower.protocol import (
        KEY_META,
        KEY_METRICS,
        KEY_UPDATE,
        META_CLIENT_ID,
        META_FRESH_STATE,
        METRIC_NUM_EXAMPLES,
        PAYLOAD,
        SCORES,
    )

    enc = _wire.encode(mask, np.ascontiguousarray(values), encoding)
    arrays = {PAYLOAD: Array(np.frombuffer(enc.payload, dtype=np.uint8).copy())}
    if scores is not None:
        arrays[SCORES] = Array(np.asarray(scores, dtype=np.float32))
    m = MetricRecord({METRIC_NUM_EXAMPLES: num_examples, **dict(metrics or {})})
    meta = ConfigRecord({META_CLIENT_ID: client_id, META_FRESH_STATE: False})
    content = RecordDict({KEY_UPDATE: ArrayRecord(arrays), KEY_METRICS: m, KEY_META: meta})
    return Message(content, reply_to=instruction)


class StaticGrid(LocalGrid):
    """A Grid with fixed node ids and no ClientApp, for calling ``configure_*`` directly.

    With ``client_ids`` (node id → client id) it answers ``query.psfed`` identity queries, so
    strategies with per-client masks can be configured; other messages get no reply.
    """

    def __init__(
        self, node_ids: Iterable[int], client_ids: Mapping[int, int | str] | None = None
    ) -> None:
        ensure_task_identity()
        self.online = {int(n) for n in node_ids}
        self.client_ids = dict(client_ids or {})
        self._pending = {}
        self._run = None
        self.sent = []
        self.replies = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        from flwr.app import ConfigRecord

        from psfed_robust.flower.protocol import KEY_META, META_CLIENT_ID, META_HAS_LOCAL, MSG_QUERY

        out = []
        for m in messages:
            self.sent.append(m)
            nid = m.metadata.dst_node_id
            if m.metadata.message_type == MSG_QUERY and nid in self.client_ids:
                meta = ConfigRecord({META_CLIENT_ID: self.client_ids[nid], META_HAS_LOCAL: False})
                out.append(Message(RecordDict({KEY_META: meta}), reply_to=m))
        self.replies.extend(out)
        return out
