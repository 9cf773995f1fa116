"""The Python API: ``psfed_robust.run(scenario, ...)`` runs a scenario and returns its results.

The same validation, seeds and numbers as ``psfed-robust run`` (a point's seed depends only on
the scenario seed and its setting, so the API and the CLI agree to the last bit). Without
``out`` nothing is written: the points are computed in memory. With ``out`` the run is the
CLI's (resumable parts, tidy.csv, summary.csv, meta.json, worst_case.csv/.md, plots).
"""

from __future__ import annotations

import copy
import csv
import io
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.keys import ScenarioError
from experiments.schema import (
    Scenario,
    apply_values,
    check_runnable,
    load_plugins,
    parse_scenario,
    resolve_path,
)

__all__ = ["Result", "load", "run"]

TIDY_COLUMNS = ("point", "run", "round", "metric", "value")


@dataclass
class Result:
    """What :func:`run` returns.

    ``summary``: the rows of summary.csv (one dict per sweep point and metric, its columns,
    typed: floats, ints, bools, ``None`` for an empty cell). ``tidy``: tidy.csv as columns of
    numpy arrays (``point``, ``run``, ``round``, ``metric``, ``value``; ``pandas.DataFrame(
    result.tidy)`` makes a frame). ``meta``: meta.json's content. ``worst_case``: the worst case
    over attacks per defense x fraction (worst_case.csv's rows; empty unless attacks are swept).
    ``table`` and ``worst_case_table``: the Markdown tables the CLI prints. ``out`` and
    ``files``: the folder and the files written (None and [] without ``out``).
    """

    scenario: Scenario
    summary: list[dict[str, Any]]
    tidy: dict[str, np.ndarray]
    meta: dict[str, Any]
    worst_case: list[dict[str, Any]]
    table: str
    worst_case_table: str
    out: Path | None = None
    files: list[Path] = field(default_factory=list)


def load(scenario: str | Path | Mapping[str, Any], *,
         overrides: Mapping[str, Any] | None = None, plugins: Iterable[str] = ()) -> Scenario:
    """The validated scenario: a shipped name (``"headline"``), a TOML path or a dict (the TOML
    tables as nested dicts), with ``overrides`` (dotted keys, Python values, as ``--set``)."""
    load_plugins(list(plugins), Path.cwd())
    if isinstance(scenario, Mapping):
        raw, source = copy.deepcopy(dict(scenario)), "<dict>"
    elif isinstance(scenario, str | Path):
        path = resolve_path(scenario)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
        source = str(path)
    else:
        raise ScenarioError(f"scenario must be a shipped name, a path or a dict, got "
                            f"{type(scenario).__name__}")
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ScenarioError(f"overrides must be a dict of dotted keys, got "
                            f"{type(overrides).__name__}")
    return parse_scenario(apply_values(raw, dict(overrides or {})), source=source)


def _typed(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _tidy_columns(text: str) -> dict[str, np.ndarray]:
    rows = list(csv.reader(io.StringIO(text)))[1:]
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(TIDY_COLUMNS)
    out: dict[str, np.ndarray] = {}
    for name, col in zip(TIDY_COLUMNS, cols, strict=True):
        if name == "metric":
            out[name] = np.asarray(col, dtype=str)
        elif name == "value":
            out[name] = np.asarray(col, dtype=np.float64)
        else:
            out[name] = np.asarray(col, dtype=np.int64)
    return out


def run(
    scenario: str | Path | Mapping[str, Any],
    *,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    plugins: Iterable[str] = (),
    progress: bool = False,
    force: bool = False,
    executor: Any = "local",
) -> Result:
    """Run every sweep point of ``scenario`` and return a :class:`Result`.

    ``scenario``: a shipped scenario's name, a TOML file or a dict. ``overrides``: dotted keys
    to values exactly like ``--set`` (``{"runs": 4, "sweep.sharing.fraction": [1.0, 0.125]}``).
    ``plugins``: Python files (relative to the current directory) or module names imported first
    (e.g. registering attacks). ``out``: write everything the CLI writes there (and resume
    from it); without it nothing is written. ``progress``: one line per finished point on
    stderr, and the tables on stdout; otherwise nothing is printed. ``executor``: ``"local"``,
    ``"ray"`` (``RAY_ADDRESS`` or a local Ray instance) or an executor object
    (:mod:`experiments.executors`); the results are identical.
    """
    from experiments.driver import assemble, run_points, run_scenario, summary_columns
    from experiments.report import worst_case_rows

    sc = load(scenario, overrides=overrides, plugins=plugins)
    points = sc.points()
    if out is not None:
        sink = sys.stdout if progress else io.StringIO()
        res = run_scenario(sc, out, progress=progress, force=force, stream=sink,
                           executor=executor)
        import json

        meta = json.loads(res.meta_json.read_text())
        tidy = _tidy_columns(res.tidy_csv.read_text())
        rows = res.summary_rows
        from experiments.report import worst_case_markdown

        worst = worst_case_rows(sc, rows)
        wtable = worst_case_markdown(sc, worst)
        files = [res.tidy_csv, res.summary_csv, res.meta_json,
                 *[p for p in (res.out_dir / "worst_case.csv", res.out_dir / "worst_case.md")
                   if worst], *res.plots]
        table, out_path = res.table, Path(out)
    else:
        from experiments.driver import build_part, compute_point, point_seed
        from experiments.executors import SweepJob, get_executor

        runner = get_executor(executor)  # an unknown executor is refused before any work
        check_runnable(sc, points)
        t0 = time.perf_counter()
        parts = (run_points(sc, points, progress=progress) if runner is None else
                 runner.run(SweepJob(sc, compute_point, build_part, point_seed), points,
                            progress=progress))
        done = {p.key: (rows_text, rec) for p, rows_text, rec in parts}
        merged = assemble(sc, points, [done[p.key][1] for p in points],
                          [done[p.key][0] for p in points], elapsed=time.perf_counter() - t0)
        meta, tidy, rows = merged.meta, _tidy_columns(merged.tidy_csv), merged.summary_rows
        worst, wtable, table = worst_case_rows(sc, rows), merged.worst_case, merged.table
        files, out_path = [], None
        if progress:
            print(table + ("\n\n" + wtable if wtable else ""))
    cols = summary_columns(sc)
    summary = [{c: _typed(r.get(c)) for c in cols} for r in rows]
    return Result(sc, summary, tidy, meta, worst, table, wtable, out_path, files)
