"""The driver's Flower engine refuses what it cannot honour, before any work."""

from __future__ import annotations

import pytest

from experiments.flower_engine import check_flower_point
from experiments.schema import ScenarioError, load_scenario


def _point(*overrides: str):  # type: ignore[no-untyped-def]
    s = load_scenario("digits_flower", ["runs=1", "rounds=2", *overrides])
    return next(iter(s.points()))


def test_defaults_pass() -> None:
    check_flower_point(_point())


def test_cuda_device_is_refused_on_the_flower_engine() -> None:
    """device = "cuda" was silently ignored by the Flower engine."""
    try:
        p = _point('device="cuda"')
    except ScenarioError as e:  # validation already refuses the batched-only key
        assert "device" in str(e)
        return
    with pytest.raises(ScenarioError, match="device"):
        check_flower_point(p)


def test_persistent_omniscient_attack_is_refused() -> None:
    try:
        p = _point('attack.name="alie"', "attack.malicious=2", "attack.persistent=true",
                   "attack.params={}")
    except ScenarioError as e:
        assert "persistent" in str(e)
        return
    with pytest.raises(ScenarioError, match=r"attack\.persistent"):
        check_flower_point(p)
    check_flower_point(_point('attack.name="sign_flip"', "attack.malicious=2",
                              "attack.persistent=true", "attack.params={}"))
