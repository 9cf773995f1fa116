"""Batched online engine at P1 scale: default path, torch-only path, accelerators, numpy loop.

P1 (Gogineni et al., ICASSP 2022, arXiv 2110.06556): RFF kernel LMS, K = 100 clients, L = 4,
D = 200, 1,000 iterations, 500 Monte Carlo runs, 40 participants per iteration, PSO-Fed with
M = 40 (random uncoordinated selection, uplink T = S_{k,n+1}). The engine runs the full
experiment; the numpy loop (the same algorithm written client by client) runs a reduced number of
runs and iterations, and the comparison is per run-iteration throughput. The same experiment
runs twice: the default path (compiled accelerators where they build) and torch only
(``use_kernels=False``; the mask sampler is numpy's). Each accelerator of
``psfed_robust.engine.kernels`` is also timed against its reference on P1-sized inputs (it stays
only where it earns at least 3x).

Usage: ``python benchmarks/engine.py [--runs 500] [--loop-runs 2] [--loop-iterations 150]
[--threads 2] [--selection random|round_robin] [--skip-torch-only]``. Prints figures, ends
with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

# OpenMP threads that sleep instead of spinning: on a shared 2-core machine spinning workers
# make every torch op many times slower whenever another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# run as a file, benchmarks/ would come first on sys.path: keep it off, so that a script name
# can never shadow a top-level package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from psfed_robust.engine import OnlineConfig, kernels, run_online  # noqa: E402
from psfed_robust.engine.loop import LocalStep  # noqa: E402
from psfed_robust.engine.masks import floyd_indices  # noqa: E402
from psfed_robust.engine.schedule import make_stream  # noqa: E402


def _best(fn: object, repeat: int = 5) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return best


def accelerators(cfg: OnlineConfig, block_runs: int = 125) -> dict[str, dict[str, float]]:
    """Each compiled accelerator against its reference on one P1 run block (one thread)."""
    if not kernels.available():
        return {}
    out: dict[str, dict[str, float]] = {}
    rows = 65536

    def floyd(backend: str) -> object:
        return lambda: floyd_indices(rows, cfg.dim, cfg.share_count,
                                     torch.Generator().manual_seed(0), backend=backend)

    ref, fast = _best(floyd("numpy")), _best(floyd("cpp"))
    out["floyd_sampler"] = {"reference_ms": round(ref * 1e3, 2),
                            "compiled_ms": round(fast * 1e3, 2), "speedup": round(ref / fast, 1)}
    c = cfg.replace(runs=block_runs)
    steps = {}
    for compiled in (False, True):
        stream = make_stream(c, block_runs, 0, torch.device("cpu"))
        step = LocalStep(c, stream, block_runs, torch.device("cpu"), compiled)
        W = torch.zeros((block_runs, c.num_clients, c.dim))
        y = stream.advance()
        steps[compiled] = _best(lambda s=step, W=W, y=y: s.step(W, y, None), 10)
    out["lms_rff_step"] = {"reference_ms": round(steps[False] * 1e3, 2),
                           "compiled_ms": round(steps[True] * 1e3, 2),
                           "speedup": round(steps[False] / steps[True], 1)}
    return out


def numpy_loop(runs: int, iterations: int, *, K: int = 100, L: int = 4, D: int = 200,
               P: int = 40, M: int = 40, mu: float = 0.75, num_test: int = 50,
               record_every: int = 10, seed: int = 0) -> np.ndarray:
    """PSO-Fed on P1's RFF task, one client at a time (random masks, uplink = next downlink)."""
    rng = np.random.default_rng(seed)
    scale = math.sqrt(2.0 / D)
    out = np.zeros((runs, iterations // record_every))

    def target(x: np.ndarray) -> float:
        return float(np.sqrt(x[0] ** 2 + np.sin(np.pi * x[3]) ** 2)
                     + (0.8 - 0.5 * np.exp(-x[1] ** 2)) * x[2])

    for r in range(runs):
        theta = rng.uniform(0.2, 0.9, K)
        mean = rng.uniform(-0.2, 0.2, K)
        std = np.sqrt(rng.uniform(0.2, 1.2, K))
        nstd = np.sqrt(rng.uniform(0.005, 0.03, K))
        omega = rng.standard_normal((L, D))
        b = rng.uniform(0, 2 * np.pi, D)
        stat = mean * np.sqrt((1 + theta) / (1 - theta))
        x = stat[:, None] + std[:, None] * rng.standard_normal((K, L))
        pick = rng.integers(0, K, num_test)
        xt = stat[pick, None] + std[pick, None] * rng.standard_normal((num_test, L))
        yt = np.array([target(v) for v in xt]) + nstd[pick] * rng.standard_normal(num_test)
        zt = scale * np.cos(xt @ omega + b)
        W = np.zeros((K, D))
        g = np.zeros(D)
        pending: dict[int, np.ndarray] = {}
        for n in range(iterations):
            part = np.sort(rng.choice(K, P, replace=False))
            for k in part:  # downlink: merge M global entries
                S = pending.get(int(k))
                if S is None:
                    S = rng.choice(D, M, replace=False)
                W[k, S] = g[S]
            for k in range(K):  # every client: AR(1) input, RFF, one LMS step
                u = mean[k] + std[k] * rng.standard_normal(L)
                x[k] = theta[k] * x[k] + math.sqrt(1 - theta[k] ** 2) * u
                y = target(x[k]) + nstd[k] * rng.standard_normal()
                z = scale * np.cos(x[k] @ omega + b)
                e = y - W[k] @ z
                W[k] += mu * e * z
            acc = np.zeros(D)
            new_pending = {}
            for k in part:  # uplink T_{k,n} = S_{k,n+1}
                T = rng.choice(D, M, replace=False)
                new_pending[int(k)] = T
                acc[T] += W[k, T] - g[T]
            pending = new_pending
            g += acc / P
            if (n + 1) % record_every == 0:
                out[r, (n + 1) // record_every - 1] = np.mean((yt - zt @ g) ** 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--loop-runs", type=int, default=2)
    ap.add_argument("--loop-iterations", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--selection", default="random", choices=["random", "round_robin"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-torch-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    cfg = OnlineConfig(task="rff", num_clients=100, input_dim=4, dim=200,
                       iterations=args.iterations, runs=args.runs, participants=40,
                       share_count=40, stepsize=0.75, selection=args.selection, record_every=10,
                       seed=2022)
    run_online(cfg.replace(runs=min(4, args.runs), iterations=20))  # warm-up (builds kernels)
    t0 = time.perf_counter()
    res = run_online(cfg, device=args.device)
    engine_s = time.perf_counter() - t0
    engine_us = engine_s / (cfg.runs * cfg.iterations) * 1e6
    ss = res.steady_state(0.1)
    print(f"engine  P1 scale: {cfg.runs} runs x {cfg.iterations} it, K=100, D=200, M=40, "
          f"P=40, selection={args.selection}: {engine_s:.1f} s "
          f"({engine_us:.1f} us per run-iteration, run_block={res.metadata['run_block']}, "
          f"kernels={res.metadata['engine_kernels']})")
    print(f"        global MSE last 10%: {ss.global_mse_db:.2f} dB, local {ss.local_mse_db:.2f} dB")
    torch_s = math.nan
    ss_t = None
    if not args.skip_torch_only:
        t0 = time.perf_counter()
        res_t = run_online(cfg, device=args.device, use_kernels=False)
        torch_s = time.perf_counter() - t0
        ss_t = res_t.steady_state(0.1)
        print(f"torch only: {torch_s:.1f} s ({torch_s / engine_s:.2f}x the default); "
              f"global MSE last 10%: {ss_t.global_mse_db:.2f} dB "
              f"(+-{ss_t.global_mse_sem_db:.2f} dB s.e.)")
    torch.set_num_threads(1)
    acc = accelerators(cfg)
    torch.set_num_threads(args.threads)
    for name, fig in acc.items():
        print(f"accelerator {name}: reference {fig['reference_ms']} ms, compiled "
              f"{fig['compiled_ms']} ms ({fig['speedup']}x)")

    t0 = time.perf_counter()
    loop = numpy_loop(args.loop_runs, args.loop_iterations)
    loop_s = time.perf_counter() - t0
    loop_us = loop_s / (args.loop_runs * args.loop_iterations) * 1e6
    print(f"numpy per-client loop: {args.loop_runs} runs x {args.loop_iterations} it: "
          f"{loop_s:.1f} s ({loop_us:.0f} us per run-iteration); "
          f"last MSE {10 * np.log10(loop[:, -1].mean()):.2f} dB")
    speedup = loop_us / engine_us
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"speedup (per run-iteration): {speedup:.0f}x; load average {load0:.2f} -> {load1:.2f}")
    print(json.dumps({
        "benchmark": "engine",
        "p1_scale_seconds": round(engine_s, 2),
        # null, never NaN (not JSON), when the torch-only run was skipped
        "torch_only_seconds": None if math.isnan(torch_s) else round(torch_s, 2),
        "torch_only_ratio": None if math.isnan(torch_s) else round(torch_s / engine_s, 2),
        "accelerators": acc,
        "speedup_vs_loop": round(speedup, 1),
        "engine_us_per_run_iteration": round(engine_us, 2),
        "loop_us_per_run_iteration": round(loop_us, 1),
        "runs": cfg.runs, "iterations": cfg.iterations, "clients": 100, "dim": 200,
        "share_count": 40, "participants": 40, "selection": args.selection,
        "loop_runs": args.loop_runs, "loop_iterations": args.loop_iterations,
        "threads": args.threads, "device": args.device, "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "mask_prefetch": res.metadata["mask_prefetch"],
        "engine_kernels": res.metadata["engine_kernels"],
        "load_average_start": round(load0, 2), "load_average_end": round(load1, 2),
        "steady_global_mse_db": round(ss.global_mse_db, 3),
        "steady_global_mse_db_torch_only": None if ss_t is None else round(ss_t.global_mse_db, 3),
        "torch": torch.__version__, "python": platform.python_version(),
    }))


if __name__ == "__main__":
    main()
