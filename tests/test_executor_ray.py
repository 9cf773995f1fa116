"""Ray executor: byte-identical CSVs vs the local executor, resume after killing the driver,
failed points reported while the others complete, lost workers retried (experiments/executors.py).

The Ray tests start local Ray instances (``address="local"``, nothing leaves the machine): the
first test lets the driver start and stop its own; the others share one module instance (the
executor uses an existing connection), and the kill test's driver is a subprocess with its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from experiments_fake import tiny_toml

from experiments.cli import main
from experiments.executors import (
    PointsFailed,
    RayExecutor,
    add_executor_arguments,
    executor_from_args,
    plan_blocks,
)
from experiments.keys import ScenarioError
from experiments.schema import load_scenario

ROOT = Path(__file__).resolve().parent.parent

# runs 4 runs whole; runs 40 is two engine run blocks of 20 on CPU, split by --runs-per-task 20
SWEEP = tiny_toml("ray_sweep", runs=4, rounds=300, seed=7,
                  sweep='"sharing.fraction" = [1.0, 0.25]\n"runs" = [4, 40]\n')

FLAKY = '''
import os
from pathlib import Path

from attacks import Attack, register_attack


@register_attack("flaky_test")
class FlakyTest(Attack):
    """Honest deltas, except: mode 1 raises, mode 2 kills its worker once, mode 3 always."""

    def __init__(self, *, mode: int = 0, marker: str = "") -> None:
        self.mode, self.marker = mode, marker

    def craft(self, deltas, ctx):
        if self.mode == 1:
            raise RuntimeError("flaky_test: injected failure")
        if self.mode == 3 or (self.mode == 2 and not Path(self.marker).exists()):
            Path(self.marker).write_text("died once")
            os._exit(1)
        return deltas
'''


def _write(tmp: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _cli(args: list[str]) -> int:
    return main(["run", *args, "--no-plots", "--quiet"])


def _same_csvs(a: Path, b: Path) -> None:
    for f in ("tidy.csv", "summary.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.fixture(autouse=True)
def _no_cluster_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        with warnings.catch_warnings():  # Ray's FutureWarning about a future GPU default
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    yield
    ray.shutdown()


# ------------------------------------------------------------------------------ without Ray


def test_plan_blocks_groups_whole_engine_blocks(tmp_path: Path) -> None:
    s = load_scenario(_write(tmp_path, SWEEP))
    small, big = s.points()[0], s.points()[1]
    assert (small.get("runs"), big.get("runs")) == (4, 40)
    assert plan_blocks(big, None, "cpu") == []
    assert plan_blocks(big, 20, "cpu") == [[0], [1]]  # CPU: 2 blocks of 20 from 32 runs on
    assert plan_blocks(big, 40, "cpu") == []  # fits one task
    assert plan_blocks(big, 5, "cpu") == [[0], [1]]  # never less than one engine block
    assert plan_blocks(big, 20, "cuda") == []  # CUDA: one block of all runs
    assert plan_blocks(small, 1, "cpu") == []


def test_run_online_blocks_merge_to_the_full_run() -> None:
    from psfed_robust.engine import OnlineConfig, run_online

    cfg = OnlineConfig(runs=40, iterations=60, dim=8, num_clients=6, participants=3,
                       share_count=3, seed=5, record_every=10)
    full = run_online(cfg)
    parts = [run_online(cfg, blocks=[b]) for b in (1, 0)]
    assert np.array_equal(np.concatenate([parts[1].global_mse, parts[0].global_mse]),
                          full.global_mse)
    assert np.array_equal(np.concatenate([parts[1].local_mse, parts[0].local_mse]),
                          full.local_mse)
    assert parts[0].metadata["blocks"] == [1]
    with pytest.raises(ValueError, match=r"subset of 0\.\.1"):
        run_online(cfg, blocks=[2])


def test_executor_flags_checked() -> None:
    p = argparse.ArgumentParser()
    add_executor_arguments(p)
    assert executor_from_args(p.parse_args([])) == "local"
    with pytest.raises(ScenarioError, match=r"--ray-address.*only with --executor ray"):
        executor_from_args(p.parse_args(["--ray-address", "auto"]))
    ex = executor_from_args(p.parse_args(["--executor", "ray", "--cpus-per-point", "2",
                                          "--runs-per-task", "64"]))
    assert isinstance(ex, RayExecutor) and ex.cpus_per_point == 2 and ex.runs_per_task == 64
    with pytest.raises(ScenarioError, match="--runs-per-task"):
        RayExecutor(runs_per_task=0)
    with pytest.raises(ScenarioError, match="--cpus-per-point"):
        RayExecutor(cpus_per_point=0)


def test_unreachable_ray_address_refused_quickly() -> None:
    import socket

    from experiments.executors import _check_reachable

    with socket.socket() as sock:  # a port nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ScenarioError, match=rf"--ray-address '127.0.0.1:{port}': nothing accepts"):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 5
    _check_reachable("auto")  # left to Ray
    _check_reachable("ray://head:10001")


# ------------------------------------------------------------------------------ with Ray


@pytest.mark.slow
def test_ray_sweep_byte_identical_to_local(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()  # the driver starts its own local instance
    scen = _write(tmp_path, SWEEP)
    assert _cli([str(scen), "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    code = _cli([str(scen), "--out", str(tmp_path / "ray"), "--executor", "ray",
                 "--ray-cpus", "2", "--runs-per-task", "20"])
    err = capsys.readouterr().err
    assert code == 0
    _same_csvs(tmp_path / "local", tmp_path / "ray")
    assert not ray.is_initialized()  # ... and shuts it down
    assert "sweep points:" not in err  # --quiet: no progress lines
    # every part is the local executor's bytes; the 40-run points ran as two block tasks
    for part in (tmp_path / "local" / "parts").glob("*.csv"):
        assert (tmp_path / "ray" / "parts" / part.name).read_bytes() == part.read_bytes()
    tasks = sorted(json.loads(r.read_text())["info"].get("tasks", 1)
                   for r in (tmp_path / "ray" / "parts").glob("*.json"))
    assert tasks == [1, 1, 2, 2]


@pytest.mark.slow
def test_failed_point_reported_others_complete_lost_worker_retried(
        tmp_path: Path, ray_local: None, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    marker = tmp_path / "died"
    text = (SWEEP.replace('name = "ray_sweep"', 'name = "flaky"\nplugins = ["flaky.py"]')
            .replace('name = "gaussian"', 'name = "flaky_test"').replace("p_a = 0.5\n", "")
            .replace("params = { sigma = 0.5 }", f'params = {{ marker = "{marker}" }}')
            .replace('"sharing.fraction" = [1.0, 0.25]\n"runs" = [4, 40]',
                     '"attack.params.mode" = [0, 1, 2, 3]'))
    scen = _write(tmp_path, text)
    s = load_scenario(scen)
    out = tmp_path / "ray"
    code = main(["run", str(scen), "--out", str(out), "--executor", "ray", "--max-retries", "1",
                 "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2
    assert marker.read_text() == "died once"  # mode 2 killed its first worker ...
    line = next(x for x in err.splitlines() if "sweep point(s) failed" in x)
    assert "2 of 4 sweep point(s) failed" in line
    assert "sweep point 1 (attack.mode=1): RuntimeError: flaky_test: injected failure" in line
    assert "sweep point 3 (attack.mode=3): WorkerCrashedError" in line and "2 times" in line
    assert "sweep points: 2 done, 0 running, 2 failed, 0 waiting (of 4)" in err
    done = {p.index for p in s.points() if (out / "parts" / f"{p.key}.json").exists()}
    assert done == {0, 2}  # ... and was retried: the points that can complete did
    # their parts are the local executor's bytes (mode 2 computes honestly once the marker exists)
    local = tmp_path / "local"
    keep = _write(tmp_path, text.replace("[0, 1, 2, 3]", "[0, 2]"), "keep.toml")
    assert main(["run", str(keep), "--out", str(local), "--no-plots", "--quiet"]) == 0
    for p in s.points():
        if p.index in done:
            name = f"{p.key}.csv"
            assert (out / "parts" / name).read_bytes() == (local / "parts" / name).read_bytes()


@pytest.mark.slow
def test_driver_killed_mid_sweep_resumes_to_the_same_bytes(tmp_path: Path,
                                                           ray_local: None) -> None:
    text = SWEEP.replace("rounds = 300", "rounds = 800").replace(
        '"runs" = [4, 40]', '"defense.name" = ["mean", "median", "trimmed_mean"]')
    scen = _write(tmp_path, text)
    total = len(load_scenario(scen).points())
    assert _cli([str(scen), "--out", str(tmp_path / "local")]) == 0
    out = tmp_path / "ray"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FLWR_TELEMETRY_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", "run", str(scen), "--out", str(out),
         "--executor", "ray", "--ray-cpus", "2", "--no-plots"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "parts").glob("*.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # the driver only; its Ray instance shares its fate
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything of that session left behind
        except ProcessLookupError:
            pass
        if proc.stderr:
            proc.stderr.close()
    done = len(list((out / "parts").glob("*.json")))
    assert 1 <= done < total, done
    assert not (out / "tidy.csv").exists()
    assert _cli([str(scen), "--out", str(out), "--executor", "ray"]) == 0
    _same_csvs(tmp_path / "local", out)


def test_points_failed_message_names_points() -> None:
    class P:
        index, label = 3, "fraction=0.5"

    exc = PointsFailed([(P(), "RuntimeError: boom")], 8)  # type: ignore[list-item]
    assert isinstance(exc, ScenarioError)
    assert "1 of 8 sweep point(s) failed: sweep point 3 (fraction=0.5): RuntimeError: boom" in (
        str(exc))


def test_progress_one_line_per_change_or_redrawn_on_a_terminal() -> None:
    import io

    from experiments.executors import Progress

    log = io.StringIO()
    bar = Progress(4, log)
    for state in ((0, 2, 0), (0, 2, 0), (1, 2, 0), (2, 1, 1), (2, 1, 1), (3, 0, 1)):
        bar.show(*state)
    bar.close()
    assert log.getvalue().splitlines() == [
        "sweep points: 0 done, 2 running, 0 failed, 2 waiting (of 4)",
        "sweep points: 1 done, 2 running, 0 failed, 1 waiting (of 4)",
        "sweep points: 2 done, 1 running, 1 failed, 0 waiting (of 4)",
        "sweep points: 3 done, 0 running, 1 failed, 0 waiting (of 4)",
    ]

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Tty()
    bar = Progress(2, term)
    bar.show(0, 1, 0)
    bar.show(1, 1, 0)
    bar.close()
    assert term.getvalue() == ("\rsweep points: 0 done, 1 running, 0 failed, 1 waiting (of 2)"
                               "\x1b[K\rsweep points: 1 done, 1 running, 0 failed, 0 waiting "
                               "(of 2)\x1b[K\n")
    quiet = io.StringIO()
    bar = Progress(2, quiet, enabled=False)
    bar.show(1, 0, 0)
    bar.close()
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_python_api_with_the_ray_executor_writes_nothing_and_matches_local(
        tmp_path: Path, ray_local: None) -> None:
    import psfed_robust

    scen = _write(tmp_path, SWEEP)
    local = psfed_robust.run(str(scen))
    remote = psfed_robust.run(str(scen), executor="ray")
    assert remote.summary == local.summary
    assert all(np.array_equal(remote.tidy[c], local.tidy[c]) for c in local.tidy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
