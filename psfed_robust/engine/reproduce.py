"""Reproduce the papers' figures with the batched engine (and the theory overlaid).

``python -m psfed_robust.engine.reproduce p1|p2|theory|all --out DIR [--runs N] [--quick]``

* ``p1`` — P1 (Gogineni et al., ICASSP 2022, arXiv 2110.06556): PSO-Fed (M = 40) vs Online-Fed
  (M = D = 200) on the RFF task (K = 100, L = 4, D = 200, μ = 0.75, 1,000 iterations, 40
  participants): learning curves and MSE vs communicated values (80% saving).
* ``p2`` — P2 (Lari et al., IEEE TSIPN 2025, arXiv 2403.13108), linear white-Gaussian model under
  Gaussian model poisoning: steady-state MSE vs M, vs the number of attackers, vs σ_δ², and the
  U-shaped MSE(μ) with its optimum μ*; theory (psfed_robust.engine.theory) overlaid.
* ``theory`` — theory vs simulation: learning curves and steady states on 6 attacked settings
  (3 values of M including M = D, 2 stepsizes).

Each target writes ``<name>.png`` and ``<name>.json`` (the numbers behind the figure) to DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from psfed_robust.engine import theory
from psfed_robust.engine.online import OnlineConfig, OnlineResult, run_online

__all__ = ["P2_BASE", "main", "p1", "p2", "theory_validation"]

#: P2-style linear setting used by the ``p2`` and ``theory`` targets (uplink ``independent``:
#: the configuration the theory covers exactly; ``next``, P1's form, is simulated alongside).
P2_BASE = OnlineConfig(
    task="linear", num_clients=50, dim=32, participants=10, share_count=4, stepsize=0.02,
    iterations=1500, runs=100, selection="random", coordinated=False, uplink="independent",
    server_weight="participants", attack="gaussian",
    attack_params={"p_a": 0.5, "sigma": 1.0, "persistent": False}, num_malicious=5,
    noise_var=0.01, input_var=1.0, test_mse="sample", record_every=10, seed=2024,
)
STEADY_WINDOW = 0.6  # fraction of the records averaged for the steady state (after convergence)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _db(x: float | np.ndarray) -> Any:
    return 10 * np.log10(x)


def _save(fig: Any, out: Path, name: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1, default=float))
    print(f"wrote {out / name}.png/.json")


def _ss(res: OnlineResult) -> float:
    return res.steady_state(STEADY_WINDOW).global_mse_db


# ------------------------------------------------------------------------------------------ P1
def p1(out: Path, runs: int = 100, iterations: int = 1000) -> dict[str, Any]:
    """PSO-Fed (M=40) vs Online-Fed (M=200) on P1's RFF task."""
    plt = _plt()
    base = OnlineConfig(task="rff", num_clients=100, input_dim=4, dim=200, stepsize=0.75,
                        iterations=iterations, runs=runs, participants=40, record_every=10,
                        seed=2022)
    curves: dict[str, Any] = {}
    for label, M in (("PSO-Fed M=40", 40), ("Online-Fed M=200", 200)):
        t0 = time.perf_counter()
        res = run_online(base.replace(share_count=M))
        curves[label] = {
            "M": M, "iterations": res.iterations.tolist(),
            "global_mse_db": res.global_mse_db.tolist(), "local_mse_db": res.local_mse_db.tolist(),
            "final_global_mse_db": float(res.global_mse_db[-1]),
            "steady_last10pct_db": res.steady_state(0.1).global_mse_db,
            "values_per_iteration": 2 * base.participants * M,  # downlink + uplink
            "seconds": time.perf_counter() - t0,
        }
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, c) in enumerate(curves.items()):
        it = np.asarray(c["iterations"])
        ax[0].plot(it, c["global_mse_db"], f"C{i}-", label=f"{label} (global model)")
        ax[0].plot(it, c["local_mse_db"], f"C{i}--", label=f"{label} (local, a priori)")
        ax[1].plot(it * c["values_per_iteration"] / 1e6, c["global_mse_db"], f"C{i}-",
                   label=label)
    ax[0].set(xlabel="iteration", ylabel="MSE (dB)",
              title=f"P1 RFF task: K=100, D=200, P=40, μ=0.75 ({runs} runs)")
    ax[1].set(xlabel="values communicated (millions, up+down)", ylabel="global MSE (dB)",
              title="MSE vs communication: M=40 sends 80% fewer values")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    data = {"config": base.to_dict(), "curves": curves, "communication_saving": 1 - 40 / 200}
    _save(fig, out, "p1_learning_curves", data)
    plt.close(fig)
    return data


# ------------------------------------------------------------------------------------------ P2
def _sweep(configs: list[OnlineConfig]) -> list[float]:
    return [_ss(run_online(c)) for c in configs]


def _iterations_for(cfg: OnlineConfig, mu: float, minimum: int) -> int:
    """Enough iterations that the steady-state window starts well after convergence."""
    rho = theory.spectral_radius(cfg, mu)
    n_conv = math.log(1e-3) / math.log(rho)
    it = max(minimum, math.ceil(n_conv / (1 - STEADY_WINDOW) * 1.2))
    return int(math.ceil(it / cfg.record_every) * cfg.record_every)


def _theory_db(c: OnlineConfig) -> float:
    v = theory.steady_state(c)
    return float(_db(v)) if math.isfinite(v) else float("nan")


def p2(out: Path, runs: int = 100, iterations: int = 1500) -> dict[str, Any]:
    """P2's steady-state experiments on the linear model, theory overlaid."""
    plt = _plt()
    base = P2_BASE.replace(runs=runs, iterations=iterations)
    data: dict[str, Any] = {"config": base.to_dict(), "steady_window": STEADY_WINDOW}
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))

    # (a) MSE vs M, attacked and clean, theory + sim; P1's uplink 'next' simulated too
    Ms = [1, 2, 4, 8, 16, 32]
    a: dict[str, Any] = {"M": Ms}
    for key, cfg in (("attack", base), ("no_attack", base.replace(attack="none"))):
        a[f"{key}_sim_db"] = _sweep([cfg.replace(share_count=M) for M in Ms])
        a[f"{key}_theory_db"] = [_theory_db(cfg.replace(share_count=M)) for M in Ms]
    a["attack_next_sim_db"] = _sweep([base.replace(share_count=M, uplink="next") for M in Ms])
    a["attack_same_theory_db"] = [_theory_db(base.replace(share_count=M, uplink="same"))
                                  for M in Ms]
    ax0 = ax[0, 0]
    ax0.semilogx(Ms, a["attack_theory_db"], "C0-", label="attack: theory (uplink independent)")
    ax0.semilogx(Ms, a["attack_sim_db"], "C0o", label="attack: simulation")
    ax0.semilogx(Ms, a["attack_next_sim_db"], "C2s--", label="attack: sim, uplink next (P1)")
    ax0.semilogx(Ms, a["attack_same_theory_db"], "C3:", label="attack: theory, uplink same")
    ax0.semilogx(Ms, a["no_attack_theory_db"], "C1-", label="no attack: theory")
    ax0.semilogx(Ms, a["no_attack_sim_db"], "C1o", label="no attack: simulation")
    ax0.set(xlabel="shared entries M (D = 32)", ylabel="steady-state MSE (dB)",
            title="MSE vs M (5 of 50 attackers, p_a=0.5, σ_δ²=1)")
    ax0.set_xticks(Ms, [str(m) for m in Ms])
    data["mse_vs_M"] = a

    # (b) vs number of attackers
    nms = [0, 2, 5, 10, 20]
    b: dict[str, Any] = {"num_malicious": nms}
    ax1 = ax[0, 1]
    for i, M in enumerate((4, 32)):
        cfgs = [base.replace(share_count=M, num_malicious=n) for n in nms]
        b[f"M{M}_sim_db"] = _sweep(cfgs)
        b[f"M{M}_theory_db"] = [_theory_db(c) for c in cfgs]
        ax1.plot(nms, b[f"M{M}_theory_db"], f"C{i}-", label=f"M={M} theory")
        ax1.plot(nms, b[f"M{M}_sim_db"], f"C{i}o", label=f"M={M} simulation")
    ax1.set(xlabel="number of malicious clients (of 50)", ylabel="steady-state MSE (dB)",
            title="MSE vs attackers (p_a=0.5, σ_δ²=1)")
    data["mse_vs_attackers"] = b

    # (c) vs attack variance
    sig2 = [0.01, 0.1, 1.0, 10.0]
    c_: dict[str, Any] = {"sigma2": sig2}
    ax2 = ax[1, 0]
    for i, M in enumerate((4, 32)):
        cfgs = [base.replace(share_count=M, attack_params={**base.attack_params,
                                                           "sigma": math.sqrt(s)})
                for s in sig2]
        c_[f"M{M}_sim_db"] = _sweep(cfgs)
        c_[f"M{M}_theory_db"] = [_theory_db(c) for c in cfgs]
        ax2.semilogx(sig2, c_[f"M{M}_theory_db"], f"C{i}-", label=f"M={M} theory")
        ax2.semilogx(sig2, c_[f"M{M}_sim_db"], f"C{i}o", label=f"M={M} simulation")
    ax2.set(xlabel="attack noise variance σ_δ²", ylabel="steady-state MSE (dB)",
            title="MSE vs σ_δ² (5 attackers, p_a=0.5)")
    data["mse_vs_sigma2"] = c_

    # (d) U-shaped MSE(mu) and mu*
    d: dict[str, Any] = {}
    ax3 = ax[1, 1]
    for i, M in enumerate((4, 32)):
        cfg = base.replace(share_count=M)
        mu_max = theory.max_stable_stepsize(cfg)
        grid = np.geomspace(mu_max / 200, mu_max * 0.995, 200)
        curve = [_theory_db(cfg.replace(stepsize=float(m))) for m in grid]
        mu_star, mse_star = theory.optimal_stepsize(cfg)
        sim_mu = [float(x) for x in np.geomspace(mu_max / 40, mu_max * 0.8, 6)]
        sim = _sweep([cfg.replace(stepsize=m, iterations=_iterations_for(cfg, m, iterations))
                      for m in sim_mu])
        d[f"M{M}"] = {"mu_grid": grid.tolist(), "theory_db": curve, "mu_star": mu_star,
                      "mse_star_db": float(_db(mse_star)), "mu_ms_max": mu_max,
                      "sim_mu": sim_mu, "sim_db": sim}
        ax3.semilogx(grid, curve, f"C{i}-", label=f"M={M} theory")
        ax3.semilogx(sim_mu, sim, f"C{i}o", label=f"M={M} simulation")
        ax3.axvline(mu_star, color=f"C{i}", ls=":", lw=1)
        ax3.plot([mu_star], [_db(mse_star)], f"C{i}*", ms=12,
                 label=f"μ*={mu_star:.3f} ({_db(mse_star):.1f} dB)")
    ax3.set(xlabel="stepsize μ", ylabel="steady-state MSE (dB)",
            title="U-shaped MSE(μ) under attack, optimum μ*")
    data["mse_vs_mu"] = d
    for axis in ax.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"P2 linear model: K=50, P=10, D=32, σ_ν²=0.01, {runs} runs, "
                 "random uncoordinated selection", fontsize=10)
    _save(fig, out, "p2_steady_state", data)
    plt.close(fig)
    return data


# ------------------------------------------------------------------------------------ theory
VALIDATION_M = (4, 8, 32)
VALIDATION_MU = (0.02, 0.05)


def validation_configs(runs: int = 100, iterations: int = 1500) -> list[OnlineConfig]:
    """The 6 attacked settings (3 M incl. M = D, 2 stepsizes) the theory is validated on."""
    return [P2_BASE.replace(share_count=M, stepsize=mu, runs=runs, iterations=iterations)
            for M in VALIDATION_M for mu in VALIDATION_MU]


def theory_validation(out: Path, runs: int = 200, iterations: int = 1500) -> dict[str, Any]:
    """Learning curves and steady states: simulation vs theory on the validation settings."""
    plt = _plt()
    rows = []
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, cfg in enumerate(validation_configs(runs, iterations)):
        res = run_online(cfg)
        ss = res.steady_state(STEADY_WINDOW)
        lc = theory.learning_curve(cfg)
        pred = _theory_db(cfg)
        rows.append({"M": cfg.share_count, "mu": cfg.stepsize, "sim_db": ss.global_mse_db,
                     "sim_sem_db": ss.global_mse_sem_db, "theory_db": pred,
                     "diff_db": ss.global_mse_db - pred})
        lab = f"M={cfg.share_count}, μ={cfg.stepsize}"
        ax[0].plot(res.iterations, res.global_mse_db, f"C{i}", alpha=0.6, lw=1)
        ax[0].plot(np.arange(len(lc)), _db(lc), f"C{i}--", lw=1.2, label=lab)
    ax[0].set(xlabel="iteration", ylabel="global MSE (dB)", ylim=(None, None),
              title="learning curves: simulation (solid) vs theory (dashed)")
    ax[0].legend(fontsize=7)
    labels = [f"M={r['M']}\nμ={r['mu']}" for r in rows]
    x = np.arange(len(rows))
    ax[1].bar(x - 0.2, [r["theory_db"] for r in rows], 0.4, label="theory")
    ax[1].bar(x + 0.2, [r["sim_db"] for r in rows], 0.4, yerr=[r["sim_sem_db"] for r in rows],
              label="simulation")
    ax[1].set_xticks(x, labels, fontsize=8)
    ax[1].set(ylabel="steady-state MSE (dB)",
              title="steady state (max |diff| "
                    f"{max(abs(r['diff_db']) for r in rows):.2f} dB)")
    ax[1].legend(fontsize=8)
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(f"Theory vs simulation under attack ({runs} runs): linear, K=50, P=10, D=32, "
                 "5 attackers p_a=0.5 σ_δ²=1, uplink independent", fontsize=10)
    data = {"config": P2_BASE.replace(runs=runs, iterations=iterations).to_dict(),
            "steady_window": STEADY_WINDOW, "rows": rows}
    _save(fig, out, "theory_validation", data)
    plt.close(fig)
    for r in rows:
        print(f"M={r['M']:3d} mu={r['mu']:.3f}: sim {r['sim_db']:7.2f} ± {r['sim_sem_db']:.2f} dB"
              f", theory {r['theory_db']:7.2f} dB, diff {r['diff_db']:+.2f} dB")
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psfed_robust.engine.reproduce",
                                 description="Reproduce P1/P2 figures with the batched engine.")
    ap.add_argument("target", choices=["p1", "p2", "theory", "all"])
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--runs", type=int, default=None, help="Monte Carlo runs (default per target)")
    ap.add_argument("--quick", action="store_true", help="few runs/iterations (smoke test)")
    args = ap.parse_args(argv)
    q = args.quick
    if args.target in ("p1", "all"):
        p1(args.out, runs=args.runs or (4 if q else 100), iterations=100 if q else 1000)
    if args.target in ("p2", "all"):
        p2(args.out, runs=args.runs or (4 if q else 100), iterations=200 if q else 1500)
    if args.target in ("theory", "all"):
        theory_validation(args.out, runs=args.runs or (4 if q else 200),
                          iterations=200 if q else 1500)


if __name__ == "__main__":
    main()
