"""The ``psfed-robust`` command line: run scenarios, print theory, list registries."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.keys import ScenarioError

__all__ = ["main"]

EPILOG = """examples:
  psfed-robust run                                  # the built-in headline grid
  psfed-robust run p2_mse_vs_m --runs 50 --out results/p2
  psfed-robust run my.toml --set attack.malicious=5 --set sweep.sharing.fraction=[1,0.25]
  psfed-robust theory p2_mse_vs_m
  psfed-robust reproduce p2                         # the papers' figures (shipped scenarios)
  psfed-robust list attacks --plugin my_attack.py   # registered attacks, plugin's included
  psfed-robust list keys                            # every scenario key, engines honouring it
"""

#: the shipped scenarios behind each paper's figures (docs/reproductions.md)
REPRODUCTIONS: dict[str, tuple[str, ...]] = {
    "p1": ("p1_rff",),
    "p2": ("p2_mse_vs_m", "p2_attackers", "p2_sigma", "p2_stepsize", "p2_theory"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psfed-robust",
        description="Partial-sharing (PSO-Fed) poisoning-robustness testbed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a scenario (default: the built-in headline grid)",
        description="Run every sweep point of a scenario, writing tidy.csv, summary.csv, "
        "meta.json and PNG plots; resumes the finished points of an interrupted run.",
    )
    run.add_argument("scenario", nargs="?", default=None,
                     help="scenario TOML file, or the name of a shipped scenario "
                     "(see `psfed-robust list scenarios`)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a key (dotted, e.g. federation.clients=20 or "
                     "sweep.sharing.fraction=[1,0.5]); repeatable")
    run.add_argument("--out", default=None, help="output folder (default: results/<name>)")
    run.add_argument("--runs", type=int, default=None, help="Monte Carlo runs per sweep point")
    run.add_argument("--engine", choices=("batched", "flower"), default=None,
                     help="engine override")
    run.add_argument("--force", action="store_true",
                     help="discard results of a different scenario in --out")
    run.add_argument("--no-plots", action="store_true", help="skip PNG plots")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    _plugin_arg(run)
    from experiments.executors import add_executor_arguments

    add_executor_arguments(run)

    th = sub.add_parser(
        "theory", help="print the steady-state theory for a scenario's sweep points",
        description="Steady-state global MSE predicted by the theory (linear task, random "
        "selection, Gaussian or no attack, mean aggregation) and the optimal stepsize.",
    )
    th.add_argument("scenario", help="scenario TOML file or shipped scenario name")
    th.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _plugin_arg(th)

    rep = sub.add_parser(
        "reproduce", help="reproduce a paper's figures by running its shipped scenarios",
        description="Run the shipped scenarios behind P1's or P2's figures (p1: "
        + ", ".join(REPRODUCTIONS["p1"]) + "; p2: " + ", ".join(REPRODUCTIONS["p2"])
        + "), each into OUT/<scenario name>; resumes like `run`.",
    )
    rep.add_argument("target", choices=(*REPRODUCTIONS, "all"))
    rep.add_argument("--out", default="results", help="parent folder (default: results)")
    rep.add_argument("--runs", type=int, default=None, help="Monte Carlo runs per sweep point")
    rep.add_argument("--quick", action="store_true",
                     help="smoke test: 2 runs and 200 rounds per point")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")

    ls = sub.add_parser("list", help="list attacks, defenses, selectors, keys or scenarios",
                        description="List registered attacks/defenses, selectors, every "
                        "scenario key, or the scenarios shipped in experiments/scenarios.")
    ls.add_argument("what", choices=("attacks", "defenses", "selectors", "keys", "scenarios"))
    _plugin_arg(ls)

    sc = sub.add_parser("schema", help="print the scenario schema (Markdown)",
                        description="Print every scenario key, its type, default and allowed "
                        "values as Markdown (docs/scenarios.md is generated from it).")
    del sc
    return p


def _plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE",
                   help="Python file (relative to the current folder) or module imported "
                   "first, e.g. one registering attacks/defenses; repeatable")


def _load_plugins(args: argparse.Namespace) -> None:
    from experiments.schema import load_plugins

    load_plugins(args.plugins, Path.cwd())


def _cmd_run(args: argparse.Namespace) -> int:
    from experiments.driver import run_scenario
    from experiments.executors import executor_from_args
    from experiments.schema import load_scenario

    _load_plugins(args)
    overrides = list(args.overrides)
    if args.runs is not None:
        overrides.append(f"runs={args.runs}")
    if args.engine is not None:
        overrides.append(f'engine="{args.engine}"')
    scenario = load_scenario(args.scenario, overrides)
    out = Path(args.out) if args.out else Path("results") / scenario.name
    print(f"scenario {scenario.name!r} from {scenario.source}: {len(scenario.points())} sweep "
          f"point(s) x {scenario.get('runs')} run(s), engine {scenario.get('engine')} -> {out}")
    run_scenario(scenario, out, progress=not args.quiet, force=args.force,
                 plots=False if args.no_plots else None, executor=executor_from_args(args))
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from experiments.driver import run_scenario
    from experiments.schema import load_scenario

    names = [n for t in (REPRODUCTIONS if args.target == "all" else [args.target])
             for n in REPRODUCTIONS[t]]
    overrides = ["runs=2", "rounds=200"] if args.quick else []
    if args.runs is not None:
        overrides.append(f"runs={args.runs}")
    scenarios = [load_scenario(n, overrides) for n in names]  # all validated before any work
    for scenario in scenarios:
        out = Path(args.out) / scenario.name
        print(f"{scenario.name}: {len(scenario.points())} sweep point(s) x "
              f"{scenario.get('runs')} run(s) -> {out}")
        run_scenario(scenario, out, progress=not args.quiet)
    return 0


def _cmd_theory(args: argparse.Namespace) -> int:
    from experiments.engines import theory_for_point
    from experiments.report import fmt_value
    from experiments.schema import load_scenario

    _load_plugins(args)
    scenario = load_scenario(args.scenario, args.overrides)
    print(f"| point | {' | '.join(scenario.sweep) or 'base'} | theory steady-state global MSE "
          f"(dB) | optimal stepsize mu* |")
    print("|---|" + "---|" * (max(1, len(scenario.sweep)) + 2))
    for p in scenario.points():
        t = theory_for_point(p)
        vals = " | ".join(fmt_value(v) for _, v in p.values) or "-"
        if t is None:
            print(f"| {p.index} | {vals} | not covered by the theory | – |")
        else:
            approx = "" if t.get("exact", True) else " (approximation: docs/theory.md)"
            print(f"| {p.index} | {vals} | {t['steady_db']:.2f}{approx} | {t['mu_opt']:.4g} |")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    _load_plugins(args)
    if args.what == "attacks":
        from attacks import attack_class, list_attacks

        for name in list_attacks():
            cls = attack_class(name)
            tags = [t for t in ("omniscient", "mask_aware") if getattr(cls, t, False)]
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:18s} [{cls.kind}{', ' + ', '.join(tags) if tags else ''}] "
                  f"params: {', '.join(cls.param_names())}\n    {doc}")
    elif args.what == "defenses":
        from defenses import defense_class, list_defenses

        for name in list_defenses():
            dcls = defense_class(name)
            doc = (dcls.__doc__ or "").strip().splitlines()[0] if dcls.__doc__ else ""
            params = ", ".join(getattr(dcls, "param_names", lambda: ())())
            print(f"{name:18s} params: {params}\n    {doc}")
    elif args.what == "keys":
        from experiments.keys import keys_text

        print(keys_text())
    elif args.what == "selectors":
        import psfed_robust.core.selectors as sel

        for name in sel.__all__:
            obj = getattr(sel, name)
            if isinstance(obj, type):
                doc = (obj.__doc__ or "").strip().splitlines()[0]
                print(f"{name:28s} {doc}")
        from experiments.keys import key

        k = key("sharing.selector")
        print(f"\nscenario files: sharing.selector = {' | '.join(map(repr, k.choices or ()))} "
              f"({k.allowed_doc().replace('`', '')})")
    else:
        from experiments.schema import load_scenario, shipped_scenarios

        for path in shipped_scenarios():
            try:
                s = load_scenario(path)
                desc = str(s.get("description")).strip().splitlines()[0] if s.get(
                    "description") else ""
                print(f"{path.stem:28s} {len(s.points()):3d} pts  {s.get('engine'):8s} {desc}")
            except ScenarioError as exc:  # pragma: no cover - shipped files are tested
                print(f"{path.stem:28s} INVALID: {exc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "reproduce":
            return _cmd_reproduce(args)
        if args.command == "theory":
            return _cmd_theory(args)
        if args.command == "list":
            return _cmd_list(args)
        if args.command == "schema":
            from experiments.schema import schema_markdown

            print(schema_markdown())
            return 0
    except ScenarioError as exc:
        print(f"psfed-robust: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
