"""The experiment driver on the batched NN engine: ``engine = "batched"`` with an image task.

A tiny synthetic scenario end to end (summary rows, curves equal to run_nn on the mapped
config), the key mapping, validation errors for NN keys on the wrong engine (and for keys the NN
engine does not honour), NNConfig errors re-raised naming the scenario key, the shipped NN
scenarios, and the same accuracy curve as the Flower engine for one digits point.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from experiments.keys import NN, ScenarioError, engine_label
from experiments.nn_point import nn_config, run_nn_point
from experiments.schema import load_scenario, parse_scenario
from psfed_robust.nn import run_nn

TINY: dict[str, Any] = {
    "name": "nn_tiny", "engine": "batched", "runs": 2, "rounds": 4, "seed": 1,
    "task": {"kind": "synthetic", "model": "cnn", "batch_size": 16, "lr": 0.05,
             "momentum_scope": "persistent"},
    "federation": {"clients": 4, "participants": 4},
    "attack": {"malicious": 1},
    "output": {"record_every": 2},
    "sweep": {"sharing.fraction": [0.5, 1.0], "attack.name": ["none", "alie"]},
}


def _scenario(**changes: Any) -> Any:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for dotted, value in changes.items():
        sec, _, leaf = dotted.rpartition(".")
        (raw.setdefault(sec, {}) if sec else raw)[leaf] = value
    return parse_scenario(raw)


def test_engine_label() -> None:
    assert engine_label("batched", "digits") == NN == engine_label("batched", "synthetic")
    assert engine_label("batched", "linear") == "batched"
    assert engine_label("flower", "digits") == "flower"


def test_driver_runs_a_tiny_nn_scenario(tmp_path: Path) -> None:
    from experiments.driver import run_scenario

    scen = _scenario()
    out = run_scenario(scen, tmp_path / "o", progress=False, plots=False, stream=None)
    rows = list(csv.DictReader(out.summary_csv.open()))
    metrics = {r["metric"] for r in rows}
    assert metrics == {"accuracy", "loss", "bytes_down", "bytes_up"}
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert len(acc) == 4 and all(0.0 <= float(r["steady"]) <= 1.0 for r in acc)
    tidy = list(csv.DictReader(out.tidy_csv.open()))
    # 4 points x 2 runs x 2 recorded rounds x 4 metrics
    assert len(tidy) == 4 * 2 * 2 * 4
    assert {r["round"] for r in tidy} == {"2", "4"}
    # partial sharing halves the bytes per direction (the same wire codec as the Flower path)
    by = {(float(r["sharing.fraction"]), r["attack.name"]): float(r["steady"]) for r in rows
          if r["metric"] == "bytes_up"}
    assert by[(0.5, "none")] < 0.6 * by[(1.0, "none")]


def test_point_result_is_run_nn_of_the_mapped_config() -> None:
    point = _scenario().points()[1]  # fraction 0.5, alie
    cfg = nn_config(point, seed=7)
    assert (cfg.task, cfg.model, cfg.clients, cfg.participants, cfg.runs, cfg.rounds) == (
        "synthetic", "cnn", 4, 4, 2, 4)
    assert (cfg.fraction, cfg.attack, cfg.malicious, cfg.momentum_scope, cfg.record_every,
            cfg.seed, cfg.batch_size) == (0.5, "alie", 1, "persistent", 2, 7, 16)
    res = run_nn_point(point, 7)
    direct = run_nn(cfg)
    np.testing.assert_array_equal(res.rounds, direct.rounds)
    for name, v in direct.metrics.items():
        np.testing.assert_array_equal(res.metrics[name], v)
    assert res.lower_is_better["accuracy"] is False


def test_attack_none_point_is_unarmed() -> None:
    cfg = nn_config(_scenario().points()[0], seed=1)
    assert cfg.attack == "none" and cfg.malicious == 0


@pytest.mark.parametrize(("changes", "key"), [
    ({"engine": "flower", "task.kind": "digits"}, "task.model"),  # cnn on Flower
    ({"task.dim": 8}, "task.dim"),  # an online-task key on the NN engine
    ({"federation.stepsize": 0.1}, "federation.stepsize"),
    ({"federation.scheduling": "bernoulli"}, "federation.scheduling"),
    ({"sharing.count": 3}, "sharing.count"),
    ({"task.model": "resnet"}, "task.model"),
    ({"task.lr_schedule": "step"}, "task.lr_schedule"),  # NNConfig: needs lr_step_rounds
    ({"task.momentum": 1.5}, "task.momentum"),
    ({"task.hidden": 32}, "task.hidden"),  # sizes the MLP only; the point's model is the CNN
    ({"task.local_steps": 2, "task.local_epochs": 3}, "task.local_epochs"),
    ({"task.lr_step_rounds": 5}, "task.lr_step_rounds"),  # constant schedule
])
def test_validation_names_the_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ScenarioError, match=key.replace(".", r"\.")):
        _scenario(**changes)  # parsing validates every sweep point


def test_nn_keys_refused_on_the_online_and_flower_engines() -> None:
    online = {"name": "lin", "engine": "batched", "runs": 1, "rounds": 10,
              "task": {"kind": "linear", "momentum": 0.5}}
    with pytest.raises(ScenarioError, match=r"task\.momentum.*batched engine does not use"):
        parse_scenario(online)
    flower = {"name": "fl", "engine": "flower", "runs": 1, "rounds": 2,
              "task": {"kind": "synthetic"}}
    with pytest.raises(ScenarioError, match=r"task\.kind"):
        parse_scenario(flower)


@pytest.mark.parametrize("name", ["digits_cnn", "cc_vs_cm_alie"])
def test_shipped_nn_scenarios_validate(name: str) -> None:
    from experiments.schema import validate_point

    scen = load_scenario(name)
    points = scen.points()
    assert len(points) >= 12
    for p in points:
        validate_point(p)
        assert engine_label(str(p.get("engine")), str(p.get("task.kind"))) == NN


def test_same_accuracy_curve_as_the_flower_engine_through_the_driver() -> None:
    from experiments.engines import run_point

    over = ['sweep.sharing.fraction=[0.5]', 'sweep.attack.name=["none"]',
            'sweep.defense.name=["mean"]', "runs=1", "rounds=3", "federation.clients=3",
            "federation.participants=3"]
    flower = load_scenario("digits_flower", over).points()[0]
    batched = load_scenario("digits_flower", [*over, "engine=batched"]).points()[0]
    a = run_point(flower, 5)
    b = run_point(batched, 5)
    assert b.info["engine"] == "nn-batched"
    np.testing.assert_allclose(b.metrics["accuracy"], a.metrics["accuracy"], atol=1e-9)
    np.testing.assert_allclose(b.metrics["loss"], a.metrics["loss"], rtol=1e-4)
