"""Flower Apps built on psfed_robust.flower.

- ``digits_server`` / ``digits_client``: the digits Flower App (``[tool.flwr.app.components]`` in
  the repository's pyproject.toml); see docs/flower_app.md. ``digits_config`` parses its run
  config, ``digits_threat`` turns its attack/defense keys into a validated threat model. The
  in-process runtime for tests and benchmarks is :class:`psfed_robust.flower.testing.LocalGrid`.
"""
