"""The batched NN engine against the Flower engine (experiments.flower_engine) on one scenario.

Both engines derive the run seed, split, initial MLP, masks and batch order from the scenario
seed the same way, so with a deterministic attack (or none) the global models — and so the
test-accuracy curves — agree up to float rounding; an omniscient attack (ALIE) runs as the
Flower server adversary on masked dense deltas and here on the shared columns.
"""

from __future__ import annotations

import numpy as np
import pytest

from psfed_robust.nn import NNConfig, run_nn


@pytest.mark.parametrize(("attack", "params"), [("none", {}), ("sign_flip", {"scale": 4.0}),
                                                ("alie", {})])
def test_same_accuracy_curve_as_flower(attack: str, params: dict[str, float]) -> None:
    from experiments.flower_engine import run_flower_point
    from experiments.schema import load_scenario

    seed, clients, rounds, frac = 5, 4, 4, 0.5
    sc = load_scenario("digits_flower", [
        f"sweep.sharing.fraction=[{frac}]", f'sweep.attack.name=["{attack}"]',
        'sweep.defense.name=["mean"]', "runs=1", f"seed={seed}", f"rounds={rounds}",
        f"federation.clients={clients}", f"federation.participants={clients}",
        "attack.malicious=1", "attack.params={}" if not params else
        "attack.params={ scale = 4.0 }"])
    flower = run_flower_point(sc.points()[0], seed)
    cfg = NNConfig(task="digits", model="mlp", hidden=64, clients=clients, runs=1, rounds=rounds,
                   seed=seed, fraction=frac, lr=0.05, batch_size=32, attack=attack,
                   attack_params=params, malicious=1 if attack != "none" else 0, threads=1)
    ours = run_nn(cfg)
    np.testing.assert_allclose(ours.metrics["accuracy"], flower.metrics["accuracy"], atol=1e-9)
    np.testing.assert_allclose(ours.metrics["loss"], flower.metrics["loss"], rtol=1e-4)
