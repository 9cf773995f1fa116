"""Column kernels shared by the coordinate-wise rules (median, trimmed mean, Bulyan).

All of them need, per coordinate, the values of the valid rows in sorted order. The kernel sorts
every column of ``x[..., K, D]`` along ``K`` with invalid entries pushed to the end, so order
statistics of a column with ``c`` valid values sit at ranks ``0..c-1``.

NaN/Inf policy (one for every path: torch or compiled, CPU or GPU, fill or reporters mode): the
valid values of a column are ordered as ``torch.sort`` orders them, ``-inf < finite < +inf <
NaN`` (a NaN of either sign above ``+inf``); invalid entries (non-participants, non-reporters)
are filled with NaN, so they sort after every valid value and never reach a rank below ``c``. A
rank-window rule averages the values at its ranks ``[lo, hi)``, so a non-finite value reaches
the output only if it falls inside the window: a NaN acts as the largest value (the median of
a column with ``v`` NaN among ``c`` values is NaN only if ``v > (c - 1) // 2``; a trimmed mean
dropping ``b`` per side only if ``v > b``), ``±inf`` inside the window gives ``±inf`` (NaN if
both signs are in it, IEEE). Nothing is rejected here: which replies to drop is the caller's
policy (docs/attacks_defenses.md, "Non-finite values").

Two back ends:

- the reference, pure torch (``torch.sort`` along K, chunked over D so the working set stays in
  cache), used on every device;
- an optional vectorised sorting-network kernel (``psfed_robust/csrc/defense_kernels.cpp``:
  Batcher's odd-even merge sort, 1,104 comparators for K = 100, applied to 64 adjacent
  coordinates at a time, SIMD compare-exchange in L1, the rank window reduced in the same pass),
  built once by :class:`~psfed_robust._cpp.TorchExtension`. It is used only for CPU
  float32/float64 inputs of at least :data:`CPP_MIN_NUMEL` elements when a C++ compiler is
  available (``PSFED_NO_CPP_KERNEL=1`` disables it; a build failure falls back to torch). It
  earns its place: ``benchmarks/aggregators.py`` prints its speedup over the torch path per
  kernel (median and trimmed mean of 100 x 10^6 values, sorted columns). Tolerance against the
  reference: :func:`sort_columns` gives the same values (a sort is a permutation; NaN payload
  bits aside), :func:`window_mean` the same up to the summation order of the window (relative
  ``1e-5`` in float32, ``1e-12`` in float64; ``tests/test_defense_kernels.py``).

``torch.quantile`` is never used (limited to 2**24 elements, pytorch#64947).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from psfed_robust._cpp import TorchExtension, kernels_disabled, source

__all__ = ["batcher_network", "cpp_kernel_available", "sort_columns", "window_mean"]

# Inputs with at least this many elements use the compiled kernel when it is available. The
# kernel is faster at every size (3x at 5 x 10, 26x on a 100-client CNN round of 1.5M values),
# but its one-time build takes ~20 s: small workloads (the headline's 16 x 10 x 32 rounds) stay
# on torch and never trigger it; from ~1M values per call a study repays it in a few hundred
# rounds (a 100-client CNN point: 9.9 -> ~0.4 s of median over 800 calls).
CPP_MIN_NUMEL = 1 << 20
_CHUNK = 1 << 14  # columns per chunk of the torch path

@functools.lru_cache(maxsize=64)
def batcher_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators of Batcher's odd-even merge sort for ``n`` inputs (min goes to the lower index).

    Built for the next power of two and restricted to wires ``< n``: padding wires hold ``+inf``,
    and a standard-form comparator never moves a maximal value down, so they are no-ops.
    """
    p = 1
    while p < n:
        p *= 2
    pairs: list[tuple[int, int]] = []
    pp = 1
    while pp < p:
        k = pp
        while k >= 1:
            j = k % pp
            while j <= p - 1 - k:
                for i in range(min(k, p - j - k)):
                    if (i + j) // (pp * 2) == (i + j + k) // (pp * 2):
                        pairs.append((i + j, i + j + k))
                j += 2 * k
            k //= 2
        pp *= 2
    return tuple((a, b) for a, b in pairs if b < n)


@functools.lru_cache(maxsize=256)
def window_network(n: int, lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """Batcher's network pruned for the *sum* of the sorted ranks ``[lo, hi)``.

    Walking backwards, a comparator is dropped if neither output is needed later, or if both
    outputs are only summed (swapping two summed values does not change the sum). Median of 100:
    897 of 1,104 comparators remain.
    """
    live = set(range(lo, hi))
    sum_only = set(range(lo, hi))
    kept: list[tuple[int, int]] = []
    for a, b in reversed(batcher_network(n)):
        if (a not in live and b not in live) or (a in sum_only and b in sum_only):
            continue
        kept.append((a, b))
        live |= {a, b}
        sum_only -= {a, b}
    return tuple(reversed(kept))


@functools.lru_cache(maxsize=256)
def _pairs_tensor(n: int, lo: int = -1, hi: int = -1) -> Tensor:
    net = batcher_network(n) if lo < 0 else window_network(n, lo, hi)
    return torch.tensor(net, dtype=torch.int32).reshape(-1, 2).contiguous()


_EXT = TorchExtension(
    "psfed_defense_kernels", source("defense_kernels.cpp"),
    cflags=["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"],
    ldflags=["-fopenmp"],
)


def _load_cpp() -> Any:
    """The compiled module, or ``None`` (disabled, no compiler, or the build failed)."""
    return _EXT.get()


def cpp_kernel_available(build: bool = True) -> bool:
    """Whether the compiled sorting-network kernel can be used (builds it if ``build``)."""
    if kernels_disabled():
        return False
    if not build:
        return _EXT.built
    return _load_cpp() is not None


def _sort_torch(x: Tensor) -> Tensor:
    d = x.shape[-1]
    if d <= _CHUNK:
        return torch.sort(x, dim=-2).values
    out = torch.empty_like(x)
    for c0 in range(0, d, _CHUNK):  # chunks over D (not coordinates): keeps the sort in cache
        blk = x[..., c0 : c0 + _CHUNK].transpose(-1, -2).contiguous()
        out[..., c0 : c0 + _CHUNK] = torch.sort(blk, dim=-1).values.transpose(-1, -2)
    return out


def _use_cpp(x: Tensor, backend: str) -> bool:
    if backend == "cpp":
        if not cpp_kernel_available():
            raise RuntimeError("the compiled column kernel is not available")
        return True
    if backend == "torch":
        return False
    if backend != "auto":
        raise ValueError(f"backend must be one of 'auto', 'torch', 'cpp', got {backend!r}")
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and x.numel() >= CPP_MIN_NUMEL
        and x.shape[-2] > 1
        and cpp_kernel_available()
    )


def _fill_invalid(x: Tensor, valid: Tensor | None) -> Tensor:
    """Invalid entries -> NaN: after every valid value, a valid NaN included (the policy)."""
    if valid is None:
        return x
    return torch.where(valid, x, torch.full((), float("nan"), dtype=x.dtype, device=x.device))


def sort_columns(x: Tensor, valid: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """Sort each column ``x[..., :, d]`` ascending (NaN last); entries with ``valid`` False
    become NaN, so the ``c`` valid values of a column hold ranks ``0..c-1``.

    ``backend``: ``"auto"`` (compiled kernel for large CPU float inputs when available),
    ``"torch"`` or ``"cpp"`` (raises if the kernel cannot be built).
    """
    x = _fill_invalid(x, valid)
    k, d = x.shape[-2], x.shape[-1]
    if k <= 1:
        return x.clone()
    if _use_cpp(x, backend):
        x3 = x.reshape(-1, k, d).contiguous()
        return _load_cpp().sort_columns(x3, _pairs_tensor(k)).reshape(x.shape)
    return _sort_torch(x)


def window_mean(
    x: Tensor,
    lo: Tensor,
    hi: Tensor,
    valid: Tensor | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Per column, the mean of the sorted valid values at ranks ``[lo, hi)`` -> ``[..., D]``.

    ``lo``/``hi`` are integer tensors broadcastable to ``[..., D]`` with ``0 <= lo < hi <= count``
    of valid values (the caller guarantees it; columns with no valid value are the caller's).
    Median: ``[(c-1)//2, c//2+1)``; trimmed mean: ``[b, c-b)``.
    """
    x = _fill_invalid(x, valid)
    k, d = x.shape[-2], x.shape[-1]
    out_shape = x.shape[:-2] + x.shape[-1:]
    if k > 1 and _use_cpp(x, backend):
        x3 = x.reshape(-1, k, d).contiguous()
        if lo.numel() == 1 and hi.numel() == 1:  # one window for every column (dense input)
            l0, h0 = int(lo), int(hi)
            pairs = _pairs_tensor(k, l0, h0) if 0 <= l0 < h0 <= k else _pairs_tensor(k)
            lo3 = torch.tensor([l0], dtype=torch.int32)
            hi3 = torch.tensor([h0], dtype=torch.int32)
        else:
            pairs = _pairs_tensor(k)
            lo3 = torch.broadcast_to(lo, out_shape).reshape(-1, d).to(torch.int32).contiguous()
            hi3 = torch.broadcast_to(hi, out_shape).reshape(-1, d).to(torch.int32).contiguous()
        return _load_cpp().window_mean(x3, pairs, lo3, hi3).reshape(out_shape)
    lo = torch.broadcast_to(lo, out_shape)
    hi = torch.broadcast_to(hi, out_shape)
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    ranks = torch.arange(k, device=x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    for c0 in range(0, d, _CHUNK):  # chunks over D (not coordinates), [chunk, K] layout
        sl = slice(c0, c0 + _CHUNK)
        srt = torch.sort(x[..., sl].transpose(-1, -2).contiguous(), dim=-1).values
        lo_c, hi_c = lo[..., sl].unsqueeze(-1), hi[..., sl].unsqueeze(-1)
        keep = (ranks >= lo_c) & (ranks < hi_c)
        tot = torch.where(keep, srt, zero).sum(dim=-1)
        out[..., sl] = tot / (hi_c - lo_c).squeeze(-1).to(x.dtype)
    return out
