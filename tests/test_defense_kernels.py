"""The coordinate-wise column kernels (defenses/_kernels.py): one NaN/Inf policy on every path.

Oracle: numpy's ``np.sort``, an independent sort with the same order (``-inf < finite < +inf <
NaN``), over each column's valid values only; the torch path is the reference the compiled
kernel must match (same sorted values, window means within the documented tolerance).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defenses import get_defense
from defenses._kernels import CPP_MIN_NUMEL, cpp_kernel_available, sort_columns, window_mean

needs_cpp = pytest.mark.skipif(
    not cpp_kernel_available(), reason="no C++ toolchain for the optional sorting kernel"
)
BACKENDS = ["torch", pytest.param("cpp", marks=needs_cpp)]
NAN, INF = float("nan"), float("inf")


def oracle_window(x: np.ndarray, valid: np.ndarray | None, lo: np.ndarray, hi: np.ndarray
                  ) -> np.ndarray:
    """Per column, mean of the ranks [lo, hi) of the valid values sorted by np.sort."""
    d = x.shape[1]
    out = np.empty(d, dtype=np.float64)
    for j in range(d):
        col = x[:, j] if valid is None else x[valid[:, j], j]
        srt = np.sort(col.astype(np.float64))
        with np.errstate(invalid="ignore"):
            out[j] = srt[lo[j] : hi[j]].mean()
    return out


def median_window(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(count - 1, 0) // 2, count // 2 + 1


def nonfinite_matrix(k: int, d: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, d, generator=g, dtype=dtype)
    pick = torch.rand(k, d, generator=g)
    x[pick < 0.08] = NAN
    x[(pick >= 0.08) & (pick < 0.12)] = INF
    x[(pick >= 0.12) & (pick < 0.16)] = -INF
    x[(pick >= 0.16) & (pick < 0.18)] = -NAN  # NaN with the sign bit set: still above +inf
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sort_puts_nan_last_and_invalid_after_every_valid_value(
    backend: str, dtype: torch.dtype
) -> None:
    x = nonfinite_matrix(23, 300, 1, dtype)
    valid = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.7
    srt = sort_columns(x, valid, backend=backend)
    count = valid.sum(0)
    xn, vn = x.numpy(), valid.numpy()
    for j in range(x.shape[1]):
        c = int(count[j])
        ref = np.sort(xn[vn[:, j], j])
        got = srt[:c, j].numpy()
        np.testing.assert_array_equal(got, ref)  # NaN positions equal too
        assert torch.isnan(srt[c:, j]).all()  # the invalid entries, after every valid one


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_mean_follows_the_policy_on_hand_made_columns(backend: str) -> None:
    # columns (rows = participants); valid marks the reporters
    cols = [
        ([1.0, NAN, 5.0, 9.0, 7.0], [1, 1, 1, 1, 1], 7.0),  # NaN is the largest: median 7
        ([NAN, NAN, NAN, 2.0, 3.0], [1, 1, 1, 1, 1], NAN),  # 3 of 5 NaN: the median is NaN
        ([INF, -INF, 0.0, 1.0, 2.0], [1, 1, 1, 1, 1], 1.0),  # ±inf are extreme values
        ([1.0, NAN, 4.0, 0.0, 0.0], [1, 1, 0, 0, 0], NAN),  # reporters 1, NaN: mean(1, NaN)
        ([1.0, 3.0, NAN, NAN, -NAN], [1, 1, 0, 0, 0], 2.0),  # non-reporters' NaN never enter
        ([INF, 2.0, 0.0, 0.0, 0.0], [1, 1, 0, 0, 0], INF),  # mean(2, inf)
        ([INF, -INF, 5.0, 0.0, 0.0], [1, 1, 0, 0, 0], NAN),  # mean(-inf, inf): IEEE NaN
    ]
    x = torch.tensor([c[0] for c in cols], dtype=torch.float32).T.contiguous()
    valid = torch.tensor([c[1] for c in cols], dtype=torch.bool).T.contiguous()
    count = valid.sum(0)
    lo, hi = (count - 1).clamp_min(0) // 2, count // 2 + 1
    got = window_mean(x, lo, hi, valid, backend=backend)
    want = torch.tensor([c[2] for c in cols], dtype=torch.float32)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_window_mean_matches_numpy_on_nonfinite_inputs(backend: str, dtype: torch.dtype) -> None:
    x = nonfinite_matrix(31, 400, 3, dtype)
    valid = torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.6
    count = valid.sum(0)
    for lo, hi in (median_window(count.numpy()), (count.numpy() // 5, count.numpy() * 4 // 5)):
        ok = hi > lo
        lo_t, hi_t = torch.from_numpy(np.where(ok, lo, 0)), torch.from_numpy(np.where(ok, hi, 1))
        got = window_mean(x, lo_t, hi_t, valid, backend=backend).numpy()
        ref = oracle_window(x.numpy(), valid.numpy(), lo_t.numpy(), hi_t.numpy())
        keep = ok & (count.numpy() > 0)
        rtol = 1e-5 if dtype == torch.float32 else 1e-12
        np.testing.assert_allclose(got[keep], ref[keep], rtol=rtol, atol=rtol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_kernel_matches_the_torch_reference(dtype: torch.dtype) -> None:
    """Dense (one window for every column: the pruned network) and per-column windows."""
    x = nonfinite_matrix(2 * 37, 1000, 5, dtype).reshape(2, 37, 1000)
    valid = torch.rand(x.shape, generator=torch.Generator().manual_seed(6)) < 0.7
    a = sort_columns(x, valid, backend="cpp")
    b = sort_columns(x, valid, backend="torch")
    torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    count = valid.sum(-2)
    windows = [((count - 1).clamp_min(0) // 2, count // 2 + 1), (count // 10, count - count // 10)]
    for lo, hi in windows:
        ok = (hi > lo) & (count > 0)
        lo, hi = torch.where(ok, lo, 0), torch.where(ok, hi, 1)
        wa = window_mean(x, lo, hi, valid, backend="cpp")
        wb = window_mean(x, lo, hi, valid, backend="torch")
        torch.testing.assert_close(wa[ok], wb[ok], equal_nan=True, rtol=rtol, atol=rtol)
    for lo_s, hi_s in ((18, 19), (3, 34), (0, 37)):  # dense: scalar windows
        wa = window_mean(x, torch.tensor(lo_s), torch.tensor(hi_s), backend="cpp")
        wb = window_mean(x, torch.tensor(lo_s), torch.tensor(hi_s), backend="torch")
        torch.testing.assert_close(wa, wb, equal_nan=True, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("row", [0, 19])
def test_median_and_trimmed_mean_with_a_nan_participant_at_kernel_scale(row: int) -> None:
    """Issue 14 item 2: at >= 2**22 elements (the compiled path when built) one NaN participant
    made the median all-NaN (row 0) or moved 137,402 of 262,144 coordinates (row 19); the torch
    path returned the median of the others with NaN as the largest value. Now every path does."""
    k, d = 20, 1 << 18
    assert k * d >= CPP_MIN_NUMEL
    g = torch.Generator().manual_seed(row)
    x = torch.randn(k, d, generator=g)
    x[row] = NAN
    gm = torch.zeros(d)
    srt = np.sort(x.numpy(), axis=0)  # NaN row last
    med = get_defense("median")(x, None, gm)
    np.testing.assert_allclose(med.numpy(), 0.5 * (srt[9] + srt[10]), rtol=1e-6, atol=1e-7)
    assert not torch.isnan(med).any()
    tm = get_defense("trimmed_mean", beta=0.1)(x, None, gm)  # b = 2 per side: NaN trimmed
    np.testing.assert_allclose(tm.numpy(), srt[2:18].mean(0), rtol=1e-5, atol=1e-6)
    for backend in ("torch", *(("cpp",) if cpp_kernel_available() else ())):
        c = torch.tensor(k)
        got = window_mean(x, (c - 1) // 2, c // 2 + 1, backend=backend)
        torch.testing.assert_close(got, med, rtol=1e-6, atol=1e-7)


def test_reporters_median_ignores_non_reporters_but_keeps_a_reporters_nan() -> None:
    """Reporters mode through the public rule: a NaN sent by a reporter is the largest value of
    its coordinate; NaN held by non-reporters is never read."""
    x = torch.tensor([[1.0, 1.0, 1.0], [NAN, 2.0, 5.0], [3.0, NAN, NAN], [4.0, 4.0, 4.0]])
    masks = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    gm = torch.full((3,), -7.0)
    out = get_defense("median")(x, masks, gm, mode="reporters")
    # col 0: {1, NaN, 3} -> 3; col 1: {1, 2, 4} -> 2; col 2: {1, 5} -> 3
    torch.testing.assert_close(out, torch.tensor([3.0, 2.0, 3.0]))


@needs_cpp
def test_tiles_with_and_without_nan_agree_with_the_reference() -> None:
    """The kernel checks each tile (1,024 columns) for NaN and sorts NaN-free tiles with plain
    min/max: a NaN in one tile must not change the others, nor be lost in its own."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 25, 5000, generator=g)
    x[1, 7, 3000] = NAN
    x[2, :13, 4999] = NAN  # a majority of NaN in the last (partial) tile's last column
    x[0, 3, 10] = INF
    for lo_s, hi_s in ((12, 13), (2, 23)):
        lo, hi = torch.tensor(lo_s), torch.tensor(hi_s)
        torch.testing.assert_close(window_mean(x, lo, hi, backend="cpp"),
                                   window_mean(x, lo, hi, backend="torch"),
                                   equal_nan=True, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sort_columns(x, backend="cpp"), sort_columns(x, backend="torch"),
                               equal_nan=True, rtol=0, atol=0)
