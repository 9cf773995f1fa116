"""The round core (psfed_robust.core.round): merge, deltas, attack seam, server step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import defenses
from psfed_robust.core.aggregation import psofed_server_step, reporters_mean
from psfed_robust.core.round import (
    attack_step,
    densify,
    gather,
    local_deltas,
    merge_,
    server_step,
)


def _index(gen: torch.Generator, lead: tuple[int, ...], D: int, M: int) -> torch.Tensor:
    keys = torch.rand((*lead, D), generator=gen)
    return keys.argsort(-1)[..., :M]


def test_merge_by_hand() -> None:
    local = torch.tensor([1.0, 2.0, 3.0, 4.0])
    merge_(local, torch.tensor([3, 0]), torch.tensor([40.0, 10.0]))
    assert local.tolist() == [10.0, 2.0, 3.0, 40.0]
    W = torch.zeros((2, 3, 4))
    g = torch.arange(8.0).view(2, 4)
    idx = torch.tensor([[[0], [1], [2]], [[3], [3], [0]]])
    merge_(W, idx, gather(g, idx))
    assert W[0, 1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert W[1, 0].tolist() == [0.0, 0.0, 0.0, 7.0]
    assert W[1, 2].tolist() == [4.0, 0.0, 0.0, 0.0]
    merge_(W[0, 0], None, g[0])
    assert W[0, 0].tolist() == g[0].tolist()


def test_local_deltas_and_gather_1d() -> None:
    assert local_deltas(torch.tensor([3.0, 5.0]), torch.tensor([1.0, 1.0])).tolist() == [2, 4]
    W = torch.ones((2, 3, 4))
    d = local_deltas(W, torch.zeros(2, 4) + 0.5)
    assert d.shape == (2, 3, 4) and float(d.max()) == 0.5
    assert gather(torch.tensor([5.0, 6.0, 7.0]), torch.tensor([2, 0])).tolist() == [7.0, 5.0]


def test_psofed_step_by_hand() -> None:
    # g = 0; client 0 sends 2 on coord 0, client 1 sends 4 on coords 0 and 1; ω = 1/2
    g = torch.zeros(3)
    vals = [torch.tensor([2.0]), torch.tensor([4.0, 4.0])]
    idx: list[torch.Tensor | None] = [torch.tensor([0]), torch.tensor([0, 1])]
    new = server_step(defenses.get_defense("mean"), vals, g, index=idx)
    assert new.tolist() == [3.0, 2.0, 0.0]
    rep = server_step(defenses.get_defense("mean"), vals, g, index=idx, mode="reporters")
    assert rep.tolist() == [3.0, 4.0, 0.0]


@pytest.mark.parametrize("mode", ["fill", "reporters"])
def test_indexed_mean_equals_dense(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    B, K, D, M = 3, 5, 16, 4
    g = torch.randn((B, D), generator=gen, dtype=torch.float64)
    idx = _index(gen, (B, K), D, M)
    vals = torch.randn((B, K, M), generator=gen, dtype=torch.float64)
    part = torch.rand((B, K), generator=gen) < 0.7
    w = torch.rand((B, K), generator=gen, dtype=torch.float64)
    mean = defenses.get_defense("mean")
    fast = server_step(mean, vals, g, index=idx, participants=part, weights=w, mode=mode)
    upd, masks = densify(vals, idx, g)
    ref_fn = psofed_server_step if mode == "fill" else reporters_mean
    ref = ref_fn(upd, masks, g, weights=w, participants=part)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)


def test_padding_slots_never_read() -> None:
    g = torch.zeros((1, 4))
    idx = torch.tensor([[[0, 1], [2, 3]]])
    vals = torch.tensor([[[1.0, 1.0], [float("inf"), float("nan")]]])
    part = torch.tensor([[True, False]])
    new = server_step(defenses.get_defense("mean"), vals, g, index=idx, participants=part)
    assert new.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_sequence_form_equals_stacked_and_flower_oracle() -> None:
    gen = torch.Generator().manual_seed(5)
    D, K = 50, 6
    g = torch.randn(D, generator=gen)
    shared = torch.randperm(D, generator=gen)[:20]
    vals = [torch.randn(20, generator=gen) for _ in range(K)]
    n = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0])
    w = n / n.sum()
    mean = defenses.get_defense("mean")
    seq = server_step(mean, vals, g, index=[shared] * K, weights=w)
    stacked = server_step(mean, torch.stack(vals), g, index=shared.expand(K, 20), weights=w)
    torch.testing.assert_close(seq, stacked, rtol=1e-6, atol=1e-6)
    # dense replies: FedAvg's example-weighted mean (Flower's numpy aggregate as the oracle)
    from flwr.server.strategy.aggregate import aggregate

    dense = [torch.randn(D, generator=gen) for _ in range(K)]
    ours = server_step(mean, dense, g, index=[None] * K, weights=w)
    theirs = aggregate([([d.numpy()], int(c)) for d, c in zip(dense, n.tolist(), strict=True)])
    np.testing.assert_allclose(ours.numpy(), theirs[0], rtol=1e-5, atol=1e-6)
    # unshared coordinates keep the global value
    rest = torch.ones(D, dtype=torch.bool)
    rest[shared] = False
    assert torch.equal(seq[rest], g[rest])


def test_robust_rule_sees_the_fill_view() -> None:
    gen = torch.Generator().manual_seed(7)
    K, D, M = 7, 12, 5
    g = torch.randn(D, generator=gen)
    idx = _index(gen, (K,), D, M)
    vals = torch.randn((K, M), generator=gen)
    med = defenses.get_defense("median")
    out = server_step(med, vals, g, index=idx)
    upd, masks = densify(vals, idx, g)
    torch.testing.assert_close(out, med(upd, masks, g))
    # K is odd: each coordinate is the middle value of its filled column
    for d in range(D):
        assert float(out[d]) == float(upd[:, d].sort().values[K // 2])


def test_server_step_rejects_two_mask_forms_and_bad_mode() -> None:
    g = torch.zeros(2)
    with pytest.raises(ValueError, match="masks or index"):
        server_step(defenses.get_defense("mean"), torch.zeros((1, 2)), g,
                    masks=torch.ones((1, 2), dtype=torch.bool), index=torch.zeros((1, 2)))
    with pytest.raises(ValueError, match="mode"):
        server_step(defenses.get_defense("mean"), torch.zeros((1, 2)), g, mode="avg")  # type: ignore[arg-type]


class _Double:
    name = "double"

    def __call__(self, deltas: torch.Tensor, ctx: object) -> torch.Tensor:
        out = deltas.clone()
        out[..., 0, :] *= 2
        return out


def test_attack_step_persistence_is_the_engines_setting() -> None:
    honest = torch.ones((2, 3, 4))
    sent, rows = attack_step(_Double(), honest, None, persistent=False)
    assert rows is None and float(sent[:, 0].sum()) == 16.0
    sent, rows = attack_step(_Double(), honest, None, persistent=True)
    assert rows is not None and rows.tolist() == [[True, False, False]] * 2


def test_attack_step_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        attack_step(lambda d, c: d[..., :1], torch.ones((2, 3)), None, persistent=False)
