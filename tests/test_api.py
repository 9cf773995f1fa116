"""The Python API (``psfed_robust.run``): in memory or into a folder, silent unless asked, the
same numbers as the CLI; the README's "Python API" example runs as written."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from experiments_fake import tiny_scenario

import psfed_robust
from experiments.cli import main
from experiments.driver import summary_columns
from experiments.keys import ScenarioError

ROOT = Path(__file__).resolve().parent.parent

TINY = tiny_scenario("tiny_api", runs=3, rounds=60, seed=5, malicious=2,
                     sweep={"sharing.fraction": [1.0, 0.125], "attack.name": ["none", "gaussian"]})


def test_import_psfed_robust_does_not_load_the_experiment_layer() -> None:
    code = ("import sys, psfed_robust; assert callable(psfed_robust.run); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('experiments', 'matplotlib')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_in_memory_run_writes_and_prints_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str],
        fake: None) -> None:
    monkeypatch.chdir(tmp_path)
    res = psfed_robust.run(TINY, overrides={"runs": 2})
    assert list(tmp_path.iterdir()) == []
    got = capfd.readouterr()
    assert got.out == "" and got.err == ""
    assert res.out is None and res.files == []
    # 4 points x 2 metrics, the columns of summary.csv, typed
    assert len(res.summary) == 8
    assert all(list(r) == summary_columns(res.scenario) for r in res.summary)
    assert {r["runs"] for r in res.summary} == {2}
    assert {r["sharing.fraction"] for r in res.summary} == {1.0, 0.125}
    assert all(isinstance(r["diverged"], bool) for r in res.summary)
    # tidy: 4 points x 2 runs x 6 recorded rounds x 2 metrics
    assert set(res.tidy) == {"point", "run", "round", "metric", "value"}
    assert len(res.tidy["value"]) == 4 * 2 * 6 * 2
    assert res.tidy["value"].dtype == np.float64 and set(res.tidy["metric"]) == {
        "global_mse", "local_mse"}
    assert res.meta["scenario"]["runs"] == 2 and len(res.meta["points"]) == 4
    # worst case over the one attack, per fraction, beside the no-attack value
    assert [w["worst_attack"] for w in res.worst_case] == ["gaussian", "gaussian"]
    assert "worst case over attacks" in res.worst_case_table


def test_out_writes_what_the_cli_writes_and_matches_in_memory(tmp_path: Path, fake: None) -> None:
    mem = psfed_robust.run(TINY)
    res = psfed_robust.run(TINY, out=tmp_path / "o")
    assert res.out == tmp_path / "o"
    names = {p.name for p in res.files}
    assert {"tidy.csv", "summary.csv", "meta.json", "worst_case.csv", "worst_case.md"} <= names
    assert all(p.is_file() for p in res.files)
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert len(rows) == len(res.summary) == len(mem.summary)
    for disk, a, b in zip(rows, res.summary, mem.summary, strict=True):
        assert list(disk) == list(a)
        assert a == b or all(a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k])
                                              and math.isnan(b[k])) for k in a)
        assert float(disk["steady_db"]) == pytest.approx(a["steady_db"], rel=1e-9)
    assert json.loads((tmp_path / "o" / "meta.json").read_text()) == res.meta
    for k in ("point", "run", "round", "value"):
        np.testing.assert_array_equal(res.tidy[k], mem.tidy[k])


def test_progress_prints_one_line_per_point_and_the_tables(
        capfd: pytest.CaptureFixture[str], fake: None) -> None:
    psfed_robust.run(TINY, progress=True)
    got = capfd.readouterr()
    lines = got.err.strip().splitlines()
    assert len(lines) == 4 and all(re.match(r"\[\d/4\] fraction=", ln) for ln in lines)
    assert "| fraction | attack |" in got.out and "worst case over attacks" in got.out


def test_errors_name_the_key(fake: None) -> None:
    with pytest.raises(ScenarioError, match=r"sharing\.fractoin"):
        psfed_robust.run(TINY, overrides={"sharing.fractoin": 0.5})
    with pytest.raises(ScenarioError, match="overrides must be a dict"):
        psfed_robust.run(TINY, overrides=["runs=2"])  # type: ignore[arg-type]
    with pytest.raises(ScenarioError, match="not found"):
        psfed_robust.run("no_such_scenario_anywhere")
    with pytest.raises(ScenarioError, match="scenario must be"):
        psfed_robust.run(42)


def test_api_and_cli_give_the_same_numbers(tmp_path: Path) -> None:
    """The real engine: overrides as a dict == the same --set on the command line."""
    ov = {"runs": 2, "rounds": 100, "sweep.sharing.fraction": [1.0, 0.125],
          "sweep.attack.name": ["none", "gaussian", "sign_flip"], "sweep.defense.name": ["mean"],
          "sweep.defense.mode": ["fill"], "output.plots": False}
    res = psfed_robust.run("headline", overrides=ov)
    sets = [a for k, v in ov.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["run", "headline", *sets, "--out", str(tmp_path), "--quiet"]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [float(r["steady_db"]) for r in rows] == pytest.approx(
        [r["steady_db"] for r in res.summary], rel=1e-9)  # the CSV holds 10 digits


def _readme_api_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_readme_python_api_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = _readme_api_block()
    assert "psfed_robust.run(" in code
    scope: dict[str, Any] = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    res = scope["res"]
    assert res.out is None and res.summary and res.worst_case
    assert "worst case over attacks" in capsys.readouterr().out
    assert {w["defense.name"] for w in res.worst_case} == {"mean", "trimmed_mean"}
