"""Scenario fuzz and crash consistency (issue 14, "Also").

Fuzz: random keys, types and values on a valid scenario -> either it parses, or a ScenarioError
whose message names a key that was changed, and ``psfed-robust run`` then writes nothing; never
another exception. Crash consistency: the driver is stopped at random writes (before the write,
after half of the bytes, after the temporary file but before the rename) and random parts are
damaged between runs; the next run must end with exactly the reference bytes. Seeded: the same
cases on every run.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from experiments_fake import tiny_scenario

import experiments.driver
import experiments.engines
from experiments.cli import main
from experiments.driver import run_scenario
from experiments.keys import KEYS, RENAMED, ScenarioError
from experiments.schema import parse_scenario

BASE = tiny_scenario("fz", runs=2, rounds=20, seed=1, malicious=1)

POOL: list[Any] = [0, 1, -1, 3, 7, 10**12, 0.0, 0.5, 1.0, 1.5, -0.25, math.inf, -math.inf,
                   math.nan, True, False, "", "random", "topk", "fill", "reporters", "krum",
                   "none", "cuda", "../x", "linear", "rff", "digits", [], [1, 2], [0.5],
                   {}, {"sigma": 1.0}, {"f": 2}, {"bogus": 1}]
EXTRA_NAMES = ["bogus", "task.dimm", "sweeps", "attack.params.bogus", "defense.params.f",
               "attack.params.sigma", *RENAMED]


def _mutate(rng: random.Random, raw: dict[str, Any]) -> list[str]:
    """Apply 1-3 random changes; return the dotted names touched."""
    touched = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        names = [k.name for k in KEYS] + EXTRA_NAMES
        name = rng.choice(names)
        value = copy.deepcopy(rng.choice(POOL))
        k = next((k for k in KEYS if k.name == name), None)
        if k is not None and rng.random() < 0.6:  # a plausible value of the key's type
            if k.choices is not None:
                value = rng.choice(k.choices)
            elif k.type is int:
                value = rng.randint(1, 4)
            elif k.type is float:
                value = rng.choice([0.05, 0.25, 0.5, 1.0])
            else:
                value = copy.deepcopy(k.default)
        as_sweep = rng.random() < 0.3
        if as_sweep:
            raw.setdefault("sweep", {})[name] = (
                [value, copy.deepcopy(rng.choice(POOL))] if rng.random() < 0.8 else value)
        elif "." in name:
            sec, leaf = name.split(".", 1)
            table = raw.setdefault(sec, {})
            if not isinstance(table, dict):
                continue
            if leaf.startswith("params."):
                params = table.setdefault("params", {})
                if isinstance(params, dict):
                    params[leaf.split(".", 1)[1]] = value
            else:
                table[leaf] = value
        else:
            raw[name] = value
        touched.append(name)
    return touched


def _names(dotted: str) -> set[str]:
    out = {dotted, dotted.rsplit(".", 1)[-1]}
    if dotted in RENAMED:
        out.add(RENAMED[dotted])
    return out


@pytest.mark.parametrize("block", range(4))
def test_fuzzed_scenarios_fail_cleanly_and_write_nothing(tmp_path: Path, block: int) -> None:
    rng = random.Random(f"experiments-fuzz-{block}")
    failures = successes = 0
    for case in range(60):
        raw = copy.deepcopy(BASE)
        touched = _mutate(rng, raw)
        try:
            parse_scenario(raw)
            successes += 1
            continue
        except ScenarioError as exc:
            msg = str(exc)
        failures += 1
        wanted = set().union(*(_names(t) for t in touched)) | {"sweep", "engine"}
        assert any(w in msg for w in wanted), (case, touched, msg)
        try:
            text = tomli_w.dumps(raw)
        except (TypeError, ValueError):
            continue  # not representable in TOML (e.g. a mixed list): parsing covered it
        path = tmp_path / f"c{case}.toml"
        path.write_text(text)
        out = tmp_path / f"out{case}"
        assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2, (touched, msg)
        assert not out.exists(), (touched, msg)
    assert failures > 20 and successes > 3  # the fuzzer exercises both outcomes


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, the files stay as they are."""


def _crashing_writer(at: int, how: str, real: Any) -> Any:
    count = [0]

    def write(path: Path, data: str | bytes) -> None:
        count[0] += 1
        if count[0] < at:
            return real(path, data)
        blob = data.encode() if isinstance(data, str) else data
        tmp = path.with_name(path.name + ".tmp4242")
        if how == "half":
            tmp.write_bytes(blob[: len(blob) // 2])
        elif how == "before_rename":
            tmp.write_bytes(blob)
        raise Crash

    return write


def test_crash_at_random_points_and_damaged_parts_end_with_exact_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: None
) -> None:
    raw = dict(copy.deepcopy(BASE), sweep={"sharing.fraction": [1.0, 0.5, 0.25],
                                           "attack.malicious": [0, 2]})
    scen = parse_scenario(raw)
    ref = run_scenario(scen, tmp_path / "ref", progress=False, stream=None)
    real = experiments.driver._atomic_write
    rng = random.Random("experiments-crash")
    for trial in range(10):
        out = tmp_path / f"t{trial}"
        for _ in range(rng.choice([1, 1, 2, 3])):  # several crashes in a row, then damage
            at = rng.randint(1, 16)
            how = rng.choice(["before", "half", "before_rename"])
            monkeypatch.setattr(experiments.driver, "_atomic_write",
                                _crashing_writer(at, how, real))
            try:
                run_scenario(scen, out, progress=False, stream=None)
            except Crash:
                pass
            monkeypatch.setattr(experiments.driver, "_atomic_write", real)
        parts = sorted((out / "parts").glob("*.*")) if (out / "parts").exists() else []
        for victim in rng.sample(parts, k=min(len(parts), rng.randint(0, 2))):
            how = rng.choice(["truncate", "empty", "delete", "flip"])
            blob = victim.read_bytes()
            if how == "truncate":
                victim.write_bytes(blob[: len(blob) // 2])
            elif how == "empty":
                victim.write_bytes(b"")
            elif how == "delete":
                victim.unlink()
            elif blob:
                i = rng.randrange(len(blob))
                victim.write_bytes(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1:])
        done = run_scenario(scen, out, progress=False, stream=None)
        assert done.tidy_csv.read_bytes() == ref.tidy_csv.read_bytes(), trial
        assert done.summary_csv.read_bytes() == ref.summary_csv.read_bytes(), trial
        assert not list((out / "parts").glob("*.tmp*"))
