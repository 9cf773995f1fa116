"""Experiment driver: outputs, determinism across processes, resume after SIGKILL, CLI."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from experiments_fake import PLUGIN, tiny_toml

from experiments.cli import main
from experiments.driver import run_scenario
from experiments.schema import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parent.parent

TINY = tiny_toml("tiny", runs=3, rounds=120, seed=11,
                 sweep='"sharing.fraction" = [1.0, 0.25]\n"defense.name" = ["mean", "median"]\n')


def _env(hashseed: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = hashseed
    env["PYTHONPATH"] = str(ROOT)
    return env


def _cli(args: list[str], hashseed: str = "0", **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=ROOT, env=_env(hashseed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        **kw,  # type: ignore[arg-type]
    )


def test_outputs_are_tidy_and_complete(tmp_path: Path) -> None:
    import tomllib

    scen = parse_scenario(tomllib.loads(TINY))
    out = run_scenario(scen, tmp_path / "o", progress=False, plots=True, stream=None)
    rows = list(csv.DictReader(out.tidy_csv.open()))
    # 4 points x 3 runs x 12 recorded iterations x 2 metrics
    assert len(rows) == 4 * 3 * 12 * 2
    assert set(rows[0]) == {"point", "run", "round", "metric", "value"}
    keys = {(r["point"], r["run"], r["round"], r["metric"]) for r in rows}
    assert len(keys) == len(rows)
    summary = list(csv.DictReader(out.summary_csv.open()))
    assert len(summary) == 4 * 2
    for r in summary:
        assert float(r["ci_high_db"]) >= float(r["steady_db"])
    meta = (out.meta_json).read_text()
    assert '"scenario_digest"' in meta and '"versions"' in meta and '"seed"' in meta
    assert {p.name for p in out.plots} >= {"learning_curves.png", "steady_vs_fraction.png",
                                           "defense_comparison.png"}
    assert all(p.stat().st_size > 10_000 for p in out.plots)
    assert "| fraction | name |" in out.table or "| fraction |" in out.table


def test_same_scenario_two_processes_byte_identical(tmp_path: Path) -> None:
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    procs = [
        _cli(["run", str(scen), "--out", str(tmp_path / f"o{h}"), "--quiet", "--no-plots"], h)
        for h in ("1", "2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    for name in ("summary.csv", "tidy.csv"):
        a = (tmp_path / "o1" / name).read_bytes()
        assert a == (tmp_path / "o2" / name).read_bytes(), name


SLOW = TINY.replace("rounds = 120", "rounds = 3000").replace(
    '"defense.name" = ["mean", "median"]', '"defense.name" = ["mean", "median", "trimmed_mean"]'
).replace("runs = 3", "runs = 6")


def test_resume_after_sigkill_gives_exact_rows(tmp_path: Path) -> None:
    scen = tmp_path / "slow.toml"
    scen.write_text(SLOW)
    ref = tmp_path / "ref"
    p = _cli(["run", str(scen), "--out", str(ref), "--quiet", "--no-plots"])
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()

    out = tmp_path / "killed"
    victim = _cli(["run", str(scen), "--out", str(out), "--quiet", "--no-plots"])
    deadline = time.time() + 300
    while (not list((out / "parts").glob("*.json")) and time.time() < deadline
           and victim.poll() is None):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    done = sorted((out / "parts").glob("*.json"))
    assert 1 <= len(done) < 6, f"kill landed after {len(done)} of 6 points"
    assert not (out / "tidy.csv").exists()

    again = _cli(["run", str(scen), "--out", str(out), "--quiet", "--no-plots"])
    so, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()
    assert b"resuming" in so
    assert (out / "tidy.csv").read_bytes() == (ref / "tidy.csv").read_bytes()
    assert (out / "summary.csv").read_bytes() == (ref / "summary.csv").read_bytes()


def test_resume_refuses_a_different_scenario(tmp_path: Path) -> None:
    import tomllib



    run_scenario(parse_scenario(tomllib.loads(TINY)), tmp_path, progress=False, stream=None)
    other = parse_scenario(tomllib.loads(TINY.replace("seed = 11", "seed = 12")))
    with pytest.raises(ScenarioError, match="different scenario"):
        run_scenario(other, tmp_path, progress=False, stream=None)


@pytest.mark.parametrize("cmd", [[], ["run"], ["theory"], ["list"], ["schema"], ["reproduce"]])
def test_help_on_every_command(cmd: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*cmd, "--help"])
    assert info.value.code == 0
    assert "usage: psfed-robust" in capsys.readouterr().out


def test_list_commands(capsys: pytest.CaptureFixture[str]) -> None:
    for what in ("attacks", "defenses", "selectors", "keys", "scenarios"):
        assert main(["list", what]) == 0
    out = capsys.readouterr().out
    assert "sharing.fraction" in out and "[batched]" in out and "[flower+nn]" in out
    assert "gaussian" in out and "median" in out and "headline" in out
    assert "RandomMaskSelector" in out


def test_bad_scenario_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace('kind = "linear"', 'kind = "linear"\ndimension = 3'))
    out = tmp_path / "never"
    assert main(["run", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "task.dimension" in err and "allowed keys" in err
    assert not out.exists()
    assert main(["run", str(bad.with_name("missing.toml"))]) == 2


def test_theory_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["theory", "p2_mse_vs_m", "--set", "runs=2"]) == 0
    out = capsys.readouterr().out
    assert "theory steady-state" in out


def test_plugin_attack_usable_by_name_from_a_scenario(tmp_path: Path) -> None:
    import tomllib

    (tmp_path / "my_attack.py").write_text(PLUGIN.format(name="plugin_boost"))
    text = TINY.replace('name = "tiny"', 'name = "tiny"\nplugins = ["my_attack.py"]').replace(
        'name = "gaussian"', 'name = "plugin_boost"').replace(
        "params = { sigma = 0.5 }", "params = { factor = 50.0 }").replace("p_a = 0.5\n", "")
    (tmp_path / "s.toml").write_text(text)
    s = load_scenario(tmp_path / "s.toml", ["sweep.sharing.fraction=[1.0]",
                                            'sweep.defense.name=["mean"]'])
    assert "plugin_boost" in __import__("attacks").list_attacks()
    out = run_scenario(s, tmp_path / "o", progress=False, stream=None)
    boosted = out.summary_rows[0]["steady_db"]
    clean = run_scenario(
        parse_scenario(tomllib.loads(TINY.replace('name = "gaussian"', 'name = "none"')
                                     .replace("params = { sigma = 0.5 }", "")),
                       ), tmp_path / "c", progress=False, stream=None
    ).summary_rows[0]["steady_db"]
    assert boosted > clean + 3.0  # a 50x boosting attacker hurts the mean
    bad = text.replace("factor = 50.0", "factor = -1.0")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(ScenarioError, match="factor"):
        load_scenario(tmp_path / "bad.toml")
