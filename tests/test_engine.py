"""Batched online engine: config validation, masks, options, seams (P1 arXiv 2110.06556)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psfed_robust.engine import OnlineConfig, run_online
from psfed_robust.engine.masks import MaskPool, floyd_masks, rotation_table
from psfed_robust.engine.schedule import LinkMasks, block_generator, dense_masks, schedule

SMALL = OnlineConfig(num_clients=12, dim=30, iterations=60, runs=4, participants=5,
                     share_count=6, record_every=5, seed=1)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("task", "cnn", "OnlineConfig.task must be one of 'rff', 'linear'"),
        ("selection", "topk", "OnlineConfig.selection must be one of 'random', 'round_robin'"),
        ("uplink", "prev", "'next', 'same', 'independent'"),
        ("server_weight", "sum", "'participants', 'expected', 'all'"),
        ("share_count", 31, "OnlineConfig.share_count must be an integer in [1, dim=30]"),
        ("participants", 0, "OnlineConfig.participants"),
        ("stepsize", -1.0, "OnlineConfig.stepsize must be a finite number > 0"),
        ("aggregation_mode", "median", "'fill', 'reporters'"),
        ("record_every", 61, "OnlineConfig.record_every"),
        ("dtype", "float16", "'float32', 'float64'"),
    ],
)
def test_config_errors_name_field_and_allowed(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        SMALL.replace(**{field: value})
    assert needle in str(info.value)


def test_bernoulli_needs_p_c_and_rff_needs_four_inputs() -> None:
    with pytest.raises(ValueError, match="p_c"):
        SMALL.replace(scheduling="bernoulli")
    with pytest.raises(ValueError, match="input_dim"):
        SMALL.replace(input_dim=3)
    with pytest.raises(ValueError, match="test_mse"):
        SMALL.replace(test_mse="expected")


def test_unknown_attack_and_defense_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attack"):
        run_online(SMALL.replace(attack="nope"))
    with pytest.raises(ValueError, match="unknown defense"):
        run_online(SMALL.replace(defense="nope"))


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("count", [0, 1, 7, 15, 16, 29, 30])
def test_floyd_masks_exact_count(count: int) -> None:
    m = floyd_masks(500, 30, count, torch.Generator().manual_seed(count))
    assert m.dtype == torch.bool and m.shape == (500, 30)
    assert bool((m.sum(1) == count).all())


def test_floyd_masks_torch_backend_exact_and_uniform() -> None:
    """The device (torch) path, used on CUDA, exercised on CPU."""
    m = floyd_masks(20000, 12, 5, torch.Generator().manual_seed(2), backend="torch")
    assert bool((m.sum(1) == 5).all())
    assert torch.allclose(m.double().mean(0), torch.full((12,), 5 / 12, dtype=torch.float64),
                          atol=0.015)
    assert bool((floyd_masks(7, 12, 9, torch.Generator(), backend="torch").sum(1) == 9).all())


def test_floyd_masks_uniform_marginals_and_pairs() -> None:
    D, M, n = 10, 3, 40000
    m = floyd_masks(n, D, M, torch.Generator().manual_seed(0)).double()
    freq = m.mean(0)
    assert torch.allclose(freq, torch.full((D,), M / D, dtype=torch.float64), atol=0.01)
    pair = (m.T @ m / n).numpy()
    off = pair[~np.eye(D, dtype=bool)]
    assert np.allclose(off, M * (M - 1) / (D * (D - 1)), atol=0.01)
    # every one of the C(10,3)=120 subsets appears with frequency ~1/120
    codes = (m.long() * (2 ** torch.arange(D))).sum(1)
    counts = torch.bincount(codes, minlength=2 ** D)[codes.unique()]
    assert counts.numel() == math.comb(D, M)
    assert float(counts.float().std() / counts.float().mean()) < 0.1


def test_mask_pool_is_an_ordered_stream() -> None:
    a = MaskPool(20, 5, torch.Generator().manual_seed(3), chunk=7)
    b = MaskPool(20, 5, torch.Generator().manual_seed(3), chunk=7)
    got_a = torch.cat([a.take(n) for n in (3, 5, 9, 1)])
    got_b = torch.cat([b.take(n) for n in (3, 5, 9, 1)])
    assert torch.equal(got_a, got_b)
    assert bool((got_a.sum(1) == 5).all())
    assert len({tuple(r.tolist()) for r in got_a}) > 10  # rows differ


def test_rotation_table_round_robin() -> None:
    D, M = 10, 3
    table = rotation_table(D, M)
    for o in range(D):
        for n in range(4):
            row = table[(-o - n * M) % D]
            expect = torch.zeros(D, dtype=torch.bool)
            expect[[(o + n * M + j) % D for j in range(M)]] = True
            assert torch.equal(row, expect)


def _mask_source(**kw: object) -> LinkMasks:
    cfg = SMALL.replace(**kw)
    return LinkMasks(cfg, 3, torch.Generator().manual_seed(0), torch.device("cpu"),
                  torch.Generator().manual_seed(1))


def test_uplink_next_is_the_next_downlink_of_returning_participants() -> None:
    src = _mask_source(uplink="next")
    idx0 = torch.tensor([[0, 1, 2, 3, 4]] * 3)
    S0 = src.downlink(0, idx0)
    T0 = src.uplink(0, idx0, S0, None)
    assert S0 is not None and T0 is not None
    idx1 = torch.tensor([[2, 3, 4, 5, 6]] * 3)  # clients 2,3,4 return
    S1 = src.downlink(1, idx1)
    assert S1 is not None
    assert torch.equal(S1[:, :3], T0[:, 2:5])
    dense = dense_masks(S1, SMALL.dim)
    assert bool((dense.sum(-1) == 6).all())  # index lists of 6 distinct entries


def test_uplink_same_and_round_robin_shift() -> None:
    src = _mask_source(uplink="same")
    idx = torch.tensor([[0, 1, 2, 3, 4]] * 3)
    S = src.downlink(0, idx)
    assert src.uplink(0, idx, S, None) is S
    rr = _mask_source(selection="round_robin", uplink="next")
    S0 = rr.downlink(0, idx)
    T0 = rr.uplink(0, idx, S0, None)
    S1 = rr.downlink(1, idx)
    assert S0 is not None and T0 is not None and S1 is not None
    assert torch.equal(T0, S1)
    D, M = SMALL.dim, SMALL.share_count
    assert torch.equal(torch.roll(dense_masks(S0, D), M, dims=-1), dense_masks(T0, D))


def test_coordinated_masks_identical_across_clients() -> None:
    src = _mask_source(coordinated=True, uplink="independent")
    idx = torch.tensor([[0, 1, 2, 3, 4]] * 3)
    S = src.downlink(0, idx)
    assert S is not None
    assert bool((S == S[:, :1]).all())


def test_schedule_fixed_and_bernoulli() -> None:
    keys = torch.rand((6, 12), generator=torch.Generator().manual_seed(0))
    idx, valid = schedule(keys, SMALL)
    assert valid is None and idx.shape == (6, 5)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())
    cfg = SMALL.replace(scheduling="bernoulli", p_c=0.3)
    idx, valid = schedule(keys, cfg)
    assert valid is not None
    assert torch.equal(valid.sum(1), (keys < 0.3).sum(1))
    for r in range(6):
        chosen = idx[r][valid[r]]
        assert torch.equal(chosen, torch.nonzero(keys[r] < 0.3).flatten())


# ----------------------------------------------------------------------------- engine options
def test_result_shapes_and_metadata() -> None:
    res = run_online(SMALL)
    assert res.iterations.tolist() == list(range(5, 61, 5))
    assert res.global_mse.shape == (4, 12) and res.local_mse.shape == (4, 12)
    assert res.global_mse_db.shape == (12,)
    assert np.allclose(res.global_mse_db, 10 * np.log10(res.global_mse.mean(0)))
    assert res.final_global_model.shape == (4, 30)
    meta = res.metadata
    for key in ("scheduling", "selection", "coordinated", "uplink", "server_weight",
                "aggregation_mode", "attack_persistent", "local_mse", "test_mse"):
        assert key in meta["choices"]
    assert meta["p_e"] == pytest.approx(0.2)
    assert meta["communication_saving"] == pytest.approx(0.8)
    ss = res.steady_state(0.5)
    assert math.isfinite(ss.global_mse_db) and ss.first_iteration == 35


def test_learning_reduces_mse() -> None:
    res = run_online(SMALL.replace(iterations=200, record_every=10))
    assert res.global_mse_db[-1] < res.global_mse_db[0] - 2.0
    lin = run_online(SMALL.replace(task="linear", stepsize=0.02, iterations=200,
                                   record_every=10))
    assert lin.global_mse_db[-1] < lin.global_mse_db[0] - 5.0


def test_attack_with_zero_probability_changes_nothing() -> None:
    atk = SMALL.replace(attack="gaussian", num_malicious=4,
                        attack_params={"p_a": 0.0, "sigma": 5.0})
    # the attack seam re-forms the sent values as g + δ: equal to w_k up to rounding
    np.testing.assert_allclose(run_online(SMALL).global_mse, run_online(atk).global_mse,
                               rtol=1e-5)


def test_attack_hurts_and_persistent_hurts_more() -> None:
    cfg = SMALL.replace(task="linear", stepsize=0.02, iterations=300, record_every=10, runs=6)
    clean = run_online(cfg).steady_state(0.5).global_mse_db
    atk = {"p_a": 1.0, "sigma": 0.3}
    tx = run_online(cfg.replace(attack="gaussian", num_malicious=3,
                                attack_params=atk)).steady_state(0.5).global_mse_db
    pers = run_online(cfg.replace(attack="gaussian", num_malicious=3, attack_params=atk,
                                  attack_persistent=True))
    assert tx > clean + 1.0
    assert pers.steady_state(0.5).global_mse_db > tx
    assert pers.metadata["choices"]["attack_persistent"] is True


def test_bernoulli_all_equals_fixed_all() -> None:
    a = run_online(SMALL.replace(participants=12))
    b = run_online(SMALL.replace(scheduling="bernoulli", p_c=1.0))
    assert np.array_equal(a.global_mse, b.global_mse)


@pytest.mark.parametrize(
    "changes",
    [
        {"selection": "round_robin"},
        {"selection": "round_robin", "coordinated": True},
        {"coordinated": True},
        {"coordinated": True, "uplink": "next"},
        {"uplink": "same"},
        {"uplink": "independent"},
        {"scheduling": "bernoulli", "p_c": 0.3},
        {"scheduling": "bernoulli", "p_c": 0.3, "server_weight": "expected"},
        {"server_weight": "all"},
        {"aggregation_mode": "reporters"},
        {"local_mse": "test"},
        {"nonparticipant_updates": False},
        {"dtype": "float64"},
        {"task": "linear", "stepsize": 0.02, "test_mse": "expected"},
    ],
)
def test_every_option_runs(changes: dict[str, object]) -> None:
    res = run_online(SMALL.replace(**changes))
    assert np.isfinite(res.global_mse).all() and np.isfinite(res.local_mse).all()
    for key, value in changes.items():
        if key in res.metadata["choices"]:
            assert res.metadata["choices"][key] == value


def test_nonparticipant_updates_matter() -> None:
    cfg = SMALL.replace(participants=1, iterations=40, record_every=40, local_mse="test")
    on = run_online(cfg).local_mse
    off = run_online(cfg.replace(nonparticipant_updates=False)).local_mse
    assert float(off.mean()) > float(on.mean())  # frozen clients learn less


def test_linear_expected_mse_matches_sample_on_average() -> None:
    cfg = SMALL.replace(task="linear", stepsize=0.02, iterations=200, record_every=10, runs=8,
                        num_test=400)
    a = run_online(cfg).global_mse[:, -5:].mean()
    b = run_online(cfg.replace(test_mse="expected")).global_mse[:, -5:].mean()
    assert abs(10 * math.log10(a / b)) < 0.5


def test_common_random_numbers_across_share_count() -> None:
    """Data and schedules do not depend on M: the first record differs only through masks."""
    g1 = block_generator(0, "data", 0)
    g2 = block_generator(0, "data", 0)
    assert torch.equal(torch.rand(5, generator=g1), torch.rand(5, generator=g2))
    assert not torch.equal(torch.rand(5, generator=block_generator(0, "data", 1)),
                           torch.rand(5, generator=block_generator(0, "data", 0)))


def test_progress_bar_runs(capsys: pytest.CaptureFixture[str]) -> None:
    run_online(SMALL.replace(iterations=10, record_every=1), progress=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs_same_code() -> None:
    res = run_online(SMALL.replace(attack="gaussian", num_malicious=2), device="cuda")
    assert np.isfinite(res.global_mse).all()
    assert res.metadata["device"].startswith("cuda")


def test_mask_prefetch_gives_identical_results() -> None:
    threads = torch.get_num_threads()
    a = run_online(SMALL, mask_prefetch=True)
    assert torch.get_num_threads() == threads
    b = run_online(SMALL, mask_prefetch=False)
    assert a.metadata["mask_prefetch"] and not b.metadata["mask_prefetch"]
    assert np.array_equal(a.global_mse, b.global_mse)


def test_mask_pool_multi_chunk_take() -> None:
    a = MaskPool(12, 4, torch.Generator().manual_seed(9), chunk=5, prefetch=True)
    b = MaskPool(12, 4, torch.Generator().manual_seed(9), chunk=5)
    try:
        got = torch.cat([a.take(2), a.take(13), a.take(1)])
    finally:
        a.close()
    assert torch.equal(got, torch.cat([b.take(2), b.take(13), b.take(1)]))
    assert got.shape == (16, 12) and bool((got.sum(1) == 4).all())


@pytest.mark.parametrize("count", [0, 3, 10, 17, 20])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_floyd_indices_match_masks(count: int, backend: str) -> None:
    from psfed_robust.engine.masks import floyd_indices

    idx = floyd_indices(300, 20, count, torch.Generator().manual_seed(4), backend=backend)
    masks = floyd_masks(300, 20, count, torch.Generator().manual_seed(4), backend=backend)
    assert idx.shape == (300, count)
    assert torch.equal(dense_masks(idx, 20), masks)
