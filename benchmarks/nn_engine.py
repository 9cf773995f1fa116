"""Batched NN engine (psfed_robust.nn): speed against its baselines, a 100-client CNN point, memory.

1. The ``digits_flower`` setting (digits MLP, 10 clients, 15 rounds, 2 runs, shared fraction
   0.5, no attack, mean), side by side in one process, at 1 thread and at ``--threads`` (all
   cores by default): the batched engine's default path (the compiled MLP kernel of
   :mod:`psfed_robust.nn.kernels`), the torch fused path it replaces (``PSFED_NO_CPP_KERNEL=1``:
   the kernel's reference; the kernel's ratio is taken on training proper, the train phase less
   the batch-order draws both paths share), the ``torch.func`` path (``fused = False``:
   ``vmap(grad)`` with ``functional_call``), the plain per-client torch loop of
   :mod:`psfed_robust.nn.reference` (same split, initial model, masks and batch order: the same
   final parameters within float tolerance, printed) and the Flower engine through
   ``experiments.flower_engine``. Each time is the best of ``--reps`` calls of a whole point
   (every run of it), after one warm-up call.
2. A 100-client digits CNN study point: 200 rounds x 4 runs, shared fraction 0.5, worker
   momentum 0.9, batch 8, ALIE on 10 clients against the coordinate-wise median — one call.
3. Memory per client, measured: the peak RSS growth of a one-round CNN run (fresh processes,
   after a warm-up run; Linux's VmHWM reset through /proc/self/clear_refs) with 200 and 1,000
   clients, training in chunks of 50 rows so its bounded buffers cancel; the slope is the bytes
   per client (state and round working set); from it the largest clients x parameters that fit
   in 24 GB.

Usage: ``python benchmarks/nn_engine.py [--threads 2] [--skip-flower] [--cnn-rounds 200]``.
Run it under ``flock /tmp/psfed-bench.lock`` on a shared machine; the machine load is printed.
The last line is ONE JSON object: ``speedup_vs_flower``, ``acc_batched``, ``acc_flower``,
``clients``, ``rounds``, ``threads`` (the headline figures at ``--threads``), ``threads_1`` and
``threads_<n>`` (each pass's figures) and the other figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

# (no OMP_WAIT_POLICY here: at 2 threads its PASSIVE setting makes every parallel torch op wake
# sleeping threads, 2x slower small ops for the torch paths and the Flower engine alike, which
# would flatter the ratios; the policy in effect is printed)
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from psfed_robust.nn import NNConfig, run_nn  # noqa: E402
from psfed_robust.nn.reference import reference_loop  # noqa: E402

GiB = 2**30


def _best(fn: Callable[[], Any], reps: int) -> tuple[float, float, Any]:
    """(best, median) seconds of ``reps`` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), float(np.median(times)), out


def _flower_point(frac: float, seed: int, runs: int) -> Callable[[], Any]:
    from experiments.flower_engine import run_flower_point
    from experiments.schema import load_scenario

    sc = load_scenario("digits_flower", [
        f"sweep.sharing.fraction=[{frac}]", 'sweep.attack.name=["none"]',
        'sweep.defense.name=["mean"]', f"runs={runs}", f"seed={seed}"])
    point = sc.points()[0]
    return lambda: run_flower_point(point, seed)


_RSS_SNIPPET = """
import sys, torch
torch.set_num_threads(1)
from psfed_robust.nn import NNConfig, run_nn

def status(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(field))

k = int(sys.argv[1])
cfg = dict(task="digits", model="cnn", runs=1, rounds=1, fraction=0.5, batch_size=8,
           momentum_scope="persistent", attack="alie", defense="median", threads=1, max_chunk=50)
run_nn(NNConfig(clients=20, malicious=2, **cfg))  # imports, caches, kernels
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset the peak-RSS counter (VmHWM)
run_nn(NNConfig(clients=k, malicious=k // 10, **cfg))
print(status("VmHWM:") - base)
"""


def _peak_rss(clients: int) -> int:
    out = subprocess.run([sys.executable, "-c", _RSS_SNIPPET, str(clients)], check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def _timed_pieces(cfg: NNConfig, reps: int) -> tuple[dict[str, float], Any]:
    """Seconds spent per point in local training (``train_rows``), the batch-order draws
    (``batch_plan``) and the evaluation sums, measured inside real runs of ``cfg`` (each the
    best of ``reps`` runs): the accelerators at work in the engine, not in isolation."""
    import psfed_robust.nn.engine as eng

    names = {"train": "train_rows", "plan": "batch_plan"}
    best: dict[str, float] = {}
    res: Any = None
    saved = {k: getattr(eng, v) for k, v in names.items()}
    saved_eval = eng._Evaluator.__call__
    for _ in range(reps):
        spent = {"train": 0.0, "plan": 0.0, "eval": 0.0}

        def wrap(key: str, fn: Callable[..., Any], acc: dict[str, float] = spent
                 ) -> Callable[..., Any]:
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    acc[key] += time.perf_counter() - t
            return timed

        try:
            for k, v in names.items():
                setattr(eng, v, wrap(k, saved[k]))
            eng._Evaluator.__call__ = wrap("eval", saved_eval)  # type: ignore[method-assign]
            res = run_nn(cfg)
        finally:
            for k, v in names.items():
                setattr(eng, v, saved[k])
            eng._Evaluator.__call__ = saved_eval  # type: ignore[method-assign]
        for k, v in spent.items():
            best[k] = min(best.get(k, float("inf")), v)
    return best, res


def _kernel_ratios(cfg: NNConfig, reps: int) -> dict[str, float]:
    """Each compiled accelerator of the NN engine against its torch reference, timed inside
    runs of the point ``cfg`` (``PSFED_NO_CPP_KERNEL=1`` for the references): local training,
    the batch-order draws and the evaluation sums, per point."""
    run_nn(cfg)
    fast, _ = _timed_pieces(cfg, reps)
    os.environ["PSFED_NO_CPP_KERNEL"] = "1"
    try:
        run_nn(cfg)
        ref, _ = _timed_pieces(cfg, reps)
    finally:
        del os.environ["PSFED_NO_CPP_KERNEL"]
    out: dict[str, float] = {}
    for k in ("train", "plan", "eval"):
        out[f"{k}_compiled_ms"] = round(1e3 * fast[k], 2)
        out[f"{k}_torch_ms"] = round(1e3 * ref[k], 2)
        out[f"{k}_ratio"] = round(ref[k] / fast[k], 2)
    print(f"  compiled accelerators vs their torch reference, in the engine (ms per point): "
          f"training {out['train_torch_ms']:.2f} / {out['train_compiled_ms']:.2f} = "
          f"{out['train_ratio']:.1f}x; batch orders {out['plan_torch_ms']:.2f} / "
          f"{out['plan_compiled_ms']:.2f} = {out['plan_ratio']:.1f}x; evaluation "
          f"{out['eval_torch_ms']:.2f} / {out['eval_compiled_ms']:.2f} = "
          f"{out['eval_ratio']:.1f}x")
    return out


def _mlp_point(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """Section 1 at ``threads`` torch threads (and kernel threads): every path side by side."""
    torch.set_num_threads(threads)
    seed, runs, clients, rounds, frac = 3, 2, 10, 15, 0.5
    cfg = NNConfig(task="digits", model="mlp", hidden=64, clients=clients, runs=runs,
                   rounds=rounds, seed=seed, fraction=frac, lr=0.05, batch_size=32,
                   threads=threads)
    t_fast, m_fast, res = _best(lambda: run_nn(cfg), args.reps)
    acc_batched = float(np.mean(res.metrics["accuracy"][:, -1]))
    os.environ["PSFED_NO_CPP_KERNEL"] = "1"  # the torch fused path: the kernel's reference
    try:
        t_torch, m_torch, res_torch = _best(lambda: run_nn(cfg), args.reps)
    finally:
        del os.environ["PSFED_NO_CPP_KERNEL"]
    t_vmap, m_vmap, res_vmap = _best(lambda: run_nn(replace(cfg, fused=False)),
                                     args.reps)
    t_loop, m_loop, (ref, ref_acc) = _best(lambda: reference_loop(cfg), args.reps)
    acc_loop = float(np.mean(ref_acc[:, -1]))
    d_loop = float((res.final_global - ref).abs().max())
    d_vmap = float((res.final_global - res_vmap.final_global).abs().max())
    d_torch = float((res.final_global - res_torch.final_global).abs().max())
    print(f"digits MLP, {clients} clients, {rounds} rounds, {runs} runs, fraction {frac}, "
          f"{threads} thread(s) (best / median of {args.reps} calls):")
    print(f"  batched, {res.info['train_path']:8s} path  {t_fast:8.4f} / {m_fast:.4f} s, "
          f"acc {acc_batched:.4f}")
    print(f"  batched, torch fused path {t_torch:8.4f} / {m_torch:.4f} s "
          f"({t_torch / t_fast:.1f}x), max |param diff| {d_torch:.1e}")
    print(f"  batched, torch.func path  {t_vmap:8.4f} / {m_vmap:.4f} s "
          f"({t_vmap / t_fast:.1f}x), max |param diff| {d_vmap:.1e}")
    print(f"  per-client torch loop     {t_loop:8.4f} / {m_loop:.4f} s "
          f"({t_loop / t_fast:.1f}x), acc {acc_loop:.4f}, max |param diff| {d_loop:.1e}")
    print("  phases (ms): " + ", ".join(f"{k} {1e3 * v:.1f}"
                                        for k, v in res.info["phase_seconds"].items()))
    fig: dict[str, Any] = {
        "batched_seconds": round(t_fast, 4), "train_path": res.info["train_path"],
        "torch_fused_seconds": round(t_torch, 4),
        "kernels": _kernel_ratios(cfg, max(args.reps, 5)),
        "speedup_vs_loop": round(t_loop / t_fast, 1),
        "speedup_vs_torch_func": round(t_vmap / t_fast, 1), "acc_batched": round(acc_batched, 4),
        "acc_loop": round(acc_loop, 4)}
    if not args.skip_flower:
        t_fl, m_fl, fl = _best(_flower_point(frac, seed, runs), args.reps)
        acc_flower = float(np.mean(fl.metrics["accuracy"][:, -1]))
        print(f"  Flower engine             {t_fl:8.4f} / {m_fl:.4f} s "
              f"({t_fl / t_fast:.1f}x; median {m_fl / m_fast:.1f}x), acc {acc_flower:.4f}")
        fig.update({"speedup_vs_flower": round(t_fl / t_fast, 1),
                    "speedup_vs_flower_median": round(m_fl / m_fast, 1),
                    "acc_flower": round(acc_flower, 4), "flower_seconds": round(t_fl, 3)})
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads of the CNN point and of the MLP point's second pass (the "
                         "MLP point runs at 1 thread and at this count)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-flower", action="store_true")
    ap.add_argument("--cnn-rounds", type=int, default=200)
    ap.add_argument("--cnn-runs", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', '(default)')}")
    out: dict[str, Any] = {}

    # ---------------------------------------------------------------- 1. digits_flower setting
    counts = sorted({1, args.threads})
    for threads in counts:
        fig = _mlp_point(args, threads)
        out[f"threads_{threads}"] = fig
    top = out[f"threads_{counts[-1]}"]  # the headline figures: every core of the machine
    out.update({k: top[k] for k in ("speedup_vs_flower", "speedup_vs_flower_median",
                                    "acc_flower", "flower_seconds", "kernels")
                if k in top})
    out.update({"batched_seconds": top["batched_seconds"], "acc_batched": top["acc_batched"],
                "acc_loop": top["acc_loop"], "speedup_vs_loop": top["speedup_vs_loop"],
                "speedup_vs_torch_func": top["speedup_vs_torch_func"], "clients": 10,
                "rounds": 15, "threads": counts[-1]})
    torch.set_num_threads(args.threads)

    # ---------------------------------------------------------------- 2. 100-client CNN point
    cnn = NNConfig(task="digits", model="cnn", clients=100, runs=args.cnn_runs,
                   rounds=args.cnn_rounds, seed=0, fraction=0.5, lr=0.1, batch_size=8,
                   momentum_scope="persistent", attack="alie", malicious=10, defense="median",
                   record_every=10, threads=args.threads)
    run_nn(replace(cnn, rounds=1, clients=10, malicious=1))  # warm-up
    t, c, o = time.perf_counter(), time.process_time(), os.times()
    big = run_nn(cnn)
    t_cnn, c_cnn, o1 = time.perf_counter() - t, time.process_time() - c, os.times()
    sys_cnn = o1.system - o.system  # kernel time: mostly page faults of fresh large tensors
    P = int(big.info["num_parameters"])
    acc_cnn = float(np.mean(big.metrics["accuracy"][:, -1]))
    print(f"digits CNN (P = {P}), 100 clients, {cnn.rounds} rounds x {cnn.runs} runs, ALIE x10 "
          f"vs median, worker momentum: {t_cnn:.2f} s ({1e3 * t_cnn / cnn.rounds:.0f} ms per "
          f"round; process CPU time {c_cnn:.2f} s, of which system {sys_cnn:.2f} s), final acc "
          f"{acc_cnn:.4f}")
    phases = big.info["phase_seconds"]
    print("  phases (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    out.update({"cnn_seconds": round(t_cnn, 2), "cnn_cpu_seconds": round(c_cnn, 2),
                "cnn_sys_seconds": round(sys_cnn, 2),
                "cnn_phase_seconds": phases, "cnn_clients": 100, "cnn_rounds": cnn.rounds,
                "cnn_runs": cnn.runs, "cnn_acc": round(acc_cnn, 4), "cnn_params": P})

    # ---------------------------------------------------------------- 3. memory per client
    lo, hi = 200, 1000
    r_lo, r_hi = _peak_rss(lo), _peak_rss(hi)
    per_client = max(1, (r_hi - r_lo) // (hi - lo))
    fit = int(24 * GiB // (per_client / P))
    print(f"  peak RSS growth {r_lo / 2**20:.0f} MiB ({lo} clients) -> {r_hi / 2**20:.0f} MiB "
          f"({hi}): "
          f"{per_client} B per client = {per_client / P:.1f} B per parameter (state "
          f"{big.info['state_bytes_per_client']} B: local model + worker momentum)")
    print(f"  24 GB holds clients x parameters up to ~{fit:.3g}: {fit // P:,} clients of this "
          f"CNN, {fit // 10**5:,} of a 100k-parameter model, {fit // 10**6:,} of a 1M one")
    out.update({"bytes_per_client": per_client, "bytes_per_parameter": round(per_client / P, 1),
                "clients_x_params_24gb": fit, "load": round(load[0], 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
