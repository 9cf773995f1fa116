"""The Flower engine (PSFedAvg + PSFedClient through an in-process Grid) and the pure core
functions (selectors, merge, psofed_server_step) give the same global model for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch import nn

from psfed_robust.core.aggregation import psofed_server_step, reporters_mean, server_weights
from psfed_robust.core.selectors import (
    ClientSpecificMaskSelector,
    MaskSelector,
    RandomMaskSelector,
    RoundRobinMaskSelector,
)
from psfed_robust.flower import (
    AggregationSettings,
    MaskSettings,
    ProtocolSettings,
    PSFedAvg,
    PSFedClient,
    arrays_from_model,
    make_client_app,
)
from psfed_robust.flower.testing import LocalGrid

D, K, N, STEPS, MU = 24, 5, 16, 3, 0.05


def data(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_true = torch.linspace(-1, 1, D, dtype=torch.float64)
    y = x @ w_true + 0.1 * torch.randn(N, generator=g, dtype=torch.float64)
    return x, y


def lms(w: torch.Tensor, k: int) -> torch.Tensor:
    """A few deterministic LMS/SGD steps on client k's fixed data."""
    x, y = data(k)
    w = w.clone()
    for _ in range(STEPS):
        w = w + MU * x.T @ (y - x @ w) / N
    return w


def make_model() -> nn.Module:
    torch.manual_seed(7)
    return nn.Linear(D, 1, bias=False).double()


class LMSClient(PSFedClient):
    def train_local(self, config: dict) -> int:
        k = int(self.client_id)  # type: ignore[arg-type]
        w = self.model.weight.data.view(-1)
        w.copy_(lms(w, k))
        return N


def core_run(selector: MaskSelector, rounds: int, mode: str) -> torch.Tensor:
    w0 = make_model().weight.data.view(-1).clone()
    g = w0.clone()
    local = [w0.clone() for _ in range(K)]
    for r in range(1, rounds + 1):
        masks = []
        for k in range(K):
            kw = {"client_id": k} if "client_id" in selector.required_context else {}
            m = torch.from_numpy(selector.select(D, r, **kw).data.copy())
            local[k] = torch.where(m, g, local[k])  # merge global on the downlink mask
            local[k] = lms(local[k], k)  # local update
            masks.append(m)
        u, mk = torch.stack(local), torch.stack(masks)
        w = server_weights(torch.ones(K, dtype=torch.bool), "participants", dtype=torch.float64)
        step = psofed_server_step if mode == "fill" else reporters_mean
        g = step(u, mk, g, weights=w)
    return g


def flower_run(selector: MaskSelector, rounds: int, mode: str) -> tuple[np.ndarray, PSFedAvg]:
    app = make_client_app(lambda ctx: LMSClient(make_model()))
    grid = LocalGrid(app, K)
    strategy = PSFedAvg(
        min_train_nodes=K, min_available_nodes=K, masks=MaskSettings(selector=selector),
        aggregation=AggregationSettings(mode=mode),  # type: ignore[arg-type]
        protocol=ProtocolSettings(evaluation="none"),
    )
    strategy.start(grid, arrays_from_model(make_model()), num_rounds=rounds,
                   train_config=ConfigRecord({"lr": MU}))
    return strategy.global_flat, strategy


@pytest.mark.parametrize(
    ("selector", "mode"),
    [
        (RandomMaskSelector(0.25, seed=11), "fill"),
        (ClientSpecificMaskSelector(0.3, seed=5, overlap_fraction=0.5), "fill"),
        (ClientSpecificMaskSelector(0.3, seed=5, overlap_fraction=0.0), "reporters"),
        (RoundRobinMaskSelector(count=5, coordinated=False), "fill"),
    ],
)
def test_flower_equals_core(selector: MaskSelector, mode: str) -> None:
    rounds = 6
    expected = core_run(selector, rounds, mode).numpy()
    got, strategy = flower_run(selector, rounds, mode)
    assert got.dtype == np.float64  # the model's dtype is preserved end to end
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # the global model moved away from w0 and every round accepted every client
    assert all(h["accepted-replies"] == K and h["rejected-replies"] == 0 for h in strategy.history)
    # client ids were learned from node_config, never the random node ids
    assert sorted(strategy.node_client_ids.values()) == list(range(K))
