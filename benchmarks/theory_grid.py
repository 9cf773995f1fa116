"""PSO-Fed theory (psfed_robust.engine.theory) against the batched engine on a grid of settings.

The grid spans uplink ``next`` (P1's PSO-Fed, Gogineni et al., ICASSP 2022, arXiv 2110.06556)
uncoordinated and coordinated, ``independent`` and ``same``; fixed and Bernoulli scheduling;
the three server weights; non-participant updates on/off; no attack, transmit-only and persistent
Gaussian model poisoning (Lari et al., IEEE TSIPN 2025, arXiv 2403.13108) with various p_a,
σ_δ and numbers of attackers; M from 1 to D. Every setting: D ≤ 32, test MSE as its expectation
over test inputs (``test_mse="expected"``), steady state = mean of the last half of the records.

Checks (the issue's acceptance figures): worst steady-state deviation (global) ≤ 0.3 dB with the
simulation's 95% CI within ±0.1 dB; learning curves within 0.5 dB at every recorded iteration
after the first 10%; μ* within one grid step of the simulated best stepsize on ``--mu-settings``
stepsize sweeps (M < D, uplink next; common random numbers across the sweep). Coordinated
round robin is exact and counted in the grid; uncoordinated round robin (modelled as random
selection: an approximation) is reported apart.

Usage: ``python benchmarks/theory_grid.py [--runs 2048] [--iterations 800] [--quick]``. Prints
figures, ends with ONE JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(
    os.path.abspath(__file__))]

import numpy as np  # noqa: E402

from psfed_robust.engine import OnlineConfig, run_online, theory  # noqa: E402

BASE = OnlineConfig(
    task="linear", num_clients=20, dim=16, participants=5, share_count=4, stepsize=0.05,
    iterations=800, runs=2048, uplink="next", attack="gaussian",
    attack_params={"p_a": 0.5, "sigma": 1.0}, num_malicious=3, noise_var=0.01,
    test_mse="expected", record_every=10, seed=15)
STEADY_WINDOW = 0.5
#: a U-shaped MSE(μ) with μ* well inside the stable range (the σ_ν² floor does not move argmin)
MU_BASE = BASE.replace(attack_params={"p_a": 0.5, "sigma": 0.5}, noise_var=0.5,
                       iterations=2000, runs=256)
MU_GRID = tuple(0.01 * 1.5 ** i for i in range(7))  # 0.010 … 0.114


def persistent(cfg: OnlineConfig) -> OnlineConfig:
    """A persistent attack: the ``attack_persistent`` field, or the older attack parameter."""
    if "attack_persistent" in OnlineConfig.__dataclass_fields__:
        return cfg.replace(attack_persistent=True)
    return cfg.replace(attack_params={**cfg.attack_params, "persistent": True})


def grid() -> list[tuple[str, OnlineConfig]]:
    """≥ 24 exact settings spanning every dimension of the theory."""
    b = BASE
    out = [
        ("next M=4 (base)", b),
        ("next M=1", b.replace(share_count=1)),
        ("next M=8", b.replace(share_count=8)),
        ("next M=D=16", b.replace(share_count=16)),
        ("next coordinated", b.replace(coordinated=True)),
        ("next coordinated M=8", b.replace(coordinated=True, share_count=8)),
        ("next bernoulli participants", b.replace(scheduling="bernoulli", p_c=0.25)),
        ("next bernoulli expected", b.replace(scheduling="bernoulli", p_c=0.25,
                                              server_weight="expected")),
        ("next bernoulli all", b.replace(scheduling="bernoulli", p_c=0.25, server_weight="all")),
        ("next fixed all", b.replace(server_weight="all", stepsize=0.08)),
        ("next no non-participant updates", b.replace(nonparticipant_updates=False)),
        ("next no np-updates bernoulli", b.replace(nonparticipant_updates=False,
                                                   scheduling="bernoulli", p_c=0.3)),
        ("next persistent", persistent(b)),
        ("next persistent coordinated", persistent(b.replace(coordinated=True))),
        ("next persistent bernoulli", persistent(b.replace(scheduling="bernoulli", p_c=0.25))),
        ("next no attack", b.replace(attack="none", attack_params={}, num_malicious=0)),
        ("next p_a=1 sigma=2", b.replace(attack_params={"p_a": 1.0, "sigma": 2.0})),
        ("next 1 attacker", b.replace(num_malicious=1)),
        ("next 10 attackers", b.replace(num_malicious=10, attack_params={"p_a": 0.2,
                                                                         "sigma": 1.0})),
        ("next mu=0.02", b.replace(stepsize=0.02)),
        ("next mu=0.1", b.replace(stepsize=0.1)),
        ("next P=1", b.replace(participants=1, stepsize=0.03)),
        ("next P=K=10", b.replace(num_clients=10, participants=10, num_malicious=2)),
        ("next D=32 K=50 P=10 M=8", b.replace(dim=32, num_clients=50, participants=10,
                                              share_count=8, stepsize=0.02, num_malicious=5)),
        ("independent persistent", persistent(b.replace(uplink="independent"))),
        ("independent bernoulli participants", b.replace(uplink="independent",
                                                         scheduling="bernoulli", p_c=0.25)),
        ("same M=4", b.replace(uplink="same")),
        ("next coordinated bernoulli participants", b.replace(
            coordinated=True, scheduling="bernoulli", p_c=0.25)),
    ]
    return out


def round_robin() -> list[tuple[str, OnlineConfig]]:
    """Round-robin selection: coordinated is exact (eq. RR); uncoordinated is modelled as random
    selection (an approximation, reported apart)."""
    b = BASE.replace(selection="round_robin")
    c = b.replace(coordinated=True)
    return [("rr coordinated next M=4", c), ("rr coordinated next M=3", c.replace(share_count=3)),
            ("rr coordinated same M=4", c.replace(uplink="same")),
            ("rr coordinated independent M=4", c.replace(uplink="independent")),
            ("rr coordinated next persistent bernoulli", persistent(c.replace(
                scheduling="bernoulli", p_c=0.25, nonparticipant_updates=False))),
            ("rr next M=4 (approx.)", b), ("rr next M=8 (approx.)", b.replace(share_count=8)),
            ("rr same M=4 (approx.)", b.replace(uplink="same")),
            ("rr independent M=4 (approx.)", b.replace(uplink="independent"))]


def db(x: Any) -> Any:
    return 10 * np.log10(x)


def compare(cfg: OnlineConfig) -> dict[str, Any]:
    """Simulate ``cfg`` and compare steady states and learning curves with the theory."""
    t0 = time.perf_counter()
    res = run_online(cfg)
    sec = time.perf_counter() - t0
    ss = res.steady_state(STEADY_WINDOW)
    it = res.iterations
    lc = theory.learning_curve(cfg)
    llc = theory.local_learning_curve(cfg)
    re = cfg.record_every
    sim = res.global_mse.mean(0)
    dev = db(sim) - db(lc[it])
    sel = it > 0.1 * cfg.iterations
    # local records average the a-priori errors of the record_every iterations of the record
    th_local = np.array([llc[t - re + 1:t + 1].mean() for t in it])
    ldev = db(res.local_mse.mean(0)) - db(th_local)
    rec_sem = db(1 + res.global_mse.std(0, ddof=1) / math.sqrt(cfg.runs) / sim)
    th_ss = db(theory.steady_state(cfg))
    th_local_ss = db(theory.steady_state_local(cfg))
    return {
        "sim_db": ss.global_mse_db, "ci95_db": 1.96 * ss.global_mse_sem_db, "theory_db": th_ss,
        "diff_db": ss.global_mse_db - th_ss,
        "local_sim_db": ss.local_mse_db, "local_theory_db": th_local_ss,
        "local_diff_db": ss.local_mse_db - th_local_ss,
        "lc_max_dev_db": float(np.abs(dev[sel]).max()),
        "lc_local_max_dev_db": float(np.abs(ldev[sel]).max()),
        "record_sem_db": float(rec_sem[sel].mean()), "method": theory.method(cfg),
        "exact": theory.is_exact(cfg), "seconds": sec,
    }


def mu_sweep(name: str, cfg: OnlineConfig) -> dict[str, Any]:
    """Simulated steady state on :data:`MU_GRID` (same random numbers) vs the theory's μ*."""
    sims = []
    for mu in MU_GRID:
        r = run_online(cfg.replace(stepsize=mu))
        sims.append(r.steady_state(STEADY_WINDOW).global_mse_db)
    mu_star, mse_star = theory.optimal_stepsize(cfg)
    best = int(np.argmin(sims))
    star_idx = float(np.log(mu_star / MU_GRID[0]) / np.log(1.5))  # grid coordinate of μ*
    return {"name": name, "mu_star": mu_star, "mse_star_db": float(db(mse_star)),
            "sim_best_mu": MU_GRID[best], "grid_steps_off": abs(star_idx - best),
            "sim_db": [round(float(s), 3) for s in sims],
            "theory_db": [round(float(db(theory.steady_state(cfg, m))), 3) for m in MU_GRID]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2048)
    ap.add_argument("--iterations", type=int, default=800)
    ap.add_argument("--mu-runs", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="4 settings, 128 runs, 1 μ sweep")
    args = ap.parse_args(argv)
    settings = grid()
    mu_settings = [("M=4", MU_BASE), ("M=8", MU_BASE.replace(share_count=8)),
                   ("coordinated M=4", MU_BASE.replace(coordinated=True))]
    rr = round_robin()
    if args.quick:
        settings, mu_settings, rr = settings[:4], mu_settings[:1], rr[:1] + rr[-1:]
        args.runs, args.mu_runs = 128, 64
    rows = []
    print(f"{'setting':42s} {'sim dB':>8s} {'±CI95':>6s} {'theory':>8s} {'diff':>6s} "
          f"{'LCmax':>6s} {'rec.sem':>7s} {'loc.diff':>8s} {'s':>5s}")
    for name, cfg in settings + rr:
        r = compare(cfg.replace(runs=args.runs, iterations=args.iterations))
        r["name"] = name
        rows.append(r)
        print(f"{name:42s} {r['sim_db']:8.3f} {r['ci95_db']:6.3f} {r['theory_db']:8.3f} "
              f"{r['diff_db']:+6.3f} {r['lc_max_dev_db']:6.3f} {r['record_sem_db']:7.3f} "
              f"{r['local_diff_db']:+8.3f} "
              f"{r['seconds']:5.1f}", flush=True)
    exact = [r for r in rows if r["exact"]]
    approx = [r for r in rows if not r["exact"]]
    sweeps = []
    for name, cfg in mu_settings:
        s = mu_sweep(name, cfg.replace(runs=args.mu_runs))
        sweeps.append(s)
        print(f"mu* {name:18s} theory {s['mu_star']:.4f} ({s['mse_star_db']:.2f} dB), "
              f"sim best {s['sim_best_mu']:.4f}, {s['grid_steps_off']:.2f} grid steps off; "
              f"sim {s['sim_db']} theory {s['theory_db']}", flush=True)
    out = {
        "settings": len(exact),
        "worst_steady_dev_db": max(abs(r["diff_db"]) for r in exact),
        "worst_ci95_db": max(r["ci95_db"] for r in exact),
        "worst_lc_dev_db": max(r["lc_max_dev_db"] for r in exact),
        "worst_local_steady_dev_db": max(abs(r["local_diff_db"]) for r in exact),
        "mu_star_max_grid_steps_off": max(s["grid_steps_off"] for s in sweeps),
        "mu_star_settings": len(sweeps),
        "round_robin_worst_dev_db": max((abs(r["diff_db"]) for r in approx), default=None),
        "runs": args.runs, "iterations": args.iterations,
    }
    out["pass"] = bool(out["worst_steady_dev_db"] <= 0.3 and out["worst_ci95_db"] <= 0.1
                       and out["worst_lc_dev_db"] <= 0.5
                       and all(s["grid_steps_off"] <= 1.0 for s in sweeps))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
