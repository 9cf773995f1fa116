"""Shared test settings: no Flower telemetry; hypothesis without per-example deadlines (CI CPUs
are shared and slow, and a deadline would turn load into flaky failures)."""

import os

from hypothesis import settings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

settings.register_profile("psfed", deadline=None)
settings.load_profile("psfed")
