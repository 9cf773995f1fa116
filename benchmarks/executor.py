"""Local executor vs a local Ray instance on the same 16-point sweep (experiments/executors.py).

The sweep: 4 sharing fractions x 2 defenses (mean, median) x 2 attacker counts, linear task,
D = 16, K = 10 clients, 8 Monte Carlo runs per point, ``--rounds`` iterations (CPU-bound points
of about a second each). It runs once with the local executor (one point after another in this
process) and once as Ray tasks of one CPU each on a local Ray instance with ``--cpus`` CPUs; the
ratio of the two wall times is the speed-up (near ``--cpus`` for CPU-bound points on an idle
machine; the local executor's torch already keeps more than one core partly busy, so the
ratio against a one-thread local run is printed too). Ray's per-point overhead: the round trip
of one task on a warm worker (a sweep point as argument, a part's bytes back), and the same
sweep with 10 iterations per point (engine work about nil) as Ray tasks taking the whole
instance (one at a time) against the local executor, best of three. Both executors'
tidy.csv and summary.csv are checked byte-identical.

Usage: ``python benchmarks/executor.py [--rounds 2500] [--cpus 2]``. Prints figures, ends with
ONE JSON line. Run it alone (``flock /tmp/psfed-bench.lock``): other load skews the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# run as a file, benchmarks/ would come first on sys.path: keep it off, so that a script name
# can never shadow a top-level package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]

from experiments.driver import run_scenario  # noqa: E402
from experiments.executors import RayExecutor  # noqa: E402
from experiments.schema import Scenario, parse_scenario  # noqa: E402

SWEEP = {
    "name": "executor_bench", "runs": 8, "seed": 2, "rounds": 2500,
    "task": {"kind": "linear", "dim": 16},
    "federation": {"clients": 10, "participants": 5},
    "attack": {"name": "gaussian", "p_a": 0.5, "params": {"sigma": 0.5}},
    "output": {"record_every": 10, "plots": False},
    "sweep": {"sharing.fraction": [1.0, 0.5, 0.25, 0.125], "defense.name": ["mean", "median"],
              "attack.malicious": [0, 2]},
}


def _scenario(rounds: int) -> Scenario:
    return parse_scenario({**SWEEP, "rounds": rounds}, "<benchmark>")


def _timed(scenario: Scenario, out: Path, executor: str | RayExecutor) -> float:
    t0 = time.perf_counter()
    run_scenario(scenario, out, progress=False, stream=io.StringIO(), executor=executor)
    return time.perf_counter() - t0


def _local_cpu(scenario: Scenario, out: Path, threads: int | None) -> tuple[float, float]:
    """(wall s, process CPU s) of the local executor, torch on ``threads`` threads (None: as is)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    c0 = time.process_time()
    try:
        wall = _timed(scenario, out, "local")
    finally:
        torch.set_num_threads(before)
    return wall, time.process_time() - c0


def _roundtrip_ms(scenario: Scenario, nbytes: int, calls: int = 50) -> float:
    """Ray's own cost of one task: submit, schedule on a warm worker, return ``nbytes`` of rows
    (the mean part size) to the driver; a real sweep point travels as the argument."""
    import ray

    def echo(point: object, n: int) -> str:
        del point
        return "x" * n

    task = ray.remote(echo).options(num_cpus=1)
    point = scenario.points()[0]
    ray.get(task.remote(point, nbytes))  # warm
    t0 = time.perf_counter()
    for _ in range(calls):
        ray.get(task.remote(point, nbytes))
    return 1000 * (time.perf_counter() - t0) / calls


def _same(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("tidy.csv", "summary.csv"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2500, help="iterations per point")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = ap.parse_args()
    import ray

    load0 = os.getloadavg()[0]
    work, trivial = _scenario(args.rounds), _scenario(10)
    n = len(work.points())
    with tempfile.TemporaryDirectory(prefix="psfed-executor-bench-") as tmp:
        root = Path(tmp)
        t_local, cpu_local = _local_cpu(work, root / "local", None)
        t_local1, _ = _local_cpu(work, root / "local1", 1)
        t_local_trivial = min(_timed(trivial, root / f"local_trivial{i}", "local")
                              for i in range(3))
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*",
                                category=FutureWarning)  # about a future Ray default
        t0 = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        t_start = time.perf_counter() - t0
        try:
            # first tasks start the workers (Python + torch imports): the cold sweep includes them
            t_cold = _timed(trivial, root / "ray_cold", RayExecutor(cpus_per_point=1))
            t_ray = _timed(work, root / "ray", RayExecutor(cpus_per_point=1))
            whole = RayExecutor(cpus_per_point=args.cpus)  # one task at a time
            _timed(trivial, root / "ray_seq_warm", whole)
            t_seq = min(_timed(trivial, root / f"ray_seq{i}", whole) for i in range(3))
            part_bytes = sum(f.stat().st_size for f in (root / "ray" / "parts").glob("*.csv")) // n
            t_trip = _roundtrip_ms(work, part_bytes)
        finally:
            ray.shutdown()
        identical = _same(root / "local", root / "ray") and _same(root / "local", root / "local1") \
            and all(_same(root / "local_trivial0", root / d) for d in ("ray_cold", "ray_seq0"))
    load1 = os.getloadavg()[0]
    overhead_ms = 1000 * (t_seq - t_local_trivial) / n
    ratio, ratio1 = t_local / t_ray, t_local1 / t_ray
    print(f"{n} sweep points x 8 runs x {args.rounds} iterations (D = 16, K = 10)")
    print(f"local executor                 {t_local:7.2f} s  ({t_local / n:.2f} s per point, "
          f"{cpu_local / t_local:.2f} cores busy: torch threads + mask prefetch)")
    print(f"local executor, 1 torch thread {t_local1:7.2f} s")
    print(f"Ray, {args.cpus} CPUs, 1 CPU per task    {t_ray:7.2f} s  -> {ratio:.2f}x the local "
          f"executor, {ratio1:.2f}x the one-thread local executor (+ {t_start:.2f} s to start "
          f"Ray)")
    print(f"cold start: first trivial sweep on fresh workers {t_cold:.2f} s")
    print(f"Ray per-point overhead: {t_trip:.1f} ms per task round trip (a point's {part_bytes} "
          f"bytes of rows back); sweep of trivial points one at a time, best of 3: {t_seq:.2f} s "
          f"vs local {t_local_trivial:.2f} s for {n} ({overhead_ms:+.1f} ms per point)")
    print(f"tidy.csv and summary.csv byte-identical: {identical}")
    print(f"load average (1 min) before / after: {load0:.2f} / {load1:.2f}, {os.cpu_count()} "
          f"cores, Ray {ray.__version__}")
    print(json.dumps({
        "benchmark": "executor", "points": n, "rounds": args.rounds, "ray_cpus": args.cpus,
        "local_s": round(t_local, 3), "local_cores_busy": round(cpu_local / t_local, 2),
        "local_1thread_s": round(t_local1, 3), "ray_s": round(t_ray, 3),
        "speedup": round(ratio, 3), "speedup_vs_1thread": round(ratio1, 3),
        "ray_start_s": round(t_start, 3), "ray_cold_trivial_sweep_s": round(t_cold, 3),
        "task_roundtrip_ms": round(t_trip, 2), "trivial_sweep_overhead_ms_per_point":
        round(overhead_ms, 1), "identical": identical,
        "load_before": round(load0, 2), "load_after": round(load1, 2),
    }))


if __name__ == "__main__":
    main()
