"""Scenario files: parsing, validation and sweep expansion (keys declared in experiments.keys).

A scenario is a TOML file (read with :mod:`tomllib`) with top-level keys and the tables
``[task]``, ``[federation]``, ``[sharing]``, ``[attack]``, ``[defense]``, ``[output]`` and
``[sweep]``. ``[sweep]`` maps dotted keys (``"sharing.fraction"``) to lists and is expanded as a
cartesian product, in the order written. :func:`parse_scenario` validates every value of every
sweep point before it returns (types, ranges, the keys the chosen engine honours, cross-key rules,
the registries, each rule's participant-count precondition, and the batched engine's own
``OnlineConfig``), so a scenario that returns from it runs; :func:`check_runnable` adds the checks
that need this machine (data folders, CUDA, memory).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments.keys import (
    KEYS,
    NN,
    RENAMED,
    SECTIONS,
    Key,
    ScenarioError,
    canonical_value,
    coerce,
    engine_label,
    key,
    keys_markdown,
    setting_json,
    short_key,
)

__all__ = [
    "Scenario",
    "ScenarioError",
    "SweepPoint",
    "apply_overrides",
    "apply_values",
    "is_param_key",
    "load_scenario",
    "parse_scenario",
    "schema_markdown",
]

Config = dict[str, dict[str, Any]]
TOP_LEVEL = tuple(k.name for k in KEYS if not k.section)
#: tables of registry parameters: ``params.<param>`` and ``params_by_name.<name>.<param>``
PARAM_TABLES = ("params", "params_by_name")


def _lookup(dotted: str) -> tuple[str, str, Key | None]:
    """(section, leaf, declaration) of a dotted key; ``params.X`` and
    ``params_by_name.NAME.X`` leaves have no declaration (the registry checks them)."""
    sec, _, rest = dotted.partition(".") if "." in dotted else ("", "", dotted)
    if sec and rest.startswith("params.") and f"{sec}.params" in {k.name for k in KEYS}:
        if dotted == "attack.params.persistent":
            key(dotted)  # renamed: raises naming the new key
        return sec, rest, None
    if sec and rest.startswith("params_by_name.") and f"{sec}.params_by_name" in {
            k.name for k in KEYS}:
        if rest.count(".") != 2 or "" in rest.split("."):
            raise ScenarioError(f"{dotted!r}: write {sec}.params_by_name.<{sec} name>.<parameter>"
                                f", e.g. {sec}.params_by_name.{_EXAMPLE[sec]}")
        return sec, rest, None
    k = key(dotted)
    return k.section, k.leaf, k


_EXAMPLE = {"attack": "gaussian.sigma", "defense": "trimmed_mean.beta"}


def is_param_key(dotted: str) -> bool:
    """A registry parameter (untyped until the attack/defense checks it), not a declared key."""
    return any(f".{t}." in dotted for t in PARAM_TABLES)


def _validate_table(raw: Mapping[str, Any]) -> Config:
    out: Config = {sec: {} for sec in ("", *SECTIONS)}
    for name, value in raw.items():
        if name == "sweep":
            continue
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ScenarioError(f"[{name}] must be a table, got {type(value).__name__}")
            for sub, v in value.items():
                k = key(f"{name}.{sub}")
                out[name][sub] = coerce(k, v)
        elif name in TOP_LEVEL:
            out[""][name] = coerce(key(name), value)
        else:
            if name in RENAMED:
                key(name)  # raises, naming the new key
            allowed = ", ".join([*TOP_LEVEL, *SECTIONS, "sweep"])
            raise ScenarioError(f"unknown top-level key {name!r}; allowed: {allowed}")
    for k in KEYS:
        out[k.section].setdefault(k.leaf, copy.deepcopy(k.default))
    return out


def _set(cfg: Config, dotted: str, value: Any) -> None:
    sec, leaf, k = _lookup(dotted)
    if k is None and leaf.startswith("params_by_name."):
        _, name, param = leaf.split(".")
        tables = {n: dict(t) for n, t in cfg[sec]["params_by_name"].items()}
        tables.setdefault(name, {})[param] = copy.deepcopy(value)
        cfg[sec]["params_by_name"] = tables
    elif k is None:
        cfg[sec]["params"] = dict(cfg[sec]["params"])
        cfg[sec]["params"][leaf.split(".", 1)[1]] = copy.deepcopy(value)
    else:
        cfg[sec][leaf] = coerce(k, value)


def _get(cfg: Mapping[str, Mapping[str, Any]], dotted: str) -> Any:
    """A validated value; ``attack.params``/``defense.params`` are the parameters of the
    configured attack/rule: the shared table with its own ``params_by_name`` table on top."""
    sec, leaf, k = _lookup(dotted)
    if k is None and leaf.startswith("params_by_name."):
        _, name, param = leaf.split(".")
        return cfg[sec]["params_by_name"].get(name, {}).get(param)
    if k is None:
        return cfg[sec]["params"].get(leaf.split(".", 1)[1])
    if dotted == "defense.f" and cfg["defense"]["f"] is None:
        return cfg["attack"]["malicious"]
    if leaf == "params" and sec in ("attack", "defense"):
        own = cfg[sec]["params_by_name"].get(cfg[sec]["name"], {})
        return {**cfg[sec]["params"], **own}
    return cfg[sec][leaf]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class SweepPoint:
    """One resolved configuration of the sweep.

    Engines read settings with :meth:`get` (``point.get("federation.clients")``): validated,
    typed, defaults filled, ``defense.f`` resolved.
    """

    index: int
    values: tuple[tuple[str, Any], ...]  # (dotted key, value) of the swept keys, as written
    config: Config

    @property
    def label(self) -> str:
        return ", ".join(f"{short_key(k)}={_fmt(v)}" for k, v in self.values) or "base"

    @property
    def setting(self) -> str:
        """Canonical JSON of the swept values: the point's identity (seeds, result parts)."""
        return setting_json(self.values)

    @property
    def key(self) -> str:
        """Short hash of :attr:`setting` (the name of the point's result part)."""
        return hashlib.sha256(self.setting.encode()).hexdigest()[:16]

    def get(self, dotted: str) -> Any:
        return _get(self.config, dotted)


@dataclass
class Scenario:
    """A validated scenario: the base configuration and its sweep."""

    config: Config
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
            pts.append(SweepPoint(i, tuple(zip(keys, combo, strict=True)), cfg))
        return pts

    def resolved(self) -> dict[str, Any]:
        """A JSON-ready dict of the whole scenario (for meta.json and hashing)."""
        base: dict[str, Any] = dict(self.config[""])
        for sec in SECTIONS:
            base[sec] = self.config[sec]
        base["sweep"] = self.sweep
        return base

    def digest(self) -> str:
        """Content hash: independent of the order keys are written in (results are keyed by each
        point's setting, so swapping two sweep axes resumes the same points)."""
        blob = json.dumps(self.resolved(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def participant_counts(point: SweepPoint) -> list[int]:
    """The participant counts a round of ``point`` can have, for rules' preconditions.

    Fixed scheduling: ``participants``. Bernoulli (n ~ Binomial(K, p_c)): every count whose
    probability of occurring in at least one of the point's ``rounds x runs`` rounds exceeds
    1e-6 (union bound); rarer counts are treated as negligible.
    """
    k = int(point.get("federation.clients"))
    if point.get("engine") != "batched" or point.get("federation.scheduling") == "fixed":
        return [int(point.get("federation.participants"))]
    from scipy import stats

    p = float(point.get("federation.p_c"))
    draws = int(point.get("rounds")) * int(point.get("runs"))
    eps = 1e-6 / max(1, draws)
    lo = int(stats.binom.ppf(eps, k, p))
    hi = int(stats.binom.isf(eps, k, p))
    return list(range(max(lo, 0), min(hi, k) + 1))


def validate_point(point: SweepPoint) -> None:
    """Everything about one point that needs no machine: see the module docstring."""
    from experiments.registry_check import check_attack, check_defense

    cfg = point.config
    engine = engine_label(str(cfg[""]["engine"]), str(cfg["task"]["kind"]))
    where = f"sweep point {point.index} ({point.label})"
    for k in KEYS:
        value = cfg[k.section][k.leaf]
        if engine not in k.engines and value != k.default:
            raise ScenarioError(
                f"{k.name}: {where}: the {engine} engine does not use this key (set to "
                f"{value!r}; it honours it only on {' and '.join(k.engines)}); remove it or set "
                f"it to its default {k.default!r}"
            )
        if engine in k.engine_choices:
            coerce(k, value, engine)
    fed, share, att = cfg["federation"], cfg["sharing"], cfg["attack"]
    rules = [
        (fed["scheduling"] == "fixed" and fed["participants"] > fed["clients"],
         "federation.participants", f"({fed['participants']}) must be <= federation.clients "
         f"({fed['clients']})"),
        (att["malicious"] > fed["clients"], "attack.malicious",
         f"({att['malicious']}) must be <= federation.clients ({fed['clients']})"),
        (cfg["output"]["record_every"] > cfg[""]["rounds"], "output.record_every",
         f"({cfg['output']['record_every']}) must be <= rounds ({cfg['']['rounds']})"),
        (share["count"] > 0 and share["fraction"] != 1.0, "sharing.count",
         "and sharing.fraction are both set; set one of them"),
    ]
    for bad, name, msg in rules:
        if bad:
            raise ScenarioError(f"{name}: {where}: {msg}")
    from experiments.configs import attack_params_of, defense_params_of
    from experiments.registry_check import check_name

    for kind in ("attack", "defense"):
        _check_by_name(kind, cfg[kind]["params_by_name"], where)

    check_name("attack", str(att["name"]), where)
    check_name("defense", str(cfg["defense"]["name"]), where)
    check_attack(str(att["name"]), attack_params_of(point), where)
    check_defense(str(cfg["defense"]["name"]), defense_params_of(point), where,
                  participant_counts(point))
    if engine == "batched":
        from experiments.configs import online_config

        online_config(point)
    elif engine == NN:
        from experiments.nn_point import nn_config

        nn_config(point)
    else:
        from experiments.configs import check_flower_point

        check_flower_point(point)


def _check_by_name(kind: str, tables: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Each ``<kind>.params_by_name`` table names a registered attack/rule and holds only its
    parameters (a key it would ignore is an error, never a silently dropped setting)."""
    from experiments.registry_check import accepted_params, check_name

    for name, params in tables.items():
        if kind == "attack" and name == "none":
            raise ScenarioError(f"attack.params_by_name.none: {where}: 'none' takes no parameters")
        check_name(kind, name, f"{where}, {kind}.params_by_name.{name}")
        acc = accepted_params(kind, name)
        for p in params:
            new = RENAMED.get(f"{kind}.params.{p}")
            if new is not None:
                raise ScenarioError(f"{kind}.params_by_name.{name}.{p}: is a scenario key; use "
                                    f"{new!r}")
            if p not in acc:
                raise ScenarioError(
                    f"{kind}.params_by_name.{name}.{p}: {where}: not a parameter of {name!r}; "
                    f"allowed: {', '.join(acc) or '(none)'}")


def check_runnable(scenario: Scenario, points: Iterable[SweepPoint] | None = None) -> None:
    """Checks that need this machine, run before any work: data folders, CUDA, memory."""
    from experiments.resources import check_resources

    for p in scenario.points() if points is None else points:
        task = p.config["task"]
        if task["kind"] in ("mnist", "fashion_mnist", "cifar10"):
            d = task["data_dir"]
            if not d or not Path(d).is_dir():
                raise ScenarioError(
                    f"task.data_dir: sweep point {p.index}: task.kind {task['kind']!r} needs "
                    f"task.data_dir, an existing folder with the torchvision dataset (nothing is "
                    f"downloaded); got {d!r} — e.g. --set task.data_dir=/path/to/data"
                )
        if engine_label(str(p.get("engine")), str(task["kind"])) == NN:
            from experiments.nn_point import check_nn_resources

            check_nn_resources(p)
        else:
            check_resources(p)


def parse_value(text: str) -> Any:
    """Parse an override value as TOML (``0.5``, ``true``, ``[1, 2]``); bare words: strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, TOML values) to a raw scenario table."""
    values: list[tuple[str, Any]] = []
    for ov in overrides:
        if "=" not in ov:
            raise ScenarioError(f"override {ov!r} must look like key=value (e.g. runs=5)")
        name, text = ov.split("=", 1)
        values.append((name.strip(), parse_value(text.strip())))
    return apply_values(raw, values)


def apply_values(raw: dict[str, Any], overrides: Iterable[tuple[str, Any]] | Mapping[str, Any],
                 cwd: Path | None = None) -> dict[str, Any]:
    """Apply ``(dotted key, value)`` overrides, as ``--set`` does, to a raw scenario table.

    Plugin files given here resolve against ``cwd`` (default: the current directory), not
    against the scenario file: the user typed them where they stand.
    """
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for name, value in items:
        if not isinstance(name, str):
            raise ScenarioError(f"override keys must be dotted strings, got {name!r}")
        value = copy.deepcopy(value)
        if name.startswith("sweep."):
            if not isinstance(value, list):
                raise ScenarioError(f"{name}: a sweep override needs a list, e.g. {name}=[1, 2]")
            sweep = raw.setdefault("sweep", {})
            if not isinstance(sweep, dict):
                raise ScenarioError(f"[sweep] must be a table, got {type(sweep).__name__}")
            sweep[name.removeprefix("sweep.")] = value
            continue
        if name == "plugins" and isinstance(value, list):
            value = [_abs_plugin(v, cwd) for v in value]
        sec, leaf, _ = _lookup(name)
        target = raw if not sec else raw.setdefault(sec, {})
        if not isinstance(target, dict):
            raise ScenarioError(f"[{sec}] must be a table, got {type(target).__name__}")
        path = leaf.split(".")
        if path[0] in PARAM_TABLES and len(path) > 1:
            if path[0] == "params":
                path = ["params", leaf.split(".", 1)[1]]
            for part in path[:-1]:
                nxt = target.setdefault(part, {})
                if not isinstance(nxt, dict):
                    raise ScenarioError(f"{name}: {sec}.{part} must be a table, got {nxt!r}")
                target = nxt
            target[path[-1]] = value
        else:
            target[leaf] = value
        # An explicit override of a swept key replaces the sweep axis.
        if isinstance(raw.get("sweep"), dict):
            raw["sweep"].pop(name, None)
    return raw


def _abs_plugin(item: Any, cwd: Path | None) -> Any:
    if isinstance(item, str) and item.endswith(".py") and not Path(item).is_absolute():
        return str(((cwd or Path.cwd()) / item).resolve())
    return item


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
    """Validate a raw table into a :class:`Scenario`: every value of every sweep point."""
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"a scenario must be a table, got {type(raw).__name__}")
    cfg = _validate_table(raw)
    base = Path(source).parent if source and not source.startswith("<") else None
    load_plugins(cfg[""]["plugins"], base)
    sweep_raw = raw.get("sweep", {})
    if not isinstance(sweep_raw, dict):
        raise ScenarioError(f"[sweep] must be a table, got {type(sweep_raw).__name__}")
    sweep: dict[str, list[Any]] = {}
    for name, values in sweep_raw.items():
        if not isinstance(name, str):
            raise ScenarioError(f"sweep: keys must be strings, got {name!r}")
        _lookup(name)
        if name in ("plugins", "name", "description"):
            raise ScenarioError(f"sweep.{name}: this key cannot be swept")
        if not isinstance(values, list) or not values:
            raise ScenarioError(f"sweep.{name}: must be a non-empty list, got {values!r}")
        normalised = []
        for v in values:
            probe = copy.deepcopy(cfg)
            try:
                _set(probe, name, v)  # type/range check of every value
            except ScenarioError as exc:
                raise ScenarioError(f"sweep.{exc}") from exc
            normalised.append(v if is_param_key(name) else canonical_value(name, v))
        seen = [json.dumps(canonical_value(name, v), default=str) for v in values]
        if len(set(seen)) != len(seen):
            raise ScenarioError(f"sweep.{name}: values repeat ({values!r}): each setting once")
        sweep[name] = normalised
    scen = Scenario(cfg, sweep, source)
    pts = scen.points()
    from experiments.registry_check import check_param_keys

    for kind in ("attack", "defense"):
        params: dict[str, Any] = {}
        for p in pts:
            params.update(p.get(f"{kind}.params"))
        check_param_keys(kind, (), params)  # renamed keys first
    for p in pts:
        validate_point(p)  # names registered, each point's parameters build
    for kind in ("attack", "defense"):
        names = {p.get(f"{kind}.name") for p in pts}
        params = {}
        for p in pts:
            params.update(p.get(f"{kind}.params"))
        check_param_keys(kind, sorted(names), params)  # a key no rule of the sweep accepts
    return scen


def resolve_path(path: str | Path) -> Path:
    """A scenario argument: an existing file, else a shipped scenario's name (``headline``)."""
    p = Path(path)
    if p.is_file():
        return p
    if len(p.parts) == 1:  # a bare name: a shipped scenario
        shipped = Path(__file__).parent / "scenarios"
        for cand in (shipped / p.name, shipped / f"{p.name}.toml"):
            if cand.is_file():
                return cand
    if p.exists():
        raise ScenarioError(f"scenario {str(path)!r} is a folder, not a scenario file (and no "
                            f"shipped scenario has that name; see `psfed-robust list scenarios`)")
    raise ScenarioError(f"scenario file {str(path)!r} not found")


def load_scenario(path: str | Path | None, overrides: Iterable[str] = ()) -> Scenario:
    """Read a scenario file (or the built-in default when ``path`` is None), apply overrides."""
    p = resolve_path(default_scenario_path() if path is None else path)
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{p}: not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{p}: cannot read the scenario file: {exc}") from exc
    raw = apply_overrides(raw, overrides)
    return parse_scenario(raw, source=str(p))


def default_scenario_path() -> Path:
    return Path(__file__).parent / "scenarios" / "headline.toml"


def shipped_scenarios() -> list[Path]:
    return sorted((Path(__file__).parent / "scenarios").glob("*.toml"))


def schema_markdown() -> str:
    """The key tables as Markdown (docs/scenarios.md holds this text)."""
    return keys_markdown()
