"""Batched selection masks for the online engine (exact-count random, round-robin).

PSO-Fed's selection matrix ``S_{k,n} = diag(s)`` has exactly ``M`` ones (Gogineni et al., ICASSP
2022, arXiv 2110.06556). Sorting random keys of every ``[runs, clients, D]`` row each iteration is
the obvious way to draw exact-``M`` masks and the slow one (``O(D log D)`` per row, ~3 µs for
D = 200 on a CPU core). Here:

* random masks come from :class:`MaskPool`: rows drawn in large chunks with a vectorised
  Floyd's algorithm (``min(M, D-M)`` steps over all rows of a chunk; exact uniform
  ``M``-subsets), as bool masks (:func:`floyd_masks`) or index lists (:func:`floyd_indices`,
  what the engine uses: merge and server step then touch only the ``M`` shared entries),
  handed out in order by :meth:`MaskPool.take`;
* round-robin masks are index arithmetic, ``{(o_k + nM + j) mod D : j < M}``;
  :func:`rotation_table` gives them as bool rows.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from psfed_robust.engine import kernels

__all__ = ["MaskPool", "floyd_indices", "floyd_masks", "mask_to_indices", "rotation_table"]


#: Floyd sampler back ends: "auto" (CPU: compiled C++ if available, else numpy; other devices:
#: torch), "numpy", "cpp" (CPU; the same draws and picks as "numpy"), "torch"
_BACKENDS = ("auto", "numpy", "cpp", "torch")


def _bounded_ints(rng: np.random.Generator, highs: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[i, :]`` ← ``n`` exact uniform integers on ``[0, highs[i])`` (``out``: int64 [m, n]).

    16-bit Lemire multiply-shift with rejection on raw PCG64 output (used for ``highs ≤ 2^12``):
    ``x`` a uniform 16-bit integer, ``p = x·h``; accept ``p >> 16`` unless
    ``p mod 2^16 < 2^16 mod h`` (probability ``< h / 2^16``), in which case a fresh ``x`` is
    drawn for that entry (vectorised over the rejected entries, in order, until none is left).
    """
    m = highs.shape[0]
    h = highs.astype(np.uint32)[:, None]
    thr = (np.uint32(65536) - h) % h
    bg = rng.bit_generator
    raw = bg.random_raw((m * n + 3) // 4).view(np.uint16)[: m * n].reshape(m, n)
    p = raw.astype(np.uint32)
    p *= h
    bad = (p & np.uint32(0xFFFF)) < thr
    p >>= np.uint32(16)
    np.copyto(out, p, casting="unsafe")
    if not bad.any():
        return
    flat = np.flatnonzero(bad)  # rejected entries, row-major order
    rows, cols = flat // n, flat % n
    while rows.size:
        hr = h[rows, 0]
        x = bg.random_raw((rows.size + 3) // 4).view(np.uint16)[: rows.size].astype(np.uint32)
        x *= hr
        ok = (x & np.uint32(0xFFFF)) >= thr[rows, 0]
        out[rows[ok], cols[ok]] = x[ok] >> np.uint32(16)
        rows, cols = rows[~ok], cols[~ok]


def _floyd(rows: int, dim: int, m: int, generator: torch.Generator, device: torch.device,
           backend: str, want_masks: bool = True,
           index_dtype: torch.dtype = torch.long) -> tuple[Tensor | None, Tensor]:
    """Floyd's algorithm for ``m`` of ``dim``: ``(masks [rows, dim] bool, picks [rows, m])``.

    ``want_masks=False`` skips building the bool masks on CPU (returns ``None`` for them there).
    ``index_dtype``: ``torch.long`` or ``torch.int16`` (``dim`` ≤ 32767) for the picks.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, "
                         f"got {backend!r}")
    if m == 0 or rows == 0:
        return (torch.zeros((rows, dim), dtype=torch.bool, device=device),
                torch.zeros((rows, m), dtype=torch.long, device=device))
    if device.type == "cpu" and backend != "torch":
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
        rng = np.random.Generator(np.random.PCG64(seed))
        use_cpp = backend != "numpy" and dim <= 1 << 12 and kernels.available()
        if backend == "cpp" and not use_cpp:
            raise RuntimeError("the compiled Floyd sampler is not available (dim <= 4096 and a "
                               "working C++ compiler are needed)")
        if use_cpp:  # the same draws and steps as below, compiled
            st = rng.bit_generator.state["state"]
            words = np.array([(w & (2**64 - 1)) for w in (st["state"] >> 64, st["state"],
                                                          st["inc"] >> 64, st["inc"])],
                             dtype=np.uint64)
            picks_t, masks_t = kernels.floyd_pcg(rows, dim, m, words, want_masks)
            return masks_t, picks_t.to(index_dtype)
        out = np.empty((rows, dim), dtype=np.bool_) if want_masks else None
        picks = np.empty((rows, m), dtype=np.int64)
        highs = np.arange(dim - m + 1, dim + 1, dtype=np.int64)
        sub = 4096
        tt_buf = np.empty((m, min(rows, sub)), dtype=np.int64)
        for s0 in range(0, rows, sub):
            n = min(rows, s0 + sub) - s0
            tt = tt_buf[:, :n]  # [m, n]: row i = step i's draws, then its picks
            if dim <= 1 << 12:
                _bounded_ints(rng, highs, n, tt)
            else:
                for i in range(m):
                    tt[i] = rng.integers(0, highs[i], size=n, dtype=np.int64)
            base = np.arange(n, dtype=np.int64) * dim
            tt += base[None, :]
            bj = base + (dim - m)
            sel = np.zeros(n * dim, dtype=np.bool_)
            for i in range(m):
                ti = tt[i]
                np.copyto(ti, bj, where=sel.take(ti))  # t taken: pick j = dim - m + i
                sel.put(ti, True)
                bj += 1
            tt -= base[None, :]
            picks[s0 : s0 + n] = tt.T
            if out is not None:
                out[s0 : s0 + n] = sel.reshape(n, dim)
        masks = None if out is None else torch.from_numpy(out)
        return masks, torch.from_numpy(picks).to(index_dtype)
    u = torch.rand((rows, m), generator=generator, device=device, dtype=torch.float64).t()
    hi_t = torch.arange(dim - m, dim, device=device, dtype=torch.float64)[:, None]
    t_dev = torch.minimum((u * (hi_t + 1.0)).floor_(), hi_t).long()  # [m, rows]
    sel_t = torch.zeros((rows, dim), dtype=torch.bool, device=device)
    cols: list[Tensor] = []
    for i in range(m):
        ti = t_dev[i][:, None]
        pick = torch.where(sel_t.gather(1, ti), dim - m + i, ti)
        sel_t.scatter_(1, pick, True)
        cols.append(pick)
    return sel_t, torch.cat(cols, dim=1).to(index_dtype)


def floyd_masks(rows: int, dim: int, count: int, generator: torch.Generator,
                device: torch.device | str = "cpu", backend: str = "auto") -> Tensor:
    """``[rows, dim]`` bool masks, each an independent uniform ``count``-subset (Floyd's algorithm).

    Step ``i`` (``j = dim - m + i``, ``m = min(count, dim - count)``) draws ``t ~ U{0..j}`` and
    adds ``j`` if ``t`` is already selected, else ``t``. For ``count > dim/2`` the complement is
    drawn and inverted. On CPU one 63-bit integer drawn from ``generator`` seeds a numpy PCG64;
    rows are processed 4096 at a time: all ``m`` draws of every row of the sub-chunk come first,
    as exact uniform integers from 16-bit words of the PCG64's raw output (Lemire's
    multiply-shift with rejection, :func:`_bounded_ints`; ``numpy`` ``integers`` per step for
    ``dim > 4096``), then the ``m`` steps run with ``np.take``/``np.put`` on a flat bitmap; on
    other devices ``t = floor(u (j+1))`` with ``u = rand(rows, m)`` in float64 from ``generator``
    and the steps run in torch (``backend="torch"`` forces this path on CPU too).
    """
    if not 0 <= count <= dim:
        raise ValueError(f"count must be in [0, dim={dim}], got {count}")
    sel, _ = _floyd(rows, dim, min(count, dim - count), generator, torch.device(device), backend)
    assert sel is not None
    return ~sel if count > dim - count else sel


def floyd_indices(rows: int, dim: int, count: int, generator: torch.Generator,
                  device: torch.device | str = "cpu", backend: str = "auto",
                  dtype: torch.dtype = torch.long) -> Tensor:
    """:func:`floyd_masks` as index lists ``[rows, count]`` (distinct within a row).

    For ``count ≤ dim/2`` these are Floyd's picks in step order (no sort); otherwise the sorted
    complement of the drawn set. Same random draws as :func:`floyd_masks`. ``dtype``: int64
    (default) or int16 (``dim`` ≤ 32767; the engine's compact lists, same values).
    """
    if dtype not in (torch.long, torch.int16) or (dtype == torch.int16 and dim > 32767):
        raise ValueError(f"dtype must be torch.long, or torch.int16 for dim <= 32767, got {dtype}")
    if not 0 <= count <= dim:
        raise ValueError(f"count must be in [0, dim={dim}], got {count}")
    m = min(count, dim - count)
    small = count <= dim - count
    sel, picks = _floyd(rows, dim, m, generator, torch.device(device), backend,
                        want_masks=not small, index_dtype=dtype)
    if small:
        return picks
    assert sel is not None
    return mask_to_indices(~sel, count).to(dtype)


def mask_to_indices(sel: Tensor, count: int) -> Tensor:
    """``[rows, dim]`` bool masks with exactly ``count`` ones → sorted indices ``[rows, count]``."""
    rows, dim = sel.shape
    if sel.device.type == "cpu":
        flat = np.flatnonzero(sel.numpy())
        return torch.from_numpy((flat % dim).reshape(rows, count))
    return sel.nonzero()[:, 1].reshape(rows, count)


class MaskPool:
    """An ordered stream of i.i.d. uniform exact-``count`` masks of length ``dim``.

    Rows are generated ``chunk`` at a time by :func:`floyd_masks` from ``generator`` (always
    whole chunks, in order) and handed out in order, so the masks a caller receives depend only
    on the generator's seed and ``chunk``. With ``prefetch`` a worker thread generates the next
    chunk while the caller computes (numpy and torch release the GIL); the stream is the same.
    ``dtype``: ``torch.bool`` or a float dtype (0/1 masks, converted once per chunk);
    ``indices=True``: index lists ``[rows, count]`` (:func:`floyd_indices`) instead of masks,
    of ``index_dtype`` (int64 or int16); ``backend``: the Floyd sampler's (same masks). Call
    :meth:`close` when done with a prefetching pool.
    """

    def __init__(self, dim: int, count: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", chunk: int = 65536,
                 prefetch: bool = False, dtype: torch.dtype = torch.bool,
                 indices: bool = False, index_dtype: torch.dtype = torch.long,
                 backend: str = "auto") -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, "
                             f"got {backend!r}")
        self.backend = backend
        self.dim, self.count, self.generator = dim, count, generator
        self.indices = indices
        self.device = torch.device(device)
        self.chunk = max(1, chunk)
        self.dtype = dtype
        self.index_dtype = index_dtype
        self._buf = torch.zeros((0, count if indices else dim),
                                dtype=index_dtype if indices else dtype, device=self.device)
        self._pos = 0
        self._executor: ThreadPoolExecutor | None = None
        self._next: Future[Tensor] | None = None
        if prefetch:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskpool")
            self._next = self._executor.submit(self._generate)

    def _generate(self) -> Tensor:
        if self.indices:
            return floyd_indices(self.chunk, self.dim, self.count, self.generator, self.device,
                                 backend=self.backend, dtype=self.index_dtype)
        out = floyd_masks(self.chunk, self.dim, self.count, self.generator, self.device,
                          backend=self.backend)
        return out if self.dtype == torch.bool else out.to(self.dtype)

    def _chunk(self) -> Tensor:
        if self._next is None or self._executor is None:
            return self._generate()
        out = self._next.result()
        self._next = self._executor.submit(self._generate)
        return out

    def take(self, rows: int) -> Tensor:
        """The next ``rows`` masks (``[rows, dim]``) or index lists (do not modify them)."""
        end = self._pos + rows
        if end <= self._buf.shape[0]:
            out = self._buf[self._pos : end]
            self._pos = end
            return out
        parts = [self._buf[self._pos :]]
        have = parts[0].shape[0]
        while True:
            self._buf = self._chunk()
            self._pos = min(rows - have, self._buf.shape[0])
            parts.append(self._buf[: self._pos])
            have += self._pos
            if have >= rows:
                break
        parts = [p for p in parts if p.shape[0]]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def close(self) -> None:
        """Stop the prefetch worker (a pending chunk is finished and dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor, self._next = None, None


def rotation_table(dim: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """``[dim, dim]`` bool: row ``s`` has ones at the ``d`` with ``(s + d) mod dim < count``.

    The round-robin mask with offset ``o`` at iteration ``n`` (ones at ``(o + nM + j) mod D``,
    ``j < M``) is row ``(−o − n·M) mod D``.
    """
    pattern = torch.zeros(2 * dim, dtype=torch.bool, device=device)
    pattern[:count] = True
    pattern[dim : dim + count] = True
    return pattern.unfold(0, dim, 1)[:dim].contiguous()
