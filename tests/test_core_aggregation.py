"""PSO-Fed server step and reporters mean: cases computed by hand, weights, participants, shapes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from psfed_robust.core.aggregation import (
    effective_masks,
    fill_unshared,
    psofed_server_step,
    reporters_mean,
    server_weights,
)

T, F = True, False
G = torch.tensor([1.0, 1.0, 1.0, 1.0])
U = torch.tensor([[3.0, 5.0, 9.0, 9.0], [5.0, 9.0, 9.0, 7.0]])
M = torch.tensor([[T, T, F, F], [T, F, F, T]])


def test_fill_unshared_known_by_hand() -> None:
    out = fill_unshared(U, M, G)
    assert out.tolist() == [[3.0, 5.0, 1.0, 1.0], [5.0, 1.0, 1.0, 7.0]]
    assert torch.equal(fill_unshared(U, None, G), U)


def test_psofed_step_fill_semantics_uniform() -> None:
    # weights 1/|K_n| = 1/2: coordinate 0: 1 + (2 + 4)/2 = 4; coord 1: 1 + 4/2 = 3 (the
    # unshared entry counts as the server's value: a half step); coord 2: nobody -> 1;
    # coord 3: 1 + 6/2 = 4.
    assert psofed_server_step(U, M, G).tolist() == [4.0, 3.0, 1.0, 4.0]
    # equals the mean of the filled vectors
    assert torch.allclose(psofed_server_step(U, M, G), fill_unshared(U, M, G).mean(dim=0))


def test_psofed_step_server_weight_schemes() -> None:
    part = torch.tensor([T, T, F])
    u = torch.cat([U, torch.full((1, 4), 100.0)])
    m = torch.cat([M, torch.ones(1, 4, dtype=torch.bool)])
    w_all = server_weights(part, "all")  # 1/K = 1/3, non-participant 0
    assert torch.allclose(w_all, torch.tensor([1 / 3, 1 / 3, 0.0]))
    out = psofed_server_step(u, m, G, weights=w_all, participants=part)
    assert torch.allclose(out, torch.tensor([1 + 6 / 3, 1 + 4 / 3, 1.0, 1 + 6 / 3]))
    w_exp = server_weights(part, "expected", p_c=0.5)  # 1/(p_c K) = 2/3
    assert torch.allclose(w_exp, torch.tensor([2 / 3, 2 / 3, 0.0]))
    out = psofed_server_step(u, m, G, weights=w_exp, participants=part)
    assert torch.allclose(out, torch.tensor([1 + 4.0, 1 + 8 / 3, 1.0, 1 + 4.0]))
    w_part = server_weights(part, "participants")
    assert torch.allclose(w_part, torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(
        psofed_server_step(u, m, G, participants=part), torch.tensor([4.0, 3.0, 1.0, 4.0])
    )
    assert server_weights(torch.tensor([F, F]), "participants").tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="p_c"):
        server_weights(part, "expected")
    with pytest.raises(ValueError, match="allowed"):
        server_weights(part, "bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        server_weights(part, "all", num_clients=0)


def test_non_participant_row_is_ignored_entirely() -> None:
    part = torch.tensor([T, F])
    u = U.clone()
    u[1] = float("nan")  # never read
    out = psofed_server_step(u, M, G, participants=part)
    assert out.tolist() == [1 + 2.0, 1 + 4.0, 1.0, 1.0]
    out = reporters_mean(u, M, G, participants=part)
    assert out.tolist() == [3.0, 5.0, 1.0, 1.0]
    assert effective_masks(U, M, part).tolist() == [[T, T, F, F], [F, F, F, F]]


def test_unshared_values_never_leak() -> None:
    u = U.clone()
    u[~M] = float("nan")
    assert torch.isfinite(psofed_server_step(u, M, G)).all()
    assert torch.isfinite(reporters_mean(u, M, G)).all()


def test_reporters_mean_known_by_hand() -> None:
    # coordinate 0: (3 + 5)/2 = 4; 1: only client 0 -> 5; 2: nobody -> keep 1; 3: only client 1 -> 7
    assert reporters_mean(U, M, G).tolist() == [4.0, 5.0, 1.0, 7.0]
    # example-count weights 1:3 -> coordinate 0: (3*1 + 5*3)/4 = 4.5
    w = torch.tensor([1.0, 3.0])
    assert reporters_mean(U, M, G, weights=w).tolist() == [4.5, 5.0, 1.0, 7.0]
    assert reporters_mean(U, None, G).tolist() == [4.0, 7.0, 9.0, 8.0]
    zero_w = torch.tensor([0.0, 1.0])  # a zero-weight reporter does not count as a reporter
    assert reporters_mean(U, M, G, weights=zero_w).tolist() == [5.0, 1.0, 1.0, 7.0]


def test_batched_leading_dims() -> None:
    u = torch.stack([U, U + 1])
    m = torch.stack([M, ~M])
    g = torch.stack([G, G])
    out = psofed_server_step(u, m, g)
    assert out[0].tolist() == [4.0, 3.0, 1.0, 4.0]
    assert torch.allclose(out[1], fill_unshared(U + 1, ~M, G).mean(dim=0))
    assert reporters_mean(u, m, g)[0].tolist() == [4.0, 5.0, 1.0, 7.0]


def test_shape_and_weight_errors() -> None:
    with pytest.raises(ValueError, match=r"\[..., K, D\]"):
        psofed_server_step(G, None, G)
    with pytest.raises(ValueError, match="global_model"):
        psofed_server_step(U, M, torch.zeros(3))
    with pytest.raises(ValueError, match="masks shape"):
        psofed_server_step(U, M[:, :3], G)
    with pytest.raises(TypeError, match="bool"):
        reporters_mean(U, M.float(), G)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="participants"):
        psofed_server_step(U, M, G, participants=torch.tensor([T, T, T]))
    with pytest.raises(ValueError, match="weights shape"):
        psofed_server_step(U, M, G, weights=torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        reporters_mean(U, M, G, weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="finite"):
        reporters_mean(U, M, G, weights=torch.tensor([1.0, float("nan")]))


@given(st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_step_properties(k: int, d: int, seed: int, p: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(k, d, generator=gen, dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    m = torch.rand(k, d, generator=gen) < p
    step = psofed_server_step(u, m, g)
    # fill-mode mean equals the mean of the filled vectors
    assert torch.allclose(step, fill_unshared(u, m, g).mean(dim=0))
    rep = reporters_mean(u, m, g)
    nobody = ~m.any(dim=0)
    assert torch.equal(rep[nobody], g[nobody])
    lo = torch.where(m, u, torch.full_like(u, float("inf"))).min(dim=0).values
    hi = torch.where(m, u, torch.full_like(u, -float("inf"))).max(dim=0).values
    some = ~nobody
    assert bool((rep[some] >= lo[some] - 1e-12).all() and (rep[some] <= hi[some] + 1e-12).all())
    # dense masks: both rules reduce to the plain mean
    full = torch.ones_like(m)
    assert torch.allclose(psofed_server_step(u, full, g), u.mean(dim=0))
    assert torch.allclose(reporters_mean(u, full, g), u.mean(dim=0))
