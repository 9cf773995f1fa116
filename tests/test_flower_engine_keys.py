"""The driver's Flower engine refuses what it cannot honour, before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from experiments.flower_engine import check_flower_point
from experiments.schema import ScenarioError, load_scenario

BASE = """
engine = "flower"
runs = 1
rounds = 2
[task]
kind = "digits"
[federation]
clients = 4
participants = 4
[output]
record_every = 1
"""


def _point(tmp_path: Path, extra: str) -> Any:
    f = tmp_path / "s.toml"
    f.write_text(BASE + extra)
    return next(iter(load_scenario(f).points()))


def test_defaults_pass(tmp_path: Path) -> None:
    check_flower_point(_point(tmp_path, ""))


def test_cuda_device_is_refused_on_the_flower_engine(tmp_path: Path) -> None:
    """device = "cuda" was silently ignored by the Flower engine."""
    point = _point(tmp_path, "")
    point.config[""]["device"] = "cuda"  # as if schema validation had let it through
    with pytest.raises(ScenarioError, match="device"):
        check_flower_point(point)


def test_persistent_omniscient_attack_is_refused(tmp_path: Path) -> None:
    attack = '[attack]\nname = "{}"\nmalicious = 1\npersistent = true\n'
    with pytest.raises(ScenarioError, match=r"attack\.persistent"):
        check_flower_point(_point(tmp_path, attack.format("alie")))
    check_flower_point(_point(tmp_path, attack.format("sign_flip")))


def test_scenario_validation_runs_the_flower_checks_before_any_work(tmp_path: Path) -> None:
    """Every Flower point is checked when the scenario loads, not when its point runs."""
    f = tmp_path / "s.toml"
    f.write_text(BASE + '[attack]\nname = "ipm"\nmalicious = 1\npersistent = true\n'
                 '[sweep]\n"attack.name" = ["sign_flip", "ipm"]\n')
    with pytest.raises(ScenarioError, match=r"attack\.persistent.*'ipm'"):
        load_scenario(f)
