"""The experiment driver: sweep points × Monte Carlo runs, verified result parts, resume, outputs.

Order of work: the scenario is fully validated (:func:`experiments.schema.parse_scenario`) and
this machine checked (:func:`experiments.schema.check_runnable`) before anything is written;
then the output folder is created and stamped with the scenario's digest.

Each sweep point's rows go to ``parts/<key>.csv`` and its record to ``parts/<key>.json``, where
``key`` hashes the point's *setting* (its canonical swept values, not its position), each through
a temporary file, fsync and an atomic rename, the CSV first. The record holds the setting, seed,
the CSV's SHA-256 and row count: a point counts as done only when its record parses, names the
same setting and seed, and its CSV matches checksum and row count. A damaged or missing part
(killed mid-write, truncated, emptied, deleted) is computed again on the next run, with a notice;
:func:`finalize` refuses, naming the point, to merge a part that does not verify. A point's seed
is ``stable_seed(scenario seed, setting)``, so it depends on neither the order of the ``[sweep]``
keys nor on other points. ``tidy.csv`` and ``summary.csv`` are always rebuilt from the parts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from experiments.keys import ScenarioError
from experiments.results import DIVERGED_DB, PointResult, csv_cell
from experiments.schema import Scenario, SweepPoint, check_runnable
from psfed_robust.core.seeding import stable_seed

if TYPE_CHECKING:
    from experiments.executors import Executor

__all__ = ["Assembled", "PointResult", "RunOutputs", "assemble", "build_part", "compute_point",
           "db_interval", "finalize", "run_points", "run_scenario", "steady_state",
           "summary_columns"]

TIDY_HEADER = ("point", "run", "round", "metric", "value")


@dataclass
class RunOutputs:
    out_dir: Path
    tidy_csv: Path
    summary_csv: Path
    meta_json: Path
    plots: list[Path]
    table: str
    summary_rows: list[dict[str, Any]]


def _fmt(x: float | None) -> str:
    """Deterministic float text (same bytes in every process); ``nan``/``inf`` spelled out."""
    if x is None:
        return ""
    return format(float(x), ".10g")


def _db(x: float) -> float:
    """10 log10(x); NaN stays NaN (a NaN is never reported as -inf dB), 0 is -inf."""
    if math.isnan(x):
        return math.nan
    return 10.0 * math.log10(x) if x > 0 else -math.inf


def steady_state(values: np.ndarray, window: float) -> np.ndarray:
    """Per-run mean over the final ``window`` fraction of the recorded points: ``[R]``."""
    t = values.shape[-1]
    n = max(1, math.ceil(window * t))
    with np.errstate(all="ignore"):
        return np.asarray(values[..., t - n :].mean(axis=-1))


def _t_interval(per_run: np.ndarray, level: float) -> tuple[float, float]:
    """(mean, half width) of a t-interval across runs (NaN half width with < 2 runs)."""
    with np.errstate(all="ignore"):
        m = float(per_run.mean())
        if per_run.size < 2:
            return m, math.nan
        t = float(stats.t.ppf(0.5 + level / 2, per_run.size - 1))
        return m, t * float(per_run.std(ddof=1)) / math.sqrt(per_run.size)


def db_interval(per_run: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Steady state in dB and its ``level`` interval, computed on the log scale.

    The mean ``m`` of the per-run MSEs gets the interval ``10 log10(m) ± (10 / ln 10) t s /
    (m sqrt(R))`` (the delta method for ``log m``): always a real interval around the estimate in
    dB, where the linear interval ``m ± t s / sqrt(R)`` can have a negative lower end. NaN bounds
    when fewer than two runs or any run is not finite.
    """
    m, half = _t_interval(per_run, level)
    centre = _db(m)
    if not (math.isfinite(half) and math.isfinite(centre)) or not np.isfinite(per_run).all():
        return centre, math.nan, math.nan
    half_db = 10.0 / math.log(10.0) * half / m
    return centre, centre - half_db, centre + half_db


def _summarise(point: SweepPoint, res: PointResult, window: float) -> list[dict[str, Any]]:
    rows = []
    for name, vals in res.metrics.items():
        per_run = steady_state(np.asarray(vals, dtype=np.float64), window)
        bad_runs = int((~np.isfinite(per_run)).sum())
        row: dict[str, Any] = {"point": point.index, "label": point.label}
        for k, v in point.values:
            row[k] = v
        row["metric"] = name
        row["runs"] = int(vals.shape[0])
        if name.endswith("_mse"):
            centre, lo, hi = db_interval(per_run)
            diverged = bad_runs > 0 or not centre < DIVERGED_DB
            row["steady_db"] = centre
            row["ci_low_db"] = math.nan if diverged else lo
            row["ci_high_db"] = math.nan if diverged else hi
            row["theory_db"] = res.theory_db if name == "global_mse" else None
        else:
            m, half = _t_interval(per_run, 0.95)
            diverged = bad_runs > 0
            row["steady"] = m
            row["ci_low"] = math.nan if diverged else m - half
            row["ci_high"] = math.nan if diverged else m + half
        row["diverged"] = bool(diverged)
        row["diverged_runs"] = bad_runs
        rows.append(row)
    return rows


def _atomic_write(path: Path, data: str | bytes) -> None:
    """Write through ``<name>.tmp<pid>``, fsync, then rename: a reader sees old or new bytes."""
    blob = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(blob)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _part_csv(res: PointResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    rounds = [str(int(r)) for r in res.rounds]
    for name, vals in res.metrics.items():
        for run in range(vals.shape[0]):
            for rnd, v in zip(rounds, vals[run], strict=True):
                w.writerow((run, rnd, name, _fmt(float(v))))
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
    """The seed of one sweep point: scenario seed + the point's canonical setting."""
    return stable_seed("experiments.point", int(scenario.get("seed")), point.setting)


def _paths(out: Path, point: SweepPoint) -> tuple[Path, Path]:
    return out / "parts" / f"{point.key}.csv", out / "parts" / f"{point.key}.json"


def _check_part(out: Path, point: SweepPoint, seed: int) -> tuple[str, dict[str, Any] | None]:
    """``("ok", record)``, ``("missing", None)`` or ``(why it is damaged, None)``."""
    csv_path, rec_path = _paths(out, point)
    if not rec_path.exists():
        return "missing", None
    try:
        rec = json.loads(rec_path.read_text())
        setting, rec_seed = rec["setting"], rec["seed"]
        sha, rows = rec["csv_sha256"], rec["csv_rows"]
        if not isinstance(rec["summary"], list):
            raise TypeError("summary is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its record {rec_path.name} is unreadable ({type(exc).__name__}: {exc})", None
    if setting != point.setting or rec_seed != seed:
        return f"its record {rec_path.name} belongs to another setting or seed", None
    try:
        blob = csv_path.read_bytes()
    except OSError:
        return f"its rows {csv_path.name} are missing", None
    have, same = blob.count(b"\n"), hashlib.sha256(blob).hexdigest() == sha
    if not same or have != rows:
        return (f"its rows {csv_path.name} do not match the record ({have} of {rows} rows, "
                f"checksum {'matches' if same else 'differs'})"), None
    return "ok", rec


def _prepare_output(out: Path) -> None:
    """Create ``out/parts`` and prove it is writable (clear errors, not tracebacks)."""
    if out.exists() and not out.is_dir():
        raise ScenarioError(f"--out {str(out)!r} is a file; give a folder for the results")
    try:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ScenarioError(
            f"--out {str(out)!r}: cannot write results there ({exc.strerror or exc}); choose "
            f"another folder with --out"
        ) from exc


def run_scenario(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    progress: bool = True,
    force: bool = False,
    plots: bool | None = None,
    stream: Any = None,
    executor: str | Executor = "local",
) -> RunOutputs:
    """Run every sweep point (resuming verified parts) and write all outputs into ``out_dir``.

    ``executor``: ``"local"`` (this process, one point after another), ``"ray"`` or an executor
    object (:mod:`experiments.executors`): workers only compute parts; they are written here.
    """
    from experiments.executors import SweepJob, get_executor

    runner = get_executor(executor)  # an unknown executor is refused before any work
    points = scenario.points()
    check_runnable(scenario, points)  # nothing is written before this passes
    out = Path(out_dir)
    _prepare_output(out)
    parts = out / "parts"
    digest = scenario.digest()
    stamp = out / "scenario.sha"
    old = stamp.read_text().strip() if stamp.is_file() else None
    if old is not None and old != digest:
        if not force:
            raise ScenarioError(
                f"{out} holds results of a different scenario (digest {old} != {digest}); use "
                f"another --out or --force to discard them"
            )
        for f in parts.iterdir():
            if f.is_file():
                f.unlink()
    _atomic_write(stamp, digest + "\n")
    for tmp in parts.glob("*.tmp*"):  # left by a run killed mid-write
        tmp.unlink(missing_ok=True)
    stream = stream if stream is not None else sys.stdout
    t0 = time.perf_counter()
    todo = []
    for pt in points:
        state, _ = _check_part(out, pt, point_seed(scenario, pt))
        if state != "ok":
            todo.append(pt)
            if state != "missing":
                print(f"sweep point {pt.index} ({pt.label}): {state}; computing it again",
                      file=stream)
    if len(todo) < len(points):
        print(f"resuming: {len(points) - len(todo)} of {len(points)} sweep points already done",
              file=stream)
    results = (run_points(scenario, todo, progress=progress) if runner is None else runner.run(
        SweepJob(scenario, compute_point, build_part, point_seed), todo, progress=progress))
    for point, rows, record in results:
        csv_path, rec_path = _paths(out, point)
        _atomic_write(csv_path, rows)
        _atomic_write(rec_path, json.dumps(record, default=_json_default, sort_keys=True))
    return finalize(scenario, out, elapsed=time.perf_counter() - t0, plots=plots, stream=stream)


def compute_point(scenario: Scenario, point: SweepPoint, *,
                  progress: bool = False) -> tuple[str, dict[str, Any]]:
    """Run one point: its part rows (CSV text, no header) and its record (summary, curves...)."""
    from experiments.engines import run_point

    return build_part(scenario, point, run_point(point, point_seed(scenario, point),
                                                 progress=progress))


def build_part(scenario: Scenario, point: SweepPoint,
               res: PointResult) -> tuple[str, dict[str, Any]]:
    """A point's part from its result: CSV rows and record (also for merged run blocks)."""
    seed = point_seed(scenario, point)
    rows = _part_csv(res)
    record = {"setting": point.setting, "seed": seed,
              "csv_sha256": hashlib.sha256(rows.encode()).hexdigest(),
              "csv_rows": rows.count("\n"),
              "summary": _summarise(point, res, float(scenario.get("output.steady_window"))),
              "info": res.info, "curves": {k: _curve(v) for k, v in res.metrics.items()},
              "rounds": [int(r) for r in res.rounds]}
    return rows, record


def run_points(scenario: Scenario, points: Sequence[SweepPoint], *,
               progress: bool = False) -> Iterator[tuple[SweepPoint, str, dict[str, Any]]]:
    """Compute ``points``, yielding ``(point, rows, record)`` as each finishes.

    Progress (``progress=True``) goes to stderr: one bar on a terminal (the engine's own bar
    only when a single point runs, so bars never nest), else one line per finished point, so
    logs get ``len(points)`` lines, not a redraw per iteration.
    """
    tty = progress and sys.stderr.isatty()
    bar = None
    if tty and len(points) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(points), desc="sweep points", unit="pt", file=sys.stderr)
    for i, point in enumerate(points, 1):
        if bar is not None:
            bar.set_postfix_str(point.label[:60])
        t = time.perf_counter()
        rows, record = compute_point(scenario, point, progress=tty and bar is None)
        if bar is not None:
            bar.update(1)
        elif progress and not tty:
            print(f"[{i}/{len(points)}] {point.label} ({time.perf_counter() - t:.1f} s)",
                  file=sys.stderr, flush=True)
        yield point, rows, record
    if bar is not None:
        bar.close()


def _curve(values: np.ndarray) -> list[float]:
    """Run-averaged curve; MSE metrics are averaged in linear scale."""
    with np.errstate(all="ignore"):
        return [float(x) for x in np.asarray(values, dtype=np.float64).mean(axis=0)]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _load_parts(out: Path, scenario: Scenario,
                points: Sequence[SweepPoint]) -> list[dict[str, Any]]:
    loaded, bad = [], []
    for p in points:
        state, rec = _check_part(out, p, point_seed(scenario, p))
        if rec is None:
            bad.append(f"sweep point {p.index} ({p.label}): "
                       + ("no results" if state == "missing" else state))
        else:
            loaded.append(rec)
    if bad:
        raise ScenarioError(
            f"{out}: {len(bad)} sweep point(s) lack verified results, nothing merged: "
            + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
            + " — run the same command again to compute them"
        )
    return loaded


@dataclass
class Assembled:
    """The merged results of a sweep, before anything is written (see :func:`assemble`)."""

    tidy_csv: str
    summary_csv: str
    summary_rows: list[dict[str, Any]]
    meta: dict[str, Any]
    table: str
    worst_case: str  # Markdown: worst case over attacks ("" unless attack.name is swept)


SUMMARY_FIXED = ("metric", "runs", "diverged", "diverged_runs", "steady_db", "ci_low_db",
                 "ci_high_db", "theory_db", "steady", "ci_low", "ci_high")


def summary_columns(scenario: Scenario) -> list[str]:
    """The columns of summary.csv (and of ``psfed_robust.run(...).summary`` rows)."""
    return ["point", "label", *scenario.sweep, *SUMMARY_FIXED]


def assemble(scenario: Scenario, points: Sequence[SweepPoint], records: Sequence[dict[str, Any]],
             rows: Sequence[str], *, elapsed: float = 0.0) -> Assembled:
    """tidy.csv, summary.csv, meta.json and the Markdown table of verified per-point results
    (``records`` and ``rows`` in the order of ``points``); nothing is written."""
    buf = io.StringIO()
    buf.write(",".join(TIDY_HEADER) + "\n")
    for p, text in zip(points, rows, strict=True):
        for line in text.splitlines():
            buf.write(f"{p.index},{line}\n")
    summary_rows = []
    for p, part in zip(points, records, strict=True):
        for row in part["summary"]:
            summary_rows.append({**row, "point": p.index, "label": p.label, **dict(p.values)})
    cols = summary_columns(scenario)
    sbuf = io.StringIO()
    w = csv.writer(sbuf, lineterminator="\n")
    w.writerow(cols)
    for row in summary_rows:
        w.writerow([csv_cell(row.get(c)) for c in cols])
    meta_obj = {
        "scenario": scenario.resolved(),
        "scenario_source": scenario.source,
        "scenario_digest": scenario.digest(),
        "points": [
            {"index": p.index, "values": dict(p.values), "setting": p.setting, "part": p.key,
             "seed": point_seed(scenario, p), "info": part.get("info", {})}
            for p, part in zip(points, records, strict=True)
        ],
        "versions": _versions(),
        "git_commit": _git_commit(),
        "elapsed_seconds_last_session": round(elapsed, 3),
    }
    from experiments.report import markdown_table, worst_case_markdown, worst_case_rows

    return Assembled(buf.getvalue(), sbuf.getvalue(), summary_rows, meta_obj,
                     markdown_table(scenario, summary_rows),
                     worst_case_markdown(scenario, worst_case_rows(scenario, summary_rows)))


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
    parts = _load_parts(out, scenario, points)
    merged = assemble(scenario, points, parts, [_paths(out, p)[0].read_text() for p in points],
                      elapsed=elapsed)
    tidy = out / "tidy.csv"
    _atomic_write(tidy, merged.tidy_csv)
    summary = out / "summary.csv"
    _atomic_write(summary, merged.summary_csv)
    meta = out / "meta.json"
    _atomic_write(meta, json.dumps(merged.meta, indent=2, default=_json_default, sort_keys=True))
    from experiments.figures import make_plots
    from experiments.report import write_tables

    tables = write_tables(scenario, merged.summary_rows, out)
    do_plots = scenario.get("output.plots") if plots is None else plots
    plot_files: list[Path] = []
    if do_plots:
        plot_files = make_plots(scenario, points, parts, out)
    if stream is not None:
        print(merged.table, file=stream)
        if merged.worst_case:
            print("\n" + merged.worst_case, file=stream)
        print(f"\nwrote {tidy}, {summary}, {meta}"
              + "".join(f", {p}" for p in [*tables, *plot_files]), file=stream)
    return RunOutputs(out, tidy, summary, meta, plot_files, merged.table, merged.summary_rows)
