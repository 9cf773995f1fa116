"""``LoopbackGrid``: an in-process Flower ``Grid`` that calls a ClientApp directly.

A fast, deterministic runtime for tests and benchmarks of Message-API strategies: no Ray, no
SuperLink, no polling. Each node has a persistent :class:`flwr.app.Context` (``node_config``
``partition-id``/``num-partitions``, a ``state`` RecordDict that lives for the run) as in
Flower's simulation and deployment runtimes. Every message — instruction and reply — travels the
way Flower 1.42 moves it between processes: its object tree is deflated to bytes and inflated
again, so the ClientApp never shares an object with the ServerApp and the bytes are counted
from the real serialized objects (the same number as
:func:`psfed_robust.flower.metering.message_bytes`). A ClientApp that raises gets Flower's error
reply (``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``) and its Context is left unchanged, as in the
real runtimes.

Differences from the real runtimes, on purpose: messages are handled one after another in the
calling thread (``push_messages`` runs the ClientApp), node ids are fixed at construction, TTLs
are not enforced, the content-addressed dedup of shared objects is not applied (every message is
counted whole, which is how the byte figures in docs/flower_app.md are defined), and the Context
is copied (``deepcopy`` of the state; Array payloads are immutable bytes, so this is cheap)
rather than serialized per message as the real runtimes do.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict, UserConfig, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["LoopbackGrid", "Traffic", "run_server_app", "transport"]


@dataclass(frozen=True)
class Traffic:
    """One message that crossed the loopback: direction, type, round (group id) and bytes."""

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
    recomputes its children's ids (each record re-deflated ~15 times, each array chunk hashed
    twice), work no Flower runtime does.
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


class LoopbackGrid(Grid):
    """A ``Grid`` over ``num_nodes`` in-process nodes that run ``client_app``.

    Parameters
    ----------
    client_app : ClientApp
        The app every node runs.
    num_nodes : int
        Number of nodes; node ``i`` gets ``node_config = {"partition-id": i,
        "num-partitions": num_nodes}`` (plus ``node_config``'s entries).
    run_config : Mapping
        The run config every Context sees (what ``[tool.flwr.app.config]`` gives in a real run).
    node_config : Mapping
        Extra node-config entries for every node.
    run_id, seed
        Run id, and the seed of the (64-bit, possibly > 2**63, as in Flower) node ids.
    serialize : bool
        Deflate/inflate every message (default). ``False`` passes objects through (faster, no
        byte counts) — only for debugging.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        run_config: Mapping[str, UserConfigValue] | None = None,
        node_config: Mapping[str, UserConfigValue] | None = None,
        run_id: int = 1,
        seed: int = 0,
        serialize: bool = True,
    ) -> None:
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
            raise ValueError(f"num_nodes must be a positive int, got {num_nodes!r}")
        self.client_app = client_app
        self.serialize = serialize
        self._run = Run.create_empty(run_id)
        rng = random.Random(seed)
        ids: list[int] = []
        while len(ids) < num_nodes:
            nid = rng.getrandbits(64)
            if nid > SUPERLINK_NODE_ID and nid not in ids:
                ids.append(nid)
        self.node_ids: list[int] = ids
        base_run_config: UserConfig = dict(run_config or {})
        self.contexts: dict[int, Context] = {}
        for i, nid in enumerate(ids):
            ncfg: UserConfig = {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes}
            ncfg.update(node_config or {})
            self.contexts[nid] = Context(
                run_id=run_id,
                node_id=nid,
                node_config=ncfg,
                state=RecordDict(),
                run_config=dict(base_run_config),
            )
        self.offline: set[int] = set()  # node ids that never answer (tests of failures)
        self.traffic: list[Traffic] = []
        self._replies: dict[str, Message] = {}

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

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
        return list(self.node_ids)

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
            self._replies[msg.metadata.message_id] = self._deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    # ------------------------------------------------------------------ runtime
    def _deliver(self, msg: Message) -> Message:
        dst = msg.metadata.dst_node_id
        mtype, group = msg.metadata.message_type, msg.metadata.group_id
        t0 = time.perf_counter()
        if self.serialize:
            incoming, nbytes = transport(msg)
        else:
            incoming, nbytes = msg, 0
        self.traffic.append(Traffic("down", mtype, group, dst, nbytes, time.perf_counter() - t0))
        context = self.contexts[dst]
        work = copy.copy(context)
        work.state = copy.deepcopy(context.state)  # committed only if the ClientApp succeeds
        prev = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
            context.run_id,
            dst,
            2,
        )
        t0 = time.perf_counter()
        try:
            reply = self.client_app(incoming, work)
            self.contexts[dst] = work
        except Exception as ex:
            reason = f"{type(ex)}:<'{ex}'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=incoming
            )
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = prev
        elapsed = time.perf_counter() - t0
        if self.serialize:
            reply, nbytes = transport(reply)
        else:
            nbytes = 0
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        self.traffic.append(Traffic("up", mtype, group, dst, nbytes, elapsed))
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
    grid: LoopbackGrid,
    run_config: Mapping[str, UserConfigValue] | None = None,
) -> Context:
    """Run ``server_app`` against ``grid`` in this thread, as the ``flwr-serverapp`` would."""
    ctx = Context(
        run_id=grid.run.run_id,
        node_id=SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config or {}),
    )
    prev = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = (
        grid.run.run_id,
        SUPERLINK_NODE_ID,
        1,
    )
    try:
        server_app(grid, ctx)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = prev
    return ctx
