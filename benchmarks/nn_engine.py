"""Batched NN engine (psfed_robust.nn) against per-client baselines, and a 100-client CNN point.

1. The ``digits_flower`` setting (digits MLP, 10 clients, 15 rounds, shared fraction 0.5, no
   attack, mean): the batched engine against (a) the Flower engine through
   ``experiments.flower_engine`` when it runs on this tree, and (b) the plain per-client torch
   loop of :mod:`psfed_robust.nn.reference` (same split, initial model, masks and batch order:
   the same final parameters within float tolerance, checked here). Times are per point (every
   run of it), the batched engine's including its first-call warm-up.
2. A 100-client digits CNN study point: 200 rounds x 4 runs, shared fraction 0.5, worker
   momentum 0.9, batch 8, ALIE on 10 clients against the coordinate-wise median.
3. Memory per client: the engine's state bytes and the training bytes per row of a vmap chunk.

Usage: ``python benchmarks/nn_engine.py [--threads 1] [--skip-flower] [--cnn-rounds 200]``.
Run it under ``flock /tmp/psfed-bench.lock`` on a shared machine. The last line is ONE JSON
object: ``speedup_vs_flower`` (or ``speedup_vs_loop`` when the Flower engine did not run),
``acc_batched``, ``acc_flower`` (or ``acc_loop``), ``clients``, ``rounds`` and the CNN figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from psfed_robust.nn import NNConfig, run_nn  # noqa: E402
from psfed_robust.nn.reference import reference_loop  # noqa: E402

GiB = 2**30


def _flower(frac: float, seed: int, runs: int) -> tuple[float, float] | str:
    """(seconds, final accuracy averaged over runs) of the Flower engine, or why it did not run."""
    try:
        from experiments.flower_engine import run_flower_point
        from experiments.schema import load_scenario

        sc = load_scenario("digits_flower", [
            f"sweep.sharing.fraction=[{frac}]", 'sweep.attack.name=["none"]',
            'sweep.defense.name=["mean"]', f"runs={runs}", f"seed={seed}"])
        point = sc.points()[0]
        t = time.perf_counter()
        res = run_flower_point(point, seed)
        return time.perf_counter() - t, float(np.mean(res.metrics["accuracy"][:, -1]))
    except Exception as exc:  # the Flower engine is optional here: report, do not fail
        return f"{type(exc).__name__}: {exc}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--cnn-rounds", type=int, default=200)
    ap.add_argument("--cnn-runs", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load {os.getloadavg()}")

    # ---------------------------------------------------------------- 1. digits_flower setting
    seed, runs, clients, rounds, frac = 3, 2, 10, 15, 0.5
    cfg = NNConfig(task="digits", model="mlp", hidden=64, clients=clients, runs=runs,
                   rounds=rounds, seed=seed, fraction=frac, lr=0.05, batch_size=32,
                   threads=args.threads)
    t = time.perf_counter()
    res = run_nn(cfg)
    t_batched_cold = time.perf_counter() - t
    t = time.perf_counter()
    res = run_nn(cfg)
    t_batched = time.perf_counter() - t
    acc_batched = float(np.mean(res.metrics["accuracy"][:, -1]))
    t = time.perf_counter()
    ref, ref_acc = reference_loop(cfg)
    t_loop = time.perf_counter() - t
    acc_loop = float(np.mean(ref_acc[:, -1]))
    max_diff = float((res.final_global - ref).abs().max())
    print(f"digits MLP, {clients} clients, {rounds} rounds, {runs} runs, fraction {frac}:")
    print(f"  batched {t_batched:.3f} s (first call {t_batched_cold:.3f} s), acc {acc_batched:.4f}")
    print(f"  per-client loop {t_loop:.3f} s, acc {acc_loop:.4f}, max |param diff| {max_diff:.2e}")
    flower = "skipped (--skip-flower)" if args.skip_flower else _flower(frac, seed, runs)
    out: dict[str, object] = {}
    if isinstance(flower, tuple):
        t_flower, acc_flower = flower
        print(f"  Flower engine {t_flower:.3f} s, acc {acc_flower:.4f}")
        out["speedup_vs_flower"] = round(t_flower / t_batched, 2)
        out["acc_flower"] = round(acc_flower, 4)
    else:
        print(f"  Flower engine not run: {flower}")
    out["speedup_vs_loop"] = round(t_loop / t_batched, 2)
    out["acc_batched"] = round(acc_batched, 4)
    out["acc_loop"] = round(acc_loop, 4)
    out["clients"], out["rounds"] = clients, rounds

    # ---------------------------------------------------------------- 2. 100-client CNN point
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cnn = NNConfig(task="digits", model="cnn", clients=100, runs=args.cnn_runs,
                   rounds=args.cnn_rounds, seed=0, fraction=0.5, lr=0.1, batch_size=8,
                   momentum_scope="persistent", attack="alie",
                   malicious=10, defense="median", record_every=10, threads=args.threads)
    t = time.perf_counter()
    big = run_nn(cnn)
    t_cnn = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    P = int(big.info["num_parameters"])
    print(f"digits CNN (P = {P}), 100 clients, {cnn.rounds} rounds x {cnn.runs} runs, ALIE x10 "
          f"vs median: {t_cnn:.2f} s, final acc {np.mean(big.metrics['accuracy'][:, -1]):.4f}")

    # ---------------------------------------------------------------- 3. memory per client
    state = int(big.info["state_bytes_per_client"])
    row = int(big.info["train_bytes_per_row"])
    # per client and round: W row + merged copy + momentum + honest/sent/values (index form)
    per_client = 4 * P * 4 + 3 * 4 * P
    print(f"  state {state} B per client (local model{' + momentum' if state > 4 * P else ''}); "
          f"round working set ~{per_client} B per client ({per_client / P:.0f} B per parameter); "
          f"training {row} B per row of a vmap chunk (bounded by memory_budget_mb); "
          f"peak RSS growth {max(0, rss1 - rss0) / 2**20:.0f} MiB")
    fit = int(24 * GiB // (per_client / P))
    print(f"  24 GB holds clients x P up to ~{fit:.3g} (e.g. {fit // 10**5} clients of a 100k "
          "model), training chunked")
    out.update({"cnn_seconds": round(t_cnn, 2), "cnn_clients": 100, "cnn_rounds": cnn.rounds,
                "cnn_runs": cnn.runs, "cnn_acc": round(float(np.mean(
                    big.metrics["accuracy"][:, -1])), 4), "cnn_params": P,
                "bytes_per_client": per_client, "clients_x_params_24gb": fit})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
