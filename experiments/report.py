"""Reports: the Markdown tables (per point, worst case over attacks) and number formatting.

The worst case over attacks is the standard selection of ByzFL (Allouah et al., *Fixing by
Mixing*, AISTATS 2023; the ByzFL benchmark): a defense is rated by the attack that hurts it most,
so every row names that attack and sits beside the no-attack baseline of the same setting.
Figures are drawn in :mod:`experiments.figures`.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.keys import short_key
from experiments.results import DIVERGED_DB, csv_cell

if TYPE_CHECKING:
    from experiments.schema import Scenario

__all__ = ["DIVERGED_DB", "fmt_metric", "fmt_value", "frac_label", "main_metric",
           "markdown_table", "short_key", "worst_case_markdown", "worst_case_rows",
           "write_tables"]

X_PREFERENCE = (
    "sharing.fraction",
    "sharing.count",
    "federation.stepsize",
    "attack.malicious",
    "attack.params.sigma",
    "attack.p_a",
)

#: metrics where a higher value is better (every other metric: lower is better)
HIGHER_IS_BETTER = frozenset({"accuracy"})


def frac_label(v: Any) -> str:
    """``0.125`` -> ``1/8``, ``1.0`` -> ``1``: exact when ``v`` is a ratio with a small
    denominator (<= 1024), else the shortest exact decimal (``fmt_value``)."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return fmt_value(v)
    f = Fraction(v).limit_denominator(1024)
    if abs(float(f) - float(v)) > 1e-12 * max(1.0, abs(float(v))):
        return fmt_value(v)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def fmt_value(v: Any) -> str:
    """A swept value as written: ``0.125`` (never rounded to ``0.12``), ``1``, names as is."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.10g}"
    return str(v)


def _num(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v))):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _bytes(v: float) -> str:
    """Bytes as an integer below 10 KiB, else in binary units with three significant digits."""
    if abs(v) < 10 * 1024:
        return f"{round(v):d} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        v /= 1024.0
        if abs(v) < 1024 or unit == "TiB":
            return f"{v:.3g} {unit}"
    raise AssertionError("unreachable")


def fmt_metric(metric: str, v: Any) -> str:
    """A steady-state value of ``metric`` for a table: dB with 2 decimals, bytes as integers or
    KiB/MiB, accuracy/loss with 4 decimals, counts without decimals when whole."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    x = float(v)
    if metric.endswith("_mse"):
        return f"{x:.2f}"
    if metric.startswith("bytes"):
        return _bytes(x)
    if metric in ("accuracy", "loss"):
        return f"{x:.4f}"
    return f"{x:.0f}" if x == round(x) else f"{x:.2f}"


def _diverged(row: dict[str, Any]) -> bool:
    """The summary row's verdict (rows of older parts: non-finite or above DIVERGED_DB)."""
    if "diverged" in row:
        return bool(row["diverged"])
    v = row.get("steady_db", row.get("steady"))
    return isinstance(v, float) and not (v < DIVERGED_DB)


def main_metric(metrics: Sequence[str]) -> str:
    """The metric reports rank by: ``global_mse`` (online), else ``accuracy`` (image tasks)."""
    for m in ("global_mse", "accuracy"):
        if m in metrics:
            return m
    return sorted(metrics)[0]


def _value_col(metric: str) -> tuple[str, str, str]:
    return (("steady_db", "ci_low_db", "ci_high_db") if metric.endswith("_mse")
            else ("steady", "ci_low", "ci_high"))


def _unit(metric: str) -> str:
    return f"{metric} (dB)" if metric.endswith("_mse") else metric


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
        cells = [fmt_value(first.get(k)) for k in keys]
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
                      else fmt_metric(m, ms[m].get("steady")) if m in ms else "–"
                      for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attack_axes(scenario: Scenario) -> list[str]:
    """Swept keys the worst case is taken over: the attack's name and its parameters."""
    return [k for k in scenario.sweep if k == "attack.name" or k.startswith("attack.params")]


def _badness(row: dict[str, Any], metric: str) -> float:
    """How much an attack hurt: diverged is worst; else the metric, signed so higher is worse."""
    if _diverged(row):
        return math.inf
    v = row.get(_value_col(metric)[0])
    if v is None or not math.isfinite(float(v)):
        return math.inf
    return -float(v) if metric in HIGHER_IS_BETTER else float(v)


def _attack_label(row: dict[str, Any], axes: Sequence[str]) -> str:
    extra = [f"{short_key(k)}={fmt_value(row.get(k))}" for k in axes if k != "attack.name"]
    return str(row.get("attack.name")) + (f" ({', '.join(extra)})" if extra else "")


WORST_COLUMNS = ("metric", "worst_attack", "worst", "ci_low", "ci_high", "diverged",
                 "no_attack", "gap", "attacks_compared")


def worst_case_rows(scenario: Scenario, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting of the non-attack swept keys (defense x fraction x ...): the attack that hurts
    the main metric most (a diverged point is the worst), its value and 95% CI, the no-attack
    value of the same setting and the gap to it. Empty unless ``attack.name`` is swept."""
    if "attack.name" not in scenario.sweep:
        return []
    metric = main_metric(sorted({str(r["metric"]) for r in rows}))
    vcol, lo, hi = _value_col(metric)
    axes = attack_axes(scenario)
    group_keys = [k for k in scenario.sweep if k not in axes]
    groups: dict[str, tuple[list[Any], list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for r in sorted(rows, key=lambda r: int(r["point"])):
        if r["metric"] != metric:
            continue
        vals = [r.get(k) for k in group_keys]
        ident = repr([fmt_value(v) for v in vals])
        _, attacked, base = groups.setdefault(ident, (vals, [], []))
        (base if r.get("attack.name") == "none" else attacked).append(r)
    out = []
    for vals, attacked, base in groups.values():
        if not attacked:
            continue
        worst = max(attacked, key=lambda r: _badness(r, metric))  # first of equals: point order
        div = _diverged(worst)
        w = math.nan if div else float(worst[vcol])
        b = base[0] if base else None
        b_val = None if b is None else (math.inf if _diverged(b) else float(b[vcol]))
        gap = None if b_val is None or div or not math.isfinite(b_val) else w - b_val
        out.append({**dict(zip(group_keys, vals, strict=True)), "metric": metric,
                    "worst_attack": _attack_label(worst, axes), "worst": w,
                    "ci_low": math.nan if div else worst.get(lo),
                    "ci_high": math.nan if div else worst.get(hi), "diverged": div,
                    "no_attack": b_val, "gap": gap, "attacks_compared": len(attacked)})
    return out



def worst_case_csv(scenario: Scenario, worst: Sequence[dict[str, Any]]) -> str:
    axes = attack_axes(scenario)
    cols = [k for k in scenario.sweep if k not in axes] + list(WORST_COLUMNS)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for row in worst:
        w.writerow([csv_cell(row.get(c)) for c in cols])
    return buf.getvalue()


def worst_case_markdown(scenario: Scenario, worst: Sequence[dict[str, Any]]) -> str:
    """The worst-case rows pivoted: one line per defense (x other keys), per value of the x key
    (the shared fraction when swept) the worst value with its attack, and the no-attack value."""
    if not worst:
        return ""
    metric = str(worst[0]["metric"])
    axes = attack_axes(scenario)
    group_keys = [k for k in scenario.sweep if k not in axes]
    x_key = next((k for k in X_PREFERENCE if k in group_keys), None)
    row_keys = sorted((k for k in group_keys if k != x_key),
                      key=lambda k: (k != "defense.name", group_keys.index(k)))
    xs = list(scenario.sweep[x_key]) if x_key else [None]
    lines_by: dict[str, tuple[list[Any], dict[str, dict[str, Any]]]] = {}
    for r in worst:
        vals = [r.get(k) for k in row_keys]
        ident = repr([fmt_value(v) for v in vals])
        lines_by.setdefault(ident, (vals, {}))[1][fmt_value(r.get(x_key)) if x_key else ""] = r
    xl = (lambda v: frac_label(v)) if x_key in ("sharing.fraction",) else fmt_value
    head = [short_key(k) for k in row_keys]
    for x in xs:
        at = f"{short_key(x_key)} {xl(x)}: " if x_key else ""
        head += [f"{at}worst (attack)", f"{at}no attack"]
    names = sorted({str(a) for a in scenario.sweep["attack.name"] if a != "none"})
    worse = "higher" if metric not in HIGHER_IS_BETTER else "lower"
    lines = [f"## {scenario.name}: worst case over attacks ({', '.join(names)}), "
             f"steady-state {_unit(metric)}, {worse} is worse", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for vals, by_x in lines_by.values():
        cells = [fmt_value(v) for v in vals]
        for x in xs:
            got = by_x.get(fmt_value(x) if x_key else "")
            if got is None:
                cells += ["–", "–"]
                continue
            r = got
            w = "diverged" if r["diverged"] else fmt_metric(metric, r["worst"])
            b = r["no_attack"]
            cells += [f"{w} ({r['worst_attack']})",
                      "–" if b is None else "diverged" if math.isinf(b) else fmt_metric(metric, b)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(scenario: Scenario, rows: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """worst_case.csv and worst_case.md (when attacks are swept); returns the files written."""
    worst = worst_case_rows(scenario, rows)
    if not worst:
        return []
    csv_path, md_path = out / "worst_case.csv", out / "worst_case.md"
    csv_path.write_text(worst_case_csv(scenario, worst))
    md_path.write_text(worst_case_markdown(scenario, worst) + "\n")
    return [csv_path, md_path]
