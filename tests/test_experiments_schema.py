"""Scenario schema: validation errors name the key and the allowed values; sweeps expand."""

from __future__ import annotations

import pytest

from experiments.keys import key
from experiments.schema import (
    ScenarioError,
    apply_overrides,
    load_scenario,
    parse_scenario,
    schema_markdown,
    shipped_scenarios,
)

BASE = {
    "name": "t",
    "runs": 2,
    "rounds": 20,
    "task": {"kind": "linear", "dim": 8},
    "federation": {"clients": 6, "participants": 3},
    "attack": {"name": "gaussian", "malicious": 1, "params": {"sigma": 0.5}},
}


def test_defaults_filled_and_sweep_cartesian_in_order() -> None:
    raw = dict(BASE, sweep={"sharing.fraction": [1.0, 0.5], "attack.malicious": [0, 1, 2]})
    s = parse_scenario(raw)
    pts = s.points()
    assert len(pts) == 6
    assert [p.values for p in pts[:3]] == [
        (("sharing.fraction", 1.0), ("attack.malicious", 0)),
        (("sharing.fraction", 1.0), ("attack.malicious", 1)),
        (("sharing.fraction", 1.0), ("attack.malicious", 2)),
    ]
    assert pts[4].get("sharing.fraction") == 0.5 and pts[4].get("attack.malicious") == 1
    assert s.get("defense.name") == key("defense.name").default
    assert s.get("federation.stepsize") == key("federation.stepsize").default


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (dict(BASE, bogus=1), "unknown top-level key 'bogus'"),
        (dict(BASE, task={"kind": "linear", "dimm": 3}), "unknown key 'task.dimm'"),
        (dict(BASE, task={"kind": "graph"}), "task.kind: 'graph' is not allowed; allowed values"),
        (dict(BASE, runs=0), "runs: 0 is out of range; must be > 0"),
        (dict(BASE, runs="3"), "runs: expected int"),
        (dict(BASE, sharing={"fraction": 1.5}), "sharing.fraction: 1.5 is out of range"),
        (dict(BASE, federation={"clients": 4, "participants": 5}),
         "federation.participants: sweep point 0 (base): (5) must be <= federation.clients"),
        (dict(BASE, attack={"name": "nope"}),
         "attack.name: sweep point 0 (base): 'nope' is not registered"),
        (dict(BASE, attack={"name": "gaussian", "params": {"sigmaa": 1}}), "sigmaa"),
        (dict(BASE, attack={"name": "gaussian", "params": {"sigma": -1.0}}), "sigma"),
        (dict(BASE, defense={"name": "nope"}),
         "defense.name: sweep point 0 (base): 'nope' is not registered"),
        (dict(BASE, sweep={"sharing.fractio": [1.0]}), "unknown key 'sharing.fractio'"),
        (dict(BASE, sweep={"sharing.fraction": []}), "must be a non-empty list"),
        (dict(BASE, sweep={"sharing.fraction": [1.0, 2.0]}), "sweep.sharing.fraction: 2.0 is out"),
        (dict(BASE, engine="flower"), "task.kind: 'linear' is not allowed on the flower engine"),
    ],
)
def test_bad_scenarios_name_the_key(raw: dict, needle: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert needle in str(info.value)


def test_overrides_and_sweep_override() -> None:
    raw = apply_overrides(
        dict(BASE, sweep={"attack.malicious": [0, 1]}),
        ["runs=3", "attack.malicious=2", "attack.params.sigma=0.25",
         "sweep.sharing.fraction=[1.0, 0.25]", 'defense.mode="reporters"'],
    )
    s = parse_scenario(raw)
    assert s.get("runs") == 3
    assert s.sweep == {"sharing.fraction": [1.0, 0.25]}  # explicit value replaced the axis
    assert s.get("attack.malicious") == 2
    assert s.get("attack.params")["sigma"] == 0.25
    assert s.get("defense.mode") == "reporters"
    with pytest.raises(ScenarioError, match="key=value"):
        apply_overrides(BASE, ["runs"])
    with pytest.raises(ScenarioError, match="needs a list"):
        apply_overrides(BASE, ["sweep.runs=3"])


def test_digest_changes_with_content() -> None:
    a = parse_scenario(BASE)
    b = parse_scenario(dict(BASE, seed=1))
    assert a.digest() == parse_scenario(BASE).digest()
    assert a.digest() != b.digest()


@pytest.mark.parametrize("path", shipped_scenarios(), ids=lambda p: p.stem)
def test_shipped_scenarios_are_valid(path) -> None:  # type: ignore[no-untyped-def]
    s = load_scenario(path)
    assert s.points()


def test_schema_doc_in_sync() -> None:
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "scenarios.md").read_text()
    assert schema_markdown() in doc, "regenerate docs/scenarios.md: psfed-robust schema"


def test_defense_pre_reaches_the_rule_with_the_declared_f() -> None:
    from experiments.configs import defense_params_of, online_config

    raw = dict(BASE, federation={"clients": 12, "participants": 9},
               defense={"name": "median", "f": 2, "pre": ["nnm", {"name": "bucketing", "s": 2}]})
    point = parse_scenario(raw).points()[0]
    params = defense_params_of(point)
    assert params["pre"] == ["nnm", {"name": "bucketing", "s": 2}] and params["f"] == 2
    cfg = online_config(point)
    assert dict(cfg.defense_params)["pre"] == params["pre"]


def test_defense_pre_specs_and_chained_preconditions_fail_before_work() -> None:
    with pytest.raises(ScenarioError, match=r"defense\.pre"):
        parse_scenario(dict(BASE, defense={"pre": [3]}))
    with pytest.raises(ScenarioError, match="defense"):
        parse_scenario(dict(BASE, defense={"pre": ["no_such_rule"]}))
    # bucketing(s=2) leaves ceil(n/2) rows; krum(f=1) needs more than 2f + 2 = 4 of them
    raw = dict(BASE, federation={"clients": 12, "participants": 8},
               defense={"name": "krum", "f": 1, "pre": [{"name": "bucketing", "s": 2}]})
    with pytest.raises(ScenarioError, match="krum"):
        parse_scenario(raw)
    parse_scenario(dict(raw, federation={"clients": 12, "participants": 10}))
