"""Flower Apps built on psfed_robust.flower, and an in-process runtime for tests and benchmarks.

- ``digits_server`` / ``digits_client``: the digits Flower App (``[tool.flwr.app.components]`` in
  the repository's pyproject.toml); see docs/flower_app.md.
- ``loopback``: :class:`~psfed_robust.flower.apps.loopback.LoopbackGrid`, an in-process Grid.
"""
