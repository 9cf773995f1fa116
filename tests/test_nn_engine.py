"""Batched NN engine (psfed_robust.nn): shapes, determinism, the plain-loop oracle, merge
semantics, attacks and defenses through the round core, label flipping, config errors."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.seeding import stable_seed
from psfed_robust.nn import NNConfig, NNResult, build_model, run_nn
from psfed_robust.nn.data import synthetic
from psfed_robust.nn.engine import make_selector, poison_rows, run_seed
from psfed_robust.nn.reference import reference_loop

TASK = synthetic(0)
BASE = NNConfig(task="synthetic", model="mlp", hidden=16, clients=3, runs=2, rounds=3,
                batch_size=16, lr=0.05, seed=1, threads=1)


def _run(**kw: Any) -> NNResult:
    return run_nn(replace(BASE, **kw), task=TASK)


def test_shapes_and_recorded_rounds() -> None:
    res = _run(record_every=2, fraction=0.5)
    assert res.rounds.tolist() == [2, 3]
    for name in ("accuracy", "loss", "bytes_down", "bytes_up"):
        assert res.metrics[name].shape == (2, 2), name
    assert "asr" not in res.metrics
    P = FlattenedModel(build_model("mlp", (1, 8, 8), 4, hidden=16)).num_parameters
    assert res.final_global.shape == (2, P) and res.info["num_parameters"] == P
    assert np.all((res.metrics["accuracy"] >= 0) & (res.metrics["accuracy"] <= 1))


def test_deterministic_and_seeded() -> None:
    a, b = _run(fraction=0.5), _run(fraction=0.5)
    assert torch.equal(a.final_global, b.final_global)
    c = _run(fraction=0.5, seed=2)
    assert not torch.equal(a.final_global, c.final_global)
    # the row chunking of the vmap calls does not change the result beyond float rounding
    d = _run(fraction=0.5, max_chunk=1)
    torch.testing.assert_close(a.final_global, d.final_global, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [
    {"clients": 1, "shuffle": False},
    {"clients": 1, "fraction": 0.5, "weight_decay": 1e-3, "lr_schedule": "cosine"},
    {"clients": 3, "fraction": 0.25, "momentum_scope": "persistent"},
    {"clients": 3, "partition": "dirichlet", "dirichlet_alpha": 0.3, "local_epochs": 2,
     "selector": "round_robin", "fraction": 0.5},
])
def test_equals_plain_per_client_loop(kw: dict[str, Any]) -> None:
    cfg = replace(BASE, runs=1, batch_size=24, **kw)  # 320/24: a short last batch
    res = run_nn(cfg, task=TASK)
    ref, acc = reference_loop(cfg, task=TASK)
    torch.testing.assert_close(res.final_global, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.metrics["accuracy"], acc, atol=1e-9)


def test_unshared_global_entries_stay_put() -> None:
    cfg = replace(BASE, runs=1, rounds=1, fraction=0.25)
    res = run_nn(cfg, task=TASK)
    rs = run_seed(cfg.seed, 0)
    g0 = FlattenedModel(build_model("mlp", (1, 8, 8), 4, hidden=16,
                                    seed=stable_seed("experiments.flower.model", rs))).flatten()
    P = g0.numel()
    sel = make_selector("random", 0.25, stable_seed("experiments.flower.masks", rs) % (1 << 31))
    shared = torch.from_numpy(sel.select(P, 1).data.copy())
    assert torch.equal(res.final_global[0][~shared], g0[~shared])
    assert not torch.equal(res.final_global[0][shared], g0[shared])
    # bytes: the wire codec's payload of the seeded mask + float32 values; round 1 adds the
    # dense first-contact model
    assert res.metrics["bytes_up"][0, 0] < 4 * int(shared.sum()) + 64
    assert res.metrics["bytes_down"][0, 0] > 4 * P


def test_sign_flip_by_hand() -> None:
    # every client malicious, full sharing, mean: g1 - g0 = -scale * (clean g1 - g0)
    base = replace(BASE, runs=1, rounds=1)
    clean = run_nn(base, task=TASK).final_global
    rs = run_seed(base.seed, 0)
    g0 = FlattenedModel(build_model("mlp", (1, 8, 8), 4, hidden=16,
                                    seed=stable_seed("experiments.flower.model", rs))).flatten()
    atk = run_nn(replace(base, attack="sign_flip", attack_params={"scale": 3.0}, malicious=3),
                 task=TASK).final_global
    torch.testing.assert_close(atk - g0, -3.0 * (clean - g0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("attack", "params", "defense", "dparams", "mode"), [
    ("alie", {}, "median", {}, "fill"),
    ("ipm", {}, "krum", {}, "fill"),
    ("min_max", {}, "trimmed_mean", {}, "reporters"),
    ("gaussian", {}, "centered_clipping", {}, "fill"),
    ("sign_flip", {"scale": 4.0}, "mean", {}, "reporters"),
])
def test_attacks_and_defenses_reachable(attack: str, params: dict[str, Any], defense: str,
                                        dparams: dict[str, Any], mode: str) -> None:
    kw = {"clients": 6, "malicious": 1, "fraction": 0.5, "rounds": 2, "defense": defense,
          "defense_params": dparams, "mode": mode}
    clean = _run(**kw)
    res = _run(attack=attack, attack_params=params, **kw)
    assert np.isfinite(res.metrics["accuracy"]).all()
    assert not torch.equal(res.final_global, clean.final_global)


def test_per_client_masks_and_partial_participation() -> None:
    res = _run(selector="client_specific", fraction=0.5, clients=4, participants=2,
               attack="alie", malicious=1)
    assert np.isfinite(res.metrics["loss"]).all()
    res2 = _run(selector="topk", fraction=0.3)
    assert np.isfinite(res2.metrics["loss"]).all()


def test_persistence_only_matters_with_partial_sharing() -> None:
    kw = {"attack": "sign_flip", "attack_params": {"scale": 2.0}, "malicious": 1, "rounds": 3}
    full = [_run(fraction=1.0, persistent=p, **kw).final_global for p in (False, True)]
    assert torch.equal(full[0], full[1])  # the full downlink overwrites the attacker's model
    part = [_run(fraction=0.5, persistent=p, **kw).final_global for p in (False, True)]
    assert not torch.equal(part[0], part[1])


def test_label_flip_poisons_only_malicious_rows() -> None:
    atk = __import__("attacks").get_attack("label_flip")
    y = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2]])
    bad = torch.tensor([False, True, False])
    out = poison_rows(y, bad, atk, 4, None)
    assert out[0].tolist() == [0, 1, 2, 3] and out[2].tolist() == [1, 1, 2, 2]
    assert out[1].tolist() == [0, 1, 2, 3]  # 3 - y
    assert y[1].tolist() == [3, 2, 1, 0]  # input untouched


def test_label_flip_end_to_end() -> None:
    kw = {"rounds": 6, "clients": 3, "runs": 1}
    none = _run(attack="label_flip", malicious=0, **kw)
    assert "asr" not in none.metrics
    assert torch.equal(none.final_global, _run(**kw).final_global)
    allbad = _run(attack="label_flip", malicious=3, **kw)
    assert allbad.metrics["asr"].shape == (1, 6)
    assert allbad.metrics["asr"][0, -1] > 0.8 and allbad.metrics["accuracy"][0, -1] < 0.2
    one = _run(attack="label_flip", malicious=1, **kw)
    assert one.metrics["asr"][0, -1] < allbad.metrics["asr"][0, -1]


@pytest.mark.parametrize(("name", "shape"), [("cnn", (1, 8, 8)), ("cnn", (1, 28, 28)),
                                             ("cifar_cnn", (3, 32, 32)), ("mlp", (1, 28, 28))])
def test_models_by_name(name: str, shape: tuple[int, int, int]) -> None:
    a = build_model(name, shape, 10, seed=5)
    b = build_model(name, shape, 10, seed=5)
    assert a(torch.zeros((2, *shape))).shape == (2, 10)
    fa, fb = FlattenedModel(a).flatten(), FlattenedModel(b).flatten()
    assert torch.equal(fa, fb)
    assert not torch.equal(fa, FlattenedModel(build_model(name, shape, 10, seed=6)).flatten())


def test_cnn_runs_local_steps_and_step_schedule() -> None:
    res = _run(model="cnn", local_steps=2, lr_schedule="step", lr_step_rounds=2)
    assert np.isfinite(res.metrics["loss"]).all()


@pytest.mark.parametrize(("kw", "match"), [
    ({"model": "resnet"}, "model"),
    ({"attack": "nope"}, "attack"),
    ({"participants": 9}, "participants"),
    ({"fraction": 1.5}, "fraction"),
    ({"lr_schedule": "step"}, "lr_step_rounds"),
    ({"clients": 0}, "clients"),
])
def test_config_errors_name_the_field(kw: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        replace(BASE, **kw)


def test_bad_attack_parameter_is_named() -> None:
    with pytest.raises(ValueError, match="bogus"):
        replace(BASE, attack="alie", attack_params={"bogus": 1})


def test_cached_batch_seed_is_stable_seed() -> None:
    from psfed_robust.nn.train import _batch_seed, _encode_part

    for rs, k, n in ((0, 0, 1), (2**62 + 5, 99, 1234), (7, 3, 0)):
        tail = _encode_part(n) + b"\x1e"
        assert _batch_seed(rs, k, tail) == stable_seed("experiments.flower.batches", rs, k, n)


def test_batch_plan_by_hand() -> None:
    from psfed_robust.nn.train import batch_plan

    plan = batch_plan([5, 2], [0, 0], [0, 1], 1, batch_size=2, local_epochs=1, local_steps=0,
                      shuffle=False)
    assert plan.positions[0].tolist() == [[0, 1], [2, 3], [4, 0]]
    assert plan.valid[0].tolist() == [[True, True], [True, True], [True, False]]
    assert plan.active.tolist() == [[True, True, True], [True, False, False]]
    steps = batch_plan([5], [0], [0], 1, batch_size=2, local_epochs=1, local_steps=4,
                       shuffle=True)
    assert steps.active.shape == (1, 4) and bool(steps.active.all())
    for s in range(4):  # each step: 2 distinct examples of the client's 5
        assert len(set(steps.positions[0, s].tolist())) == 2
        assert max(steps.positions[0, s].tolist()) < 5
