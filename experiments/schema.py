"""Scenario files: schema, validation and sweep expansion.

A scenario is a TOML file (read with :mod:`tomllib`) with top-level keys and the tables
``[task]``, ``[federation]``, ``[sharing]``, ``[attack]``, ``[defense]``, ``[output]`` and
``[sweep]``. Every key is declared in :data:`SCHEMA`; an unknown key or a bad value stops before any
work with a message that names the key and the allowed values. ``[sweep]`` maps dotted keys
(``"sharing.fraction"``) to lists and is expanded as a cartesian product, in the order written.
docs/scenarios.md is generated from :data:`SCHEMA` (:func:`schema_markdown`).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "SCHEMA",
    "Field",
    "Scenario",
    "ScenarioError",
    "SweepPoint",
    "apply_overrides",
    "load_scenario",
    "parse_scenario",
    "schema_markdown",
]


class ScenarioError(ValueError):
    """A scenario file or override is invalid (the message names the key)."""


@dataclass(frozen=True)
class Field:
    """One scenario key: its type, default, allowed values and meaning."""

    type: type | tuple[type, ...]
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], bool] | None = None
    check_doc: str = ""
    nullable: bool = False


def _pos(x: Any) -> bool:
    return bool(x > 0)


def _nonneg(x: Any) -> bool:
    return bool(x >= 0)


def _unit(x: Any) -> bool:
    return bool(0.0 <= x <= 1.0)


def _unit_open(x: Any) -> bool:
    return bool(0.0 < x <= 1.0)


TASKS = ("linear", "rff", "digits", "mnist", "fashion_mnist", "cifar10")
ONLINE_TASKS = ("linear", "rff")
IMAGE_TASKS = ("digits", "mnist", "fashion_mnist", "cifar10")

SCHEMA: dict[str, dict[str, Field]] = {
    "": {
        "name": Field(str, "scenario", "Scenario name (used for the output folder)."),
        "description": Field(str, "", "Free text, copied to meta.json."),
        "engine": Field(
            str, "batched", "Which engine runs it: the batched online engine or Flower.",
            choices=("batched", "flower"),
        ),
        "runs": Field(int, 20, "Monte Carlo runs per sweep point.", check=_pos, check_doc="> 0"),
        "seed": Field(int, 0, "Scenario seed; every draw derives from it via SHA-256.",
                      check=_nonneg, check_doc=">= 0"),
        "rounds": Field(int, 1000, "Iterations (online) or Flower rounds.", check=_pos,
                        check_doc="> 0"),
        "device": Field(str, "cpu", "Torch device for the batched engine.",
                        choices=("cpu", "cuda", "auto")),
        "plugins": Field(list, [], "Python files (relative to the scenario file) or module "
                         "names imported first, e.g. to register your own attacks/defenses."),
    },
    "task": {
        "kind": Field(str, "linear", "Learning task.", choices=TASKS),
        "dim": Field(int, 32, "Model dimension D (linear: input size; rff: number of features).",
                     check=_pos, check_doc="> 0"),
        "input_dim": Field(int, 4, "Raw input dimension L of the RFF task.", check=_pos,
                           check_doc="> 0"),
        "kernel_width": Field(float, 1.0, "RFF kernel width sigma_k (omega ~ N(0, sigma_k^-2 I)).",
                              check=_pos, check_doc="> 0"),
        "noise_var": Field(float, 0.01, "Observation noise variance sigma_nu^2 (linear task).",
                           check=_nonneg, check_doc=">= 0"),
        "input_var": Field(float, 1.0, "Input variance sigma_x^2 (linear task).", check=_pos,
                           check_doc="> 0"),
        "num_test": Field(int, 50, "Test points N_t for the global-model MSE.", check=_pos,
                          check_doc="> 0"),
        "data_dir": Field(str, "", "Folder with torchvision datasets (mnist, fashion_mnist, "
                          "cifar10); nothing is downloaded."),
        "partition": Field(str, "iid", "Client data split for image tasks.",
                           choices=("iid", "dirichlet")),
        "dirichlet_alpha": Field(float, 0.5, "Dirichlet concentration for non-IID splits.",
                                 check=_pos, check_doc="> 0"),
        "hidden": Field(int, 64, "Hidden units of the image MLP.", check=_pos, check_doc="> 0"),
        "lr": Field(float, 0.05, "Client learning rate (image tasks).", check=_pos,
                    check_doc="> 0"),
        "local_epochs": Field(int, 1, "Local epochs per round (image tasks).", check=_pos,
                              check_doc="> 0"),
        "batch_size": Field(int, 32, "Local batch size (image tasks).", check=_pos,
                            check_doc="> 0"),
    },
    "federation": {
        "clients": Field(int, 50, "Number of clients K.", check=_pos, check_doc="> 0"),
        "scheduling": Field(str, "fixed", "Fixed number of participants per round, or each "
                            "client independently with probability p_c.",
                            choices=("fixed", "bernoulli")),
        "participants": Field(int, 10, "Participants per round (fixed scheduling).", check=_pos,
                              check_doc="> 0"),
        "p_c": Field(float, 0.2, "Participation probability (bernoulli scheduling).",
                     check=_unit_open, check_doc="in (0, 1]"),
        "stepsize": Field(float, 0.05, "LMS stepsize mu (online tasks).", check=_pos,
                          check_doc="> 0"),
        "server_weight": Field(str, "participants", "PSO-Fed server weight: 1/|K_n|, "
                               "1/(p_c K) or 1/K.", choices=("participants", "expected", "all")),
    },
    "sharing": {
        "selector": Field(str, "random", "Mask selection scheme.",
                          choices=("random", "round_robin", "topk", "client_specific")),
        "fraction": Field(float, 1.0, "Shared fraction p_e = M/D (ignored when count is set).",
                          check=_unit_open, check_doc="in (0, 1]"),
        "count": Field(int, 0, "Shared entries M per round (0: use fraction).", check=_nonneg,
                       check_doc=">= 0"),
        "coordinated": Field(bool, False, "All clients share the same entries in a round."),
        "uplink": Field(str, "next", "Uplink mask: the downlink mask of the next round (P1's "
                        "form), the same one as the downlink, or an independent draw.",
                        choices=("next", "same", "independent")),
    },
    "attack": {
        "name": Field(str, "none", "Attack registry name, or 'none'."),
        "malicious": Field(int, 0, "Number of malicious clients (the first ids).",
                           check=_nonneg, check_doc=">= 0"),
        "p_a": Field(float, 1.0, "Attack probability when a malicious client participates "
                     "(passed to attacks that take p_a).", check=_unit, check_doc="in [0, 1]"),
        "params": Field(dict, {}, "Attack parameters (see `psfed-robust list attacks`)."),
    },
    "defense": {
        "name": Field(str, "mean", "Aggregator registry name ('mean' is PSO-Fed's step)."),
        "mode": Field(str, "fill", "How partial updates meet the aggregator.",
                      choices=("fill", "reporters")),
        "params": Field(dict, {}, "Aggregator parameters (see `psfed-robust list defenses`)."),
    },
    "output": {
        "record_every": Field(int, 10, "Record metrics every this many iterations/rounds.",
                              check=_pos, check_doc="> 0"),
        "steady_window": Field(float, 0.2, "Final fraction of the recorded curve averaged as the "
                               "steady state.", check=_unit_open, check_doc="in (0, 1]"),
        "plots": Field(bool, True, "Write PNG plots."),
    },
}

SECTIONS = tuple(k for k in SCHEMA if k)


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " | ".join(x.__name__ for x in t)
    return {"dict": "table"}.get(t.__name__, t.__name__)


def _coerce(key: str, f: Field, value: Any) -> Any:
    if value is None and f.nullable:
        return None
    if f.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if f.type is not bool and isinstance(value, bool):
        raise ScenarioError(f"{key}: expected {_type_name(f.type)}, got a boolean ({value!r})")
    if not isinstance(value, f.type):
        raise ScenarioError(
            f"{key}: expected {_type_name(f.type)}, got {type(value).__name__} ({value!r})"
        )
    if f.choices is not None and value not in f.choices:
        allowed = ", ".join(repr(c) for c in f.choices)
        raise ScenarioError(f"{key}: {value!r} is not allowed; allowed values: {allowed}")
    if f.check is not None and not f.check(value):
        raise ScenarioError(f"{key}: {value!r} is out of range; must be {f.check_doc}")
    return copy.deepcopy(value)


def _split(dotted: str) -> tuple[str, str]:
    if "." in dotted:
        sec, key = dotted.split(".", 1)
    else:
        sec, key = "", dotted
    if sec not in SCHEMA:
        raise ScenarioError(
            f"unknown section {sec!r} in key {dotted!r}; allowed sections: {', '.join(SECTIONS)}"
        )
    if key.startswith("params.") and "params" in SCHEMA[sec]:
        return sec, key
    if key not in SCHEMA[sec]:
        where = f"[{sec}]" if sec else "top level"
        raise ScenarioError(
            f"unknown key {dotted!r} ({where}); allowed keys: {', '.join(SCHEMA[sec])}"
        )
    return sec, key


def _validate_table(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {sec: {} for sec in SCHEMA}
    for key, value in raw.items():
        if key == "sweep":
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ScenarioError(f"[{key}] must be a table, got {type(value).__name__}")
            for sub, v in value.items():
                if sub not in SCHEMA[key]:
                    raise ScenarioError(
                        f"unknown key '{key}.{sub}'; allowed keys in [{key}]: "
                        f"{', '.join(SCHEMA[key])}"
                    )
                out[key][sub] = _coerce(f"{key}.{sub}", SCHEMA[key][sub], v)
        elif key in SCHEMA[""]:
            out[""][key] = _coerce(key, SCHEMA[""][key], value)
        else:
            allowed = ", ".join([*SCHEMA[""], *SECTIONS, "sweep"])
            raise ScenarioError(f"unknown top-level key {key!r}; allowed: {allowed}")
    for sec, fields in SCHEMA.items():
        for k, f in fields.items():
            out[sec].setdefault(k, copy.deepcopy(f.default))
    return out


def _set(cfg: dict[str, dict[str, Any]], dotted: str, value: Any) -> None:
    sec, key = _split(dotted)
    if key.startswith("params."):
        cfg[sec]["params"] = dict(cfg[sec]["params"])
        cfg[sec]["params"][key.split(".", 1)[1]] = value
    else:
        cfg[sec][key] = _coerce(dotted, SCHEMA[sec][key], value)


def _get(cfg: Mapping[str, Mapping[str, Any]], dotted: str) -> Any:
    sec, key = _split(dotted)
    if key.startswith("params."):
        return cfg[sec]["params"].get(key.split(".", 1)[1])
    return cfg[sec][key]


@dataclass(frozen=True)
class SweepPoint:
    """One resolved configuration of the sweep."""

    index: int
    values: tuple[tuple[str, Any], ...]  # (dotted key, value) of the swept keys
    config: dict[str, dict[str, Any]]

    @property
    def label(self) -> str:
        from experiments.report import short_key

        return ", ".join(f"{short_key(k)}={_fmt(v)}" for k, v in self.values) or "base"

    def get(self, dotted: str) -> Any:
        return _get(self.config, dotted)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class Scenario:
    """A validated scenario: the base configuration and its sweep."""

    config: dict[str, dict[str, Any]]
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    source: str = "<built-in>"

    @property
    def name(self) -> str:
        return str(self.config[""]["name"])

    def get(self, dotted: str) -> Any:
        return _get(self.config, dotted)

    def points(self) -> list[SweepPoint]:
        keys = list(self.sweep)
        combos = itertools.product(*(self.sweep[k] for k in keys)) if keys else [()]
        pts = []
        for i, combo in enumerate(combos):
            cfg = copy.deepcopy(self.config)
            for k, v in zip(keys, combo, strict=True):
                _set(cfg, k, v)
            _check_consistency(cfg, where=f"sweep point {dict(zip(keys, combo, strict=True))}")
            pts.append(SweepPoint(i, tuple(zip(keys, combo, strict=True)), cfg))
        return pts

    def resolved(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole scenario (for meta.json and hashing)."""
        base = {k: v for k, v in self.config[""].items()}
        for sec in SECTIONS:
            base[sec] = self.config[sec]
        base["sweep"] = self.sweep
        return base

    def digest(self) -> str:
        blob = json.dumps(self.resolved(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_consistency(cfg: Mapping[str, Mapping[str, Any]], where: str = "scenario") -> None:
    fed, task, share = cfg["federation"], cfg["task"], cfg["sharing"]
    att = cfg["attack"]
    engine = cfg[""]["engine"]
    if engine == "batched" and task["kind"] not in ONLINE_TASKS:
        raise ScenarioError(
            f"{where}: task.kind {task['kind']!r} needs engine = 'flower'; the batched engine "
            f"runs {', '.join(ONLINE_TASKS)}"
        )
    if engine == "flower" and task["kind"] not in IMAGE_TASKS:
        raise ScenarioError(
            f"{where}: engine 'flower' runs task.kind in {', '.join(IMAGE_TASKS)}, "
            f"got {task['kind']!r}"
        )
    if fed["scheduling"] == "fixed" and fed["participants"] > fed["clients"]:
        raise ScenarioError(
            f"{where}: federation.participants ({fed['participants']}) must be <= "
            f"federation.clients ({fed['clients']})"
        )
    if att["malicious"] > fed["clients"]:
        raise ScenarioError(
            f"{where}: attack.malicious ({att['malicious']}) must be <= federation.clients "
            f"({fed['clients']})"
        )
    if share["count"] > task["dim"] and task["kind"] in ONLINE_TASKS:
        raise ScenarioError(
            f"{where}: sharing.count ({share['count']}) must be <= task.dim ({task['dim']})"
        )
    _check_registries(cfg, where)


def check_runnable(scenario: Scenario) -> None:
    """Checks that need the machine (data folders): run before any work starts."""
    for p in scenario.points():
        task = p.config["task"]
        if task["kind"] in ("mnist", "fashion_mnist", "cifar10"):
            d = task["data_dir"]
            if not d or not Path(d).is_dir():
                raise ScenarioError(
                    f"sweep point {p.index}: task.kind {task['kind']!r} needs task.data_dir, an "
                    f"existing folder with the torchvision dataset (nothing is downloaded); got "
                    f"{d!r} — e.g. --set task.data_dir=/path/to/data"
                )


def _check_registries(cfg: Mapping[str, Mapping[str, Any]], where: str) -> None:
    from experiments.registry_check import check_attack, check_defense

    check_attack(cfg["attack"]["name"], dict(cfg["attack"]["params"]), cfg["attack"]["p_a"],
                 where)
    check_defense(cfg["defense"]["name"], dict(cfg["defense"]["params"]), where)


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (``0.5``, ``true``, ``[1, 2]``); bare words: strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys) to a raw scenario table."""
    raw = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ScenarioError(f"override {ov!r} must look like key=value (e.g. runs=5)")
        key, text = ov.split("=", 1)
        key = key.strip()
        value = parse_value(text.strip())
        if key.startswith("sweep."):
            if not isinstance(value, list):
                raise ScenarioError(f"{key}: a sweep override needs a list, e.g. {key}=[1, 2]")
            raw.setdefault("sweep", {})[key.removeprefix("sweep.")] = value
            continue
        sec, sub = _split(key)
        target = raw if not sec else raw.setdefault(sec, {})
        if sub.startswith("params."):
            target.setdefault("params", {})[sub.split(".", 1)[1]] = value
        else:
            target[sub] = value
        # An explicit override of a swept key replaces the sweep axis.
        raw.get("sweep", {}).pop(key, None)
    return raw


def load_plugins(plugins: Iterable[str], base: Path | None = None) -> None:
    """Import plugin modules (names) or files (paths ending in .py) that register extensions."""
    import importlib
    import importlib.util
    import sys

    for item in plugins:
        if not isinstance(item, str):
            raise ScenarioError(f"plugins: entries must be strings, got {item!r}")
        if item.endswith(".py"):
            path = Path(item)
            if not path.is_absolute() and base is not None:
                path = base / path
            if not path.is_file():
                raise ScenarioError(f"plugins: file {str(path)!r} not found")
            name = "psfed_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
            if name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ScenarioError(f"plugins: cannot import {str(path)!r}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[name]
                raise ScenarioError(f"plugins: importing {str(path)!r} failed: {exc}") from exc
        else:
            try:
                importlib.import_module(item)
            except ImportError as exc:
                raise ScenarioError(f"plugins: cannot import module {item!r}: {exc}") from exc


def parse_scenario(raw: Mapping[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a raw table into a :class:`Scenario` (all sweep points are checked)."""
    cfg = _validate_table(raw)
    base = Path(source).parent if source and not source.startswith("<") else None
    load_plugins(cfg[""]["plugins"], base)
    sweep_raw = raw.get("sweep", {})
    if not isinstance(sweep_raw, dict):
        raise ScenarioError(f"[sweep] must be a table, got {type(sweep_raw).__name__}")
    sweep: dict[str, list[Any]] = {}
    for key, values in sweep_raw.items():
        _split(key)
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"sweep.{key}: must be a non-empty list, got {values!r}")
        for v in values:
            probe = copy.deepcopy(cfg)
            _set(probe, key, v)  # type/choice check of every value
        sweep[key] = list(values)
    scen = Scenario(cfg, sweep, source)
    _check_consistency(cfg)
    pts = scen.points()  # every combination is consistent
    from experiments.registry_check import check_param_keys

    for kind in ("attack", "defense"):
        names = {p.get(f"{kind}.name") for p in pts}
        params: dict[str, Any] = {}
        for p in pts:
            params.update(p.get(f"{kind}.params"))
        check_param_keys(kind, sorted(names), params)
    return scen


def load_scenario(path: str | Path | None, overrides: Iterable[str] = ()) -> Scenario:
    """Read a scenario file (or the built-in default when ``path`` is None), apply overrides."""
    if path is None:
        path = default_scenario_path()
    p = Path(path)
    if not p.exists():
        shipped = Path(__file__).parent / "scenarios" / p.name
        shipped_toml = shipped.with_suffix(".toml")
        if shipped.exists():
            p = shipped
        elif shipped_toml.exists():
            p = shipped_toml
        else:
            raise ScenarioError(f"scenario file {str(path)!r} not found")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from exc
    raw = apply_overrides(raw, overrides)
    return parse_scenario(raw, source=str(p))


def default_scenario_path() -> Path:
    return Path(__file__).parent / "scenarios" / "headline.toml"


def shipped_scenarios() -> list[Path]:
    return sorted((Path(__file__).parent / "scenarios").glob("*.toml"))


def schema_markdown() -> str:
    """The schema as Markdown tables (docs/scenarios.md is generated from this)."""
    lines: list[str] = []
    for sec, fields in SCHEMA.items():
        lines.append(f"### {'[' + sec + ']' if sec else 'Top level'}\n")
        lines.append("| key | type | default | allowed | meaning |")
        lines.append("|---|---|---|---|---|")
        for k, f in fields.items():
            allowed = ", ".join(f"`{c}`" for c in f.choices) if f.choices else f.check_doc
            default = json.dumps(f.default)
            lines.append(f"| `{k}` | {_type_name(f.type)} | `{default}` | {allowed} | {f.doc} |")
        lines.append("")
    return "\n".join(lines)
