"""PSFedClient: local state survives re-created clients, evaluation never writes state, client
ids, builder variants and the client-side attack seam (gaussian, sign flip, label flip)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from torch import nn

from psfed_robust.flower import (
    MaskSettings,
    ProtocolSettings,
    PSFedAvg,
    PSFedClient,
    ThreatSettings,
    _wire,
    arrays_from_model,
    make_client_app,
    resolve_client_id,
)
from psfed_robust.flower.protocol import KEY_UPDATE, PAYLOAD, STATE_LOCAL, STATE_THETA
from psfed_robust.flower.testing import LocalGrid

TRACE: dict[tuple[Any, int, str], np.ndarray] = {}


def model_fn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Linear(8, 2)


class Tracer(PSFedClient):
    """Records what it sees; every message builds a brand-new object (and model)."""

    def train_local(self, config: dict[str, Any]) -> int:
        TRACE[(self.client_id, self.server_round, "start")] = self.flat_model.flatten_numpy()
        g = torch.Generator().manual_seed(100 * int(self.client_id) + self.server_round)  # type: ignore[arg-type]
        x = torch.randn(16, 8, generator=g)
        y = self.poison_labels(torch.randint(0, 2, (16,), generator=g), 2)
        TRACE[(self.client_id, self.server_round, "labels")] = y.numpy()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        with torch.no_grad():
            for p in self.model.parameters():
                p -= 0.5 * p.grad  # type: ignore[operator]
        TRACE[(self.client_id, self.server_round, "after")] = self.flat_model.flatten_numpy()
        return 16

    def evaluate_local(self, config: dict[str, Any]) -> tuple[float, int, dict[str, float]]:
        TRACE[(self.client_id, self.server_round, "eval")] = self.flat_model.flatten_numpy()
        return 1.0, 4, {"acc": 0.5}


def run(rounds: int = 2, n: int = 3, **kw: Any) -> tuple[PSFedAvg, LocalGrid]:
    TRACE.clear()
    grid_kw = {k: kw.pop(k) for k in ("node_configs", "run_config") if k in kw}
    kw.setdefault("masks", MaskSettings(fraction=0.3, seed=2))
    if "evaluation" in kw:
        kw["protocol"] = ProtocolSettings(evaluation=kw.pop("evaluation"))
    if "client_attacks" in kw:
        kw["threat"] = ThreatSettings(client_attacks=kw.pop("client_attacks"),
                                      persistent=kw.pop("persistent", False))
    grid = LocalGrid(make_client_app(lambda ctx: Tracer(model_fn())), n, **grid_kw)
    s = PSFedAvg(min_train_nodes=n, min_available_nodes=n, min_evaluate_nodes=n, **kw)
    s.start(grid, arrays_from_model(model_fn()), num_rounds=rounds)
    return s, grid


def theta(grid: LocalGrid, nid: int) -> np.ndarray:
    rec = grid.contexts[nid].state[STATE_LOCAL]
    return rec[STATE_THETA].numpy().copy()  # type: ignore[union-attr]


def sent_values(grid: LocalGrid, nid: int, rnd: int) -> tuple[Any, np.ndarray]:
    replies = [r for r in grid.replies if r.metadata.src_node_id == nid
               and r.metadata.message_type == "train.psfed"]
    payload = replies[rnd - 1].content[KEY_UPDATE][PAYLOAD].numpy().tobytes()  # type: ignore[union-attr]
    return _wire.decode(payload, 18)


def test_unshared_local_values_survive_recreated_clients() -> None:
    s, grid = run(rounds=3, evaluation="none")
    masks = {r: s.mask_selector.select(18, r) for r in (1, 2, 3)}
    for nid, cid in s.node_client_ids.items():
        for r in (2, 3):
            start = TRACE[(cid, r, "start")]
            prev = TRACE[(cid, r - 1, "after")]
            m = masks[r].data
            np.testing.assert_array_equal(start[~m], prev[~m])  # kept from its own training
        np.testing.assert_array_equal(theta(grid, nid), TRACE[(cid, 3, "after")])
        assert grid.contexts[nid].state["psfed.meta"]["rounds-trained"] == 3  # type: ignore[index]
    # the clients really diverge from the global model on unshared coordinates
    assert not np.allclose(theta(grid, nid)[~masks[3].data], s.global_flat[~masks[3].data])


@pytest.mark.parametrize("evaluation", ["merged", "local", "global"])
def test_evaluation_never_overwrites_local_state(evaluation: str) -> None:
    s, grid = run(rounds=2, evaluation=evaluation)
    mask2 = s.mask_selector.select(18, 2).data
    g = s.global_flat
    for nid, cid in s.node_client_ids.items():
        local = TRACE[(cid, 2, "after")]
        np.testing.assert_array_equal(theta(grid, nid), local)  # eval did not write state
        seen = TRACE[(cid, 2, "eval")]
        if evaluation == "local":
            np.testing.assert_array_equal(seen, local)
        elif evaluation == "global":
            np.testing.assert_allclose(seen, g)
        else:  # merged: local model with the new global values on the client's last mask
            expect = local.copy()
            expect[mask2] = g[mask2]
            np.testing.assert_allclose(seen, expect)
    ev = s.history  # train history exists; evaluation metrics are aggregated
    assert ev


def test_resolve_client_id() -> None:
    def ctx(nc: dict[str, Any]) -> Context:
        return Context(run_id=1, node_id=2**63 + 5, node_config=nc, state=RecordDict(),
                       run_config={})

    assert resolve_client_id(ctx({"partition-id": 4})) == 4
    assert resolve_client_id(ctx({"partition-id": 4, "client-id": "site-a"})) == "site-a"
    assert resolve_client_id(ctx({"client-id": "12"})) == 12
    with pytest.raises(ValueError, match="partition-id"):
        resolve_client_id(ctx({}))


def test_function_builder_and_numeric_flow() -> None:
    calls: list[int] = []

    def train_fn(model: nn.Module, config: dict[str, Any], context: Context) -> int:
        calls.append(int(context.node_config["partition-id"]))
        assert config["lr"] == 0.1 and not any(k.startswith("psfed-") for k in config)
        with torch.no_grad():
            model.weight.add_(1.0)
        return 3

    from flwr.app import ConfigRecord

    app = make_client_app(model_fn=lambda ctx: model_fn(), train_fn=train_fn)
    grid = LocalGrid(app, 2)
    s = PSFedAvg(min_train_nodes=2, min_available_nodes=2, masks=MaskSettings(fraction=1.0),
                 protocol=ProtocolSettings(evaluation="none"))
    init = arrays_from_model(model_fn())
    s.start(grid, init, num_rounds=1, train_config=ConfigRecord({"lr": 0.1}))
    assert sorted(calls) == [0, 1]
    w0 = init["weight"].numpy().ravel()
    np.testing.assert_allclose(s.global_flat[: w0.size], w0 + 1.0, rtol=1e-6)
    with pytest.raises(ValueError):
        make_client_app()


# ---------------------------------------------------------------------------- attack seam
def test_gaussian_client_attack_server_assigned() -> None:
    s0, g0 = run(rounds=1, evaluation="none")
    s1, g1 = run(rounds=1, evaluation="none",
                 client_attacks={0: ("gaussian", {"p_a": 1.0, "sigma": 10.0})})
    for nid0, cid in s0.node_client_ids.items():
        nid1 = next(n for n, c in s1.node_client_ids.items() if c == cid)
        m0, v0 = sent_values(g0, nid0, 1)
        m1, v1 = sent_values(g1, nid1, 1)
        assert m0 == m1
        if cid == 0:
            assert np.abs(v1 - v0).max() > 1.0  # noise on the attacker's shared values
            np.testing.assert_array_equal(theta(g1, nid1), theta(g0, nid0))  # transmit-only
        else:
            np.testing.assert_array_equal(v1, v0)
    s2, _ = run(rounds=1, evaluation="none",
                 client_attacks={0: ("gaussian", {"p_a": 0.0, "sigma": 10.0})})
    assert s2.global_flat.tobytes() == s0.global_flat.tobytes()


def test_sign_flip_from_node_config_and_run_config() -> None:
    for kw in (
        {"node_configs": [{"partition-id": 0, "malicious": True, "attack": "sign_flip"},
                          {"partition-id": 1}, {"partition-id": 2}]},
        {"run_config": {"malicious-clients": "0", "attack": "sign_flip", "attack.scale": 2.0}},
    ):
        scale = 2.0 if "run_config" in kw else 1.0
        s, grid = run(rounds=1, evaluation="none", **kw)
        for nid, cid in s.node_client_ids.items():
            mask, vals = sent_values(grid, nid, 1)
            ref = TRACE[(cid, 1, "start")]
            after = TRACE[(cid, 1, "after")]
            if cid == 0:
                expect = (ref - scale * (after - ref))[mask.data]
            else:
                expect = after[mask.data]
            np.testing.assert_allclose(vals, expect, rtol=1e-6, atol=1e-6)


def test_label_flip_data_attack_via_poison_labels() -> None:
    run(rounds=1, evaluation="none", client_attacks={1: ("label_flip", {})})
    run_honest = dict(TRACE)
    run(rounds=1, evaluation="none")
    for cid in (0, 1, 2):
        y_att, y_hon = run_honest[(cid, 1, "labels")], TRACE[(cid, 1, "labels")]
        if cid == 1:
            np.testing.assert_array_equal(y_att, 1 - y_hon)
        else:
            np.testing.assert_array_equal(y_att, y_hon)


def test_error_reply_for_model_size_mismatch() -> None:
    grid = LocalGrid(make_client_app(lambda ctx: Tracer(nn.Linear(3, 1))), 2)
    s = PSFedAvg(min_train_nodes=2, min_available_nodes=2,
                 protocol=ProtocolSettings(evaluation="none"))
    s.start(grid, arrays_from_model(model_fn()), num_rounds=1)
    assert s.history[0]["rejected.message-error"] == 2
    errs = [r for r in grid.replies if r.has_error()]
    assert errs and "parameters" in str(errs[0].error.reason)
    assert isinstance(errs[0], Message)


def test_persistence_is_the_threat_model_setting_of_the_client_seam() -> None:
    """persistent=True: the attacker's stored local model is the poisoned one it sent (core
    attack_step); persistent=False: the trained one. Not an attack parameter."""
    atk = {0: ("sign_flip", {})}
    s_t, g_t = run(rounds=1, evaluation="none", client_attacks=atk)
    s_p, g_p = run(rounds=1, evaluation="none", client_attacks=atk, persistent=True)
    for s, grid, persistent in ((s_t, g_t, False), (s_p, g_p, True)):
        nid = next(n for n, c in s.node_client_ids.items() if c == 0)
        ref, after = TRACE[(0, 1, "start")], TRACE[(0, 1, "after")]
        poisoned = ref - (after - ref)
        np.testing.assert_allclose(theta(grid, nid), poisoned if persistent else after,
                                   rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="threat model"):
        ThreatSettings(client_attacks={0: ("sign_flip", {"persistent": True})})


def test_client_attack_state_is_explicit_and_survives_between_messages() -> None:
    """A stateful plugin attack counts its calls in ctx.state; the ClientApp is rebuilt per
    message, so the count lives in context.state (never on the attack object)."""
    import attacks

    name = "flower_test_counting"
    if name not in attacks.list_attacks():

        @attacks.register_attack(name)
        def counting(deltas: torch.Tensor, ctx: Any) -> torch.Tensor:
            ctx.state["calls"] = int(ctx.state.get("calls", 0)) + 1
            ctx.state["last"] = deltas[0].clone()
            return deltas * float(ctx.state["calls"])

    s, grid = run(rounds=3, evaluation="none", client_attacks={1: (name, {})})
    nid = next(n for n, c in s.node_client_ids.items() if c == 1)
    state = grid.contexts[nid].state
    assert state["psfed.attack-state.values"]["calls"] == 3  # type: ignore[index]
    last = state["psfed.attack-state.arrays"]["last"].numpy()  # type: ignore[index]
    np.testing.assert_allclose(last, TRACE[(1, 3, "after")] - TRACE[(1, 3, "start")],
                               rtol=1e-5, atol=1e-6)
    mask, vals = sent_values(grid, nid, 3)  # round 3 sends 3x the honest delta
    ref, after = TRACE[(1, 3, "start")], TRACE[(1, 3, "after")]
    np.testing.assert_allclose(vals, (ref + 3.0 * (after - ref))[mask.data], rtol=1e-5,
                               atol=1e-6)


def test_reply_writers_round_trip_through_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``train_reply`` / ``evaluate_reply`` / ``query_reply`` write, validation reads back
    field for field; a user metric never overrides a reserved one (num-examples, loss)."""
    from flwr.supercore.task_identity import TaskIdentity

    from psfed_robust.core.mask import Mask
    from psfed_robust.flower import _wire
    from psfed_robust.flower._arrays import array_from_numpy
    from psfed_robust.flower.protocol import MSG_EVALUATE, MSG_QUERY, MSG_TRAIN
    from psfed_robust.flower.validation import (
        evaluate_reply,
        parse_evaluate_reply,
        parse_query_reply,
        parse_train_reply,
        query_reply,
        train_reply,
    )

    for attr in ("_run_id", "_node_id", "_task_id"):  # a Message needs them; restored after
        monkeypatch.setattr(TaskIdentity, attr, 1)

    def instruction(kind: str) -> Message:
        return Message(RecordDict(), dst_node_id=7, message_type=kind)

    mask = Mask(np.array([True, False, True, False]))
    scores = np.array([0.0, 1.0, 2.0, 3.0], np.float32)
    reply = train_reply(
        instruction(MSG_TRAIN), _wire.encode_array(mask, np.array([1.5, -2.0], np.float32)),
        client_id=3, num_examples=5, fresh=True, metrics={"acc": 1, "num-examples": 99},
        scores=array_from_numpy(scores),
    )
    u = parse_train_reply(reply, model_size=4, model_dtype=np.dtype(np.float32), want_scores=True)
    assert (u.node_id, u.client_id, u.num_examples, u.fresh_state) == (7, 3, 5, True)
    assert u.metrics == {"acc": 1.0}
    np.testing.assert_array_equal(u.mask.data, mask.data)
    np.testing.assert_array_equal(u.values, [1.5, -2.0])
    assert u.scores is not None
    np.testing.assert_array_equal(u.scores, scores)

    ev = parse_evaluate_reply(evaluate_reply(
        instruction(MSG_EVALUATE), client_id="a", loss=0.5, num_examples=2,
        metrics={"loss": 9.0, "acc": 0.25}))
    assert (ev.client_id, ev.loss, ev.num_examples, ev.metrics) == ("a", 0.5, 2, {"acc": 0.25})

    assert parse_query_reply(query_reply(instruction(MSG_QUERY), client_id=4, has_local=True)) \
        == (4, True)
