"""The Flower hot path's shortcuts give exactly what the slow, obvious code gives.

- byte metering sized from object structure == ``Σ len(o.deflate())`` over Flower's object tree
  (every message shape the library sends, shared/duplicate objects, multi-chunk arrays), and the
  strategy's per-round byte metrics == the bytes the loopback runtime really serialized;
- one-copy npy Arrays are byte-identical to ``Array(ndarray)``; zero-copy views equal
  ``Array.numpy()`` and fall back to it for anything unusual;
- the wire codec's ``encode_update_parts``/``decode_update(copy=False)`` equal the copying forms;
- cached mask indices, gather and the client's core merge equal boolean indexing;
- a full downlink mask skips reading the stored model but keeps every state rule.
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import flwr.app.message.array as flwr_array
import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import nn

import psfed_robust.wire as wire
from psfed_robust.core.mask import Mask
from psfed_robust.flower import (
    MaskSettings,
    ProtocolSettings,
    PSFedAvg,
    ThreatSettings,
    arrays_from_model,
    make_client_app,
)
from psfed_robust.flower._arrays import array_from_numpy, array_from_parts, array_view
from psfed_robust.flower._masks import gather, index_tensor, mask_indices
from psfed_robust.flower.client import _merge
from psfed_robust.flower.metering import ByteMeter, deflated_bytes, message_bytes, unique_bytes
from psfed_robust.flower.protocol import META_FRESH_STATE, STATE_LOCAL, STATE_THETA
from psfed_robust.flower.testing import (
    LocalGrid,
    build_train_reply,
    ensure_task_identity,
    roundtrip,
)
from psfed_robust.flower.validation import all_finite


def _real_unique(msgs: list[Message]) -> int:
    seen: dict[str, int] = {}
    for m in msgs:
        for oid, o in get_all_nested_objects(m).items():
            seen.setdefault(oid, len(o.deflate()))
    return sum(seen.values())


def _messages() -> list[Message]:
    ensure_task_identity()
    rng = np.random.default_rng(0)
    payload = wire.encode_update(Mask.random(5000, 0.3, seed=1, round_num=1),
                                 rng.standard_normal(1500).astype(np.float32)).payload
    down = ArrayRecord({"payload": Array(np.frombuffer(payload, np.uint8).copy())})
    cfg = ConfigRecord({"server-round": 3, "psfed-model-size": 5000, "ünï": "cödé",
                        "blob": b"\x00\x01", "flag": True, "xs": [1.5, 2.5]})
    instr = Message(RecordDict({"psfed.config": cfg, "psfed.down": down,
                                "psfed.init": down}), dst_node_id=2**63 + 5,
                    message_type="train.psfed")
    reply_content = RecordDict({
        "psfed.update": ArrayRecord({"payload": array_from_numpy(np.arange(77, dtype=np.uint8)),
                                     "scores": Array(rng.random(5000).astype(np.float32))}),
        "psfed.metrics": MetricRecord({"num-examples": 12, "loss": 0.25}),
        "psfed.meta": ConfigRecord({"client-id": 4, "fresh-state": False}),
    })
    reply = Message(reply_content, reply_to=instr)
    twins = Message(RecordDict({
        "a": ArrayRecord({"x": Array(np.zeros(40, np.float64)),
                          "y": Array(np.zeros(40, np.float64))}),
        "m1": MetricRecord({"n": 3}), "m2": MetricRecord({"n": 3}),
        "c1": ConfigRecord({}), "c2": ConfigRecord({}),
    }), dst_node_id=9, message_type="evaluate")
    error = Message(Error(code=0, reason="client crashed: boom"), reply_to=instr)
    empty = Message(RecordDict({}), dst_node_id=3, message_type="query.psfed")
    dense = Message(RecordDict({"arrays": ArrayRecord(nn.Linear(30, 7).state_dict()),
                                "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=0, message_type="train")
    return [instr, reply, twins, error, empty, dense, roundtrip(reply)]


def test_metering_equals_the_real_serialized_bytes() -> None:
    for msg in _messages():
        assert message_bytes(msg) == deflated_bytes(msg)


def test_metering_counts_identical_chunks_once_like_flower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flwr_array, "FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE", 1000)
    rng = np.random.default_rng(1)
    ensure_task_identity()
    noise = rng.integers(0, 255, 4500).astype(np.uint8)
    head = np.concatenate([noise[:1000], np.zeros(3000, np.uint8)])  # chunk 0 shared with noise
    msg = Message(RecordDict({"a": ArrayRecord({
        "zeros": Array(np.zeros(5000, np.uint8)),  # 5 chunks: the 4 full ones are identical
        "noise": Array(noise),
        "head": Array(head),
        "zeros2": Array(np.zeros(5000, np.uint8)),  # an identical Array: sent once
    })}), dst_node_id=1, message_type="train")
    assert message_bytes(msg) == deflated_bytes(msg)


def test_unique_bytes_dedups_across_messages_like_flower() -> None:
    msgs = _messages()
    shared = msgs[0].content
    more = [Message(shared, dst_node_id=i + 10, message_type="train.psfed") for i in range(3)]
    copies = [roundtrip(m) for m in more]  # equal content, distinct objects
    every = msgs + more + copies
    assert unique_bytes(every) == _real_unique(every)
    meter = ByteMeter()  # a shared meter gives the same per-message numbers
    assert [message_bytes(m, meter) for m in every] == [deflated_bytes(m) for m in every]
    assert unique_bytes(every, meter) == _real_unique(every)


def test_metering_falls_back_for_unknown_object_types() -> None:
    class Odd(ConfigRecord):
        pass

    ensure_task_identity()
    msg = Message(RecordDict({"c": Odd({"a": 1})}), dst_node_id=1, message_type="train")
    assert message_bytes(msg) == deflated_bytes(msg)


def _app() -> ClientApp:
    def model_fn(ctx: Context) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))

    def train_fn(model: nn.Module, cfg: dict[str, Any], ctx: Context) -> int:
        g = torch.Generator().manual_seed(int(ctx.node_config["partition-id"]))
        x, y = torch.randn(8, 20, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return 8

    def eval_fn(model: nn.Module, cfg: dict[str, Any], ctx: Context) -> tuple[float, int, dict]:
        return 0.5, 4, {"acc": 1.0}

    return make_client_app(model_fn=model_fn, train_fn=train_fn, evaluate_fn=eval_fn)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_strategy_byte_metrics_equal_the_bytes_the_runtime_serialized(fraction: float) -> None:
    torch.manual_seed(0)
    init = arrays_from_model(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)))
    grid = LocalGrid(_app(), 4)
    strategy = PSFedAvg(min_train_nodes=4, min_available_nodes=4, min_evaluate_nodes=4,
                        masks=MaskSettings(fraction=fraction, seed=3),
                        threat=ThreatSettings(client_attacks={1: ("gaussian", {"sigma": 0.1})}))
    cuts: list[int] = []

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        cuts.append(len(grid.traffic))
        return MetricRecord({})

    strategy.start(grid, init, num_rounds=3, evaluate_fn=evaluate_fn)
    train_rounds = list(strategy.history)
    assert len(train_rounds) == 3
    for r, (a, b) in enumerate(itertools.pairwise(cuts)):
        traffic = [t for t in grid.traffic[a:b] if t.message_type == "train.psfed"]
        down = sum(t.num_bytes for t in traffic if t.direction == "down")
        up = sum(t.num_bytes for t in traffic if t.direction == "up")
        assert train_rounds[r]["bytes-down-total"] == down
        assert train_rounds[r]["bytes-up-total"] == up


# ---------------------------------------------------------------- npy Arrays
@pytest.mark.parametrize(
    "arr",
    [
        np.arange(1000, dtype=np.float32),
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.zeros(0, dtype=np.float64),
        np.ones((), dtype=np.float16),
        np.array([True, False, True]),
        np.arange(10, dtype=np.uint8),
        np.arange(6, dtype=">f4"),  # non-native: np.save's path
        np.arange(12, dtype=np.float32).reshape(3, 4).T,  # non-contiguous
    ],
)
def test_one_copy_arrays_are_byte_identical_to_np_save(arr: np.ndarray) -> None:
    fast, ref = array_from_numpy(arr), Array(arr)
    assert (fast.dtype, fast.shape, fast.stype, fast.data) == (
        ref.dtype, ref.shape, ref.stype, ref.data)
    view = array_view(fast)
    np.testing.assert_array_equal(view, ref.numpy())
    assert view.dtype == ref.numpy().dtype and view.shape == ref.numpy().shape


def test_array_view_is_zero_copy_and_read_only() -> None:
    a = array_from_numpy(np.arange(100, dtype=np.float32))
    v = array_view(a)
    assert not v.flags.writeable and not v.flags.owndata
    assert array_from_parts(np.dtype(np.float32), (100,), (v.tobytes(),)).data == a.data
    with pytest.raises(ValueError, match="parts hold"):
        array_from_parts(np.dtype(np.float32), (100,), (b"\x00" * 12,))


def test_array_view_falls_back_to_numpy_for_other_npy_data() -> None:
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    fortran = Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=buf.getvalue())
    np.testing.assert_array_equal(array_view(fortran), fortran.numpy())
    lying = Array(dtype="float64", shape=(3,), stype="numpy.ndarray",
                  data=Array(np.arange(3, dtype=np.int32)).data)  # metadata disagrees with data
    got = array_view(lying)
    assert got.dtype == np.int32  # what np.load reads, never a reinterpretation
    garbage = Array(dtype="uint8", shape=(4,), stype="numpy.ndarray", data=b"not npy")
    with pytest.raises(ValueError):
        array_view(garbage)


# ---------------------------------------------------------------- wire
@pytest.mark.parametrize("fraction", [1.0, 0.4, 0.01])
def test_wire_parts_and_views_equal_the_copying_forms(fraction: float) -> None:
    rng = np.random.default_rng(2)
    mask = Mask.random(3000, fraction, seed=7, round_num=2)
    values = rng.standard_normal(mask.count)
    for enc in ("auto", "bitmap", "gap"):
        parts, name = wire.encode_update_parts(mask, values, encoding=enc)
        full = wire.encode_update(mask, values, encoding=enc)
        assert b"".join(parts) == full.payload and name == full.encoding
        m1, v1 = wire.decode_update(full.payload, 3000)
        m2, v2 = wire.decode_update(full.payload, 3000, copy=False)
        assert m1 == m2 == mask
        np.testing.assert_array_equal(v1, v2)
        assert v1.flags.writeable and not v2.flags.writeable
        bad = bytearray(full.payload)
        bad[-1] ^= 1
        with pytest.raises(wire.WireFormatError, match="CRC"):
            wire.decode_update(bytes(bad), 3000, copy=False)


# ---------------------------------------------------------------- masks and checks
def test_cached_indices_gather_and_merge_equal_boolean_indexing() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(500)
    for mask in (Mask.random(500, 0.3, seed=1, round_num=1), Mask.all_true(500),
                 Mask.all_false(500), Mask.from_indices([0, 7, 499], 500)):
        idx = mask_indices(mask)
        assert mask_indices(mask) is idx and not idx.flags.writeable
        t = index_tensor(mask)
        assert (t is None) == (mask.count == mask.size)
        assert t is None or index_tensor(mask) is t  # one tensor object per mask
        np.testing.assert_array_equal(idx, mask.indices)
        np.testing.assert_array_equal(gather(x, mask), x[mask.data])
        y, z = x.copy(), x.copy()
        vals = rng.standard_normal(mask.count)
        _merge(y, mask, vals)
        z[mask.data] = vals
        np.testing.assert_array_equal(y, z)
        # values misaligned as in a wire payload (they start at byte 37 after a seeded mask)
        buf = np.zeros(mask.count * 8 + 48, np.uint8)
        odd = np.ndarray((mask.count,), np.float64, buffer=buf, offset=37)
        odd[:] = vals
        assert not odd.flags.aligned or mask.count == 0
        w = x.copy()
        _merge(w, mask, odd)
        np.testing.assert_array_equal(w, z)


def test_mask_equality_shortcuts_agree_with_the_data() -> None:
    a = Mask.random(400, 0.5, seed=1, round_num=1)
    b = Mask(a.data.copy())  # same data, no spec
    c = Mask.random(400, 0.5, seed=1, round_num=2)
    for x, y in ((a, b), (a, c), (b, c), (Mask.all_true(400), Mask(np.ones(400, bool))),
                 (Mask.all_false(400), Mask(np.zeros(400, bool))), (a, Mask.all_true(400))):
        assert (x == y) == (x.size == y.size and np.array_equal(x.data, y.data))


def test_all_finite() -> None:
    assert all_finite(np.ones(5, np.float32)) and all_finite(np.arange(3))
    for bad in (np.nan, np.inf, -np.inf):
        v = np.ones(1000)
        v[999] = bad
        assert not all_finite(v)


# ---------------------------------------------------------------- client state at f = 1
def test_full_mask_skips_the_stored_model_but_keeps_state_rules() -> None:
    torch.manual_seed(0)
    init = arrays_from_model(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3)))
    grid = LocalGrid(_app(), 2)
    s = PSFedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0,
                 masks=MaskSettings(fraction=1.0, seed=1),
                 protocol=ProtocolSettings(initial_sync=False))
    s.start(grid, init, num_rounds=2)
    for ctx in grid.contexts.values():  # the stored local model is the trained one
        theta = ctx.state[STATE_LOCAL][STATE_THETA].numpy()  # type: ignore[index]
        assert theta.shape == (s.num_parameters,) and np.isfinite(theta).all()
        assert ctx.state["psfed.meta"]["rounds-trained"] == 2  # type: ignore[index]
    # fresh-state: True in round 1 (no state, no init), False afterwards
    assert s.history[0]["accepted-replies"] == 2.0
    ensure_task_identity()
    nid = grid.node_ids[0]
    instr = next(iter(s.configure_train(3, s._model.arrays, ConfigRecord({}), grid)))  # type: ignore[arg-type]
    reply = grid.send_and_receive([instr])
    (msg,) = list(reply)
    assert msg.content["psfed.meta"][META_FRESH_STATE] is False  # type: ignore[index]
    fresh = LocalGrid(_app(), 2)
    instr2 = Message(instr.content, dst_node_id=fresh.node_ids[0], message_type="train.psfed")
    (msg2,) = list(fresh.send_and_receive([instr2]))
    assert msg2.content["psfed.meta"][META_FRESH_STATE] is True  # type: ignore[index]
    assert nid in grid.contexts


def test_build_train_reply_roundtrip_is_accepted_with_views() -> None:
    """The server's zero-copy values are read-only and never alias a writable buffer."""
    from psfed_robust.flower.testing import StaticGrid

    ensure_task_identity()
    d = 64
    s = PSFedAvg(min_train_nodes=2, min_available_nodes=2, fraction_evaluate=0.0,
                 masks=MaskSettings(fraction=0.5, seed=1))
    init = ArrayRecord({"w": Array(np.zeros(d, np.float32))})
    grid = StaticGrid([11, 12])
    msgs = list(s.configure_train(1, init, ConfigRecord({}), grid))
    replies = [
        roundtrip(build_train_reply(m, s._sent[m.metadata.dst_node_id].mask,
                                    np.full(s._sent[m.metadata.dst_node_id].mask.count, 2.0,
                                            np.float32), client_id=i))
        for i, m in enumerate(msgs)
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["accepted-replies"] == 2.0
    assert arrays is not None
    g = s.global_flat
    mask = s._sent[11].mask
    np.testing.assert_allclose(g[mask.data], 2.0)
    np.testing.assert_allclose(g[~mask.data], 0.0)
