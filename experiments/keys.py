"""Every scenario key, declared once.

Each :class:`Key` states its dotted name, type, default, range or choices, meaning, which engines
honour it (``"batched"``: the online engine, :class:`psfed_robust.engine.OnlineConfig`;
``"flower"``: the Flower engine, ``experiments.flower_engine``) and, for the batched engine, the
``OnlineConfig`` field it feeds. Validation (:mod:`experiments.schema`), ``psfed-robust list
keys``, the key table of docs/scenarios.md (:func:`keys_markdown`) and the batched engine's
config (:mod:`experiments.configs`) are all derived from :data:`KEYS`.

A key the chosen engine does not honour may be left out or set to its default; any other value is
an error (a setting that would be silently ignored is a wrong result). Old names of a concept are
kept in :data:`RENAMED` only to say which key replaced them.

How an engine reads a point: ``point.get("sharing.fraction")`` returns the validated, typed value
of the point (defaults filled in); ``point.get("defense.f")`` is already resolved (``None`` in the
file means ``attack.malicious``). To make the Flower engine honour one more key, add ``"flower"``
to that key's ``engines`` here and read it with ``point.get``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BOTH",
    "ENGINES",
    "KEYS",
    "NN",
    "NN_TASKS",
    "RENAMED",
    "SECTIONS",
    "Key",
    "Range",
    "ScenarioError",
    "canonical_value",
    "coerce",
    "engine_label",
    "key",
    "keys_markdown",
    "keys_text",
    "section_keys",
    "short_key",
]

ENGINES = ("batched", "flower")  # values of the ``engine`` key
#: engine label of a point whose ``engine`` is "batched" and whose task is an image task: the
#: batched NN engine (psfed_robust.nn, experiments.nn_point); keys declare it like an engine
NN = "nn"
BOTH = ("batched", NN, "flower")  # every engine (the default of Key.engines)
BATCHED = ("batched",)
FLOWER = ("flower",)
NN_ONLY = (NN,)
IMAGE = ("flower", NN)  # keys of image classification, honoured by both image engines


class ScenarioError(ValueError):
    """A scenario file or override is invalid (the message names the key)."""


@dataclass(frozen=True)
class Range:
    """A numeric interval; floats must also be finite (TOML allows ``inf`` and ``nan``)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, x: Any) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        return not (self.high is not None and (x >= self.high if self.high_open else x > self.high))

    def describe(self) -> str:
        if self.high is None and self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None and self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        lo = "(" if self.low_open else "["
        hi = ")" if self.high_open else "]"
        return f"in {lo}{self.low:g}, {self.high:g}{hi}"


POS = Range(0, None, low_open=True)
NONNEG = Range(0, None)
UNIT = Range(0.0, 1.0)
UNIT_OPEN = Range(0.0, 1.0, low_open=True)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _param_tables(v: Any) -> bool:
    return all(isinstance(n, str) and isinstance(t, dict) and all(isinstance(k, str) for k in t)
               for n, t in v.items())


def _pre_specs(v: Any) -> bool:
    return all(isinstance(x, str) or (isinstance(x, dict) and isinstance(x.get("name"), str))
               for x in v)


def _safe_name(v: Any) -> bool:
    return bool(_NAME_RE.fullmatch(v)) and ".." not in v and len(v) <= 120


@dataclass(frozen=True)
class Key:
    """One scenario key (see the module docstring)."""

    name: str  # dotted: "sharing.fraction"; top-level keys have no dot
    type: type | tuple[type, ...]
    default: Any
    doc: str
    engines: tuple[str, ...] = BOTH
    choices: tuple[Any, ...] | None = None
    #: per-engine subsets of ``choices`` (an engine not listed takes every choice)
    engine_choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    range: Range | None = None
    check: Callable[[Any], bool] | None = None
    check_doc: str = ""
    nullable: bool = False
    #: the OnlineConfig field it sets directly (None: derived in experiments.configs, or unused)
    online: str | None = None

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0] if "." in self.name else ""

    @property
    def leaf(self) -> str:
        return self.name.split(".", 1)[1] if "." in self.name else self.name

    def allowed(self, engine: str | None = None) -> tuple[Any, ...] | None:
        if self.choices is None:
            return None
        if engine is not None and engine in self.engine_choices:
            return self.engine_choices[engine]
        return self.choices

    def allowed_doc(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append(", ".join(f"`{c}`" for c in self.choices))
            for eng, sub in self.engine_choices.items():
                parts.append(f"{eng}: " + ", ".join(f"`{c}`" for c in sub))
        if self.range is not None:
            parts.append(self.range.describe())
        if self.check_doc:
            parts.append(self.check_doc)
        if self.nullable:
            parts.append("or unset")
        return "; ".join(parts)


TASKS = ("linear", "rff", "digits", "mnist", "fashion_mnist", "cifar10", "synthetic")
ONLINE_TASKS = ("linear", "rff")
IMAGE_TASKS = ("digits", "mnist", "fashion_mnist", "cifar10")
NN_TASKS = (*IMAGE_TASKS, "synthetic")  # synthetic: a small seeded 8x8 task (tests)


def engine_label(engine: str, task_kind: str) -> str:
    """The engine that runs a point: ``"nn"`` for ``engine = "batched"`` with an image task."""
    return NN if engine == "batched" and task_kind in NN_TASKS else engine


SELECTORS = ("random", "round_robin", "topk", "client_specific")

KEYS: tuple[Key, ...] = (
    # ---------------------------------------------------------------- top level
    Key("name", str, "scenario", "Scenario name: the output folder results/<name> (letters, "
        "digits, `_.+-`; no path separators).", check=_safe_name,
        check_doc="a plain folder name"),
    Key("description", str, "", "Free text, copied to meta.json."),
    Key("engine", str, "batched", "Which engine runs it: the batched engine (online tasks; image "
        "tasks run on the batched NN engine, listed as `nn`) or Flower.", choices=ENGINES),
    Key("runs", int, 20, "Monte Carlo runs per sweep point.", range=POS, online="runs"),
    Key("seed", int, 0, "Scenario seed; every draw derives from it via SHA-256.", range=NONNEG),
    Key("rounds", int, 1000, "Iterations (online) or Flower rounds.", range=POS,
        online="iterations"),
    Key("device", str, "cpu", "Torch device of the batched engine (`auto`: CUDA when available; "
        "`cuda` without CUDA is refused before any work).", ("batched", NN),
        choices=("cpu", "cuda", "auto")),
    Key("plugins", list, [], "Python files (relative to the scenario file) or module names "
        "imported first, e.g. to register your own attacks/defenses."),
    # ---------------------------------------------------------------- [task]
    Key("task.kind", str, "linear", "Learning task.", choices=TASKS,
        engine_choices={"batched": ONLINE_TASKS, NN: NN_TASKS, "flower": IMAGE_TASKS},
        online="task"),
    Key("task.dim", int, 32, "Model dimension D (linear: input size; rff: number of features).",
        BATCHED, range=POS, online="dim"),
    Key("task.input_dim", int, 4, "Raw input dimension L of the RFF task.", BATCHED, range=POS,
        online="input_dim"),
    Key("task.kernel_width", float, 1.0, "RFF kernel width sigma_k (omega ~ N(0, sigma_k^-2 I)).",
        BATCHED, range=POS, online="kernel_width"),
    Key("task.noise_var", float, 0.01, "Observation noise variance sigma_nu^2.", BATCHED,
        range=NONNEG, online="noise_var"),
    Key("task.input_var", float, 1.0, "Input variance sigma_x^2 (linear task).", BATCHED,
        range=POS, online="input_var"),
    Key("task.num_test", int, 50, "Test points N_t for the global-model MSE.", BATCHED,
        range=POS, online="num_test"),
    Key("task.data_dir", str, "", "Folder with torchvision datasets (mnist, fashion_mnist, "
        "cifar10); nothing is downloaded.", IMAGE),
    Key("task.partition", str, "iid", "Client data split for image tasks.", IMAGE,
        choices=("iid", "dirichlet")),
    Key("task.dirichlet_alpha", float, 0.5, "Dirichlet concentration for non-IID splits.",
        IMAGE, range=POS),
    Key("task.hidden", int, 64, "Hidden units of the image MLP (`task.model = \"mlp\"`).", IMAGE,
        range=POS),
    Key("task.lr", float, 0.05, "Client learning rate (image tasks).", IMAGE, range=POS),
    Key("task.local_epochs", int, 1, "Local epochs per round (image tasks).", IMAGE, range=POS),
    Key("task.batch_size", int, 32, "Local batch size (image tasks).", IMAGE, range=POS),
    Key("task.model", str, "mlp", "Image model: the MLP, a LeNet-style CNN (8x8 digits, 28x28 "
        "MNIST) or a small CIFAR-10 CNN.", NN_ONLY, choices=("mlp", "cnn", "cifar_cnn")),
    Key("task.momentum", float, 0.9, "Client SGD momentum (image tasks).", NN_ONLY, range=UNIT),
    Key("task.momentum_scope", str, "round", "Momentum buffer fresh every round (the Flower "
        "client's new optimiser) or kept across rounds (worker momentum, Karimireddy et al. "
        "2021).", NN_ONLY, choices=("round", "persistent")),
    Key("task.weight_decay", float, 0.0, "Client SGD weight decay (image tasks).", NN_ONLY,
        range=NONNEG),
    Key("task.local_steps", int, 0, "Minibatch steps per round instead of `task.local_epochs` "
        "(0: epochs).", NN_ONLY, range=NONNEG),
    Key("task.lr_schedule", str, "constant", "Client learning rate per round: constant, cosine "
        "over the rounds, or step (x `task.lr_gamma` every `task.lr_step_rounds`).", NN_ONLY,
        choices=("constant", "cosine", "step")),
    Key("task.lr_gamma", float, 0.1, "Factor of the step schedule.", NN_ONLY, range=UNIT_OPEN),
    Key("task.lr_step_rounds", int, 0, "Rounds per step of the step schedule (>= 1 with "
        "`task.lr_schedule = \"step\"`).", NN_ONLY, range=NONNEG),
    # ---------------------------------------------------------------- [federation]
    Key("federation.clients", int, 50, "Number of clients K.", range=POS, online="num_clients"),
    Key("federation.scheduling", str, "fixed", "Fixed number of participants per round, or each "
        "client independently with probability p_c.", BATCHED, choices=("fixed", "bernoulli"),
        online="scheduling"),
    Key("federation.participants", int, 10, "Participants per round (fixed scheduling).",
        range=POS, online="participants"),
    Key("federation.p_c", float, 0.2, "Participation probability (bernoulli scheduling).",
        BATCHED, range=UNIT_OPEN),
    Key("federation.stepsize", float, 0.05, "LMS stepsize mu (online tasks).", BATCHED,
        range=POS, online="stepsize"),
    Key("federation.server_weight", str, "participants", "PSO-Fed server weight: 1/|K_n|, "
        "1/(p_c K) or 1/K.", BATCHED, choices=("participants", "expected", "all"),
        online="server_weight"),
    # ---------------------------------------------------------------- [sharing]
    Key("sharing.selector", str, "random", "Mask selection scheme.", choices=SELECTORS,
        engine_choices={"batched": ("random", "round_robin")}, online="selection"),
    Key("sharing.fraction", float, 1.0, "Shared fraction p_e = M/D; the batched engine shares "
        "M = round(fraction D) >= 1 entries. Set this or `sharing.count`, not both.",
        range=UNIT_OPEN),
    Key("sharing.count", int, 0, "Shared entries M per round (0: use `sharing.fraction`).",
        BATCHED, range=NONNEG),
    Key("sharing.coordinated", bool, False, "All clients share the same entries in a round.",
        BATCHED, online="coordinated"),
    Key("sharing.uplink", str, "next", "Uplink mask: the downlink mask of the next round (P1's "
        "form), the same one as the downlink, or an independent draw.", BATCHED,
        choices=("next", "same", "independent"), online="uplink"),
    # ---------------------------------------------------------------- [attack]
    Key("attack.name", str, "none", "Attack registry name, or 'none'."),
    Key("attack.malicious", int, 0, "Number of malicious clients (the first ids): the real "
        "number of attackers.", range=NONNEG),
    Key("attack.p_a", float, 1.0, "Attack probability when a malicious client participates "
        "(passed to attacks that take p_a).", range=UNIT),
    Key("attack.persistent", bool, False, "Threat model: a persistent attacker keeps its "
        "crafted model as its local model; otherwise the attack is transmit-only."),
    Key("attack.params", dict, {}, "Attack parameters (see `psfed-robust list attacks`); when "
        "`attack.name` is swept, each attack takes the keys it accepts."),
    Key("attack.params_by_name", dict, {}, "Parameters of one attack, by name, used only when "
        "that attack runs and over `attack.params`: `[attack.params_by_name.gaussian]` `sigma = "
        "2` (`--set attack.params_by_name.gaussian.sigma=2`; sweepable at that depth). Every key "
        "must be a parameter of that attack.", check=_param_tables,
        check_doc="a table per attack name"),
    # ---------------------------------------------------------------- [defense]
    Key("defense.name", str, "mean", "Aggregator registry name ('mean' is PSO-Fed's step)."),
    Key("defense.mode", str, "fill", "How partial updates meet the aggregator.",
        choices=("fill", "reporters"), online="aggregation_mode"),
    Key("defense.f", int, None, "Declared number of Byzantine participants the rule assumes "
        "(unset: `attack.malicious`); passed as `f` to rules that take it (to trimmed_mean only "
        "when set) unless `defense.params.f` is given.", range=NONNEG, nullable=True),
    Key("defense.pre", list, [], "Pre-aggregators applied in order before the rule (composable, "
        "e.g. `[\"nnm\", {name = \"bucketing\", s = 2}]`; Allouah et al. 2023, Karimireddy et "
        "al. 2022); they take `defense.f` as their `f`.", check=_pre_specs,
        check_doc="a list of names or tables with a `name`"),
    Key("defense.params", dict, {}, "Aggregator parameters (see `psfed-robust list defenses`); "
        "when `defense.name` is swept, each rule takes the keys it accepts."),
    Key("defense.params_by_name", dict, {}, "Parameters of one rule, by name, used only when "
        "that rule aggregates and over `defense.params`: `[defense.params_by_name.trimmed_mean]` "
        "`beta = 0.2`. Every key must be a parameter of that rule.", check=_param_tables,
        check_doc="a table per defense name"),
    # ---------------------------------------------------------------- [output]
    Key("output.record_every", int, 10, "Record metrics every this many iterations/rounds "
        "(<= rounds).", range=POS, online="record_every"),
    Key("output.steady_window", float, 0.2, "Final fraction of the recorded curve averaged as "
        "the steady state.", range=UNIT_OPEN),
    Key("output.plots", bool, True, "Write PNG plots."),
)

_BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(k.section for k in KEYS if k.section))

#: old or alternative names -> the key that replaced them (an error naming the new key)
RENAMED: dict[str, str] = {
    "sharing.share_count": "sharing.count",
    "sharing.mask_fraction": "sharing.fraction",
    "sharing.p_e": "sharing.fraction",
    "sharing.selection": "sharing.selector",
    "sharing.mask_strategy": "sharing.selector",
    "federation.num_clients": "federation.clients",
    "attack.num_malicious": "attack.malicious",
    "attack.params.persistent": "attack.persistent",
    "defense.aggregation_mode": "defense.mode",
    "iterations": "rounds",
}


def key(dotted: str) -> Key:
    """The declaration of ``dotted`` (a ScenarioError naming the key and the allowed ones)."""
    if dotted in _BY_NAME:
        return _BY_NAME[dotted]
    if dotted in RENAMED:
        raise ScenarioError(f"{dotted!r} was renamed: use {RENAMED[dotted]!r}")
    sec = dotted.split(".", 1)[0] if "." in dotted else ""
    if sec and sec not in SECTIONS:
        raise ScenarioError(
            f"unknown section {sec!r} in key {dotted!r}; allowed sections: {', '.join(SECTIONS)}"
        )
    where = f"[{sec}]" if sec else "top level"
    allowed = ", ".join(k.leaf for k in section_keys(sec))
    raise ScenarioError(f"unknown key {dotted!r} ({where}); allowed keys: {allowed}")


def section_keys(section: str) -> Iterator[Key]:
    return (k for k in KEYS if k.section == section)


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " | ".join(x.__name__ for x in t)
    return {"dict": "table"}.get(t.__name__, t.__name__)


def coerce(k: Key, value: Any, engine: str | None = None) -> Any:
    """``value`` checked against ``k`` (ints become floats for float keys)."""
    name = k.name
    if value is None and k.nullable:
        return None
    if k.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if k.type is not bool and isinstance(value, bool):
        raise ScenarioError(f"{name}: expected {_type_name(k.type)}, got a boolean ({value!r})")
    if not isinstance(value, k.type):
        raise ScenarioError(
            f"{name}: expected {_type_name(k.type)}, got {type(value).__name__} ({value!r})"
        )
    allowed = k.allowed(engine)
    if allowed is not None and value not in allowed:
        on = f" on the {engine} engine" if engine in k.engine_choices else ""
        raise ScenarioError(
            f"{name}: {value!r} is not allowed{on}; allowed values: "
            + ", ".join(repr(c) for c in allowed)
        )
    if k.range is not None and not k.range.contains(value):
        raise ScenarioError(f"{name}: {value!r} is out of range; must be {k.range.describe()}")
    if k.check is not None and not k.check(value):
        raise ScenarioError(f"{name}: {value!r} is not allowed; must be {k.check_doc}")
    return copy.deepcopy(value)


def canonical_value(dotted: str, value: Any) -> Any:
    """The value as it enters seeds and point keys: declared keys use their type (``1`` and
    ``1.0`` of a float key are the same setting); untyped ``params`` numbers become floats."""
    if dotted in _BY_NAME:
        return coerce(_BY_NAME[dotted], value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _order(dotted: str) -> tuple[int, str]:
    if dotted in _BY_NAME:
        return (list(_BY_NAME).index(dotted) * 2, "")
    sec = dotted.split(".", 1)[0]
    params = f"{sec}.params"
    base = list(_BY_NAME).index(params) * 2 + 1 if params in _BY_NAME else len(_BY_NAME) * 2
    return (base, dotted)


def canonical_setting(values: tuple[tuple[str, Any], ...]) -> list[list[Any]]:
    """Swept ``(key, value)`` pairs in declaration order with canonical values: the identity of a
    sweep point, independent of the order the ``[sweep]`` table lists its keys in."""
    return [[k, canonical_value(k, v)] for k, v in sorted(values, key=lambda kv: _order(kv[0]))]


def setting_json(values: tuple[tuple[str, Any], ...]) -> str:
    return json.dumps(canonical_setting(values), sort_keys=True, default=str)


def short_key(dotted: str) -> str:
    """``sharing.fraction`` -> ``fraction``; ``attack.name`` -> ``attack``; params keep a prefix."""
    parts = dotted.split(".")
    if len(parts) == 4 and parts[1] == "params_by_name":
        return f"{parts[2]}.{parts[3]}"
    if parts[-1] == "name":
        return parts[0]
    if "params" in parts:
        return f"{parts[0]}.{parts[-1]}"
    return parts[-1]


def keys_markdown() -> str:
    """The key tables of docs/scenarios.md (a test checks the document holds this text)."""
    lines: list[str] = []
    for sec in ("", *SECTIONS):
        lines.append(f"### {'[' + sec + ']' if sec else 'Top level'}\n")
        lines.append("| key | type | default | allowed | engines | meaning |")
        lines.append("|---|---|---|---|---|---|")
        for k in section_keys(sec):
            default = "unset" if k.default is None else f"`{json.dumps(k.default)}`"
            engines = " + ".join(k.engines)
            lines.append(f"| `{k.leaf}` | {_type_name(k.type)} | {default} | {k.allowed_doc()} "
                         f"| {engines} | {k.doc} |")
        lines.append("")
    lines.append("Renamed keys (an error that names the new key): "
                 + ", ".join(f"`{a}` -> `{b}`" for a, b in RENAMED.items()) + ".\n")
    return "\n".join(lines)


def keys_text() -> str:
    """One line per key for ``psfed-robust list keys``."""
    out = []
    for k in KEYS:
        default = "unset" if k.default is None else json.dumps(k.default)
        allowed = k.allowed_doc().replace("`", "")
        out.append(f"{k.name:26s} {_type_name(k.type):6s} default {default:14s} "
                   f"[{'+'.join(k.engines)}] {allowed}\n    {k.doc}")
    return "\n".join(out)
