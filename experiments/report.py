"""Reports: the Markdown summary table and PNG plots people can look at."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.keys import short_key
from experiments.results import DIVERGED_DB

if TYPE_CHECKING:
    from experiments.schema import Scenario, SweepPoint

__all__ = ["DIVERGED_DB", "make_plots", "markdown_table", "short_key"]

X_PREFERENCE = (
    "sharing.fraction",
    "sharing.count",
    "federation.stepsize",
    "attack.malicious",
    "attack.params.sigma",
    "attack.p_a",
)


def _num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v))):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _diverged(row: dict[str, Any]) -> bool:
    """The summary row's verdict (rows of older parts: non-finite or above DIVERGED_DB)."""
    if "diverged" in row:
        return bool(row["diverged"])
    v = row.get("steady_db", row.get("steady"))
    return isinstance(v, float) and not (v < DIVERGED_DB)


def markdown_table(scenario: Scenario, rows: Sequence[dict[str, Any]]) -> str:
    """One line per sweep point: swept values, steady-state global/local MSE (dB), theory."""
    keys = list(scenario.sweep)
    by_point: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by_point[int(r["point"])][str(r["metric"])] = r
    metrics = sorted({str(r["metric"]) for r in rows})
    online = any(m.endswith("_mse") for m in metrics)
    head = [short_key(k) for k in keys]
    if online:
        head += ["global MSE (dB)", "95% CI", "theory (dB)", "local MSE (dB)"]
    else:
        head += [m for m in metrics]
    lines = [
        f"## {scenario.name}: steady state over the last "
        f"{scenario.get('output.steady_window'):.0%} of the recorded rounds, "
        f"{scenario.get('runs')} runs",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for idx in sorted(by_point):
        ms = by_point[idx]
        first = next(iter(ms.values()))
        cells = [_num(first.get(k)) if not isinstance(first.get(k), str) else first[k]
                 for k in keys]
        if online:
            g = ms.get("global_mse", {})
            loc = ms.get("local_mse", {})
            ci = (f"[{_num(g.get('ci_low_db'))}, {_num(g.get('ci_high_db'))}]"
                  if g else "–")
            if _diverged(g):
                cells += ["diverged", "–", _num(g.get("theory_db")),
                          "diverged" if _diverged(loc) else _num(loc.get("steady_db"))]
            else:
                cells += [_num(g.get("steady_db")), ci, _num(g.get("theory_db")),
                          "diverged" if _diverged(loc) else _num(loc.get("steady_db"))]
        else:
            cells += ["diverged" if m in ms and _diverged(ms[m])
                      else _num(ms[m].get("steady"), 4) if m in ms else "–" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _db(x: float) -> float:
    return 10 * math.log10(x) if x > 0 else float("nan")


def make_plots(
    scenario: Scenario,
    points: Sequence[SweepPoint],
    parts: Sequence[dict[str, Any]],
    out: Path,
) -> list[Path]:
    """Learning curves, steady state vs the swept x (theory overlaid), defense comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: list[Path] = []
    keys = list(scenario.sweep)
    main_metric = "global_mse" if "global_mse" in parts[0]["curves"] else next(
        iter(parts[0]["curves"])
    )
    is_mse = main_metric.endswith("_mse")

    def value(part: dict[str, Any], metric: str) -> float | None:
        """Steady state of ``metric``; None when the point diverged."""
        for r in part["summary"]:
            if r["metric"] == metric:
                if _diverged(r):
                    return None
                v = r.get("steady_db") if is_mse else r.get("steady")
                return None if v is None else float(v)
        return None

    def diverged(part: dict[str, Any]) -> bool:
        return any(_diverged(r) for r in part["summary"] if r["metric"] == main_metric)

    # 1. Learning curves, one panel per value of the first non-x swept key (max 6 panels).
    x_key = next((k for k in X_PREFERENCE if k in scenario.sweep), keys[0] if keys else None)
    facet_key = next((k for k in keys if k != x_key and len(scenario.sweep[k]) <= 6), None)
    facets = scenario.sweep[facet_key] if facet_key else [None]
    fig, axes = plt.subplots(1, len(facets), figsize=(5 * len(facets), 4), squeeze=False,
                             sharey=True)
    x_vals = list(scenario.sweep[x_key]) if x_key else []
    other_keys = [k for k in keys if k not in (x_key, facet_key)]
    other_combos = sorted({tuple(p.get(k) for k in other_keys) for p in points}, key=str)
    styles = ["-", "--", ":", "-."]
    for ax, fv in zip(axes[0], facets, strict=True):
        for p, part in zip(points, parts, strict=True):
            if facet_key and p.get(facet_key) != fv:
                continue
            ys = part["curves"][main_metric]
            ys = [_db(y) for y in ys] if is_mse else ys
            label = ", ".join(f"{short_key(k)}={v}" for k, v in p.values if k != facet_key)
            label = (label or "base") + (" (diverged)" if diverged(part) else "")
            ci = x_vals.index(p.get(x_key)) if x_key else 0
            combo = tuple(p.get(k) for k in other_keys)
            li = other_combos.index(combo) if combo in other_combos else 0
            ax.plot(part["rounds"], ys, lw=1.2, label=label, color=f"C{ci % 10}",
                    linestyle=styles[li % len(styles)],
                    marker=None if li < len(styles) else ".", markevery=10)
        ax.set_title(f"{short_key(facet_key)} = {fv}" if facet_key else scenario.name)
        ax.set_xlabel("iteration" if is_mse else "round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{main_metric} (dB)" if is_mse else main_metric)
    _handles, labels = axes[0][0].get_legend_handles_labels()
    if len(labels) <= 16:
        axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{scenario.name}: learning curves (mean over {scenario.get('runs')} runs)")
    fig.tight_layout()
    f1 = out / "learning_curves.png"
    fig.savefig(f1, dpi=110)
    plt.close(fig)
    files.append(f1)

    # 2. Steady state against the x key: one panel per facet value, one line per combination of
    #    the other keys (diverged points are left out and counted in the panel title).
    if x_key is not None:
        fig, axes2 = plt.subplots(1, len(facets), figsize=(5.2 * len(facets), 4.6),
                                  squeeze=False, sharey=True)
        any_theory = False
        for ax, fv in zip(axes2[0], facets, strict=True):
            groups: dict[tuple[Any, ...], list[tuple[Any, float | None, float | None]]] = (
                defaultdict(list)
            )
            for p, part in zip(points, parts, strict=True):
                if facet_key and p.get(facet_key) != fv:
                    continue
                other = tuple((k, v) for k, v in p.values if k not in (x_key, facet_key))
                theory = next((r.get("theory_db") for r in part["summary"]
                               if r["metric"] == main_metric), None)
                groups[other].append((p.get(x_key), value(part, main_metric), theory))
            n_div = 0
            for i, (other, pts) in enumerate(groups.items()):
                pts.sort(key=lambda t: t[0])
                ok = [t for t in pts if t[1] is not None and math.isfinite(float(t[1]))]
                n_div += len(pts) - len(ok)
                li = other_combos.index(tuple(v for _, v in other)) if tuple(
                    v for _, v in other) in other_combos else i
                color = f"C{li % 10}"
                label = ", ".join(f"{short_key(k)}={v}" for k, v in other) or "simulation"
                ax.plot([t[0] for t in ok], [t[1] for t in ok], "o-", color=color, label=label)
                th = [(t[0], t[2]) for t in pts if t[2] is not None and math.isfinite(t[2])]
                if th:
                    any_theory = True
                    ax.plot([t[0] for t in th], [t[1] for t in th], "x--", color=color,
                            alpha=0.9, markersize=9, label=f"theory ({label})")
            title = f"{short_key(facet_key)} = {fv}" if facet_key else scenario.name
            ax.set_title(title + (f"  ({n_div} diverged, not shown)" if n_div else ""),
                         fontsize=10)
            ax.set_xlabel(x_key)
            xs_all = [p.get(x_key) for p in points]
            if x_key in ("sharing.fraction", "sharing.count", "federation.stepsize",
                         "attack.params.sigma") and all(isinstance(v, int | float) and v > 0
                                                        for v in xs_all):
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            if len(groups) <= 12:
                ax.legend(fontsize=7)
        axes2[0][0].set_ylabel(f"steady-state {main_metric}" + (" (dB)" if is_mse else ""))
        fig.suptitle(f"{scenario.name}: steady state vs {short_key(x_key)}"
                     + (" (x--: theory)" if any_theory else ""))
        fig.tight_layout()
        f2 = out / f"steady_vs_{short_key(x_key).replace('.', '_')}.png"
        fig.savefig(f2, dpi=110)
        plt.close(fig)
        files.append(f2)

    # 3. Per-defense comparison (grouped bars), when defenses are swept.
    if "defense.name" in scenario.sweep:
        defs = scenario.sweep["defense.name"]
        group_key = next((k for k in ("attack.name", x_key) if k in scenario.sweep
                          and k != "defense.name"), None)
        gvals = scenario.sweep[group_key] if group_key else [None]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(gvals) * len(defs) / 2), 4.5))
        width = 0.8 / len(defs)
        table: list[list[float]] = []
        for d in defs:
            ys = []
            for gv in gvals:
                vals = [value(part, main_metric) for p, part in zip(points, parts, strict=True)
                        if p.get("defense.name") == d and (group_key is None
                                                           or p.get(group_key) == gv)]
                found = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
                ys.append(min(found) if found else float("nan"))
            table.append(ys)
        finite = [v for row in table for v in row if math.isfinite(v)]
        base = (min(finite) - 3.0) if (is_mse and finite) else 0.0
        for j, (d, ys) in enumerate(zip(defs, table, strict=True)):
            xs = [i + j * width for i in range(len(gvals))]
            ax.bar(xs, [y - base for y in ys], width=width, bottom=base, label=d)
            for x, y in zip(xs, ys, strict=True):
                if not math.isfinite(y):  # every point of this bar diverged
                    ax.text(x, base, "diverged", rotation=90, ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(gvals))])
        ax.set_xticklabels([str(g) for g in gvals])
        ax.set_xlabel(group_key or "")
        ax.set_ylabel(f"best steady-state {main_metric}" + (" (dB, lower is better)" if is_mse
                                                             else ""))
        ax.set_title(f"{scenario.name}: defenses (best over the other swept keys)")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        f3 = out / "defense_comparison.png"
        fig.savefig(f3, dpi=110)
        plt.close(fig)
        files.append(f3)
    comm = _communication_plot(plt, scenario, points, parts, out)
    if comm is not None:
        files.append(comm)
    return files


def _communication_plot(plt: Any, scenario: Scenario, points: Sequence[SweepPoint],
                        parts: Sequence[dict[str, Any]], out: Path) -> Path | None:
    """Global MSE against the values communicated (P1's comparison at equal communication):
    each iteration moves ``M`` values down and up per participant, ``2 P M`` in all (``2 p_c K
    M`` expected with Bernoulli scheduling). Drawn for batched sweeps of the shared amount."""
    if scenario.get("engine") != "batched" or not any(
            k in scenario.sweep for k in ("sharing.count", "sharing.fraction")):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (p, part) in enumerate(zip(points, parts, strict=True)):
        m = part.get("info", {}).get("share_count")
        if m is None or "global_mse" not in part["curves"]:
            continue
        per_iter = 2 * int(m) * (
            float(p.get("federation.p_c")) * int(p.get("federation.clients"))
            if p.get("federation.scheduling") == "bernoulli"
            else int(p.get("federation.participants")))
        xs = [r * per_iter / 1e6 for r in part["rounds"]]
        ys = [_db(y) for y in part["curves"]["global_mse"]]
        ax.plot(xs, ys, color=f"C{i % 10}", lw=1.2,
                label=f"{p.label} (M={m})" + (" (diverged)" if any(
                    _diverged(r) for r in part["summary"] if r["metric"] == "global_mse")
                    else ""))
    ax.set_xlabel("values communicated (millions, downlink + uplink)")
    ax.set_ylabel("global_mse (dB)")
    ax.set_title(f"{scenario.name}: MSE vs communication")
    ax.grid(alpha=0.3)
    if len(points) <= 16:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "communication.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
