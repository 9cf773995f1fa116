"""Plugins and per-name parameters: ``--plugin FILE`` on run/list/theory, plugin paths in
``--set`` resolved against the current folder, and ``params_by_name`` tables that give each
attack (or rule) of a name sweep its own parameters, validated per point."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from experiments_fake import PLUGIN, tiny_scenario

import psfed_robust
from experiments.cli import main
from experiments.configs import attack_params_of, defense_params_of
from experiments.keys import ScenarioError, short_key
from experiments.schema import load_scenario, parse_scenario


def _plugin(folder: Path) -> tuple[Path, str]:
    """A plugin file registering an attack whose name is unique to ``folder``."""
    name = "boost_" + hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    path = folder / "my_attack.py"
    path.write_text(PLUGIN.format(name=name))
    return path, name


BASE = tiny_scenario("plug", runs=2, rounds=40, seed=1, malicious=2,
                     attack={"name": "gaussian", "malicious": 2})


def test_list_attacks_shows_the_plugins_attacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    _, name = _plugin(tmp_path)
    assert main(["list", "attacks"]) == 0
    assert name not in capsys.readouterr().out
    assert main(["list", "attacks", "--plugin", "my_attack.py"]) == 0
    out = capsys.readouterr().out
    assert f"{name}" in out and "params: factor" in out and "a test plugin" in out
    assert main(["list", "attacks", "--plugin", "missing.py"]) == 2
    assert "missing.py" in capsys.readouterr().err


def test_run_and_theory_take_plugin_flags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    _, name = _plugin(tmp_path)
    sets = ["--set", f"attack.name={name}", "--set", "attack.params={}", "--set", "runs=2",
            "--set", "rounds=40", "--set", 'sweep.sharing.fraction=[1.0, 0.5]',
            "--set", 'sweep.attack.name=["none"]', "--set", 'sweep.defense.name=["mean"]',
            "--set", 'sweep.defense.mode=["fill"]']
    sets[sets.index('sweep.attack.name=["none"]')] = f'sweep.attack.name=["none", "{name}"]'
    assert main(["run", "headline", "--plugin", "my_attack.py", *sets, "--out", "o",
                 "--quiet"]) == 0
    rows = (tmp_path / "o" / "summary.csv").read_text().splitlines()
    assert sum(f",{name}," in r for r in rows) == 4  # 2 fractions x 2 metrics
    assert main(["theory", "headline", "--plugin", "my_attack.py", *sets]) == 0
    assert name in capsys.readouterr().out


def test_set_plugins_resolve_against_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path, name = _plugin(tmp_path)
    # a shipped scenario lives in the package; the plugin is where the user stands
    s = load_scenario("headline", ['plugins=["my_attack.py"]', f"attack.name={name}",
                                   "attack.params={}", "sweep.attack.name=[\"none\"]"])
    assert s.get("plugins") == [str(path.resolve())]
    # the API's plugins= resolve against the current folder too
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    _, other = _plugin(sub)
    from experiments.api import load

    got = load({**BASE, "attack": {"name": other, "malicious": 2}}, plugins=["my_attack.py"])
    assert got.get("attack.name") == other
    with pytest.raises(ScenarioError, match=r"nope\.py"):
        load_scenario("headline", ['plugins=["nope.py"]'])


def test_sweep_over_attack_names_takes_each_ones_parameters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: None) -> None:
    monkeypatch.chdir(tmp_path)
    _, name = _plugin(tmp_path)
    raw = {**BASE, "plugins": ["my_attack.py"],
           "attack": {"name": "gaussian", "malicious": 2, "p_a": 0.5,
                      "params_by_name": {"gaussian": {"sigma": 2.0},
                                         "sign_flip": {"scale": 4.0},
                                         name: {"factor": 5.0}}},
           "sweep": {"attack.name": ["none", "gaussian", "sign_flip", name]}}
    pts = parse_scenario(raw).points()
    assert [attack_params_of(p) for p in pts] == [
        {}, {"sigma": 2.0, "p_a": 0.5}, {"scale": 4.0}, {"factor": 5.0}]  # sign_flip: no p_a
    # the failure: shared params of one attack break a sweep over others; by name works
    shared = {**raw, "attack": {"name": "gaussian", "malicious": 2, "params": {"sigma": 2.0}}}
    with pytest.raises(ScenarioError, match=r"attack\.params\.sigma: not a parameter of"):
        parse_scenario({**shared, "sweep": {"attack.name": [name]}})
    # by-name values win over the shared table; an override reaches one attack only
    both = {**raw, "attack": {**raw["attack"], "params": {"sigma": 1.0}}}
    s = parse_scenario(both)
    assert attack_params_of(s.points()[1])["sigma"] == 2.0
    res = psfed_robust.run(raw, overrides={f"attack.params_by_name.{name}.factor": 7.0})
    assert res.scenario.config["attack"]["params_by_name"][name] == {"factor": 7.0}
    assert res.scenario.config["attack"]["params_by_name"]["gaussian"] == {"sigma": 2.0}


def test_params_by_name_is_validated_per_point(tmp_path: Path) -> None:
    def attack(tables: Any) -> dict[str, Any]:
        return {**BASE, "attack": {"name": "gaussian", "malicious": 2,
                                   "params_by_name": tables}}

    with pytest.raises(ScenarioError,
                       match=r"attack\.params_by_name\.gaussian\.scale: .* not a parameter of "
                             r"'gaussian'; allowed: .*sigma"):
        parse_scenario(attack({"gaussian": {"scale": 2.0}}))
    with pytest.raises(ScenarioError, match="'gausian' is not registered"):
        parse_scenario(attack({"gausian": {"sigma": 2.0}}))
    with pytest.raises(ScenarioError, match="'none' takes no parameters"):
        parse_scenario(attack({"none": {"sigma": 2.0}}))
    with pytest.raises(ScenarioError, match=r"attack\.params_by_name: .* must be a table per"):
        parse_scenario(attack({"gaussian": 2.0}))
    with pytest.raises(ScenarioError, match=r"use .attack\.persistent."):
        parse_scenario(attack({"gaussian": {"persistent": True}}))
    with pytest.raises(ScenarioError, match="sigma"):  # builds per point: sigma must be > 0
        parse_scenario(attack({"gaussian": {"sigma": -1.0}}))
    with pytest.raises(ScenarioError, match=r"write attack\.params_by_name\.<attack name>"):
        parse_scenario({**BASE, "sweep": {"attack.params_by_name.gaussian": [1.0]}})


def test_sweep_of_a_per_name_parameter_and_defense_tables() -> None:
    raw = {**BASE, "defense": {"name": "trimmed_mean",
                               "params_by_name": {"trimmed_mean": {"beta": 0.25}}},
           "sweep": {"attack.params_by_name.gaussian.sigma": [0.5, 2.0],
                     "defense.name": ["mean", "trimmed_mean"]}}
    s = parse_scenario(raw)
    pts = s.points()
    assert [p.get("attack.params")["sigma"] for p in pts] == [0.5, 0.5, 2.0, 2.0]
    assert len({p.setting for p in pts}) == 4
    assert [defense_params_of(p) for p in pts][:2] == [{}, {"beta": 0.25}]
    assert short_key("attack.params_by_name.gaussian.sigma") == "gaussian.sigma"
    assert pts[3].label == "gaussian.sigma=2, defense=trimmed_mean"
