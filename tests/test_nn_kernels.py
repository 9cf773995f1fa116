"""The compiled MLP training kernel (psfed_robust.nn.kernels) against the torch fused path.

The reference is ``train_rows(..., compiled=False)``: FusedModel gradients and torch.optim.SGD's
update on parameter blocks. The kernel runs the same batches, loss gradient and update with a
different summation order and a polynomial exp, so rows agree within float32 rounding; NaN and
Inf land on the same rows; the split of rows over threads does not change a bit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from psfed_robust.nn import NNConfig, build_model, kernels, run_nn
from psfed_robust.nn.fused import FusedModel
from psfed_robust.nn.train import FunctionalModel, batch_plan, train_rows

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler for the kernel")


def _mlp(sizes: list[int], bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i + 2 < len(sizes):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _round(model: nn.Module, *, rows: int = 7, batch: int = 8, epochs: int = 2,
           momentum: float = 0.9, wd: float = 0.0, lr: float = 0.1, seed: int = 0,
           per_row_labels: bool = False, compiled: bool, threads: int = 1,
           w0: torch.Tensor | None = None, x: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of ``rows`` rows with uneven example counts (short last batches, rows whose
    epochs end early), returning (parameters, momentum)."""
    gen = torch.Generator().manual_seed(seed)
    fz = FusedModel(model)
    fm = FunctionalModel(model)
    P = fz.num_parameters
    in_dim = model[1].in_features  # type: ignore[index]
    classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    n = 60
    if x is None:
        x = torch.randn((n, in_dim), generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    counts = [int(c) for c in torch.randint(3, 20, (rows,), generator=gen)]
    table = torch.stack([torch.randperm(n, generator=gen)[:20] for _ in range(rows)])
    plan = batch_plan(counts, [11] * rows, list(range(rows)), 1, batch_size=batch,
                      local_epochs=epochs, local_steps=0, shuffle=True)
    w = (fz.flat.flatten().repeat(rows, 1) + 0.1 * torch.randn((rows, P), generator=gen)
         if w0 is None else w0.clone())
    buf = 0.1 * torch.randn((rows, P), generator=gen)  # persistent momentum
    labels = torch.randint(0, classes, (rows, n), generator=gen) if per_row_labels else y
    torch.set_num_threads(threads)
    try:
        train_rows(fm, w, buf, x, labels, table, plan, lr=lr, momentum=momentum,
                   weight_decay=wd, chunk=rows, fused=fz, compiled=compiled)
    finally:
        torch.set_num_threads(1)
    return w, buf


CASES: list[dict[str, Any]] = [
    {"sizes": [64, 64, 10]},  # the digits MLP
    {"sizes": [37, 23, 5], "batch": 20},  # no dimension a multiple of 16, batch not either
    {"sizes": [48, 40, 24, 3], "wd": 1e-3, "batch": 33},  # two hidden layers, weight decay
    {"sizes": [32, 16, 4], "bias": False, "momentum": 0.0},  # no biases, plain SGD
    {"sizes": [64, 64, 10], "per_row_labels": True, "epochs": 1, "batch": 5},
]


@pytest.mark.parametrize("case", CASES)
def test_kernel_round_matches_the_torch_fused_path(case: dict[str, Any]) -> None:
    case = dict(case)
    model = _mlp(case.pop("sizes"), bias=case.pop("bias", True))
    w_ref, b_ref = _round(model, compiled=False, **case)
    w_k, b_k = _round(model, compiled=True, **case)
    torch.testing.assert_close(w_k, w_ref, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(b_k, b_ref, rtol=2e-4, atol=2e-5)
    w0, _ = _round(model, compiled=False, lr=0.0, **{k: v for k, v in case.items()
                                                     if k != "lr"})
    assert float((w_k - w0).abs().max()) > 1e-3  # it trained


def test_thread_split_changes_no_bit() -> None:
    model = _mlp([64, 64, 10])
    a = _round(model, rows=9, compiled=True, threads=1)
    b = _round(model, rows=9, compiled=True, threads=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_nan_and_inf_land_on_the_same_rows_as_torch() -> None:
    model = _mlp([64, 32, 10])
    fz = FusedModel(model)
    gen = torch.Generator().manual_seed(4)
    w0 = fz.flat.flatten().repeat(6, 1) + 0.1 * torch.randn((6, fz.num_parameters),
                                                           generator=gen)
    w0[1, 5] = float("nan")
    w0[2, 100] = float("inf")  # a first-layer weight: +-Inf logits, NaN softmax
    w0[3, -1] = float("-inf")  # an output bias: that class's probability is 0, finite rows
    ref = _round(model, rows=6, compiled=False, w0=w0)
    got = _round(model, rows=6, compiled=True, w0=w0)
    for r, k in ((ref[0], got[0]), (ref[1], got[1])):
        assert torch.equal(torch.isnan(r), torch.isnan(k))
        assert torch.equal(torch.isinf(r), torch.isinf(k))
        fin = torch.isfinite(r)
        torch.testing.assert_close(k[fin], r[fin], rtol=2e-4, atol=2e-5)
    assert bool(torch.isnan(got[0][1]).any()) and bool(torch.isfinite(got[0][0]).all())


def test_softmax_gradient_by_hand() -> None:
    # one row, one example, a bias-only output (zero weights): logits = b, one step of plain SGD
    # with lr 1: the output bias moves by -(softmax(b) - onehot(y)), known in closed form
    model = _mlp([16, 3])
    fz = FusedModel(model)
    spec = kernels.mlp_spec(fz)
    assert spec is not None
    w = torch.zeros((1, fz.num_parameters))
    b = torch.tensor([0.5, -1.0, 2.0])
    w[0, -3:] = b
    mom = torch.zeros_like(w)
    x = torch.randn((4, 16))
    table = torch.tensor([[3, 2]])  # the row's examples; position 1 is example 2
    pos = torch.tensor([[[1]]])
    y = torch.tensor([0, 0, 1, 0])  # example 2 has label 1
    kernels.mlp_sgd(spec, w, mom, x, table, pos, torch.ones((1, 1, 1), dtype=torch.bool), y,
                    torch.ones((1, 1), dtype=torch.bool), lr=1.0, momentum=0.0,
                    weight_decay=0.0)
    p = np.exp(b.numpy() - b.numpy().max())
    p /= p.sum()
    want = b.numpy() - (p - np.eye(3)[1])
    np.testing.assert_allclose(w[0, -3:].numpy(), want, rtol=1e-6, atol=1e-7)
    # the weight gradient of a zero weight matrix: -(p - onehot) x^T
    np.testing.assert_allclose(w[0, :48].view(3, 16).numpy(),
                               -np.outer(p - np.eye(3)[1], x[2].numpy()), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused_with_the_reason() -> None:
    model = _mlp([16, 8, 3])
    fz = FusedModel(model)
    spec = kernels.mlp_spec(fz)
    assert spec is not None
    w = torch.zeros((2, fz.num_parameters))
    mom = torch.zeros_like(w)
    x = torch.randn((5, 16))
    table = torch.zeros((2, 3), dtype=torch.long)
    pos = torch.zeros((2, 1, 4), dtype=torch.long)
    val = torch.ones((2, 1, 4), dtype=torch.bool)
    y = torch.zeros(5, dtype=torch.long)
    act = torch.ones((2, 1), dtype=torch.bool)
    kw: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="label"):
        kernels.mlp_sgd(spec, w, mom, x, table, pos, val, y + 3, act, **kw)
    with pytest.raises(ValueError, match="label"):  # per-row labels by table position
        kernels.mlp_sgd(spec, w, mom, x, table, pos, val, torch.full((2, 3), 7), act, **kw)
    with pytest.raises(ValueError, match="example id"):
        kernels.mlp_sgd(spec, w, mom, x, table + 5, pos, val, y, act, **kw)
    with pytest.raises(ValueError, match="batch position"):
        kernels.mlp_sgd(spec, w, mom, x, table, pos + 3, val, y, act, **kw)
    assert float(w.abs().max()) == 0.0  # refused before any row trained
    with pytest.raises(ValueError, match="float32"):
        kernels.mlp_sgd(spec, w.double(), mom, x, table, pos, val, y, act, **kw)
    with pytest.raises(ValueError, match="x must be"):
        kernels.mlp_sgd(spec, w, mom, x[:, :8].contiguous(), table, pos, val, y, act, **kw)
    with pytest.raises(ValueError, match="parameters per row"):
        kernels.mlp_sgd(spec, w[:, 1:], mom, x, table, pos, val, y, act, **kw)
    with pytest.raises(ValueError, match="valid"):
        kernels.mlp_sgd(spec, w, mom, x, table, pos, val.float(), y, act, **kw)


def test_spec_covers_mlps_only() -> None:
    fz = FusedModel(build_model("mlp", (1, 8, 8), 10, hidden=16, seed=0))
    spec = kernels.mlp_spec(fz)
    assert spec is not None
    assert spec.layers.tolist() == [[64, 16, 0, 1024, 1], [16, 10, 1040, 1200, 0]]
    assert kernels.mlp_spec(FusedModel(build_model("cnn", (1, 8, 8), 10, seed=0))) is None
    two_relu = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 2))
    assert kernels.mlp_spec(FusedModel(two_relu)) is None
    relu_last = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU())
    assert kernels.mlp_spec(FusedModel(relu_last)) is None


@pytest.mark.parametrize("kw", [
    {}, {"attack": "label_flip", "malicious": 2}, {"participants": 6, "momentum_scope":
                                                   "persistent", "weight_decay": 1e-4}])
def test_engine_with_the_kernel_equals_the_torch_path(kw: dict[str, Any],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = NNConfig(task="digits", model="mlp", hidden=32, clients=10, runs=2, rounds=4,
                   seed=5, fraction=0.5, lr=0.05, batch_size=16, **kw)
    got = run_nn(cfg)
    assert got.info["train_path"] == "compiled"
    monkeypatch.setenv("PSFED_NO_CPP_KERNEL", "1")
    ref = run_nn(replace(cfg))
    assert ref.info["train_path"] == "fused"
    torch.testing.assert_close(got.final_global, ref.final_global, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.metrics["accuracy"], ref.metrics["accuracy"], atol=0.003)


@pytest.mark.parametrize(("counts", "batch", "epochs", "local_steps"), [
    ([144, 143, 7, 1, 0, 33], 32, 1, 0), ([20, 5, 64], 8, 3, 0), ([20, 5, 1, 0], 8, 1, 4),
    ([1000, 17], 64, 2, 0), ([300, 228, 229], 16, 1, 3)])
def test_batch_orders_draw_torch_randperm(counts: list[int], batch: int, epochs: int,
                                          local_steps: int) -> None:
    # the compiled draws equal the torch loop's (torch.randperm with a generator seeded per
    # row), including 63-bit seeds, empty and one-example clients and several epochs
    rows = len(counts)
    seeds = [2**62 + 12345, 7, 99, 2**40 + 3, 5, 11][:rows]
    clients = list(range(rows))
    kw: dict[str, Any] = {"batch_size": batch, "local_epochs": epochs,
                          "local_steps": local_steps, "shuffle": True}
    for rnd in (1, 2, 50):
        got = batch_plan(counts, seeds, clients, rnd, compiled=True, **kw)
        ref = batch_plan(counts, seeds, clients, rnd, compiled=False, **kw)
        assert torch.equal(got.positions, ref.positions)
        assert torch.equal(got.valid, ref.valid) and torch.equal(got.active, ref.active)
    g = torch.Generator().manual_seed(2**63 - 1)  # the generator's seed range, by hand
    lib = kernels.load()
    pos = torch.zeros((1, 1, 10), dtype=torch.long)
    seed, n = np.array([2**63 - 1], dtype=np.uint64), np.array([10])
    assert lib.psfed_batch_orders(1, 1, 10, n.ctypes.data, seed.ctypes.data, 1, 0,
                                  pos.data_ptr()) == 0
    assert pos[0, 0].tolist() == torch.randperm(10, generator=g).tolist()
    with pytest.raises(ValueError, match="sizes out of range"):  # 9 examples need 3 steps of 4
        kernels.batch_positions(torch.zeros((1, 1, 4), dtype=torch.long), [9], b"s\x1e", [1],
                                [0], 1, 1, 0)


@pytest.mark.parametrize("own_threads", [False, True])
def test_thread_split_changes_no_bit_on_either_thread_kind(own_threads: bool,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # parts run on torch's OpenMP team, or (no GNU OpenMP found) on the library's own threads
    if own_threads:
        monkeypatch.setattr(kernels, "_openmp_entry_points", lambda: (None, None))
    model = _mlp([64, 32, 10])
    one = _round(model, rows=11, compiled=True, threads=1)
    for threads in (2, 3):
        many = _round(model, rows=11, compiled=True, threads=threads)
        assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_evaluation_sums_equal_the_torch_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    from psfed_robust.nn.engine import evaluate

    gen = torch.Generator().manual_seed(8)
    model = _mlp([37, 20, 7])
    fz = FusedModel(model)
    g = fz.flat.flatten().repeat(4, 1) + 0.5 * torch.randn((4, fz.num_parameters), generator=gen)
    g[2, 3] = float("nan")  # a NaN model: NaN loss, as torch
    x = torch.randn((101, 37), generator=gen)  # not a multiple of the kernel's 32-example chunk
    y = torch.randint(0, 7, (101,), generator=gen)
    got = evaluate(fz, g, x, y, 7)
    monkeypatch.setenv("PSFED_NO_CPP_KERNEL", "1")
    ref = evaluate(fz, g, x, y, 7)
    loss, acc, flip = got
    assert flip is not None and ref[2] is not None
    assert torch.equal(torch.isnan(loss), torch.isnan(ref[0])) and bool(torch.isnan(loss[2]))
    fin = ~torch.isnan(ref[0])
    torch.testing.assert_close(loss[fin], ref[0][fin], rtol=1e-5, atol=1e-6)
    assert torch.equal(acc, ref[1]) and torch.equal(flip, ref[2])
    assert 0.0 < float(acc[0]) < 1.0 and float(flip.max()) > 0.0


def test_evaluation_sums_do_not_depend_on_threads() -> None:
    gen = torch.Generator().manual_seed(9)
    model = _mlp([64, 48, 10])
    fz = FusedModel(model)
    spec = kernels.mlp_spec(fz)
    assert spec is not None
    g = fz.flat.flatten().repeat(3, 1) + 0.3 * torch.randn((3, fz.num_parameters), generator=gen)
    x = torch.randn((333, 64), generator=gen)
    y = torch.randint(0, 10, (333,), generator=gen)
    aimed = torch.where(9 - y != y, 9 - y, torch.full_like(y, -1))
    one = kernels.mlp_eval(spec, g, x, y, aimed, threads=1)
    for t in (2, 3, 16):
        assert torch.equal(kernels.mlp_eval(spec, g, x, y, aimed, threads=t), one)
    with pytest.raises(ValueError, match="label"):
        kernels.mlp_eval(spec, g, x, y + 10, aimed)


def test_batch_seeds_equal_stable_seed_and_threads_change_no_draw() -> None:
    from psfed_robust.core.seeding import _encode_part, stable_seed

    name = "experiments.flower.batches"
    prefix = _encode_part(name) + b"\x1e"
    runs = [0, 1, 9, 10, 2**63 - 1, 123456789012345678, -5]
    clients = [0, 3, 99, 100, 7, 12345, 2]
    for rnd in (0, 1, 15, 10**9):
        got = kernels.batch_seeds(prefix, runs, clients, rnd)
        want = [stable_seed(name, r, k, rnd) for r, k in zip(runs, clients, strict=True)]
        assert got.tolist() == want
    long_name = "x" * 300  # a message over two SHA-256 blocks
    got = kernels.batch_seeds(_encode_part(long_name) + b"\x1e", [1], [2], 3)
    assert got.tolist() == [stable_seed(long_name, 1, 2, 3)]
    counts = [144, 143, 7, 1, 0, 33, 90, 12, 55]
    kw: dict[str, Any] = {"batch_size": 16, "local_epochs": 2, "local_steps": 0,
                          "shuffle": True}
    ref = batch_plan(counts, [5] * 9, list(range(9)), 4, compiled=False, **kw).positions
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        try:
            got_pos = batch_plan(counts, [5] * 9, list(range(9)), 4, **kw).positions
        finally:
            torch.set_num_threads(1)
        assert torch.equal(got_pos, ref)
