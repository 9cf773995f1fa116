"""Issue 14 item 8: the server enforces what a reply may claim (uplink budget, example counts,
metrics). Replies go through ``PSFedAvg.aggregate_train``, the path of every runtime
(simulation, deployment, the in-process grid): the checks run on the server, whatever sent them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from psfed_robust.core.mask import Mask
from psfed_robust.flower import (
    AggregationSettings,
    MaskSettings,
    ProtocolSettings,
    PSFedAvg,
)
from psfed_robust.flower.testing import StaticGrid, build_train_reply

D = 40


def _strategy(n: int, **kw: Any) -> PSFedAvg:
    kw.setdefault("masks", MaskSettings(fraction=0.5, seed=1))
    return PSFedAvg(min_train_nodes=n, min_available_nodes=n, fraction_evaluate=0.0, **kw)


def _configure(s: PSFedAvg, n: int) -> tuple[list[Message], np.ndarray]:
    g0 = np.zeros(D, np.float32)
    msgs = list(s.configure_train(1, ArrayRecord({"w": Array(g0)}), ConfigRecord(),
                                  StaticGrid(range(10, 10 + n), {10 + i: i for i in range(n)})))
    return msgs, g0


def test_client_uplink_over_budget_is_rejected_and_counted() -> None:
    """uplink="client", uplink_fraction=0.1 of D=40: 4 coordinates agreed; a reply sharing all
    40 moved every coordinate before the fix."""
    s = _strategy(2, protocol=ProtocolSettings(uplink="client", uplink_fraction=0.1))
    msgs, g0 = _configure(s, 2)
    honest = Mask.from_indices([0, 1, 2, 3], D)
    replies = [build_train_reply(msgs[0], honest, np.full(4, 1.0, np.float32), client_id=0),
               build_train_reply(msgs[1], Mask.all_true(D), np.full(D, 100.0, np.float32),
                                 client_id=1)]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None
    assert metrics["rejected.over-budget"] == 1 and metrics["accepted-replies"] == 1
    g = s.global_flat
    np.testing.assert_array_equal(g[4:], g0[4:])  # the cheater moved nothing
    np.testing.assert_allclose(g[:4], 1.0)
    # within budget (4 coordinates anywhere) is accepted
    s2 = _strategy(1, protocol=ProtocolSettings(uplink="client", uplink_fraction=0.1))
    msgs2, _ = _configure(s2, 1)
    _, m2 = s2.aggregate_train(1, [build_train_reply(msgs2[0], Mask.from_indices(
        [5, 9, 30, 39], D), np.ones(4, np.float32), client_id=0)])
    assert m2 is not None and m2["accepted-replies"] == 1 and m2["rejected-replies"] == 0


def test_client_uplink_budget_defaults_to_the_downlink_fraction() -> None:
    s = _strategy(1, masks=MaskSettings(fraction=0.25, seed=1),
                  protocol=ProtocolSettings(uplink="client"))
    msgs, _ = _configure(s, 1)
    over = Mask.from_indices(list(range(11)), D)  # 0.25 * 40 = 10 agreed
    _, m = s.aggregate_train(1, [build_train_reply(msgs[0], over, np.ones(11, np.float32),
                                                   client_id=0)])
    assert m is not None and m["rejected.over-budget"] == 1


def test_reply_on_another_mask_than_the_seeded_one_is_rejected() -> None:
    """uplink="downlink": same count, different coordinates -> mask-mismatch."""
    s = _strategy(2)
    msgs, g0 = _configure(s, 2)
    sent = s._sent[msgs[0].metadata.dst_node_id].mask
    other = Mask(~sent.data)  # same count (half of 40), the other coordinates
    assert other.count == sent.count
    replies = [build_train_reply(msgs[0], sent, np.ones(sent.count, np.float32), client_id=0),
               build_train_reply(msgs[1], other, np.full(other.count, 50.0, np.float32),
                                 client_id=1)]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None and metrics["rejected.mask-mismatch"] == 1
    np.testing.assert_array_equal(s.global_flat[other.data], g0[other.data])


def _weighted_round(**aggregation: Any) -> tuple[PSFedAvg, Any]:
    """One num-examples-weighted round: full replies 1, 5, 1000 claiming 10, 30, 2**62 examples."""
    s = _strategy(3, masks=MaskSettings(fraction=1.0),
                  aggregation=AggregationSettings(weighting="num-examples", **aggregation))
    msgs, _ = _configure(s, 3)
    full = Mask.all_true(D)
    replies = [build_train_reply(m, full, np.full(D, v, np.float32), client_id=i, num_examples=n)
               for i, (m, v, n) in enumerate(zip(msgs, (1.0, 5.0, 1000.0), (10, 30, 1 << 62),
                                                  strict=True))]
    _, metrics = s.aggregate_train(1, replies)
    assert metrics is not None
    return s, metrics


def test_implausible_num_examples_cannot_take_over_the_weighted_average() -> None:
    """One client claiming 2**62 examples set the global model under num-examples weighting."""
    s, metrics = _weighted_round()
    assert metrics["rejected.bad-num-examples"] == 1
    np.testing.assert_allclose(s.global_flat, 0.25 * 1.0 + 0.75 * 5.0, rtol=1e-6)
    # the bound is configurable: a deployment that expects huge counts raises it
    _, m2 = _weighted_round(max_num_examples=1 << 62)
    assert m2["accepted-replies"] == 3


def test_aggregated_metrics_stay_finite() -> None:
    """A finite 1e300 metric with many examples aggregated to inf (n * v overflowed)."""
    full = Mask.all_true(D)

    def run(max_metric: float) -> dict[str, float]:
        s = _strategy(2, masks=MaskSettings(fraction=1.0),
                      aggregation=AggregationSettings(max_metric=max_metric))
        msgs, _ = _configure(s, 2)
        replies = [build_train_reply(m, full, np.zeros(D, np.float32), client_id=i,
                                     num_examples=10**9,
                                     metrics={"huge": 1e300, "loss": float(i + 1)})
                   for i, m in enumerate(msgs)]
        _, metrics = s.aggregate_train(1, replies)
        assert metrics is not None and metrics["accepted-replies"] == 2
        return {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]

    m = run(1e30)  # default-sized bound: the value is dropped, never summed
    assert "huge" not in m and m["loss"] == 1.5
    m = run(1e300)  # allowed up to 1e300: the normalised mean stays finite
    assert np.isfinite(m["huge"]) and m["huge"] == 1e300


def test_settings_refuse_bad_bounds() -> None:
    import pytest

    with pytest.raises(ValueError, match="max_num_examples"):
        AggregationSettings(max_num_examples=0)
    with pytest.raises(ValueError, match="max_metric"):
        AggregationSettings(max_metric=float("inf"))
