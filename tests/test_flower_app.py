"""The digits Flower App: data/model, run config, FAB packaging, the in-process runtime, and a
real local simulation with 10 SuperNodes (``flwr run . local``)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from flower_helpers import REPO, flwr_bin, local_home, parse_result
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from psfed_robust.flower import digits
from psfed_robust.flower.apps.digits_client import app as client_app
from psfed_robust.flower.apps.digits_config import DigitsRunConfig
from psfed_robust.flower.apps.digits_server import run_digits
from psfed_robust.flower.metering import message_bytes
from psfed_robust.flower.testing import LocalGrid, transport


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


# ---------------------------------------------------------------- data and model
def test_split_is_fixed_and_complete() -> None:
    s = digits.load_split()
    assert s.x_train.shape == (1437, 64) and s.x_test.shape == (360, 64)
    assert s.x_train.dtype == np.float32 and 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
    assert set(np.unique(s.y_test)) == set(range(10))
    again = digits.load_split.__wrapped__(360, 0)  # bypass the cache: same numbers
    np.testing.assert_array_equal(s.y_test, again.y_test)
    other = digits.load_split.__wrapped__(360, 1)
    assert not np.array_equal(s.y_test, other.y_test)


@pytest.mark.parametrize("partitioning", ["iid", "dirichlet"])
@pytest.mark.parametrize("k", [1, 4, 10])
def test_partitions_are_disjoint_nonempty_and_cover(partitioning: str, k: int) -> None:
    y = digits.load_split().y_train
    parts = [
        digits.partition_indices(y, i, k, partitioning=partitioning, alpha=0.1) for i in range(k)
    ]
    assert all(len(p) > 0 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) == len(np.unique(allidx))
    if partitioning == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_partition_arguments_are_validated() -> None:
    y = digits.load_split().y_train
    with pytest.raises(ValueError, match="partition_id"):
        digits.partition_indices(y, 4, 4)
    with pytest.raises(ValueError, match="partition must be one of"):
        digits.partition_indices(y, 0, 4, partitioning="zipf")
    with pytest.raises(ValueError, match="alpha"):
        digits.partition_indices(y, 0, 4, partitioning="dirichlet", alpha=0.0)


def test_model_is_the_2_layer_mlp_and_deterministic() -> None:
    a, b = digits.make_model(64, 0), digits.make_model(64, 0)
    assert sum(p.numel() for p in a.parameters()) == 64 * 64 + 64 + 64 * 10 + 10
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a(torch.zeros(3, 64)).shape == (3, 10)


# ---------------------------------------------------------------- run config
def test_run_config_defaults_match_pyproject() -> None:
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    parsed = DigitsRunConfig.from_run_config(cfg)
    for key, value in cfg.items():
        assert getattr(parsed, key.replace("-", "_")) == value, key


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("strategy", "krum", "strategy"),
        ("fraction", 0.0, "fraction"),
        ("lr", -1.0, "lr"),
        ("num-server-rounds", "x", "num-server-rounds"),
        ("partitioning", "zipf", "partitioning"),
    ],
)
def test_run_config_rejects_bad_values(key: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsRunConfig.from_run_config({key: value})


# ---------------------------------------------------------------- FAB packaging
def test_repository_root_builds_a_small_fab_without_the_venv() -> None:
    import zipfile
    from io import BytesIO

    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(REPO)
    names = zipfile.ZipFile(BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE / 10
    for needed in (
        "pyproject.toml",
        "psfed_robust/flower/apps/digits_server.py",
        "psfed_robust/flower/apps/digits_client.py",
        "psfed_robust/flower/digits.py",
        "psfed_robust/flower/strategy.py",
        "defenses/mean.py",
    ):
        assert needed in names
    assert not any(n.startswith((".venv/", "tests/", "results/", "build/")) for n in names)


def test_app_components_resolve() -> None:
    import tomllib

    from flwr.common.config import validate_config

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(cfg, check_module=True, project_dir=REPO)
    assert ok, errors


# ---------------------------------------------------------------- in-process runtime
def test_transport_counts_the_serialized_bytes() -> None:
    rec = RecordDict(
        {
            "arrays": ArrayRecord([np.arange(1000, dtype=np.float32)]),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    msg = Message(rec, dst_node_id=7, message_type="train")
    copy, n = transport(msg)
    assert n == message_bytes(msg)
    assert copy is not msg and copy.content["arrays"] is not msg.content["arrays"]
    np.testing.assert_array_equal(
        copy.content.array_records["arrays"]["0"].numpy(), np.arange(1000)
    )


def test_transport_computes_each_object_id_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """As Flower's push paths (no_object_id_recompute): one deflate of a record for its id and
    one for its contents, not one per level of the tree above it; same bytes and ids."""
    import hashlib

    from flwr.supercore.inflatable import inflatable_object

    rec = RecordDict({"arrays": ArrayRecord([np.arange(1000, dtype=np.float32)]),
                      "config": ConfigRecord({"server-round": 1, "x": "y"})})
    msg = Message(rec, dst_node_id=7, message_type="train")
    want_id = msg.object_id
    calls: list[int] = []
    real = ConfigRecord.deflate

    def counting(self: ConfigRecord) -> bytes:
        calls.append(1)
        return real(self)

    hashed: list[int] = []
    monkeypatch.setattr(ConfigRecord, "deflate", counting)
    monkeypatch.setattr(inflatable_object, "get_object_id",
                        lambda b: hashed.append(1) or hashlib.sha256(b).hexdigest())
    copy, n = transport(msg)
    assert len(calls) == 2
    assert len(hashed) <= 6  # Message, RecordDict, 2 records, Array, ArrayChunk: at most once
    assert n == message_bytes(msg) and copy.object_id == want_id


def test_loopback_turns_a_crash_into_an_error_reply_and_keeps_the_state() -> None:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        context.state["touched"] = ConfigRecord({"x": 1})
        raise RuntimeError("boom")

    grid = LocalGrid(app, 2)
    nid = grid.node_ids[0]
    msg = Message(RecordDict({"c": ConfigRecord({"a": 1})}), dst_node_id=nid, message_type="train")
    (reply,) = grid.send_and_receive([msg])
    assert reply.has_error() and "boom" in str(reply.error.reason)
    assert "touched" not in grid.contexts[nid].state


@pytest.mark.parametrize("strategy", ["psfedavg", "fedavg"])
def test_short_inprocess_run_trains_and_persists(strategy: str) -> None:
    rc: dict[str, bool | float | int | str] = {
        "strategy": strategy,
        "num-server-rounds": 3,
        "min-nodes": 3,
    }
    grid = LocalGrid(client_app, 3, run_config=rc)
    res = run_digits(grid, rc)
    assert len(res.accuracy) == 3 and res.final_accuracy > 0.5 > res.initial_accuracy
    assert res.train_bytes_down > 0 and res.train_bytes_up > 0
    if strategy == "psfedavg":
        # every client's persisted local model was trained once per round
        assert [h["local-rounds"] for h in res.history] == pytest.approx([1.0, 2.0, 3.0], rel=1e-12)
        assert all(h["accepted-replies"] == 3.0 for h in res.history)


def test_dirichlet_partitions_and_other_aggregators_run() -> None:
    rc: dict[str, bool | float | int | str] = {
        "num-server-rounds": 2,
        "min-nodes": 4,
        "partitioning": "dirichlet",
        "dirichlet-alpha": 0.3,
        "defense-name": "median",
        "aggregation-mode": "reporters",
    }
    grid = LocalGrid(client_app, 4, run_config=rc)
    res = run_digits(grid, rc)
    assert len(res.accuracy) == 2 and res.history[-1]["accepted-replies"] == 4.0


def test_psfed_client_evaluation_runs_in_process() -> None:
    rc: dict[str, bool | float | int | str] = {
        "num-server-rounds": 2,
        "min-nodes": 2,
        "fraction-evaluate": 1.0,
    }
    grid = LocalGrid(client_app, 2, run_config=rc)
    res = run_digits(grid, rc)
    assert res.eval_bytes_down > 0 and res.eval_bytes_up > 0


# ---------------------------------------------------------------- (a) local simulation
SIM_TIMEOUT = 420.0


@pytest.mark.slow
@pytest.mark.deployment
def test_local_simulation_with_10_supernodes() -> None:
    """``flwr run . local --federation-config "num-supernodes=10 ..." --stream``, unchanged app."""
    with local_home("psfed-sim-") as lh:
        t0 = time.monotonic()
        rc, out = lh.run(
            [
                flwr_bin("flwr"),
                "run",
                ".",
                "local",
                "--stream",
                "--federation-config",
                "num-supernodes=10 client-resources-num-cpus=1",
                "--run-config",
                "num-server-rounds=3 min-nodes=10",
            ],
            "flwr-run",
            SIM_TIMEOUT,
        )
        elapsed = time.monotonic() - t0
        lh.adopt_superlinks()
        assert lh.ps.extra_pids, "flwr run . local left no local SuperLink to stop?\n" + out
        context = f"\n--- flwr run (rc={rc}, {elapsed:.0f}s) ---\n{out[-8000:]}\n" + (
            lh.ps.report()
        )
        assert rc == 0, context
        res = parse_result(out)
        assert res["strategy"] == "psfedavg" and res["num_nodes_seen"] == 10, context
        history = res["history"]
        assert isinstance(history, list) and len(history) == 3, context
        for r, h in enumerate(history, start=1):
            assert h["accepted-replies"] == 10.0, context
            # a weighted mean of equal values: equal up to rounding
            assert h["local-rounds"] == pytest.approx(r, rel=1e-12), context  # state on all 10
        accuracy = res["accuracy"]
        assert isinstance(accuracy, list) and accuracy[-1] > 0.5, context
        assert not math.isnan(float(accuracy[-1]))
