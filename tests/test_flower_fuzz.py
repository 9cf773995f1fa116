"""Fuzz: >= 10,000 malformed train replies never escape aggregate_train and never move the model."""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psfed_robust.core.mask import Mask
from psfed_robust.flower import MaskSettings, ProtocolSettings, PSFedAvg, ThreatSettings
from psfed_robust.flower.protocol import (
    KEY_META,
    KEY_METRICS,
    KEY_UPDATE,
    META_CLIENT_ID,
    METRIC_NUM_EXAMPLES,
    MSG_TRAIN,
    PAYLOAD,
    SCORES,
)
from psfed_robust.flower.testing import StaticGrid, build_train_reply
from psfed_robust.wire import encode_update

D = 40
NODES = [101, 202, 303, 404]
CIDS = {101: 0, 202: 1, 303: 2, 404: 3}
COUNTER = {"replies": 0}


def _prepared() -> tuple[PSFedAvg, dict[int, Message], bytes]:
    """A strategy after one valid round (ids known), configured for round 2."""
    g0 = np.linspace(-1, 1, D, dtype=np.float32)
    arrays = ArrayRecord({"w": Array(g0)})
    s = PSFedAvg(min_train_nodes=4, min_available_nodes=4,
                 masks=MaskSettings(fraction=0.5, seed=3),
                 threat=ThreatSettings(expected_clients=set(CIDS.values())),
                 protocol=ProtocolSettings(evaluation="none"))
    grid = StaticGrid(NODES)
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), grid))
    replies = []
    for m in msgs:
        mask = s._sent[m.metadata.dst_node_id].mask
        vals = (g0[mask.data] + 0.1).astype(np.float32)
        replies.append(build_train_reply(m, mask, vals, client_id=CIDS[m.metadata.dst_node_id],
                                         num_examples=5))
    new, _ = s.aggregate_train(1, replies)
    assert new is not None
    instr = {m.metadata.dst_node_id: m for m in s.configure_train(2, new, ConfigRecord(), grid)}
    return s, instr, new["w"].numpy().tobytes()


STRATEGY, INSTR, G_BYTES = _prepared()


@pytest.fixture(autouse=True)
def _quiet_flwr_log() -> Iterator[None]:
    """10,000 rejections log 10,000 warnings; keep them out of the captured log (speed)."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
WRONG_TYPE = Message(RecordDict(), dst_node_id=101, message_type="train")
STRANGER = Message(RecordDict(), dst_node_id=999, message_type=MSG_TRAIN)


def _good_parts(nid: int) -> tuple[Mask, np.ndarray]:
    mask = STRATEGY._sent[nid].mask
    return mask, np.full(mask.count, 0.5, dtype=np.float32)


def _content(payload: Any = None, *, num_examples: Any = 5, client_id: Any = 0,
             drop: str = "", extra: str = "", scores: Any = None) -> RecordDict:
    arrays: dict[str, Array] = {}
    if payload is not None:
        arrays[PAYLOAD] = payload
    if scores is not None:
        arrays[SCORES] = scores
    metrics = MetricRecord({} if num_examples is None else {METRIC_NUM_EXAMPLES: num_examples})
    meta = ConfigRecord({} if client_id is None else {META_CLIENT_ID: client_id})
    recs: dict[str, Any] = {KEY_UPDATE: ArrayRecord(arrays), KEY_METRICS: metrics, KEY_META: meta}
    if drop:
        recs.pop(drop)
    if extra == "config-as-update":
        recs[KEY_UPDATE] = ConfigRecord({"x": 1})
    elif extra == "metrics-as-meta":
        recs[KEY_META] = MetricRecord({"client-id": 1})
    elif extra:
        recs[extra] = ConfigRecord({"x": 1})
    return RecordDict(recs)


def _u8(b: bytes) -> Array:
    return Array(np.frombuffer(b, dtype=np.uint8).copy())


@st.composite
def malformed(draw: st.DrawFn) -> Message:
    nid = draw(st.sampled_from(NODES))
    cid = CIDS[nid]
    instr = INSTR[nid]
    mask, vals = _good_parts(nid)
    good = encode_update(mask, vals).payload
    kind = draw(st.integers(0, 17))
    if kind == 0:
        return Message(Error(draw(st.integers(0, 10)), draw(st.text(max_size=20))), reply_to=instr)
    if kind == 1:  # random bytes as payload
        return Message(_content(_u8(draw(st.binary(max_size=200))), client_id=cid),
                       reply_to=instr)
    if kind == 2:  # bit flip / truncation / extension of a valid payload
        b = bytearray(good)
        op = draw(st.integers(0, 2))
        if op == 0:
            i = draw(st.integers(0, len(b) - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            b = b[: draw(st.integers(0, len(b) - 1))]
        else:
            b += draw(st.binary(min_size=1, max_size=8))
        return Message(_content(_u8(bytes(b)), client_id=cid), reply_to=instr)
    if kind == 3:  # payload for another model size
        m2 = Mask.random(D + draw(st.integers(1, 5)), 0.5, seed=1)
        p = encode_update(m2, np.zeros(m2.count, np.float32)).payload
        return Message(_content(_u8(p), client_id=cid), reply_to=instr)
    if kind == 4:  # another mask (mask-mismatch)
        other = ~mask
        p = encode_update(other, np.zeros(other.count, np.float32)).payload
        return Message(_content(_u8(p), client_id=cid), reply_to=instr)
    if kind == 5:  # non-finite values (NaN/Inf, or float64 overflowing the float32 model)
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
        v = vals.astype(np.float64)
        v[draw(st.integers(0, len(v) - 1))] = bad
        return Message(_content(_u8(encode_update(mask, v).payload), client_id=cid),
                       reply_to=instr)
    if kind == 6:  # bad num-examples
        n = draw(st.sampled_from([0, -1, -(2**40), 2.5, 1.0, None, [1, 2]]))
        return Message(_content(_u8(good), num_examples=n, client_id=cid), reply_to=instr)
    if kind == 7:  # bad / missing / wrong client id
        c = draw(st.sampled_from([None, -3, True, "x" * 300, "", "intruder", (cid + 1) % 4, 2.5]))
        return Message(_content(_u8(good), client_id=c), reply_to=instr)
    if kind == 8:  # missing / extra / mistyped records
        drop = draw(st.sampled_from(["", KEY_UPDATE, KEY_METRICS, KEY_META]))
        extra = draw(st.sampled_from(["", "junk", "config-as-update", "metrics-as-meta"]))
        if not drop and not extra:
            drop = KEY_META
        return Message(_content(_u8(good), client_id=cid, drop=drop, extra=extra),
                       reply_to=instr)
    if kind == 9:  # payload array of the wrong dtype / shape, or missing
        choice = draw(st.integers(0, 2))
        arr = (
            Array(np.frombuffer(good, dtype=np.uint8).astype(np.float32))
            if choice == 0
            else Array(np.frombuffer(good[: len(good) // 2 * 2], np.uint8).reshape(2, -1).copy())
            if choice == 1
            else None
        )
        return Message(_content(arr, client_id=cid), reply_to=instr)
    if kind == 10:  # unsolicited scores array
        return Message(_content(_u8(good), client_id=cid, scores=Array(np.ones(D, np.float32))),
                       reply_to=instr)
    if kind == 11:  # reply from a node that was not sampled
        return Message(_content(_u8(good), client_id=cid), reply_to=STRANGER)
    if kind == 12:  # wrong message type
        return Message(_content(_u8(good), client_id=cid), reply_to=WRONG_TYPE)
    if kind == 13:  # header fields rewritten with a fixed-up CRC (count/size lies)
        b = bytearray(good)
        struct.pack_into("<Q", b, 16, draw(st.integers(0, 2**20)))
        return Message(_content(_u8(bytes(b)), client_id=cid), reply_to=instr)
    if kind == 14:  # oversized payload
        return Message(_content(_u8(good + bytes(9 * D + 70000)), client_id=cid), reply_to=instr)
    if kind == 15:  # no content at all
        return Message(RecordDict(), reply_to=instr)
    if kind == 16:  # seeded-encoding payload of a mask with another seed (mask-mismatch)
        m2 = Mask.random(D, 0.5, seed=draw(st.integers(100, 10**6)))
        if m2 == mask:
            m2 = ~mask
        p = encode_update(m2, np.zeros(m2.count, np.float32)).payload
        return Message(_content(_u8(p), client_id=cid), reply_to=instr)
    # 17: list-valued num-examples / client id of a list type
    if draw(st.booleans()):
        return Message(_content(_u8(good), num_examples=[5], client_id=cid), reply_to=instr)
    return Message(_content(_u8(good), client_id=[cid]), reply_to=instr)


FAST = settings(max_examples=700, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@FAST
@given(st.lists(malformed(), min_size=15, max_size=20))
def test_malformed_replies_are_rejected_and_leave_model_bitwise_unchanged(
    replies: list[Message],
) -> None:
    COUNTER["replies"] += len(replies)
    s = STRATEGY
    arrays, metrics = s.aggregate_train(2, replies)
    assert arrays is not None and metrics is not None
    assert arrays["w"].numpy().tobytes() == G_BYTES
    assert s.global_flat.tobytes() == G_BYTES
    assert metrics["accepted-replies"] == 0
    assert metrics["rejected-replies"] == len(replies)
    reasons = sum(v for k, v in metrics.items() if k.startswith("rejected."))
    assert reasons == len(replies)


def test_fuzz_volume() -> None:
    # runs after the fuzz test in file order: at least 10,000 malformed replies were fed
    assert COUNTER["replies"] >= 10_000


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.lists(malformed(), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_malformed_mixed_with_valid_equals_valid_alone(replies: list[Message], rnd: Any) -> None:
    valid = []
    for nid in NODES[:3]:
        mask, _ = _good_parts(nid)
        vals = np.linspace(0, 1, mask.count, dtype=np.float32) + nid
        valid.append(build_train_reply(INSTR[nid], mask, vals, client_id=CIDS[nid],
                                       num_examples=3))
    ref = _prepared()[0]
    expected, _ = ref.aggregate_train(2, list(valid))
    mixed = list(valid)  # malformed replies interleaved; valid ones keep their relative order
    for r in replies:
        mixed.insert(rnd.randint(0, len(mixed)), r)
    s = _prepared()[0]
    got, metrics = s.aggregate_train(2, mixed)
    assert expected is not None and got is not None and metrics is not None
    assert got["w"].numpy().tobytes() == expected["w"].numpy().tobytes()
    assert metrics["accepted-replies"] == 3
