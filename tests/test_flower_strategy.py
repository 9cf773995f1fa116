"""PSFedAvg: sampling, selector context, shared payloads, dtype, defenses, adversary, metering,
dropouts and rejected replies (in-process Grid, no Ray)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from torch import nn

from psfed_robust.core.aggregation import psofed_server_step
from psfed_robust.core.mask import Mask
from psfed_robust.core.selectors import (
    ClientSpecificMaskSelector,
    GradientBasedSelector,
    MaskSelector,
    RandomMaskSelector,
    StructuredMaskSelector,
    TopKMagnitudeSelector,
)
from psfed_robust.flower import (
    AggregationSettings,
    MaskSettings,
    ProtocolSettings,
    PSFedAvg,
    PSFedClient,
    ServerAdversary,
    ThreatSettings,
    arrays_from_model,
    make_client_app,
    make_selector,
)
from psfed_robust.flower.protocol import KEY_DOWN, KEY_INIT, MSG_QUERY, MSG_TRAIN
from psfed_robust.flower.testing import LocalGrid, StaticGrid, build_train_reply

D_IN = 6


def model_fn() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D_IN, 4), nn.Tanh(), nn.Linear(4, 1))


def data(cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cid)
    x = torch.randn(20, D_IN, generator=g)
    return x, x.sum(dim=1, keepdim=True)


class Client(PSFedClient):
    def train_local(self, config: dict[str, Any]) -> int:
        x, y = data(int(self.client_id))  # type: ignore[arg-type]
        opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            loss = ((self.model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
        self.train_metrics["train-loss"] = float(loss.detach())
        return 20

    def evaluate_local(self, config: dict[str, Any]) -> tuple[float, int, dict[str, float]]:
        x, y = data(int(self.client_id))  # type: ignore[arg-type]
        with torch.no_grad():
            loss = float(((self.model(x) - y) ** 2).mean())
        return loss, 20, {"mse": loss}


def app() -> Any:
    return make_client_app(lambda ctx: Client(model_fn()))


def strategy(n: int, **kw: Any) -> PSFedAvg:
    kw.setdefault("masks", MaskSettings(fraction=0.5, seed=1))
    return PSFedAvg(min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n, **kw)


NO_EVAL = ProtocolSettings(evaluation="none")


class Spy(MaskSelector):
    """Records the context each select() call gets."""

    def __init__(self, inner: MaskSelector) -> None:
        super().__init__(inner.fraction)
        self.inner = inner
        self.calls: list[dict[str, Any]] = []
        type(self).required_context = inner.required_context  # type: ignore[misc]
        type(self).per_client = inner.per_client  # type: ignore[misc]

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        self.calls.append({"round": round_num, **context})
        return self.inner.select(num_parameters, round_num, **context)


# ---------------------------------------------------------------------------- sampling
def test_waits_for_min_available_nodes_before_sampling() -> None:
    class GrowingGrid(StaticGrid):
        def __init__(self) -> None:
            super().__init__(range(1, 11))
            self.calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return list(range(1, 11))[: min(10, 2 * self.calls)]

    s = PSFedAvg(min_train_nodes=2, min_available_nodes=10, fraction_train=0.5,
                 protocol=ProtocolSettings(poll_interval=0.0))
    msgs = list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(8, np.float32))}),
                                  ConfigRecord(), GrowingGrid()))
    assert len(msgs) == 5  # 0.5 x 10, not 0.5 x 2 (Flower's round-1 under-sampling)


def test_shared_payload_object_and_dtype_float64() -> None:
    s = strategy(4, masks=MaskSettings(strategy="random", fraction=0.5, seed=1))
    g = np.arange(30, dtype=np.float64)
    arrays = ArrayRecord({"a": Array(g[:10].reshape(2, 5)), "b": Array(g[10:])})
    msgs = list(s.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), StaticGrid([5, 6, 7, 8])))
    assert len({id(m.content) for m in msgs}) == 1  # one RecordDict -> uploaded once
    assert all(m.metadata.message_type == MSG_TRAIN for m in msgs)
    assert KEY_INIT in msgs[0].content and KEY_DOWN in msgs[0].content
    replies = [build_train_reply(m, s._sent[m.metadata.dst_node_id].mask,
                                 np.full(15, 1.5, np.float64), client_id=i, num_examples=3)
               for i, m in enumerate(msgs)]
    out, metrics = s.aggregate_train(1, replies)
    assert out is not None and metrics is not None
    assert out["a"].dtype == "float64" and tuple(out["a"].shape) == (2, 5)
    mask = s.current_mask
    assert mask is not None
    flat = np.concatenate([out["a"].numpy().ravel(), out["b"].numpy()])
    np.testing.assert_array_equal(flat[mask.data], 1.5)
    np.testing.assert_array_equal(flat[~mask.data], g[~mask.data])
    assert metrics["bytes-down-unique"] < metrics["bytes-down-total"]


# ---------------------------------------------------------------------------- selector context
def test_topk_gets_flat_model_and_structured_gets_layout() -> None:
    for inner in (TopKMagnitudeSelector(0.25), StructuredMaskSelector(0.5)):
        spy = Spy(inner)
        s = strategy(3, masks=MaskSettings(selector=spy))
        arrays = arrays_from_model(model_fn())
        s.configure_train(1, arrays, ConfigRecord(), StaticGrid([1, 2, 3]))
        assert len(spy.calls) == 1  # one selection for all clients (client-independent)
        fm = spy.calls[0]["flat_model"]
        np.testing.assert_allclose(fm.flatten_numpy(), s.global_flat)
        assert [i.name for i in fm.tensor_infos] == list(arrays.keys())
    mask = s.current_mask
    assert mask is not None and 0 < mask.count < s.num_parameters


def test_client_specific_gets_stable_ids_and_masks_differ() -> None:
    spy = Spy(ClientSpecificMaskSelector(0.4, seed=9))
    s = strategy(3, masks=MaskSettings(selector=spy), protocol=NO_EVAL)
    grid = LocalGrid(app(), 3, node_configs=[{"partition-id": p} for p in (7, 8, 9)])
    s.start(grid, arrays_from_model(model_fn()), num_rounds=2)
    assert sorted({c["client_id"] for c in spy.calls}) == [7, 8, 9]
    assert any(m.metadata.message_type == MSG_QUERY for m in grid.sent)  # identity query
    masks = list(s._last_masks.values())
    assert masks[0] != masks[1]
    assert all(h["accepted-replies"] == 3 for h in s.history)


def test_gradient_selector_gets_client_scores_after_round_one() -> None:
    spy = Spy(GradientBasedSelector(0.3))
    s = strategy(2, masks=MaskSettings(selector=spy), protocol=NO_EVAL)
    grid = LocalGrid(app(), 2)
    s.start(grid, arrays_from_model(model_fn()), num_rounds=3)
    assert spy.calls, "selector never called"
    assert min(c["round"] for c in spy.calls) == 2  # round 1: documented random fallback
    for c in spy.calls:
        assert c["gradients"].shape == (s.num_parameters,)
        assert np.all(np.isfinite(c["gradients"]))
    assert all(h["accepted-replies"] == 2 for h in s.history)


def test_mask_strategy_strings() -> None:
    for name in ("random", "topk", "gradient", "structured", "client_specific", "round_robin",
                 "round_robin_per_client"):
        assert isinstance(make_selector(name, 0.5, 1), MaskSelector)
    with pytest.raises(ValueError, match="allowed"):
        make_selector("nope", 0.5)


# ---------------------------------------------------------------------------- aggregation
def _round_inputs(s: PSFedAvg, n: int = 4) -> tuple[list[Message], np.ndarray]:
    g0 = np.linspace(-1, 1, 16).astype(np.float32)
    msgs = list(s.configure_train(1, ArrayRecord({"w": Array(g0)}), ConfigRecord(),
                                  StaticGrid(range(10, 10 + n), {10 + i: i for i in range(n)})))
    return msgs, g0


def _constant_replies(s: PSFedAvg, msgs: list[Message]) -> tuple[Mask, list[Message]]:
    """Client i replies ``i`` on every coordinate of the (shared) mask sent to the first client."""
    mask = s._sent[msgs[0].metadata.dst_node_id].mask
    replies = [build_train_reply(m, mask, np.full(mask.count, float(i), np.float32),
                                 client_id=i) for i, m in enumerate(msgs)]
    return mask, replies


@pytest.mark.parametrize("mode", ["fill", "reporters"])
def test_median_defense_both_modes(mode: str) -> None:
    s = strategy(5, masks=MaskSettings(strategy="client_specific", fraction=0.5, seed=1),
                 aggregation=AggregationSettings(rule="median", mode=mode))
    msgs, g0 = _round_inputs(s, 5)
    replies, rows, masks = [], [], []
    for i, m in enumerate(msgs):
        mask = s._sent[m.metadata.dst_node_id].mask
        vals = np.full(mask.count, 1.0 if i < 4 else 1e6, np.float32)  # one outlier
        replies.append(build_train_reply(m, mask, vals, client_id=i, num_examples=1))
        u = g0.copy()
        u[mask.data] = vals
        rows.append(u)
        masks.append(mask.data)
    out, _ = s.aggregate_train(1, replies)
    assert out is not None
    got = out["w"].numpy()
    from defenses import get_defense

    ref = get_defense("median")(torch.tensor(np.stack(rows)), torch.tensor(np.stack(masks)),
                                torch.tensor(g0), mode=mode).numpy()
    np.testing.assert_allclose(got, ref)
    reporters = np.stack(masks).sum(axis=0)
    robust = np.ones_like(reporters, dtype=bool) if mode == "fill" else reporters >= 3
    assert np.all(np.abs(got[robust]) < 10)  # the outlier never wins a 3+-row median


def test_mean_fill_is_psofed_step_with_weighting() -> None:
    for weighting, w in (("participants", 1 / 4), ("all", 1 / 4), ("expected", 1 / 4)):
        s = strategy(4, aggregation=AggregationSettings(weighting=weighting))
        msgs, g0 = _round_inputs(s)
        mask, replies = _constant_replies(s, msgs)
        out, _ = s.aggregate_train(1, replies)
        assert out is not None
        u = torch.tensor(g0).repeat(4, 1)
        for i in range(4):
            u[i, torch.from_numpy(mask.indices)] = float(i)
        mk = torch.from_numpy(mask.data.copy()).repeat(4, 1)
        ref = psofed_server_step(u, mk, torch.tensor(g0), weights=torch.full((4,), w))
        np.testing.assert_allclose(out["w"].numpy(), ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mean_fill_mixed_masks_and_unnormalised_weights_match_core_step(dtype: Any) -> None:
    """The indexed path (dense + seeded + index masks, weights not summing to one) equals
    PSO-Fed's step ``g + Σ_k ω_k T_k (u_k − g)`` computed densely by the core function."""
    from psfed_robust.flower._aggregate import Checked, aggregate, coverage
    from psfed_robust.flower._model import Layout
    from psfed_robust.flower.validation import ValidUpdate

    rng = np.random.default_rng(7)
    D = 1000
    g0 = rng.standard_normal(D).astype(dtype)
    seeded = RandomMaskSelector(fraction=0.3, seed=3).select(D, round_num=2)
    other = Mask.from_indices(rng.choice(D, 50, replace=False), D)
    masks = [Mask.all_true(D), seeded, seeded, other, Mask.all_false(D), Mask.all_true(D)]
    vals = [rng.standard_normal(m.count).astype(dtype) for m in masks]
    valid = [ValidUpdate(node_id=i, client_id=i, mask=m, values=v, num_examples=1)
             for i, (m, v) in enumerate(zip(masks, vals, strict=True))]
    w = torch.tensor([0.05, 0.2, 0.1, 0.3, 0.15, 0.1], dtype=torch.float64)  # sums to 0.9
    lay = Layout(keys=["w"], shapes=[(D,)], dtypes=[np.dtype(dtype)], offsets=[0, D],
                 dtype=np.dtype(dtype), size=D)
    checked = Checked(valid=valid, masks=masks)
    got = aggregate(strategy(6).aggregator, checked, g0, lay, w, mode="fill", server_round=1)
    assert got is not None and got.dtype == dtype
    u = torch.tensor(g0, dtype=torch.float64).repeat(len(masks), 1)
    mk = torch.zeros((len(masks), D), dtype=torch.bool)
    for i, (m, v) in enumerate(zip(masks, vals, strict=True)):
        u[i, torch.from_numpy(m.indices)] = torch.from_numpy(v.astype(np.float64))
        mk[i, torch.from_numpy(m.indices)] = True
    ref = psofed_server_step(u, mk, torch.tensor(g0, dtype=torch.float64), weights=w).numpy()
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    assert coverage(masks, D) == 1.0


def test_server_side_omniscient_adversary() -> None:
    s_honest = strategy(4, protocol=NO_EVAL)
    adversary = ServerAdversary("ipm", {0, 1}, params={"epsilon": 5.0})
    s_attacked = strategy(4, protocol=NO_EVAL, threat=ThreatSettings(adversary=adversary))
    init = arrays_from_model(model_fn())
    s_honest.start(LocalGrid(app(), 4), init, num_rounds=1)
    s_attacked.start(LocalGrid(app(), 4), init, num_rounds=1)
    g0 = np.concatenate([a.numpy().ravel() for a in init.values()])
    mask = s_honest.current_mask
    assert mask is not None
    d_h = s_honest.global_flat - g0
    d_a = s_attacked.global_flat - g0
    # IPM with eps=5 from half the clients flips the aggregate step on the shared coordinates
    assert float(np.dot(d_h[mask.data], d_a[mask.data])) < 0
    np.testing.assert_array_equal(d_a[~mask.data], 0)
    assert adversary.attacked_rows == [2]  # clients 0 and 1 of the round's 4 replies


# ---------------------------------------------------------------------------- failures
def test_dropouts_round_completes_and_all_dropped_keeps_model() -> None:
    s = strategy(4, protocol=NO_EVAL)
    dropped = LocalGrid(app(), 4, drop=lambda nid, msg: nid == min(grid_ids))
    grid_ids = list(dropped.get_node_ids())
    s.start(dropped, arrays_from_model(model_fn()), num_rounds=2)
    assert [h["accepted-replies"] for h in s.history] == [3, 3]
    assert all(h["missing-replies"] == 1 for h in s.history)

    s2 = strategy(3, protocol=NO_EVAL)
    init = arrays_from_model(model_fn())
    s2.start(LocalGrid(app(), 3, drop=lambda nid, msg: True), init, num_rounds=2)
    g0 = np.concatenate([a.numpy().ravel() for a in init.values()])
    assert s2.global_flat.tobytes() == g0.tobytes()


def test_tampered_replies_rejected_with_reasons_and_accept_failures() -> None:
    def tamper(nid: int, reply: Message) -> Message:
        if nid != bad:
            return reply
        c = reply.content
        c["psfed.metrics"]["num-examples"] = 0
        instruction = [m for m in grid.sent if m.metadata.dst_node_id == nid][-1]
        return Message(RecordDict(dict(c.items())), reply_to=instruction)

    grid = LocalGrid(app(), 4, tamper=tamper, serialize=False)
    bad = sorted(grid.get_node_ids())[0]
    s = strategy(4, protocol=NO_EVAL)
    s.start(grid, arrays_from_model(model_fn()), num_rounds=2)
    assert all(h["rejected.bad-num-examples"] == 1 for h in s.history)
    assert all(h["accepted-replies"] == 3 for h in s.history)

    s2 = strategy(4, protocol=NO_EVAL, accept_failures=False)
    init = arrays_from_model(model_fn())
    s2.start(grid, init, num_rounds=1)
    g0 = np.concatenate([a.numpy().ravel() for a in init.values()])
    assert s2.global_flat.tobytes() == g0.tobytes()


def test_client_exception_becomes_message_error() -> None:
    s = strategy(2, protocol=NO_EVAL)
    grid = LocalGrid(app(), 2, node_configs=[{"partition-id": 0}, {"no-id": 1}])
    s.start(grid, arrays_from_model(model_fn()), num_rounds=1)
    assert s.history[0]["rejected.message-error"] == 1
    assert s.history[0]["accepted-replies"] == 1


# ---------------------------------------------------------------------------- metering
def test_bytes_metrics_present_and_about_fraction_of_dense() -> None:
    big = nn.Linear(200, 100)  # 20,100 parameters

    class Noop(PSFedClient):
        def train_local(self, config: dict[str, Any]) -> int:
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(0.01)
            return 1

    for frac in (0.25, 0.5):
        s = strategy(3, masks=MaskSettings(fraction=frac, seed=1), protocol=NO_EVAL)
        grid = LocalGrid(make_client_app(lambda ctx: Noop(nn.Linear(200, 100))), 3)
        res = s.start(grid, arrays_from_model(big), num_rounds=2)
        m = res.train_metrics_clientapp[2]  # round 2: no first-contact init
        dense = m["bytes-dense-per-client"]
        assert dense > 4 * 20_100
        for key in ("bytes-down-per-client", "bytes-up-per-client"):
            ratio = m[key] / dense
            assert frac - 0.01 < ratio < frac + 0.03, (key, ratio)
        assert m["bytes-up-floor-per-client"] <= m["bytes-up-per-client"]
        assert m["bytes-down-floor-per-client"] <= m["bytes-down-per-client"]
        assert m["bytes-down-unique"] < m["bytes-down-total"]
        first = res.train_metrics_clientapp[1]
        assert first["bytes-down-per-client"] > dense  # first contact carries the dense init


# ---------------------------------------------------------------------------- round-trip reuse
def test_own_aggregate_is_not_reread_but_a_changed_record_is() -> None:
    s = strategy(4)
    msgs, _ = _round_inputs(s)
    _, replies = _constant_replies(s, msgs)
    out, _ = s.aggregate_train(1, replies)
    assert out is not None
    g1 = s._model.flat
    grid = StaticGrid(range(10, 14), {10 + i: i for i in range(4)})
    s.configure_train(2, out, ConfigRecord(), grid)  # Strategy.start hands the record back
    assert s._model.flat is g1  # not concatenated again
    np.testing.assert_array_equal(s.global_flat, out["w"].numpy())
    # the same record object with a replaced Array, or a fresh record: read again
    out["w"] = Array(np.full(16, 7.0, np.float32))
    s.configure_train(3, out, ConfigRecord(), grid)
    np.testing.assert_array_equal(s.global_flat, 7.0)
    fresh = ArrayRecord({"w": Array(np.full(16, 2.0, np.float32))})
    s.configure_train(4, fresh, ConfigRecord(), grid)
    np.testing.assert_array_equal(s.global_flat, 2.0)
    s.configure_train(5, out, ConfigRecord(), grid)  # no longer the strategy's own record
    np.testing.assert_array_equal(s.global_flat, 7.0)


def test_mixed_dtype_aggregate_is_reread() -> None:
    s = strategy(2, masks=MaskSettings(fraction=1.0, seed=1))
    arrays = ArrayRecord({"a": Array(np.zeros(4, np.float16)), "b": Array(np.zeros(4, np.float32))})
    grid = StaticGrid([5, 6], {5: 0, 6: 1})
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [build_train_reply(m, s._sent[m.metadata.dst_node_id].mask,
                                 np.full(8, 1 / 3, np.float32), client_id=i)
               for i, m in enumerate(msgs)]
    out, _ = s.aggregate_train(1, replies)
    assert out is not None
    s.configure_train(2, out, ConfigRecord(), grid)
    # the float16 layer holds the rounded value: the flat global is what the record says
    want = np.concatenate([out["a"].numpy().astype(np.float32), out["b"].numpy()])
    np.testing.assert_array_equal(s.global_flat, want)


# ---------------------------------------------------------------------------- train config
def test_train_config_sends_only_non_default_switches() -> None:
    from psfed_robust.flower.protocol import (
        CFG_CLIENT_ID,
        CFG_SEND_SCORES,
        CFG_UPLINK,
        CFG_UPLINK_ENCODING,
        KEY_CONFIG,
    )

    switches = (CFG_UPLINK, CFG_UPLINK_ENCODING, CFG_SEND_SCORES, CFG_CLIENT_ID)
    grid = StaticGrid([5, 6], {5: 0, 6: 1})
    arrays = ArrayRecord({"w": Array(np.zeros(8, np.float32))})
    s = strategy(2)
    # user entries with the protocol's names never reach the client
    user = ConfigRecord({"lr": 0.1, CFG_UPLINK: "client", CFG_SEND_SCORES: True,
                         CFG_CLIENT_ID: 9})
    cfg = next(iter(s.configure_train(1, arrays, user, grid))).content[KEY_CONFIG]
    assert not any(k in cfg for k in switches) and cfg["lr"] == 0.1
    # later rounds: client ids are known but not sent unless the strategy identifies clients
    msgs = list(s.configure_train(1, arrays, ConfigRecord(), grid))
    s.aggregate_train(1, [build_train_reply(m, s._sent[m.metadata.dst_node_id].mask,
                                            np.zeros(s._sent[m.metadata.dst_node_id].mask.count,
                                                     np.float32), client_id=i)
                          for i, m in enumerate(msgs)])
    msgs = list(s.configure_train(2, arrays, ConfigRecord(), grid))
    assert not any(k in m.content[KEY_CONFIG] for m in msgs for k in switches)
    assert len({id(m.content[KEY_CONFIG]) for m in msgs}) == 1
    s = strategy(2, masks=MaskSettings(strategy="gradient", encoding="bitmap"),
                 protocol=ProtocolSettings(uplink="client"))
    cfg = next(iter(s.configure_train(1, arrays, ConfigRecord(), grid))).content[KEY_CONFIG]
    assert cfg[CFG_UPLINK] == "client" and cfg[CFG_UPLINK_ENCODING] == "bitmap"
    assert cfg[CFG_SEND_SCORES] is True


def test_uplink_switches_written_by_the_server_read_back_by_the_client() -> None:
    """The one writer/reader pair of the uplink switches: defaults travel as absence."""
    from psfed_robust.flower.protocol import read_uplink_switches, write_uplink_switches

    cfg: dict[str, Any] = {"psfed-uplink": "client", "lr": 0.1}  # a user's stray switch
    write_uplink_switches(cfg, uplink="downlink", encoding="auto", fraction=None)
    assert cfg == {"lr": 0.1}
    assert read_uplink_switches(cfg) == ("downlink", "auto", None)
    write_uplink_switches(cfg, uplink="client", encoding="bitmap", fraction=0.25)
    assert read_uplink_switches(cfg) == ("client", "bitmap", 0.25)


# ---------------------------------------------------------------------------- deferred finite check
def test_fast_mean_defers_finite_check_and_still_rejects_non_finite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psfed_robust.flower._aggregate as strategy_mod
    import psfed_robust.flower.validation as validation_mod

    calls: list[int] = []
    real = validation_mod.all_finite

    def counting(x: Any) -> bool:
        calls.append(1)
        return real(x)

    monkeypatch.setattr(validation_mod, "all_finite", counting)
    monkeypatch.setattr(strategy_mod, "all_finite", counting)

    def replies_for(s: PSFedAvg, msgs: list[Message], bad: float | None) -> list[Message]:
        out = []
        for i, m in enumerate(msgs):
            mask = s._sent[m.metadata.dst_node_id].mask
            vals = np.full(mask.count, float(i), np.float32)
            if bad is not None and i == 1:  # a non-finite reply, then node 1's valid one
                nan_vals = vals.astype(np.float64)
                nan_vals[0] = bad
                out.append(build_train_reply(m, mask, nan_vals, client_id=i))
            out.append(build_train_reply(m, mask, vals, client_id=i))
        return out

    ref = strategy(4)
    msgs, _ = _round_inputs(ref)
    want, _ = ref.aggregate_train(1, replies_for(ref, msgs, None))
    assert want is not None
    assert len(calls) == 1  # the aggregate only, not each of the 4 replies
    for bad in (np.nan, np.inf, -np.inf, 1e300):  # 1e300: finite float64, Inf in float32
        s = strategy(4)
        msgs, _ = _round_inputs(s)
        got, metrics = s.aggregate_train(1, replies_for(s, msgs, bad))
        assert got is not None and metrics is not None
        assert metrics["rejected.non-finite"] == 1 and metrics["accepted-replies"] == 4
        assert "rejected.duplicate-reply" not in metrics  # as if checked before the duplicate
        assert got["w"].numpy().tobytes() == want["w"].numpy().tobytes()


def test_fast_mean_overflow_of_finite_replies_keeps_the_model() -> None:
    s = strategy(2, masks=MaskSettings(fraction=1.0, seed=1))
    msgs, g0 = _round_inputs(s, 2)
    big = np.finfo(np.float32).max
    replies = [build_train_reply(m, s._sent[m.metadata.dst_node_id].mask,
                                 np.full(16, big, np.float32), client_id=i, num_examples=1)
               for i, m in enumerate(msgs)]
    s.aggregation = AggregationSettings(weighting="expected")
    s.fraction_train = 0.25  # weights 1/(2·0.25) = 2: overflow
    out, metrics = s.aggregate_train(1, replies)
    assert out is not None and metrics is not None
    assert metrics["accepted-replies"] == 2 and metrics.get("rejected.non-finite", 0) == 0
    assert metrics["aggregation-failed"] == 1.0
    np.testing.assert_array_equal(s.global_flat, g0)
