"""PSO-Fed's indexed step when every client sends the same coordinates (an index expanded over
the clients, the batched engine's coordinated masks): the shared-column route must give the
same bits as the general route on a materialised copy of the index."""

from __future__ import annotations

import pytest
import torch

from psfed_robust.core.aggregation import psofed_server_step_indexed


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (so -0.0 and 0.0 differ, and NaN payloads are compared)."""
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def test_shared_columns_known_by_hand() -> None:
    # D = 4, clients 0 and 1 send coordinates [0, 2]; weights 1/2 each: the shared
    # coordinates move to the clients' mean, the others keep the global value
    g = torch.tensor([1.0, 5.0, 3.0, -2.0])
    idx = torch.tensor([0, 2]).expand(2, 2)
    values = torch.tensor([[3.0, 1.0], [5.0, 7.0]])
    out = psofed_server_step_indexed(values, idx, g, weights=torch.tensor([0.5, 0.5]))
    assert torch.equal(out, torch.tensor([4.0, 5.0, 4.0, -2.0]))
    # client 1 absent: only client 0's term, with its weight 1/2 (PSO-Fed's partial move)
    out = psofed_server_step_indexed(values, idx, g, weights=torch.tensor([0.5, 0.5]),
                                     participants=torch.tensor([True, False]))
    assert torch.equal(out, torch.tensor([2.0, 5.0, 2.0, -2.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead", [(), (3,), (2, 2)])
def test_expanded_index_same_bits_as_materialised(dtype: torch.dtype,
                                                  lead: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(11)
    for trial in range(40):
        K, D = 1 + trial % 23, 50 + 7 * trial
        M = 1 + (trial * 13) % D
        cols = torch.stack([torch.randperm(D, generator=gen)[:M]
                            for _ in range(max(1, int(torch.tensor(lead).prod())))])
        cols = cols.reshape(*lead, M)
        expanded = cols.unsqueeze(-2).expand(*lead, K, M)
        dense = expanded.clone()
        assert (expanded.stride(-2) == 0) == (K > 1) and dense.stride(-2) != 0
        scale = torch.logspace(-6, 6, M, dtype=dtype)[torch.randperm(M, generator=gen)]
        g = torch.randn((*lead, D), generator=gen, dtype=dtype)
        g[..., 0] = -0.0  # signed zeros must survive as they do on the general route
        values = g.gather(-1, cols).unsqueeze(-2) + scale * torch.randn(
            (*lead, K, M), generator=gen, dtype=dtype)
        values[..., 0, :1] = -0.0
        weights = torch.rand((*lead, K), generator=gen, dtype=dtype)
        part = torch.rand((*lead, K), generator=gen) > 0.3 if trial % 2 else None
        if part is not None:
            values = values.masked_fill(~part.unsqueeze(-1), float("nan"))  # never read
        want = psofed_server_step_indexed(values, dense, g, weights=weights, participants=part)
        got = psofed_server_step_indexed(values, expanded, g, weights=weights,
                                         participants=part)
        assert torch.equal(_bits(got), _bits(want)), (trial, K, M)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -0.5])
def test_weights_must_be_finite_and_non_negative(bad: float) -> None:
    g = torch.zeros(3)
    idx = torch.tensor([0, 1]).expand(2, 2)
    w = torch.tensor([0.5, bad])
    with pytest.raises(ValueError, match="finite and non-negative"):
        psofed_server_step_indexed(torch.ones(2, 2), idx, g, weights=w)


def test_integer_and_zero_weights_accepted() -> None:
    g = torch.zeros(3)
    idx = torch.tensor([0, 1]).expand(2, 2)
    out = psofed_server_step_indexed(torch.ones(2, 2), idx, g, weights=torch.tensor([1, 0]))
    assert torch.equal(out, torch.tensor([1.0, 1.0, 0.0]))
