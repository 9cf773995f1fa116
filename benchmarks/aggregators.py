"""Benchmark: robust aggregators on K = 100 updates of d = 10^6 (float32, CPU, 2 threads).

Each rule with a Flower counterpart (``flwr.server.strategy.aggregate``: median, trimmed mean,
Krum, Multi-Krum, Bulyan) is timed against it on the same inputs (Flower gets its own API's input,
a list of ``([ndarray], num_examples)``; building that list is not timed). The other rules are
timed alone. Flower's Bulyan recomputes an all-pairs Python-loop distance matrix for each of its
``n - 2f`` Krum steps (hours-scale work at d = 10^6), so Bulyan is compared on ``--bulyan-d``
coordinates (both sides on the same smaller input, stated in the table).

Prints a table, then ONE JSON line with ``min_speedup_vs_flower`` and ``max_abs_diff_vs_flower``
(max |ours - flower| / max |flower|, over the compared rules).

The compiled column kernel (``defenses/_kernels.py``) must earn its place against the torch
reference: the same run times each kernel entry point on both back ends (``backend="cpp"`` vs
``"torch"``, same inputs) and prints the ratio per kernel (``kernel_speedups`` in the JSON line,
with ``kernel_max_rel_diff``); a kernel below 3x is to be removed.

    python benchmarks/aggregators.py [--d 1000000] [--k 100] [--bulyan-d 100000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

from defenses import get_defense
from defenses._kernels import cpp_kernel_available, sort_columns, window_mean


def best_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    out = None
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def make_inputs(k: int, d: int, f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 0.05 * torch.randn(k, d, generator=g) + 0.01
    x[:f] = -10.0 * x[:f]  # f sign-flipping (scaled) attackers
    return x.contiguous(), torch.zeros(d)


def time_kernels(x: torch.Tensor, f: int, reps: int) -> tuple[dict[str, float], float]:
    """Each compiled kernel entry point against the torch reference on ``x`` [K, D]: prints
    the times and ratios; returns ({kernel: speedup}, max relative difference)."""
    k = x.shape[0]
    kk = torch.tensor(k)
    cases: list[tuple[str, Callable[[str], torch.Tensor]]] = [
        ("window_mean median", lambda b: window_mean(x, (kk - 1) // 2, kk // 2 + 1, backend=b)),
        ("window_mean trimmed b=f", lambda b: window_mean(x, torch.tensor(f),
                                                          kk - f, backend=b)),
        ("sort_columns", lambda b: sort_columns(x, backend=b)),
    ]
    masks = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    cnt = masks.sum(0)
    cases.append((
        "window_mean median reporters",
        lambda b: window_mean(x, (cnt - 1).clamp_min(0) // 2, cnt // 2 + 1, masks, backend=b),
    ))
    print(f"\ncompiled kernel vs torch reference (K={k}, d={x.shape[1]}):")
    print(f"{'kernel':<32}{'cpp s':>9}{'torch s':>9}{'speedup':>9}{'rel diff':>11}")
    speedups: dict[str, float] = {}
    worst = 0.0
    for name, fn in cases:
        t_c, out_c = best_time(lambda fn=fn: fn("cpp"), reps)
        t_t, out_t = best_time(lambda fn=fn: fn("torch"), max(1, min(reps, 2)))
        scale = max(float(out_t.abs().max()), 1e-30)
        rel = float((out_c - out_t).abs().max()) / scale
        worst = max(worst, rel)
        speedups[name] = round(t_t / t_c, 2)
        print(f"{name:<32}{t_c:>9.3f}{t_t:>9.3f}{t_t / t_c:>9.1f}{rel:>11.2e}")
    return speedups, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--f", type=int, default=10)
    ap.add_argument("--bulyan-d", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    k, d, f = args.k, args.d, args.f

    t0 = time.perf_counter()
    kernel = cpp_kernel_available()
    build_s = time.perf_counter() - t0

    x, gm = make_inputs(k, d, f, args.seed)
    results = [([row.numpy().copy()], 1) for row in x]

    compared: list[tuple[str, str, Callable[[], Any], Callable[[], Any], int, int]] = [
        (
            "median",
            "aggregate_median",
            lambda: get_defense("median")(x, None, gm),
            lambda: aggregate_median(results),
            3,
            d,
        ),
        (
            "trimmed_mean(beta=0.1)",
            "aggregate_trimmed_avg",
            lambda: get_defense("trimmed_mean", beta=0.1)(x, None, gm),
            lambda: aggregate_trimmed_avg(results, 0.1),
            3,
            d,
        ),
        (
            "krum(f=10)",
            "aggregate_krum",
            lambda: get_defense("krum", f=f)(x, None, gm),
            lambda: aggregate_krum(results, f, 0),
            1,
            d,
        ),
        (
            "multi_krum(f=10,m=50)",
            "aggregate_krum(to_keep)",
            lambda: get_defense("multi_krum", f=f, m=50)(x, None, gm),
            lambda: aggregate_krum(results, f, 50),
            1,
            d,
        ),
    ]
    xb, gb = make_inputs(k, args.bulyan_d, f, args.seed + 1)
    res_b = [([row.numpy().copy()], 1) for row in xb]
    compared.append(
        (
            "bulyan(f=10)",
            "aggregate_bulyan",
            lambda: get_defense("bulyan", f=f)(xb, None, gb),
            lambda: aggregate_bulyan(list(res_b), f, aggregate_krum, to_keep=0),
            1,
            args.bulyan_d,
        )
    )

    rows: list[dict[str, Any]] = []
    print(
        f"K={k} d={d} float32, torch threads=2, sorting-network kernel={kernel} "
        f"(build/load {build_s:.1f} s)"
    )
    hdr = f"{'defense':<26}{'d':>9}{'ours s':>10}{'flower s':>10}{'speedup':>9}{'rel diff':>11}"
    print(hdr)
    print("-" * len(hdr))
    for name, _fname, ours_fn, flwr_fn, flwr_reps, dd in compared:
        t_ours, out = best_time(ours_fn, args.reps)
        t_flwr, ref = best_time(flwr_fn, flwr_reps)
        ref_np = np.asarray(ref[0], dtype=np.float64)
        diff = float(np.abs(out.numpy().astype(np.float64) - ref_np).max())
        rel = diff / max(float(np.abs(ref_np).max()), 1e-30)
        rows.append(
            {
                "defense": name,
                "d": dd,
                "ours_s": t_ours,
                "flower_s": t_flwr,
                "speedup": t_flwr / t_ours,
                "rel_diff": rel,
            }
        )
        print(f"{name:<26}{dd:>9}{t_ours:>10.3f}{t_flwr:>10.3f}{t_flwr / t_ours:>9.1f}{rel:>11.2e}")

    masks = torch.rand(k, d, generator=torch.Generator().manual_seed(1)) < 0.5
    alone: list[tuple[str, Callable[[], Any]]] = [
        ("bulyan(f=10) full d", lambda: get_defense("bulyan", f=f)(x, None, gm)),
        ("mean", lambda: get_defense("mean")(x, None, gm)),
        ("geometric_median(T=8)", lambda: get_defense("geometric_median")(x, None, gm)),
        ("centered_clipping(L=3)", lambda: get_defense("centered_clipping")(x, None, gm)),
        ("norm_clipping", lambda: get_defense("norm_clipping")(x, None, gm)),
        ("median reporters p=.5", lambda: get_defense("median")(x, masks, gm, mode="reporters")),
        (
            "trimmed reporters p=.5",
            lambda: get_defense("trimmed_mean")(x, masks, gm, mode="reporters"),
        ),
        ("krum reporters p=.5", lambda: get_defense("krum", f=f)(x, masks, gm, mode="reporters")),
    ]
    for name, fn in alone:
        t, _ = best_time(fn, args.reps)
        rows.append({"defense": name, "d": d, "ours_s": t})
        print(f"{name:<26}{d:>9}{t:>10.3f}{'-':>10}{'-':>9}{'-':>11}")

    kernel_speedups, kernel_diff = time_kernels(x, f, args.reps) if kernel else ({}, 0.0)

    cmp_rows = [r for r in rows if "speedup" in r]
    summary = {
        "benchmark": "defenses",
        "K": k,
        "d": d,
        "bulyan_d": args.bulyan_d,
        "dtype": "float32",
        "threads": 2,
        "cpp_kernel": kernel,
        "min_speedup_vs_flower": round(min(r["speedup"] for r in cmp_rows), 2),
        "max_abs_diff_vs_flower": float(f"{max(r['rel_diff'] for r in cmp_rows):.3e}"),
        "speedups": {r["defense"]: round(r["speedup"], 2) for r in cmp_rows},
        "seconds": {r["defense"]: round(r["ours_s"], 4) for r in rows},
        "kernel_speedups": kernel_speedups,
        "kernel_min_speedup": min(kernel_speedups.values()) if kernel_speedups else None,
        "kernel_max_rel_diff": float(f"{kernel_diff:.3e}"),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
