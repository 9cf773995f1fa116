"""The experiment driver: sweep points × Monte Carlo runs, incremental results, resume, outputs.

Each sweep point's rows are written to ``parts/point-NNNN.csv`` (+ ``.json`` with its steady-state
summary) through a temporary file and an atomic rename as soon as the point finishes, so a run
killed at any moment (even with SIGKILL) resumes with the points it had finished and ends with
exactly the rows an uninterrupted run gives: ``tidy.csv`` and ``summary.csv`` are always rebuilt
from the parts. A point's seed is ``stable_seed(scenario seed, point values)``, so its numbers do
not depend on which other points ran in the same process.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from experiments.schema import Scenario, ScenarioError, SweepPoint, check_runnable
from psfed_robust.core.seeding import stable_seed

__all__ = ["PointResult", "RunOutputs", "run_scenario", "steady_state"]

TIDY_HEADER = ("point", "run", "round", "metric", "value")


@dataclass
class PointResult:
    """What an engine returns for one sweep point."""

    rounds: np.ndarray  # [T] recorded iterations/rounds
    metrics: dict[str, np.ndarray]  # name -> [R, T] per-run values (linear scale for MSE)
    lower_is_better: dict[str, bool] = field(default_factory=dict)
    theory_db: float | None = None  # steady-state theory prediction of global MSE (dB)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunOutputs:
    out_dir: Path
    tidy_csv: Path
    summary_csv: Path
    meta_json: Path
    plots: list[Path]
    table: str
    summary_rows: list[dict[str, Any]]


def _fmt(x: float) -> str:
    """Deterministic float text (same bytes in every process)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return format(float(x), ".10g")


def _db(x: float) -> float:
    return 10.0 * math.log10(x) if x > 0 else float("-inf")


def steady_state(values: np.ndarray, window: float) -> np.ndarray:
    """Per-run mean over the final ``window`` fraction of the recorded points: ``[R]``."""
    t = values.shape[-1]
    n = max(1, math.ceil(window * t))
    return np.asarray(values[..., t - n :].mean(axis=-1))


def _ci(per_run: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval across runs (NaN bounds when a run diverged to inf/NaN)."""
    with np.errstate(all="ignore"):
        m = float(per_run.mean())
        if per_run.size < 2 or not np.isfinite(per_run).all():
            return m, float("nan"), float("nan")
        half = float(stats.t.ppf(0.5 + level / 2, per_run.size - 1) * per_run.std(ddof=1)
                     / math.sqrt(per_run.size))
    return m, m - half, m + half


def _summarise(point: SweepPoint, res: PointResult, window: float) -> list[dict[str, Any]]:
    rows = []
    for name, vals in res.metrics.items():
        per_run = steady_state(vals, window)
        m, lo, hi = _ci(per_run)
        row: dict[str, Any] = {"point": point.index, "label": point.label}
        for k, v in point.values:
            row[k] = v
        row["metric"] = name
        row["runs"] = int(vals.shape[0])
        if name.endswith("_mse"):
            row["steady_db"] = _db(m)
            row["ci_low_db"] = _db(lo) if lo == lo and lo > 0 else float("nan")
            row["ci_high_db"] = _db(hi) if hi == hi else float("nan")
            row["theory_db"] = res.theory_db if name == "global_mse" else None
        else:
            row["steady"] = m
            row["ci_low"] = lo
            row["ci_high"] = hi
        rows.append(row)
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _point_csv(point: SweepPoint, res: PointResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    rounds = [str(int(r)) for r in res.rounds]
    for name, vals in res.metrics.items():
        for run in range(vals.shape[0]):
            row_vals = vals[run]
            for rnd, v in zip(rounds, row_vals, strict=True):
                w.writerow((point.index, run, rnd, name, _fmt(float(v))))
    return buf.getvalue()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("psfed-robust", "torch", "numpy", "scipy", "flwr", "tqdm", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def point_seed(scenario: Scenario, point: SweepPoint) -> int:
    """The seed of one sweep point: scenario seed + the point's values (not its index)."""
    vals = json.dumps([[k, v] for k, v in point.values], sort_keys=True, default=str)
    return stable_seed("experiments.point", int(scenario.get("seed")), vals)


def _run_point(scenario: Scenario, point: SweepPoint, progress: bool) -> PointResult:
    engine = point.get("engine")
    seed = point_seed(scenario, point)
    if engine == "batched":
        from experiments.engines import run_batched_point

        return run_batched_point(point, seed, progress=progress)
    from experiments.engines import run_flower_point

    return run_flower_point(point, seed, progress=progress)


def run_scenario(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    progress: bool = True,
    force: bool = False,
    plots: bool | None = None,
    stream: Any = None,
) -> RunOutputs:
    """Run every sweep point (resuming finished ones) and write all outputs into ``out_dir``."""
    from tqdm import tqdm

    check_runnable(scenario)
    out = Path(out_dir)
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    digest = scenario.digest()
    stamp = out / "scenario.sha"
    if stamp.exists() and stamp.read_text().strip() != digest:
        if not force:
            raise ScenarioError(
                f"{out} holds results of a different scenario (digest {stamp.read_text().strip()}"
                f" != {digest}); use another --out or --force to discard them"
            )
        for p in parts.iterdir():
            p.unlink()
    _atomic_write(stamp, digest + "\n")
    points = scenario.points()
    window = float(scenario.get("output.steady_window"))
    stream = stream if stream is not None else sys.stdout
    t0 = time.perf_counter()
    todo = [p for p in points if not (parts / f"point-{p.index:04d}.json").exists()]
    if len(todo) < len(points):
        print(f"resuming: {len(points) - len(todo)} of {len(points)} sweep points already done",
              file=stream)
    bar = tqdm(todo, desc="sweep points", unit="pt", disable=not progress, file=sys.stderr)
    for point in bar:
        bar.set_postfix_str(point.label[:60])
        res = _run_point(scenario, point, progress)
        _atomic_write(parts / f"point-{point.index:04d}.csv", _point_csv(point, res))
        summary = _summarise(point, res, window)
        _atomic_write(
            parts / f"point-{point.index:04d}.json",
            json.dumps({"summary": summary, "info": res.info,
                        "curves": {k: _curve(v) for k, v in res.metrics.items()},
                        "rounds": [int(r) for r in res.rounds]}, default=_json_default,
                       sort_keys=True),
        )
    bar.close()
    return finalize(scenario, out, elapsed=time.perf_counter() - t0, plots=plots, stream=stream)


def _curve(values: np.ndarray) -> list[float]:
    """Run-averaged curve; MSE metrics are averaged in linear scale."""
    return [float(x) for x in values.mean(axis=0)]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _load_parts(out: Path, points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    loaded = []
    for p in points:
        f = out / "parts" / f"point-{p.index:04d}.json"
        if not f.exists():
            raise ScenarioError(f"sweep point {p.index} ({p.label}) has no results in {out}")
        loaded.append(json.loads(f.read_text()))
    return loaded


def finalize(
    scenario: Scenario,
    out: Path,
    *,
    elapsed: float = 0.0,
    plots: bool | None = None,
    stream: Any = None,
) -> RunOutputs:
    """Assemble tidy.csv, summary.csv, meta.json, plots and the Markdown table from the parts."""
    points = scenario.points()
    parts = _load_parts(out, points)
    # tidy.csv: header + every point's rows, in point order.
    tidy = out / "tidy.csv"
    tmp = tidy.with_name("tidy.csv.tmp")
    with open(tmp, "w", newline="") as fh:
        fh.write(",".join(TIDY_HEADER) + "\n")
        for p in points:
            fh.write((out / "parts" / f"point-{p.index:04d}.csv").read_text())
    os.replace(tmp, tidy)
    # summary.csv
    summary_rows = [row for part in parts for row in part["summary"]]
    sweep_keys = list(scenario.sweep)
    cols = ["point", "label", *sweep_keys, "metric", "runs", "steady_db", "ci_low_db",
            "ci_high_db", "theory_db", "steady", "ci_low", "ci_high"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in summary_rows:
        w.writerow([_cell(row.get(c)) for c in cols])
    summary = out / "summary.csv"
    _atomic_write(summary, buf.getvalue())
    meta = out / "meta.json"
    meta_obj = {
        "scenario": scenario.resolved(),
        "scenario_source": scenario.source,
        "scenario_digest": scenario.digest(),
        "points": [
            {"index": p.index, "values": dict(p.values), "seed": point_seed(scenario, p),
             "info": part.get("info", {})}
            for p, part in zip(points, parts, strict=True)
        ],
        "versions": _versions(),
        "git_commit": _git_commit(),
        "elapsed_seconds_last_session": round(elapsed, 3),
    }
    _atomic_write(meta, json.dumps(meta_obj, indent=2, default=_json_default, sort_keys=True))
    do_plots = scenario.get("output.plots") if plots is None else plots
    plot_files: list[Path] = []
    if do_plots:
        from experiments.report import make_plots

        plot_files = make_plots(scenario, points, parts, out)
    from experiments.report import markdown_table

    table = markdown_table(scenario, summary_rows)
    if stream is not None:
        print(table, file=stream)
        print(f"\nwrote {tidy}, {summary}, {meta}"
              + "".join(f", {p}" for p in plot_files), file=stream)
    return RunOutputs(out, tidy, summary, meta, plot_files, table, summary_rows)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return _fmt(v) if math.isfinite(v) or math.isinf(v) else ""
    return str(v)
