"""Shared test settings: no Flower telemetry; hypothesis without per-example deadlines (CI CPUs
are shared and slow, and a deadline would turn load into flaky failures)."""

import os

import pytest
from hypothesis import settings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

settings.register_profile("psfed", deadline=None)
settings.load_profile("psfed")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiment driver runs ``experiments_fake.fake_run_point`` instead of an engine."""
    from experiments_fake import fake_run_point

    import experiments.engines

    monkeypatch.setattr(experiments.engines, "run_point", fake_run_point)
