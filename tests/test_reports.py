"""Reports: exact number formatting, the worst case over attacks (by hand), the figures a
sweep gets (heatmaps, faceted steady state with at most six lines a panel, pages beyond), and
one progress line per point off a terminal."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from experiments.driver import run_points, run_scenario
from experiments.figures import MAX_LINES
from experiments.report import (
    fmt_metric,
    fmt_value,
    frac_label,
    markdown_table,
    worst_case_markdown,
    worst_case_rows,
)
from experiments.schema import parse_scenario

BASE: dict[str, Any] = {
    "name": "rep", "runs": 3, "rounds": 60, "seed": 2,
    "task": {"kind": "linear", "dim": 8},
    "federation": {"clients": 8, "participants": 4},
    "attack": {"name": "gaussian", "malicious": 1, "p_a": 0.5,
               "params_by_name": {"gaussian": {"sigma": 0.5}, "sign_flip": {"scale": 2.0}}},
    "output": {"record_every": 10},
}


def test_number_formatting() -> None:
    assert [frac_label(v) for v in (1.0, 0.5, 0.125, 0.3, 3 / 64)] == [
        "1", "1/2", "1/8", "3/10", "3/64"]
    assert frac_label(math.pi / 10) == fmt_value(math.pi / 10) == "0.3141592654"
    assert fmt_value(0.125) == "0.125" and fmt_value(True) == "true" and fmt_value(4) == "4"
    assert fmt_metric("bytes_down", 9715.6) == "9716 B"
    assert fmt_metric("bytes_down", 10715.6) == "10.5 KiB"
    assert fmt_metric("bytes_up", 123456.0) == "121 KiB"
    assert fmt_metric("bytes_up", 5.0 * 2**20) == "5 MiB"
    assert fmt_metric("accuracy", 0.912345) == "0.9123"
    assert fmt_metric("global_mse", -9.204) == "-9.20"
    assert fmt_metric("rejected", 3.0) == "3" and fmt_metric("rejected", 0.25) == "0.25"
    assert fmt_metric("accuracy", math.nan) == "–"


def _row(point: int, attack: str, defense: str, fraction: float, db: float,
         diverged: bool = False, metric: str = "global_mse") -> dict[str, Any]:
    col = "steady_db" if metric.endswith("_mse") else "steady"
    lo, hi = (col.replace("steady", "ci_low"), col.replace("steady", "ci_high"))
    return {"point": point, "label": f"p{point}", "sharing.fraction": fraction,
            "attack.name": attack, "defense.name": defense, "metric": metric, "runs": 2,
            "diverged": diverged, col: db, lo: db - 1, hi: db + 1}


def _scenario(attacks: list[str], metric_rows: list[dict[str, Any]]) -> Any:
    raw = {**BASE, "sweep": {"sharing.fraction": [1.0, 0.125], "attack.name": attacks,
                             "defense.name": ["mean", "median"]}}
    return parse_scenario(raw)


def test_worst_case_by_hand() -> None:
    s = _scenario(["none", "gaussian", "sign_flip"], [])
    rows, i = [], 0
    table = {  # (fraction, defense) -> (none, gaussian, sign_flip) in dB
        (1.0, "mean"): (-20.0, 2.5, -18.0), (1.0, "median"): (-19.0, -19.5, -19.3),
        (0.125, "mean"): (-19.0, -9.2, -15.0), (0.125, "median"): (-2.0, -1.9, None)}
    for (f, d), vals in table.items():
        for a, v in zip(("none", "gaussian", "sign_flip"), vals, strict=True):
            rows.append(_row(i, a, d, f, 95.0 if v is None else v, diverged=v is None))
            rows.append({**_row(i, a, d, f, 0.0), "metric": "local_mse"})  # ignored
            i += 1
    worst = worst_case_rows(s, rows)
    got = {(w["sharing.fraction"], w["defense.name"]): (w["worst_attack"], w["worst"],
                                                        w["no_attack"], w["gap"]) for w in worst}
    assert got[(1.0, "mean")] == ("gaussian", 2.5, -20.0, 22.5)
    assert got[(1.0, "median")] == ("sign_flip", -19.3, -19.0, pytest.approx(-0.3))
    assert got[(0.125, "mean")] == ("gaussian", -9.2, -19.0, pytest.approx(9.8))
    w = next(w for w in worst if w["sharing.fraction"] == 0.125 and w["defense.name"] == "median")
    assert w["worst_attack"] == "sign_flip" and w["diverged"] and math.isnan(w["worst"])
    assert all(w["attacks_compared"] == 2 for w in worst)
    md = worst_case_markdown(s, worst)
    assert "| defense | fraction 1: worst (attack) | fraction 1: no attack | fraction 1/8: " in md
    assert "| mean | 2.50 (gaussian) | -20.00 | -9.20 (gaussian) | -19.00 |" in md
    assert "| median | -19.30 (sign_flip) | -19.00 | diverged (sign_flip) | -2.00 |" in md


def test_worst_case_of_accuracy_is_the_lowest() -> None:
    s = _scenario(["gaussian", "sign_flip"], [])
    rows = [_row(0, "gaussian", "mean", 1.0, 0.91, metric="accuracy"),
            _row(1, "sign_flip", "mean", 1.0, 0.42, metric="accuracy"),
            _row(2, "gaussian", "median", 1.0, 0.80, metric="accuracy"),
            _row(3, "sign_flip", "median", 1.0, 0.85, metric="accuracy")]
    worst = worst_case_rows(s, rows)
    assert [(w["worst_attack"], w["worst"], w["no_attack"]) for w in worst] == [
        ("sign_flip", 0.42, None), ("gaussian", 0.80, None)]
    assert "lower is worse" in worst_case_markdown(s, worst)


def test_table_prints_exact_swept_values(fake: None, tmp_path: Path) -> None:
    s = parse_scenario({**BASE, "output": {"record_every": 10, "plots": False},
                        "sweep": {"sharing.fraction": [1.0, 0.125]}})
    out = run_scenario(s, tmp_path, progress=False, stream=None)
    table = markdown_table(s, out.summary_rows)
    assert "| 0.125 |" in table and "0.12 |" not in table
    assert not (tmp_path / "worst_case.csv").exists()  # attacks not swept: no worst case


def test_full_report_of_a_sweep(fake: None, tmp_path: Path) -> None:
    """attack x defense x fraction x mode: worst_case.csv (checked against summary.csv),
    per-mode heatmaps, one steady-state page (3 defenses < 6 lines), pages for 12 lines."""
    raw = {**BASE, "sweep": {"sharing.fraction": [1.0, 0.5, 0.125],
                             "attack.name": ["none", "gaussian", "sign_flip"],
                             "defense.name": ["mean", "median", "trimmed_mean"],
                             "defense.mode": ["fill", "reporters"]}}
    out = run_scenario(parse_scenario(raw), tmp_path, progress=False, stream=None)
    names = {p.name for p in out.plots}
    assert {"heatmap_fill.png", "heatmap_reporters.png", "steady_vs_fraction.png",
            "defense_comparison.png", "learning_curves.png"} <= names
    assert "steady_vs_fraction_2.png" not in names  # 3 lines per panel: one page
    # learning curves: 3 fractions x 3 defenses = 9 lines per panel -> 2 pages of <= 6
    assert {"learning_curves_2.png"} <= names and MAX_LINES == 6
    from PIL import Image

    w, h = Image.open(tmp_path / "steady_vs_fraction.png").size
    assert w < 1400 and h < 1400, (w, h)  # 3 attacks x 2 modes in a grid, not one long row
    summary = [r for r in csv.DictReader((tmp_path / "summary.csv").open())
               if r["metric"] == "global_mse"]
    worst = list(csv.DictReader((tmp_path / "worst_case.csv").open()))
    assert len(worst) == 3 * 3 * 2
    for w_row in worst:  # independent oracle: the max over attacks from summary.csv
        same = [r for r in summary if all(r[k] == w_row[k] for k in (
            "sharing.fraction", "defense.name", "defense.mode")) and r["attack.name"] != "none"]
        top = max(same, key=lambda r: float(r["steady_db"]))
        assert (w_row["worst_attack"], float(w_row["worst"])) == (
            top["attack.name"], pytest.approx(float(top["steady_db"])))
        base = next(r for r in summary if all(r[k] == w_row[k] for k in (
            "sharing.fraction", "defense.name", "defense.mode")) and r["attack.name"] == "none")
        assert float(w_row["no_attack"]) == pytest.approx(float(base["steady_db"]))
    md = (tmp_path / "worst_case.md").read_text()
    assert "fraction 1/8: worst (attack)" in md and "| mean | fill |" in md


def test_many_lines_go_to_pages(fake: None, tmp_path: Path) -> None:
    raw = {**BASE, "output": {"record_every": 10},
           "sweep": {"sharing.fraction": [1.0, 0.5],
                     "attack.params_by_name.gaussian.sigma": [0.1, 0.2, 0.3, 0.4],
                     "defense.name": ["mean", "median"]}}
    out = run_scenario(parse_scenario(raw), tmp_path, progress=False, stream=None)
    names = sorted(p.name for p in out.plots)
    # 8 line settings per panel (sigma x defense) -> pages of 6 and 2
    assert "steady_vs_fraction.png" in names and "steady_vs_fraction_2.png" in names
    assert "steady_vs_fraction_3.png" not in names


def test_progress_off_a_terminal_is_one_line_per_point(
        fake: None, capfd: pytest.CaptureFixture[str]) -> None:
    s = parse_scenario({**BASE, "sweep": {"sharing.fraction": [1.0, 0.5, 0.25]}})
    done = list(run_points(s, s.points(), progress=True))
    err = capfd.readouterr().err.splitlines()
    assert len(done) == 3 and err == [ln for ln in err if ln.startswith("[")] and len(err) == 3
    assert err[2].startswith("[3/3] fraction=0.25 (")
    list(run_points(s, s.points(), progress=False))
    assert capfd.readouterr().err == ""
