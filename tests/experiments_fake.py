"""What the experiment-layer tests share: a tiny scenario, a fake engine, a plugin attack file.

The fake engine gives deterministic curves from the seed, no torch work.

Each run's curve is ``base * (1 + 0.1 u)`` with ``u`` uniform from the point's seed and ``base``
a function of the point's setting, so a row carrying another setting's data is detected; a point
whose ``attack.params.sigma`` is 99 diverges to NaN (run 0) and one with sigma 77 blows up to 1e9.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments.results import PointResult


def fake_run_point(point: Any, seed: int, *, progress: bool = False) -> PointResult:
    del progress
    rng = np.random.default_rng(seed)
    runs, rounds, every = int(point.get("runs")), int(point.get("rounds")), int(
        point.get("output.record_every"))
    recorded = np.arange(every, rounds + 1, every)
    base = 0.01 * (1 + float(point.get("sharing.fraction"))) * (1 + int(point.get(
        "attack.malicious")))
    g = base * (1 + 0.1 * rng.random((runs, recorded.size)))
    loc = 2 * g
    sigma = (point.get("attack.params") or {}).get("sigma")
    if sigma == 99.0:
        g[0, recorded.size // 2:] = np.nan
    if sigma == 77.0:
        g[:] = 1e9
    return PointResult(rounds=recorded, metrics={"global_mse": g, "local_mse": loc},
                       info={"fake": True, "base": base})


def tiny_scenario(name: str, *, runs: int, rounds: int, seed: int, malicious: int,
                  **sections: Any) -> dict[str, Any]:
    """A linear-task scenario (dim 8, 8 clients, 4 per round, Gaussian attack of sigma 0.5, a
    record every 10 rounds, no plots) small enough for real runs; ``sections`` add or replace
    top-level keys."""
    return {
        "name": name, "runs": runs, "rounds": rounds, "seed": seed,
        "task": {"kind": "linear", "dim": 8},
        "federation": {"clients": 8, "participants": 4},
        "attack": {"name": "gaussian", "malicious": malicious, "params": {"sigma": 0.5}},
        "output": {"record_every": 10, "plots": False},
        **sections,
    }


_TINY_BODY = """
[task]
kind = "linear"
dim = 8
[federation]
clients = 8
participants = 4
[attack]
name = "gaussian"
malicious = 2
p_a = 0.5
params = { sigma = 0.5 }
[output]
record_every = 10
plots = false
"""


def tiny_toml(name: str, *, runs: int, rounds: int, seed: int, sweep: str) -> str:
    """:func:`tiny_scenario`'s setting (2 attackers firing with p_a 0.5) as TOML text, with a
    ``[sweep]`` table (``sweep``: its lines)."""
    head = f'name = "{name}"\nruns = {runs}\nrounds = {rounds}\nseed = {seed}'
    return head + _TINY_BODY + "[sweep]\n" + sweep


#: a plugin file registering attack ``{name}`` (``PLUGIN.format(name=...)``): ``factor`` times
#: the honest delta, as in README's extension example
PLUGIN = '''
import torch
from attacks import Attack, AttackContext, register_attack


@register_attack("{name}")
class Boost(Attack):
    """Send ``factor`` times the honest delta (a test plugin)."""

    def __init__(self, *, factor: float = 3.0) -> None:
        if factor <= 0:
            raise ValueError(f"attack '{name}': 'factor' must be > 0, got {{factor}}")
        self.factor = factor

    def craft(self, deltas: torch.Tensor, ctx: AttackContext) -> torch.Tensor:
        return self.factor * deltas
'''
