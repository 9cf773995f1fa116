"""The strategy's outgoing side: waiting for and sampling nodes, identity queries, and the
train/evaluate instructions (one shared payload object per mask, so Flower uploads it once).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from psfed_robust.core.mask import Mask
from psfed_robust.flower import _wire
from psfed_robust.flower._aggregate import Sent
from psfed_robust.flower._masks import gather
from psfed_robust.flower.metering import ByteMeter, message_bytes, update_floor_bytes
from psfed_robust.flower.protocol import (
    CFG_CLIENT_ID,
    CFG_QUERY,
    CFG_SEND_SCORES,
    KEY_ATTACK,
    KEY_CONFIG,
    KEY_DOWN,
    KEY_INIT,
    MSG_QUERY,
    PAYLOAD,
)
from psfed_robust.flower.settings import ProtocolSettings
from psfed_robust.flower.validation import ClientId, ReplyRejected, parse_query_reply

__all__ = ["build_messages", "identify", "payload_record", "wait_and_sample"]


def wait_and_sample(
    grid: Grid, need: int, fraction: float, min_nodes: int, seed: int, purpose: str,
    protocol: ProtocolSettings,
) -> tuple[list[int], int]:
    """Wait for ``need`` nodes (up to the timeout), then sample: ``(sampled, available)``."""
    t0 = time.monotonic()
    while len(ids := sorted(int(n) for n in grid.get_node_ids())) < need:
        if time.monotonic() - t0 > protocol.node_wait_timeout:
            log(WARNING, "psfed: waited %.0fs for %d nodes; going on with %d",
                protocol.node_wait_timeout, need, len(ids))
            break
        log(INFO, "psfed: waiting for nodes: %d connected (need %d)", len(ids), need)
        time.sleep(protocol.poll_interval)
    size = min(len(ids), max(int(len(ids) * fraction), min_nodes))
    sampled = sorted(random.Random(seed).sample(ids, size))
    log(INFO, "psfed %s: sampled %d nodes (out of %d)", purpose, len(sampled), len(ids))
    return sampled, len(ids)


def identify(
    grid: Grid,
    node_ids: list[int],
    node_to_cid: dict[int, ClientId],
    synced: set[int],
    expected_clients: Collection[ClientId] | None,
    timeout: float,
) -> list[int]:
    """Ask nodes with unknown client ids who they are (``query.psfed``); drop the silent.

    Learns into ``node_to_cid`` and ``synced`` (nodes that already hold a local model)."""
    unknown = [n for n in node_ids if n not in node_to_cid]
    if not unknown:
        return node_ids
    rec = RecordDict({KEY_CONFIG: ConfigRecord({CFG_QUERY: "identity"})})
    msgs = [Message(rec, dst_node_id=n, message_type=MSG_QUERY) for n in unknown]
    answered: set[int] = set()
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        try:
            nid = int(reply.metadata.src_node_id)
            if nid not in unknown:
                raise ReplyRejected("unexpected-node")
            cid, has_local = parse_query_reply(reply)
            if expected_clients is not None and cid not in expected_clients:
                raise ReplyRejected("unknown-client-id", repr(cid))
            if cid in node_to_cid.values():
                raise ReplyRejected("duplicate-client-id", repr(cid))
            node_to_cid[nid] = cid
            if has_local:
                synced.add(nid)
            answered.add(nid)
        except ReplyRejected as e:
            log(WARNING, "psfed: identity query reply dropped (%s)", e)
        except Exception as e:
            log(WARNING, "psfed: identity query reply dropped (malformed: %s)", e)
    dropped = [n for n in unknown if n not in answered]
    if dropped:
        log(WARNING, "psfed: %d node(s) did not identify themselves; skipped", len(dropped))
    return [n for n in node_ids if n not in dropped]


def payload_record(mask: Mask, values: npt.NDArray[Any], encoding: str) -> ArrayRecord:
    """``{"payload": wire(mask, values)}``."""
    return ArrayRecord({PAYLOAD: _wire.encode_array(mask, np.ascontiguousarray(values),
                                                    encoding)})


def build_messages(
    g: npt.NDArray[Any],
    size: int,
    node_ids: list[int],
    cfg: dict[str, Any],
    message_type: str,
    mask_for: Callable[[int], tuple[Mask | None, bool]],
    *,
    node_to_cid: Mapping[int, ClientId],
    needs_init: Callable[[int], bool],
    identify: bool,
    attacks: Mapping[ClientId, Mapping[str, Any]],
    encoding: str,
    meter: ByteMeter,
) -> tuple[list[Message], dict[int, Sent]]:
    """One instruction per node; records are shared between nodes wherever they are equal."""
    itemsize = g.dtype.itemsize
    init_rec: ArrayRecord | None = None
    down_cache: dict[int, tuple[Mask, ArrayRecord]] = {}
    cfg_cache: dict[tuple[bool, Any], ConfigRecord] = {}
    content_cache: dict[tuple[int, bool, bool, Any], RecordDict] = {}
    msgs: list[Message] = []
    sent: dict[int, Sent] = {}
    for nid in node_ids:
        cid = node_to_cid.get(nid)
        mask, want_scores = mask_for(nid)
        init = needs_init(nid)
        if init and init_rec is None:
            init_rec = payload_record(Mask.all_true(size), g, encoding)
        down = None
        if mask is not None:
            if id(mask) not in down_cache:
                down_cache[id(mask)] = (mask, payload_record(mask, gather(g, mask), encoding))
            down = down_cache[id(mask)][1]
        ckey = (want_scores, cid if identify else None)
        if ckey not in cfg_cache:
            c = dict(cfg)
            c.pop(CFG_SEND_SCORES, None)  # absent means False (protocol.DEFAULT_UPLINK)
            c.pop(CFG_CLIENT_ID, None)
            if want_scores:
                c[CFG_SEND_SCORES] = True
            if cid is not None and identify:  # else one record for all nodes
                c[CFG_CLIENT_ID] = cid
            cfg_cache[ckey] = ConfigRecord(c)
        attack = attacks.get(cid) if cid is not None else None
        rkey = (id(mask), init, want_scores, cid if attack or identify else None)
        content = content_cache.get(rkey)
        if content is None:
            recs: dict[str, Any] = {KEY_CONFIG: cfg_cache[ckey]}
            if down is not None:
                recs[KEY_DOWN] = down
            if init:
                assert init_rec is not None
                recs[KEY_INIT] = init_rec
            if attack is not None:
                recs[KEY_ATTACK] = ConfigRecord(dict(attack))
            content = RecordDict(recs)
            content_cache[rkey] = content
        m = Message(content, dst_node_id=nid, message_type=message_type)
        msgs.append(m)
        floor = (update_floor_bytes(mask, itemsize) if mask is not None else 0) + (
            size * itemsize if init else 0)
        sent[nid] = Sent(
            mask=mask if mask is not None else Mask.all_false(size),
            client_id=cid,
            bytes=message_bytes(m, meter),
            floor=floor,
            want_scores=want_scores,
        )
    return msgs, sent
