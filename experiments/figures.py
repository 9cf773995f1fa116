"""Figures of a sweep, readable at a glance (PNG, matplotlib's Agg backend).

- ``learning_curves.png``: the main metric against the round, one panel per attack x mode, at
  most six lines per panel (more lines go to ``learning_curves_2.png`` ...); image tasks
  (``accuracy``) get a 95% t-band across runs.
- ``steady_vs_<x>.png``: the steady state against the swept x (the shared fraction, labelled
  exactly: 1/8), one panel per attack x mode, at most six lines with their 95% CI bands, the
  theory as crosses, the no-attack baseline as a dashed black line, the legend outside.
- ``heatmap[_<mode>].png``: attack x fraction, one panel per defense (no attack in the first
  row), the worst over any other swept key.
- ``defense_comparison.png``: per x value, bars per defense for each attack and for no attack,
  each the worst over the other swept keys (never the best: that would flatter every rule).
- ``communication.png``: global MSE against values communicated (batched sweeps of the share).
"""

from __future__ import annotations

import csv
import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.report import (
    HIGHER_IS_BETTER,
    X_PREFERENCE,
    _diverged,
    fmt_metric,
    fmt_value,
    frac_label,
    main_metric,
    short_key,
)

if TYPE_CHECKING:
    from experiments.schema import Scenario, SweepPoint

__all__ = ["MAX_LINES", "make_plots"]

#: lines per panel at most (more go to further pages)
MAX_LINES = 6
PANEL_KEYS = ("attack.name", "defense.mode")
DPI = 100


def _xl(key: str | None, v: Any) -> str:
    return frac_label(v) if key == "sharing.fraction" else fmt_value(v)


def _lbl(key: str, v: Any) -> str:
    return f"{short_key(key)}={_xl(key, v)}"


def _db(x: float) -> float:
    return 10 * math.log10(x) if x > 0 else float("nan")


class _Sweep:
    """Points, their summary rows and the facet layout shared by the figures."""

    def __init__(self, scenario: Scenario, points: Sequence[SweepPoint],
                 parts: Sequence[dict[str, Any]]) -> None:
        self.scenario, self.points, self.parts = scenario, list(points), list(parts)
        self.metric = main_metric(list(parts[0]["curves"]))
        self.is_mse = self.metric.endswith("_mse")
        self.keys = list(scenario.sweep)
        self.x_key = next((k for k in X_PREFERENCE if k in scenario.sweep), None)
        self.panel_keys = [k for k in PANEL_KEYS if k in scenario.sweep and k != self.x_key]
        self.rows = [{r["metric"]: r for r in part["summary"]} for part in parts]

    def vals(self, p: SweepPoint) -> dict[str, Any]:
        return dict(p.values)

    def steady(self, i: int) -> tuple[float, float, float, bool]:
        """(value, ci low, ci high, diverged) of point ``i``'s main metric."""
        r = self.rows[i].get(self.metric, {})
        cols = ("steady_db", "ci_low_db", "ci_high_db") if self.is_mse else (
            "steady", "ci_low", "ci_high")
        got = [r.get(c) for c in cols]
        v, lo, hi = (math.nan if g is None else float(g) for g in got)
        return v, lo, hi, _diverged(r) or not math.isfinite(v)

    def combos(self, keys: Sequence[str]) -> list[tuple[Any, ...]]:
        return [tuple(c) for c in itertools.product(*(self.scenario.sweep[k] for k in keys))]

    def ylabel(self, prefix: str = "") -> str:
        return f"{prefix}{self.metric}" + (" (dB)" if self.is_mse else "")


def _grid(plt: Any, n: int, ncols: int, w: float = 4.0, h: float = 3.2) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False,
                             sharex=True, sharey=True)
    flat = [a for row in axes for a in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _ncols(s: _Sweep) -> int:
    if len(s.panel_keys) == 2:
        return len(s.scenario.sweep[s.panel_keys[1]])
    return 3


def _panel_title(keys: Sequence[str], combo: Sequence[Any]) -> str:
    return ", ".join(_lbl(k, v) for k, v in zip(keys, combo, strict=True)) or "all points"


def _save(fig: Any, path: Path, handles: Sequence[Any], labels: Sequence[str]) -> Path:
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
                   frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _pages(items: list[Any]) -> list[list[Any]]:
    return [items[i:i + MAX_LINES] for i in range(0, len(items), MAX_LINES)] or [[]]


def _page_path(out: Path, stem: str, i: int) -> Path:
    return out / (f"{stem}.png" if i == 0 else f"{stem}_{i + 1}.png")


def _per_run(out: Path, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per point: (rounds [T], values [R, T]) of ``metric`` from tidy.csv."""
    acc: dict[int, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    with open(out / "tidy.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            if r["metric"] == metric:
                acc[int(r["point"])][int(r["run"])][int(r["round"])] = float(r["value"])
    res = {}
    for p, runs in acc.items():
        rounds = np.array(sorted(next(iter(runs.values()))))
        res[p] = (rounds, np.array([[runs[k][t] for t in rounds] for k in sorted(runs)]))
    return res


def _band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over runs and the half width of a 95% t-interval (0 with one run)."""
    from scipy import stats

    m = values.mean(axis=0)
    r = values.shape[0]
    if r < 2:
        return m, np.zeros_like(m)
    t = float(stats.t.ppf(0.975, r - 1))
    return m, t * values.std(axis=0, ddof=1) / math.sqrt(r)


def _learning_curves(plt: Any, s: _Sweep, out: Path) -> list[Path]:
    line_keys = [k for k in s.keys if k not in s.panel_keys]
    band = None if s.is_mse else _per_run(out, s.metric)
    files = []
    panels = s.combos(s.panel_keys)
    pages = _pages(s.combos(line_keys))
    for page_no, lines in enumerate(pages):
        fig, axes = _grid(plt, len(panels), _ncols(s))
        handles: dict[str, Any] = {}
        span: list[float] = []  # the non-diverged curves set the y range
        for ax, pc in zip(axes, panels, strict=True):
            n_div = 0
            for li, lc in enumerate(lines):
                want = dict(zip([*s.panel_keys, *line_keys], [*pc, *lc], strict=True))
                idx = next((i for i, p in enumerate(s.points) if all(
                    fmt_value(p.get(k)) == fmt_value(v) for k, v in want.items())), None)
                if idx is None:
                    continue
                part = s.parts[idx]
                label = ", ".join(_lbl(k, v) for k, v in zip(line_keys, lc, strict=True))
                label = label or "base"
                div = s.steady(idx)[3]
                n_div += div
                if band is not None and s.points[idx].index in band:
                    rounds, vals = band[s.points[idx].index]
                    m, half = _band(vals)
                    (h,) = ax.plot(rounds, m, color=f"C{li}", lw=1.3, ls=":" if div else "-")
                    ax.fill_between(rounds, m - half, m + half, color=f"C{li}", alpha=0.2,
                                    lw=0)
                else:
                    ys = part["curves"][s.metric]
                    ys = [_db(y) for y in ys] if s.is_mse else ys
                    (h,) = ax.plot(part["rounds"], ys, color=f"C{li}", lw=1.2,
                                   ls=":" if div else "-")
                if not div:
                    handles.setdefault(label, h)
                    ydata = np.asarray(h.get_ydata(), dtype=float)
                    ydata = ydata[np.isfinite(ydata)]
                    if ydata.size:
                        span += [float(ydata.min()), float(ydata.max())]
            ax.set_title(_panel_title(s.panel_keys, pc)
                         + (f"\n{n_div} diverged (dotted)" if n_div else ""), fontsize=9)
            ax.grid(alpha=0.3)
        from matplotlib.lines import Line2D

        for li, lc in enumerate(lines):  # lines that diverged in every panel: a solid proxy
            label = ", ".join(_lbl(k, v) for k, v in zip(line_keys, lc, strict=True)) or "base"
            handles.setdefault(label, Line2D([], [], color=f"C{li}", lw=1.3))
        for ax in axes:
            ax.set_xlabel("iteration" if s.is_mse else "round", fontsize=8)
        if span:
            lo, hi = min(span), max(span)
            pad = 0.08 * (hi - lo) + 1e-9
            axes[0].set_ylim(lo - pad, hi + pad)
        axes[0].set_ylabel(s.ylabel())
        what = "mean over runs" + ("" if band is None else ", 95% band")
        more = f" (page {page_no + 1}/{len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"{s.scenario.name}: {s.metric} per round ({what}, "
                     f"{s.scenario.get('runs')} runs){more}", fontsize=10)
        files.append(_save(fig, _page_path(out, "learning_curves", page_no),
                           list(handles.values()), list(handles)))
    return files


def _baseline(s: _Sweep, pc: dict[str, Any], lc: dict[str, Any]) -> dict[Any, float]:
    """No-attack steady state per x value for the panel's other settings (mean rule first)."""
    want = {**pc, **lc, "attack.name": "none"}
    if "defense.name" in s.scenario.sweep:
        defs = list(s.scenario.sweep["defense.name"])
        want["defense.name"] = "mean" if "mean" in defs else defs[0]
    out: dict[Any, float] = {}
    for i, p in enumerate(s.points):
        if s.x_key is not None and all(fmt_value(p.get(k)) == fmt_value(v)
                                       for k, v in want.items()):
            v, _, _, div = s.steady(i)
            if not div:
                out.setdefault(p.get(s.x_key), v)
    return out


def _steady(plt: Any, s: _Sweep, out: Path) -> list[Path]:
    x_key = s.x_key
    assert x_key is not None
    line_keys = [k for k in s.keys if k not in (*s.panel_keys, x_key)]
    xs = list(s.scenario.sweep[x_key])
    log = all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in xs) and (
        x_key in ("sharing.fraction", "sharing.count", "federation.stepsize",
                  "attack.params.sigma"))
    panels = s.combos(s.panel_keys)
    pages = _pages(s.combos(line_keys))
    stem = f"steady_vs_{short_key(x_key).replace('.', '_')}"
    files = []
    for page_no, lines in enumerate(pages):
        fig, axes = _grid(plt, len(panels), _ncols(s))
        handles: dict[str, Any] = {}
        for ax, pc in zip(axes, panels, strict=True):
            pcd = dict(zip(s.panel_keys, pc, strict=True))
            n_div = 0
            for li, lc in enumerate(lines):
                lcd = dict(zip(line_keys, lc, strict=True))
                pts = []
                for i, p in enumerate(s.points):
                    if all(fmt_value(p.get(k)) == fmt_value(v) for k, v in {**pcd,
                                                                             **lcd}.items()):
                        v, lo, hi, div = s.steady(i)
                        th = s.rows[i].get(s.metric, {}).get("theory_db")
                        pts.append((p.get(x_key), v, lo, hi, div, th))
                pts.sort(key=lambda t: t[0])
                ok = [t for t in pts if not t[4]]
                n_div += len(pts) - len(ok)
                label = ", ".join(_lbl(k, v) for k, v in lcd.items()) or "simulation"
                (h,) = ax.plot([t[0] for t in ok], [t[1] for t in ok], "o-", color=f"C{li}",
                               ms=4, lw=1.3)
                handles.setdefault(label, h)
                band = [t for t in ok if math.isfinite(t[2]) and math.isfinite(t[3])]
                if band:
                    ax.fill_between([t[0] for t in band], [t[2] for t in band],
                                    [t[3] for t in band], color=f"C{li}", alpha=0.18, lw=0)
                th = [(t[0], t[5]) for t in pts if t[5] is not None and math.isfinite(t[5])]
                if th:
                    (ht,) = ax.plot([t[0] for t in th], [t[1] for t in th], "x", color=f"C{li}",
                                    ms=8, mew=1.5)
                    handles.setdefault("theory (x, same colour)", ht)
            if pcd.get("attack.name", "none") != "none" or "attack.name" not in pcd:
                base = _baseline(s, pcd, {})
                if base and "attack.name" in s.scenario.sweep:
                    bx = sorted(base)
                    (hb,) = ax.plot(bx, [base[x] for x in bx], "--", color="black", lw=1.1)
                    handles.setdefault("no attack (mean rule)", hb)
            title = _panel_title(s.panel_keys, pc)
            ax.set_title(title + (f"\n{n_div} diverged point(s) not shown" if n_div else ""),
                         fontsize=9)
            if log:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs)
            ax.set_xticklabels([_xl(x_key, v) for v in xs])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
        for ax in axes:
            ax.set_xlabel(x_key, fontsize=8)
        axes[0].set_ylabel(s.ylabel("steady-state "))
        more = f" (page {page_no + 1}/{len(pages)})" if len(pages) > 1 else ""
        fig.suptitle(f"{s.scenario.name}: steady state vs {short_key(x_key)} "
                     f"(mean and 95% CI over {s.scenario.get('runs')} runs){more}", fontsize=10)
        files.append(_save(fig, _page_path(out, stem, page_no), list(handles.values()),
                           list(handles)))
    return files


def _worst_of(s: _Sweep, want: dict[str, Any]) -> tuple[float, float, float, bool] | None:
    """The worst point (main metric) among those matching ``want``; None when there is none."""
    cands = [i for i, p in enumerate(s.points)
             if all(fmt_value(p.get(k)) == fmt_value(v) for k, v in want.items())]
    if not cands:
        return None
    sign = -1.0 if s.metric in HIGHER_IS_BETTER else 1.0

    def bad(i: int) -> float:
        v, _, _, div = s.steady(i)
        return math.inf if div else sign * v

    return s.steady(max(cands, key=bad))


def _heatmaps(plt: Any, s: _Sweep, out: Path) -> list[Path]:
    attacks = list(s.scenario.sweep["attack.name"])
    attacks = (["none"] if "none" in attacks else []) + [a for a in attacks if a != "none"]
    defs = list(s.scenario.sweep.get("defense.name", [s.scenario.get("defense.name")]))
    x_key = s.x_key
    xs = list(s.scenario.sweep[x_key]) if x_key else [None]
    fig_keys = [k for k in ("defense.mode",) if k in s.scenario.sweep]
    rest = [k for k in s.keys if k not in ("attack.name", "defense.name", x_key, *fig_keys)]
    files = []
    for fc in s.combos(fig_keys):
        grids = []
        for d in defs:
            g = np.full((len(attacks), len(xs)), np.nan)
            div = np.zeros_like(g, dtype=bool)
            for ai, a in enumerate(attacks):
                for xi, x in enumerate(xs):
                    want = {**dict(zip(fig_keys, fc, strict=True)), "attack.name": a}
                    if "defense.name" in s.scenario.sweep:
                        want["defense.name"] = d
                    if x_key:
                        want[x_key] = x
                    got = _worst_of(s, want)
                    if got is not None:
                        g[ai, xi], div[ai, xi] = (math.nan, True) if got[3] else (got[0], False)
            grids.append((d, g, div))
        finite = np.concatenate([g[np.isfinite(g)] for _, g, _ in grids])
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        fig, axes = _grid(plt, len(defs), min(3, len(defs)), w=0.9 * len(xs) + 2.6,
                          h=0.42 * len(attacks) + 1.4)
        cmap = plt.get_cmap("viridis_r" if s.metric in HIGHER_IS_BETTER else "viridis"
                            ).with_extremes(bad="lightgrey")
        im = None
        for ax, (d, g, div) in zip(axes, grids, strict=True):
            im = ax.imshow(g, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            for (ai, xi), v in np.ndenumerate(g):
                text = "diverged" if div[ai, xi] else ("–" if math.isnan(v) else fmt_metric(
                    s.metric, float(v)))
                # viridis is dark at its low end (viridis_r at its high end): white text there
                low = math.isfinite(v) and (v - vmin) < 0.5 * (vmax - vmin)
                ax.text(xi, ai, text, ha="center", va="center", fontsize=7,
                        color="white" if low != (s.metric in HIGHER_IS_BETTER) else "black")
            ax.set_title(f"defense={d}", fontsize=9)
            ax.set_xticks(range(len(xs)))
            ax.set_xticklabels([_xl(x_key, x) for x in xs] if x_key else ["base"])
            ax.set_yticks(range(len(attacks)))
            ax.set_yticklabels(["no attack" if a == "none" else a for a in attacks], fontsize=8)
            ax.set_xlabel(x_key or "", fontsize=8)
        if im is not None:
            better = "higher" if s.metric in HIGHER_IS_BETTER else "lower"
            fig.colorbar(im, ax=axes, shrink=0.8,
                         label=s.ylabel("steady-state ") + f", {better} is better")
        worst = f"; worst over {', '.join(short_key(k) for k in rest)}" if rest else ""
        tag = ", ".join(_lbl(k, v) for k, v in zip(fig_keys, fc, strict=True))
        fig.suptitle(f"{s.scenario.name}: attack x {short_key(x_key) if x_key else 'setting'}"
                     f"{' (' + tag + ')' if tag else ''}{worst}", fontsize=10, y=1.03)
        name = "heatmap" + "".join(f"_{fmt_value(v)}" for v in fc)
        fig.savefig(out / f"{name}.png", dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        files.append(out / f"{name}.png")
    return files


def _defense_comparison(plt: Any, s: _Sweep, out: Path) -> Path:
    defs = list(s.scenario.sweep["defense.name"])
    attacks = list(s.scenario.sweep.get("attack.name", [s.scenario.get("attack.name")]))
    attacks = (["none"] if "none" in attacks else []) + [a for a in attacks if a != "none"]
    x_key = s.x_key
    xs = list(s.scenario.sweep[x_key]) if x_key else [None]
    rest = [k for k in s.keys if k not in ("attack.name", "defense.name", x_key)]
    fig, axes = _grid(plt, len(xs), min(2, len(xs)), w=max(5.0, 0.25 * len(defs) * len(attacks)
                                                          + 2), h=3.6)
    width = 0.8 / len(defs)
    handles: dict[str, Any] = {}
    got: dict[tuple[int, int, int], tuple[float, float, float, bool] | None] = {}
    for xi, x in enumerate(xs):
        for j, d in enumerate(defs):
            for ai, a in enumerate(attacks):
                want = {"defense.name": d}
                if "attack.name" in s.scenario.sweep:
                    want["attack.name"] = a
                if x_key:
                    want[x_key] = x
                got[xi, j, ai] = _worst_of(s, want)
    finite = [g[0] for g in got.values() if g is not None and not g[3]]
    # dB bars rise from a common floor below the best value (0 dB is no natural origin)
    floor = (min(finite) - 3.0) if (finite and s.is_mse) else 0.0
    for xi, ax in enumerate(axes):
        for (gx, j, ai), g in got.items():
            if gx != xi:
                continue
            pos = ai + j * width
            if g is None or g[3]:
                ax.text(pos, 0.02, "diverged", rotation=90, ha="center", va="bottom",
                        fontsize=6, transform=ax.get_xaxis_transform())
                continue
            v, lo, hi = g[:3]
            err = [[v - lo], [hi - v]] if math.isfinite(lo) and math.isfinite(hi) else None
            bar = ax.bar(pos, v - floor, bottom=floor, width=width, color=f"C{j % 10}",
                         yerr=err, capsize=2, hatch="//" if attacks[ai] == "none" else None,
                         edgecolor="white", lw=0)
            handles.setdefault(defs[j], bar)
        if finite and s.is_mse:
            ax.set_ylim(floor, max(finite) + 3.0)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))])
        ax.set_xticklabels(["no attack" if a == "none" else a for a in attacks], rotation=30,
                           ha="right", fontsize=8)
        ax.set_title(_lbl(x_key, xs[xi]) if x_key else s.scenario.name, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel(s.ylabel("worst steady-state " if rest else "steady-state "))
    worst = f" (each bar: worst over {', '.join(short_key(k) for k in rest)})" if rest else ""
    fig.suptitle(f"{s.scenario.name}: defenses under each attack, 95% CI{worst}", fontsize=10)
    return _save(fig, out / "defense_comparison.png", list(handles.values()), list(handles))


def _communication(plt: Any, s: _Sweep, out: Path) -> Path | None:
    """Global MSE against the values communicated (P1's comparison at equal communication):
    each iteration moves ``M`` values down and up per participant, ``2 P M`` in all (``2 p_c K
    M`` expected with Bernoulli scheduling). Drawn for batched sweeps of the shared amount."""
    if s.scenario.get("engine") != "batched" or not any(
            k in s.scenario.sweep for k in ("sharing.count", "sharing.fraction")):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    handles: dict[str, Any] = {}
    for i, (p, part) in enumerate(zip(s.points, s.parts, strict=True)):
        m = part.get("info", {}).get("share_count")
        if m is None or "global_mse" not in part["curves"]:
            continue
        per_iter = 2 * int(m) * (
            float(p.get("federation.p_c")) * int(p.get("federation.clients"))
            if p.get("federation.scheduling") == "bernoulli"
            else int(p.get("federation.participants")))
        xs = [r * per_iter / 1e6 for r in part["rounds"]]
        (h,) = ax.plot(xs, [_db(y) for y in part["curves"]["global_mse"]], color=f"C{i % 10}",
                       lw=1.2)
        handles.setdefault(f"{p.label} (M={m})" + (" (diverged)" if s.steady(i)[3] else ""), h)
    ax.set_xlabel("values communicated (millions, downlink + uplink)")
    ax.set_ylabel("global_mse (dB)")
    ax.set_title(f"{s.scenario.name}: MSE vs communication")
    ax.grid(alpha=0.3)
    shown = list(handles.items())[:16]
    return _save(fig, out / "communication.png", [h for _, h in shown], [k for k, _ in shown])


def make_plots(scenario: Scenario, points: Sequence[SweepPoint],
               parts: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Every figure of the module docstring that the sweep has the axes for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = _Sweep(scenario, points, parts)
    files = _learning_curves(plt, s, out)
    if s.x_key is not None:
        files += _steady(plt, s, out)
    if "attack.name" in scenario.sweep:
        files += _heatmaps(plt, s, out)
    if "defense.name" in scenario.sweep:
        files.append(_defense_comparison(plt, s, out))
    comm = _communication(plt, s, out)
    if comm is not None:
        files.append(comm)
    return files
