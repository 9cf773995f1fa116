"""Digits accuracy and bytes: PSFedAvg at fraction 0.5 against Flower's own FedAvg.

4 clients (IID), 20 rounds, the 2-layer MLP, central evaluation of the global model on the fixed
360-image test set. Both strategies run the same ClientApp (the digits app) through the same
in-process runtime, :class:`psfed_robust.flower.testing.LocalGrid` (persistent per-node
Contexts, every message deflated/inflated as Flower serializes it), and bytes are the serialized
train messages, down + up, counted the same way for both.
"""

from __future__ import annotations

import pytest
from flwr.supercore.task_identity import TaskIdentity

from psfed_robust.flower.apps.digits_client import app as client_app
from psfed_robust.flower.apps.digits_server import DigitsResult, run_digits
from psfed_robust.flower.testing import LocalGrid

ROUNDS = 20
CLIENTS = 4


def _run(strategy: str, **extra: bool | float | int | str) -> tuple[DigitsResult, LocalGrid]:
    rc: dict[str, bool | float | int | str] = {
        "strategy": strategy,
        "num-server-rounds": ROUNDS,
        "min-nodes": CLIENTS,
        "fraction": 0.5,
        "seed": 0,
        **extra,
    }
    grid = LocalGrid(client_app, CLIENTS, run_config=rc)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    return run_digits(grid, rc), grid


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[DigitsResult, LocalGrid]]:
    return {"fedavg": _run("fedavg"), "psfedavg": _run("psfedavg")}


@pytest.mark.slow
def test_fraction_half_reaches_095_with_at_most_055_of_fedavg_bytes(
    runs: dict[str, tuple[DigitsResult, LocalGrid]],
) -> None:
    fed, fed_grid = runs["fedavg"]
    ps, ps_grid = runs["psfedavg"]
    ratio = ps.train_bytes / fed.train_bytes
    msg = (
        f"PSFedAvg f=0.5: accuracy {ps.accuracy} bytes {ps.train_bytes}; FedAvg: accuracy "
        f"{fed.accuracy} bytes {fed.train_bytes}; ratio {ratio:.4f}"
    )
    assert len(ps.accuracy) == ROUNDS, msg
    assert ps.final_accuracy >= 0.95, msg
    assert ratio <= 0.55, msg
    # sanity: the baseline trains too, and partial sharing really halves both directions
    assert fed.final_accuracy >= 0.95, msg
    assert ps.train_bytes_up <= 0.55 * fed.train_bytes_up, msg
    assert ps.train_bytes_down <= 0.6 * fed.train_bytes_down, msg
    # the ServerApp's MeteredGrid and the loopback's transport count the same bytes
    assert ps_grid.bytes_by(prefix="train") == {
        "down": ps.train_bytes_down,
        "up": ps.train_bytes_up,
    }
    assert fed_grid.bytes_by(prefix="train") == {
        "down": fed.train_bytes_down,
        "up": fed.train_bytes_up,
    }


@pytest.mark.slow
def test_every_client_kept_its_local_model(
    runs: dict[str, tuple[DigitsResult, LocalGrid]],
) -> None:
    from psfed_robust.flower.protocol import STATE_LOCAL, STATE_META

    _, grid = runs["psfedavg"]
    for ctx in grid.contexts.values():
        assert STATE_LOCAL in ctx.state, "the local model must persist in context.state"
        meta = ctx.state.config_records[STATE_META]
        assert meta["rounds-trained"] == ROUNDS
