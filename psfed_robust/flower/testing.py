"""The in-process Flower runtime (no Ray, no SuperLink) for tests, benchmarks and the driver.

:class:`LocalGrid` is a ``flwr.serverapp.Grid`` over ``num_nodes`` in-process nodes that run a
ClientApp, so ``strategy.start(LocalGrid(app, n), ...)`` runs the real strategy and client code
paths of any Message-API strategy (PSFedAvg or Flower's FedAvg). Each node has a persistent
:class:`flwr.app.Context` (``node_config`` ``partition-id``/``num-partitions``, a ``state``
RecordDict that lives for the run), as in Flower's simulation and deployment runtimes. Every
message — instruction and reply — travels the way Flower 1.42 moves it between processes: its
object tree is deflated to bytes and inflated again (:func:`transport`), so the ClientApp never
shares an object with the ServerApp, and with metering on (the default) the bytes of each
message are recorded in :attr:`LocalGrid.traffic` (the same number as
:func:`psfed_robust.flower.metering.message_bytes`). A ClientApp that raises gets Flower's error
reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) and its Context is left unchanged.

Differences from the real runtimes, on purpose: messages are handled one after another in the
calling thread (``push_messages`` runs the ClientApp), node ids are fixed at construction, TTLs
are not enforced, the content-addressed dedup of shared objects is not applied (every message is
counted whole, as the byte figures in docs/flower_app.md are defined), and the Context's state is
deep-copied (Array payloads are immutable bytes, so this is cheap) rather than serialized.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfig, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.serverapp import ServerApp
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from psfed_robust.flower.metering import InProcessGrid

__all__ = [
    "LocalGrid",
    "StaticGrid",
    "Traffic",
    "build_train_reply",
    "ensure_task_identity",
    "roundtrip",
    "run_server_app",
    "transport",
]


def ensure_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Set ``TaskIdentity`` (needed to build instruction Messages outside a Flower runtime)."""
    for attr, val in (("run_id", run_id), ("node_id", node_id), ("task_id", task_id)):
        try:
            getattr(TaskIdentity, attr)
        except RuntimeError:
            setattr(TaskIdentity, attr, val)


@dataclass(frozen=True)
class Traffic:
    """One message that crossed the grid: direction, type, round (group id) and bytes."""

    direction: str  # "down" (ServerApp -> ClientApp) or "up" (reply)
    message_type: str
    group_id: str
    node_id: int
    num_bytes: int
    seconds: float  # ClientApp time for "up", transport time for "down"


def transport(msg: Message) -> tuple[Message, int]:
    """Deflate ``msg`` to bytes and inflate a fresh copy; return ``(copy, bytes)``.

    Object ids are computed once per object and message, inside Flower's
    ``no_object_id_recompute()``, as Flower's own push paths do (``http_grid`` for the
    ServerApp, ``run_clientapp.push_message`` for replies); without it every level of the tree
    recomputes its children's ids, work no Flower runtime does.
    """
    with no_object_id_recompute():
        objs = get_all_nested_objects(msg)
        contents = {oid: o.deflate() for oid, o in objs.items()}
        root = msg.object_id
    size = sum(len(c) for c in contents.values())
    out = inflate_object_from_contents(root, contents)
    if not isinstance(out, Message):  # pragma: no cover - Flower invariant
        raise TypeError(f"inflated a {type(out).__name__}, expected Message")
    # the message id is not part of the object body; carry it over as the runtimes do
    out.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return out, size


def roundtrip(msg: Message) -> Message:
    """``transport(msg)``'s copy (the wire path, without the byte count)."""
    return transport(msg)[0]


class LocalGrid(InProcessGrid):
    """A ``Grid`` over ``num_nodes`` in-process nodes that run ``client_app``.

    ``node_configs[i]`` replaces node i's ``node_config`` (default ``{"partition-id": i,
    "num-partitions": n}`` plus ``node_config``'s entries); ``run_config`` is what every Context
    sees. Node ids are 64-bit ids drawn from ``seed`` (possibly > 2**63, as in Flower), never
    equal to the partition ids, unless ``node_ids`` are given. ``serialize=False`` passes
    objects through (no byte counts; debugging only). Failure injection: ``offline`` node ids
    never answer; ``drop(node_id, msg) -> bool`` loses a reply after the ClientApp ran;
    ``tamper(node_id, reply) -> reply`` rewrites a reply (Byzantine tests).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        node_configs: Sequence[Mapping[str, UserConfigValue]] | None = None,
        node_config: Mapping[str, UserConfigValue] | None = None,
        run_config: Mapping[str, UserConfigValue] | None = None,
        node_ids: Sequence[int] | None = None,
        run_id: int = 1,
        seed: int = 0,
        serialize: bool = True,
        drop: Callable[[int, Message], bool] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError("node_configs must have num_nodes entries")
        ensure_task_identity()
        self.client_app = client_app
        self.serialize = serialize
        self.drop = drop
        self.tamper = tamper
        self._run = Run.create_empty(run_id)
        if node_ids is not None:
            ids = [int(n) for n in node_ids]
            if len(ids) != num_nodes or len(set(ids)) != num_nodes:
                raise ValueError("node_ids must be num_nodes distinct ids")
        else:
            rng = random.Random(seed)
            ids = []
            while len(ids) < num_nodes:
                nid = rng.getrandbits(64)
                if nid > SUPERLINK_NODE_ID and nid not in ids:
                    ids.append(nid)
        self.node_ids: list[int] = ids
        self.contexts: dict[int, Context] = {}
        for i, nid in enumerate(ids):
            ncfg: UserConfig = (dict(node_configs[i]) if node_configs is not None
                                else {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes})
            ncfg.update(node_config or {})
            self.contexts[nid] = Context(run_id=run_id, node_id=nid, node_config=ncfg,
                                         state=RecordDict(), run_config=dict(run_config or {}))
        self.offline: set[int] = set()
        self.traffic: list[Traffic] = []
        self.sent: list[Message] = []  # instructions as the ClientApps received them
        self.replies: list[Message] = []  # replies as the ServerApp received them
        self._replies: dict[str, Message] = {}

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self.node_ids if n not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            dst = msg.metadata.dst_node_id
            if dst not in self.contexts:
                raise ValueError(f"message addressed to unknown node id {dst}")
            ids.append(msg.metadata.message_id)
            if dst in self.offline:
                continue
            reply = self._deliver(msg)
            if reply is not None:
                self._replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------------ runtime
    def _deliver(self, msg: Message) -> Message | None:
        dst = msg.metadata.dst_node_id
        mtype, group = msg.metadata.message_type, msg.metadata.group_id
        t0 = time.perf_counter()
        incoming, nbytes = transport(msg) if self.serialize else (msg, 0)
        self.traffic.append(Traffic("down", mtype, group, dst, nbytes, time.perf_counter() - t0))
        self.sent.append(incoming)
        context = self.contexts[dst]
        work = copy.copy(context)
        work.state = copy.deepcopy(context.state)  # committed only if the ClientApp succeeds
        prev = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
            context.run_id, dst, 2)
        t0 = time.perf_counter()
        try:
            reply = self.client_app(incoming, work)
            self.contexts[dst] = work
        except Exception as ex:
            reason = f"{type(ex).__name__}: {ex}"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=incoming
            )
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = prev
        elapsed = time.perf_counter() - t0
        if self.drop is not None and self.drop(dst, incoming):
            return None
        if self.tamper is not None and not reply.has_error():
            reply = self.tamper(dst, reply)
        reply, nbytes = transport(reply) if self.serialize else (reply, 0)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        self.traffic.append(Traffic("up", mtype, group, dst, nbytes, elapsed))
        self.replies.append(reply)
        return reply

    # ------------------------------------------------------------------ accounting
    def bytes_by(
        self, *, message_type: str | None = None, prefix: str | None = None
    ) -> dict[str, int]:
        """``{"down": bytes, "up": bytes}`` over the traffic so far (optionally filtered)."""
        out = {"down": 0, "up": 0}
        for t in self.traffic:
            if message_type is not None and t.message_type != message_type:
                continue
            if prefix is not None and not t.message_type.startswith(prefix):
                continue
            out[t.direction] += t.num_bytes
        return out


def run_server_app(
    server_app: ServerApp,
    grid: LocalGrid,
    run_config: Mapping[str, UserConfigValue] | None = None,
) -> Context:
    """Run ``server_app`` against ``grid`` in this thread, as the ``flwr-serverapp`` would."""
    ctx = Context(run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={},
                  state=RecordDict(), run_config=dict(run_config or {}))
    prev = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        grid.run.run_id, SUPERLINK_NODE_ID, 1)
    try:
        server_app(grid, ctx)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = prev
    return ctx


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
    """A well-formed ``train.psfed`` reply to ``instruction`` (for strategy unit tests): the
    client's own reply builder over the wire encoding of ``(mask, values)``."""
    import numpy as np

    from psfed_robust.flower import _wire
    from psfed_robust.flower._arrays import array_from_numpy
    from psfed_robust.flower.validation import train_reply

    return train_reply(
        instruction, _wire.encode_array(mask, np.ascontiguousarray(values), encoding),
        client_id=client_id, num_examples=num_examples, fresh=False, metrics=metrics,
        scores=None if scores is None else array_from_numpy(np.asarray(scores, np.float32)),
    )


class StaticGrid(LocalGrid):
    """A Grid with fixed node ids and no ClientApp, for calling ``configure_*`` directly.

    With ``client_ids`` (node id → client id) it answers ``query.psfed`` identity queries, so
    strategies with per-client masks can be configured; other messages get no reply.
    """

    def __init__(
        self, node_ids: Iterable[int], client_ids: Mapping[int, int | str] | None = None
    ) -> None:
        ensure_task_identity()
        self.node_ids = [int(n) for n in node_ids]
        self.offline = set()
        self.client_ids = dict(client_ids or {})
        self._replies = {}
        self._run = Run.create_empty(1)
        self.sent = []
        self.replies = []
        self.traffic = []
        self.contexts = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(m)
            ids.append(m.metadata.message_id)
        return ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        from psfed_robust.flower.protocol import MSG_QUERY
        from psfed_robust.flower.validation import query_reply

        out = []
        for m in messages:
            self.sent.append(m)
            nid = m.metadata.dst_node_id
            if m.metadata.message_type == MSG_QUERY and nid in self.client_ids:
                out.append(query_reply(m, client_id=self.client_ids[nid], has_local=False))
        self.replies.extend(out)
        return out
