"""Explicit attack state in the batched engine: threads and run blocks cannot change results.

A plugin attack that counts its calls keeps the count in ``ctx.state`` (one dict per run block,
created by the engine at the start of the block and passed every round) and lets the count change
its output. With the state on the attack object instead, two worker threads would interleave the
counts of different blocks and the results would depend on scheduling (issue 13's measurement:
0.086361 three times with one worker, 0.0878 / 0.0865 / 0.0868 with two).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

import attacks
from psfed_robust.engine import OnlineConfig, run_online

NAME = "test_engine_state_counting"
CALLS: list[int] = []  # every count seen, to check the per-block bookkeeping


@attacks.register_attack(NAME)
def counting(deltas: Tensor, ctx: attacks.AttackContext, *, step: float = 0.002) -> Tensor:
    """Adds ``step · (number of this block's calls so far)`` to the attacker's delta."""
    calls = int(ctx.state.get("calls", 0)) + 1
    ctx.state["calls"] = calls
    CALLS.append(calls)
    rows = ctx.malicious if ctx.participants is None else ctx.malicious & ctx.participants
    return torch.where(rows.unsqueeze(-1), deltas + step * calls, deltas)


CFG = OnlineConfig(num_clients=10, dim=24, iterations=40, runs=6, run_block=2, participants=4,
                   share_count=6, record_every=4, seed=5, attack=NAME, num_malicious=3)


def test_counting_attack_same_with_one_and_two_workers_and_blocks() -> None:
    one = run_online(CFG, block_workers=1)
    two = run_online(CFG, block_workers=2)
    assert one.metadata["block_workers"] == 1 and two.metadata["block_workers"] == 2
    assert np.array_equal(one.global_mse, two.global_mse)
    assert np.array_equal(one.final_global_model, two.final_global_model)
    # each block counts its own calls: block 0 alone gives the first two runs bit for bit
    alone = run_online(CFG.replace(runs=2))
    assert np.array_equal(alone.global_mse, one.global_mse[:2])


def test_state_is_one_dict_per_block_and_the_count_matters() -> None:
    CALLS.clear()
    run_online(CFG, block_workers=2)
    # 3 blocks x 40 rounds: every block counts 1..40 (an object-held count would reach 120)
    assert sorted(CALLS) == sorted(list(range(1, 41)) * 3)
    with_count = run_online(CFG, block_workers=1)
    clean = run_online(CFG.replace(attack="none", num_malicious=0))
    assert not np.array_equal(with_count.global_mse, clean.global_mse)


@pytest.mark.parametrize("persistent", [False, True])
def test_persistence_is_the_engines_setting(persistent: bool) -> None:
    cfg = CFG.replace(attack_persistent=persistent)
    res = run_online(cfg, block_workers=2)
    assert res.metadata["choices"]["attack_persistent"] is persistent
    assert np.array_equal(res.global_mse, run_online(cfg, block_workers=1).global_mse)


def test_legacy_persistent_attack_param_maps_to_the_field() -> None:
    cfg = CFG.replace(attack="gaussian", attack_params={"sigma": 0.1, "persistent": True})
    assert cfg.attack_persistent is True and "persistent" not in cfg.attack_params
    assert cfg.replace(seed=6).attack_persistent is True
    with pytest.raises(ValueError, match="attack_params\\['persistent'\\] must be a bool"):
        CFG.replace(attack_params={"persistent": "yes"})
    with pytest.raises(ValueError, match="attack_persistent must be consistent"):
        CFG.replace(attack_persistent=True, attack_params={"persistent": False})


def test_randomised_defense_draws_from_the_blocks_generator() -> None:
    # bucketing shuffles with the engine's per-block "defense" generator: the same numbers with
    # any number of workers, and a different seed gives a different shuffle
    cfg = CFG.replace(attack="sign_flip", attack_params={"scale": 4.0}, defense="bucketing",
                      defense_params={"s": 2})
    one = run_online(cfg, block_workers=1)
    assert np.array_equal(one.global_mse, run_online(cfg, block_workers=2).global_mse)
    assert np.isfinite(one.global_mse).all()
