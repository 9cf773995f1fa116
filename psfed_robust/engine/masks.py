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

__all__ = ["MaskPool", "floyd_indices", "floyd_masks", "mask_to_indices", "rotation_table"]


def _floyd(rows: int, dim: int, m: int, generator: torch.Generator, device: torch.device,
           backend: str) -> tuple[Tensor, Tensor]:
    """Floyd's algorithm for ``m`` of ``dim``: ``(masks [rows, dim] bool, picks [rows, m])``."""
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend must be 'auto' or 'torch', got {backend!r}")
    if m == 0 or rows == 0:
        return (torch.zeros((rows, dim), dtype=torch.bool, device=device),
                torch.zeros((rows, m), dtype=torch.long, device=device))
    if device.type == "cpu" and backend == "auto":
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
        rng = np.random.Generator(np.random.PCG64(seed))
        out = np.empty((rows, dim), dtype=np.bool_)
        picks = np.empty((m, rows), dtype=np.int64)
        sub = 4096
        for s0 in range(0, rows, sub):
            n = min(rows, s0 + sub) - s0
            sel_np = np.zeros(n * dim, dtype=np.bool_)
            base = np.arange(n, dtype=np.int64) * dim
            for i, j in enumerate(range(dim - m, dim)):
                t = rng.integers(0, j + 1, size=n, dtype=np.int64)  # exact uniform on [0, j]
                t += base
                pk = np.where(sel_np[t], base + j, t)
                sel_np[pk] = True
                picks[i, s0 : s0 + n] = pk - base
            out[s0 : s0 + n] = sel_np.reshape(n, dim)
        return torch.from_numpy(out), torch.from_numpy(np.ascontiguousarray(picks.T))
    u = torch.rand((rows, m), generator=generator, device=device, dtype=torch.float64).t()
    hi_t = torch.arange(dim - m, dim, device=device, dtype=torch.float64)[:, None]
    t_dev = torch.minimum((u * (hi_t + 1.0)).floor_(), hi_t).long()  # [m, rows]
    sel = torch.zeros((rows, dim), dtype=torch.bool, device=device)
    cols: list[Tensor] = []
    for i in range(m):
        ti = t_dev[i][:, None]
        pick = torch.where(sel.gather(1, ti), dim - m + i, ti)
        sel.scatter_(1, pick, True)
        cols.append(pick)
    return sel, torch.cat(cols, dim=1)


def floyd_masks(rows: int, dim: int, count: int, generator: torch.Generator,
                device: torch.device | str = "cpu", backend: str = "auto") -> Tensor:
    """``[rows, dim]`` bool masks, each an independent uniform ``count``-subset (Floyd's algorithm).

    Step ``i`` (``j = dim - m + i``, ``m = min(count, dim - count)``) draws ``t ~ U{0..j}`` and
    adds ``j`` if ``t`` is already selected, else ``t``. For ``count > dim/2`` the complement is
    drawn and inverted. On CPU one 63-bit integer drawn from ``generator`` seeds a numpy PCG64
    that draws the exact uniform integers ``t`` (Lemire's method; several times faster than
    torch's CPU Mersenne Twister), 4096 rows at a time, step by step, and the steps run with
    numpy fancy indexing; on other devices ``t = floor(u (j+1))`` with ``u = rand(rows, m)``
    in float64 from ``generator`` and the steps run in torch (``backend="torch"`` forces this
    path on CPU too).
    """
    if not 0 <= count <= dim:
        raise ValueError(f"count must be in [0, dim={dim}], got {count}")
    sel, _ = _floyd(rows, dim, min(count, dim - count), generator, torch.device(device), backend)
    return ~sel if count > dim - count else sel


def floyd_indices(rows: int, dim: int, count: int, generator: torch.Generator,
                  device: torch.device | str = "cpu", backend: str = "auto") -> Tensor:
    """:func:`floyd_masks` as index lists ``[rows, count]`` (int64, distinct within a row).

    For ``count ≤ dim/2`` these are Floyd's picks in step order (no sort); otherwise the sorted
    complement of the drawn set. Same random draws as :func:`floyd_masks`.
    """
    if not 0 <= count <= dim:
        raise ValueError(f"count must be in [0, dim={dim}], got {count}")
    m = min(count, dim - count)
    sel, picks = _floyd(rows, dim, m, generator, torch.device(device), backend)
    if count <= dim - count:
        return picks
    return mask_to_indices(~sel, count)


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
    ``indices=True``: index lists ``[rows, count]`` (:func:`floyd_indices`) instead of masks.
    Call :meth:`close` when done with a prefetching pool.
    """

    def __init__(self, dim: int, count: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", chunk: int = 65536,
                 prefetch: bool = False, dtype: torch.dtype = torch.bool,
                 indices: bool = False) -> None:
        self.dim, self.count, self.generator = dim, count, generator
        self.indices = indices
        self.device = torch.device(device)
        self.chunk = max(1, chunk)
        self.dtype = dtype
        self._buf = torch.zeros((0, count if indices else dim),
                                dtype=torch.long if indices else dtype, device=self.device)
        self._pos = 0
        self._executor: ThreadPoolExecutor | None = None
        self._next: Future[Tensor] | None = None
        if prefetch:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskpool")
            self._next = self._executor.submit(self._generate)

    def _generate(self) -> Tensor:
        if self.indices:
            return floyd_indices(self.chunk, self.dim, self.count, self.generator, self.device)
        out = floyd_masks(self.chunk, self.dim, self.count, self.generator, self.device)
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
