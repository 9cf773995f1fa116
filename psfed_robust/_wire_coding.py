"""Mask-section coding of the wire codec (:mod:`psfed_robust.wire`): the bit packers, the
Golomb–Rice gap encoding and the runs encoding, each with its exact cost, the lower bounds that
let ``encoding="auto"`` skip a candidate, and the decoders with their structural checks.

Split from ``wire.py`` (framing, header, CRC, values, the public API) to keep each module short;
the format is described in ``docs/wire.md``. Everything raises :class:`WireFormatError` for a bad
section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from psfed_robust import _wire_kernels
from psfed_robust.core.mask import Mask

__all__ = ["WireFormatError"]


class WireFormatError(ValueError):
    """A payload is corrupt, truncated or otherwise not a valid psfed-robust wire message."""


# ====================================================================== bit helpers
def _pack_fixed(values: npt.NDArray[np.int64], width: int) -> bytes:
    """Pack each value (< 2**width) in ``width`` bits, MSB first, concatenated; zero padding."""
    if width == 0 or values.size == 0:
        return b""
    bits = np.empty((values.size, width), dtype=np.uint8)
    for j in range(width):
        np.bitwise_and(values >> (width - 1 - j), 1, out=bits[:, j], casting="unsafe")
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_fixed(
    buf: memoryview, n: int, width: int, what: str = "gap section"
) -> npt.NDArray[np.int64]:
    if width == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    nbits = n * width
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8))
    if bits[nbits:].any():
        raise WireFormatError(f"{what}: non-zero padding after the Rice remainders")
    mat = bits[:nbits].reshape(n, width)
    out = mat[:, 0].astype(np.int64)
    for j in range(1, width):
        out <<= 1
        out |= mat[:, j]
    return out


def _pack_unary(q: npt.NDArray[np.int64]) -> bytes:
    """``q[i]`` zeros then a one, for each i, concatenated; zero padding."""
    if q.size == 0:
        return b""
    ends = np.cumsum(q + 1)
    bits = np.zeros(int(ends[-1]), dtype=np.uint8)
    bits[ends - 1] = 1
    return np.packbits(bits).tobytes()


def _unpack_unary(buf: memoryview, n: int, what: str = "gap section") -> npt.NDArray[np.int64]:
    """Inverse of :func:`_pack_unary`; exactly ``n`` codes filling ``buf`` up to padding."""
    raw = np.frombuffer(buf, dtype=np.uint8)
    if n == 0:
        if raw.size:
            raise WireFormatError(f"{what}: unexpected unary bytes")
        return np.zeros(0, dtype=np.int64)
    ones = np.flatnonzero(np.unpackbits(raw)).astype(np.int64)
    if ones.size != n:
        raise WireFormatError(f"{what}: expected {n} unary codes, found {ones.size}")
    if (int(ones[-1]) >> 3) != raw.size - 1:
        raise WireFormatError(f"{what}: unary stream length does not match its codes")
    return np.diff(ones, prepend=-1) - 1


# ====================================================================== gap and runs coding
def _coded_set(mask: Mask) -> tuple[bool, npt.NDArray[np.int64]]:
    """(complement?, sorted indices of the smaller of the mask and its complement)."""
    if mask.count * 2 > mask.size:
        return True, np.flatnonzero(np.logical_not(mask.data)).astype(np.int64, copy=False)
    return False, mask.indices


def _packed_words(mask: Mask, complement: bool = False) -> npt.NDArray[np.uint64]:
    """The mask (or its complement) as little-endian u64 words: bit i = member i; zero padding."""
    size = mask.size
    packed = np.packbits(mask.data, bitorder="little")
    words = np.zeros((packed.size + 7) // 8, dtype="<u8")
    words.view(np.uint8)[: packed.size] = packed
    if complement:
        np.invert(words, out=words)
        if size % 64:
            words[-1] &= np.uint64((1 << (size % 64)) - 1)
    return words


def _shift_words(x: npt.NDArray[np.uint64], s: int) -> npt.NDArray[np.uint64]:
    """Words of the bit stream moved by ``s`` (0 < s < 64): bit i of the result = bit i+s."""
    nxt = np.empty_like(x)
    nxt[:-1] = x[1:]
    nxt[-1:] = 0
    return (x >> np.uint64(s)) | (nxt << np.uint64(64 - s))


def _shift_back(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Bit i of the result = bit i-1 of the stream (0 for i = 0)."""
    prv = np.empty_like(x)
    prv[1:] = x[:-1]
    prv[:1] = 0
    return (x << np.uint64(1)) | (prv >> np.uint64(63))


def _popcount(x: npt.NDArray[np.uint64]) -> int:
    return int(np.bitwise_count(x).sum())


def _rice_lower_bound_bytes(mask: Mask, complement: bool, m: int) -> int:
    """A lower bound on the gap section's bytes, from popcounts over the packed mask.

    It counts the gaps 0, 1 and 2 exactly (bit patterns 11, 101, 1001 between consecutive
    members of the coded set) and bounds the rest by their total, which the first and last
    member fix: ``sum(g >> k) >= sum over known + max(n_r * (3 >> k), (S_r - n_r (2^k-1)) / 2^k)``.
    O(size/64) word operations, so ``auto`` rules the gap code out cheaply near density 1/2.
    """
    words = _packed_words(mask, complement)
    nzw = np.flatnonzero(words)
    first_w, last_w = int(nzw[0]), int(nzw[-1])
    first = 64 * first_w + (int(words[first_w]) & -int(words[first_w])).bit_length() - 1
    span = 64 * last_w + int(words[last_w]).bit_length()
    y1 = _shift_words(words, 1)
    y2 = _shift_words(words, 2)
    y3 = _shift_words(words, 3)
    c = [
        _popcount(words & y1),
        _popcount(words & ~y1 & y2),
        _popcount(words & ~y1 & ~y2 & y3),
    ]
    if first < 3:
        c[first] += 1  # the first gap counts the zeros before the first member
    total = span - m  # sum of all gaps
    n_r = m - sum(c)
    s_r = total - c[1] - 2 * c[2]
    best = None
    for k in range(63):
        known = c[1] * (1 >> k) + c[2] * (2 >> k)
        rest = max(n_r * (3 >> k), -(-(s_r - n_r * ((1 << k) - 1)) // (1 << k)))
        bits = m * (1 + k) + known + rest
        best = bits if best is None or bits < best else best
    assert best is not None
    return 2 + (best + 7) // 8


def _rice_sum(values: npt.NDArray[np.int64], k: int) -> int:
    """``sum(values >> k)``, exact."""
    return int(np.sum(values >> k))


def _best_rice(values: npt.NDArray[np.int64]) -> tuple[int, int]:
    """(k, bits): the smallest exactly optimal Rice parameter and the codes' cost
    ``n(1+k) + sum(v >> k)``.

    The cost is convex in ``k`` (each ``v >> k`` has non-increasing decrements), so a walk from
    the estimate ``log2(mean · ln 2)`` finds the minimum; walking down over ties makes the choice
    canonical (the same k from any start or implementation).
    """
    n = values.size
    if n == 0:
        return 0, 0
    mean = _rice_sum(values, 0) / n  # exact integer sum: the same start on every path
    k = max(0, int(np.floor(np.log2(mean * np.log(2.0)))) if mean > 1.0 else 0)
    k = min(k, 62)

    def cost(kk: int) -> int:
        return n * (1 + kk) + _rice_sum(values, kk)

    best = cost(k)
    up = cost(k + 1) if k < 62 else best
    if up < best:
        best, k = up, k + 1
        while k < 62:
            c = cost(k + 1)
            if c >= best:
                break
            best, k = c, k + 1
    else:
        while k > 0:
            c = cost(k - 1)
            if c > best:
                break
            best, k = c, k - 1
    return k, best


def _rice_body_bytes(n: int, k: int, bits: int) -> int:
    """Bytes of a Rice body: ``n`` remainders of ``k`` bits, then the unary codes, each padded."""
    return (n * k + 7) // 8 + (bits - n * k + 7) // 8


def _rice_body(values: npt.NDArray[np.int64], k: int, nbytes: int) -> bytes:
    """Remainders (k bits each, MSB first) then quotients in unary; ``nbytes`` as planned."""
    rem = _pack_fixed(values & ((1 << k) - 1), k) if k else b""
    body = rem + _pack_unary(values >> k)
    if len(body) != nbytes:  # pragma: no cover - internal consistency
        raise AssertionError(f"Rice body of {len(body)} bytes != planned {nbytes}")
    return body


def _rice_values(body: memoryview, n: int, k: int, size: int, what: str) -> npt.NDArray[np.int64]:
    """Decode ``n`` Rice codes filling ``body`` exactly; every value is checked ``<= size``."""
    if k > 62:
        raise WireFormatError(f"{what}: Rice parameter {k} out of range")
    rem_len = (n * k + 7) // 8
    if len(body) < rem_len:
        raise WireFormatError(f"{what}: truncated Rice remainders")
    if n > 8 * (len(body) - rem_len):  # each code ends with a one bit: no allocation for it
        raise WireFormatError(f"{what}: expected {n} unary codes in {len(body) - rem_len} bytes")
    rem = _unpack_fixed(body[:rem_len], n, k, what)
    q = _unpack_unary(body[rem_len:], n, what)
    if n and int(q.max()) > (size >> k):  # so that q << k cannot overflow
        raise WireFormatError(f"{what}: gap out of range")
    v = (q << k) | rem
    if n and int(v.max()) > size:
        raise WireFormatError(f"{what}: gap out of range")
    return v


@dataclass
class _GapPlan:
    complement: bool
    k: int
    nbytes: int  # exact size of the mask section
    gaps: npt.NDArray[np.int64]


def _plan_gap(mask: Mask, budget: int | None) -> _GapPlan | None:
    """Exact plan of the gap encoding, or None when a lower bound shows it costs >= ``budget``."""
    size, count = mask.size, mask.count
    complement = count * 2 > size
    m = size - count if complement else count
    if m and budget is not None:
        if 2 + (m + 7) // 8 >= budget:  # >= 1 bit per member
            return None
        # near density 1/2 a cheap bound usually rules the gap code out
        if m > budget and _rice_lower_bound_bytes(mask, complement, m) >= budget:
            return None
    _, idx = _coded_set(mask)
    gaps = np.diff(idx, prepend=np.int64(-1)) - 1
    k, bits = _best_rice(gaps)
    return _GapPlan(complement, k, 2 + _rice_body_bytes(m, k, bits), gaps)


def _encode_gap(plan: _GapPlan) -> bytes:
    body = _rice_body(plan.gaps, plan.k, plan.nbytes - 2)
    return bytes((1 if plan.complement else 0, plan.k)) + body


def _decode_gap(buf: memoryview, size: int, count: int) -> npt.NDArray[np.bool_]:
    if len(buf) < 2:
        raise WireFormatError("gap section: truncated")
    flags, k = buf[0], buf[1]
    if flags > 1:
        raise WireFormatError(f"gap section: unknown flags {flags:#x}")
    complement = flags == 1
    if complement != (count * 2 > size):
        raise WireFormatError("gap section: complement flag inconsistent with the count")
    m = size - count if complement else count
    if k > 62:
        raise WireFormatError(f"gap section: Rice parameter {k} out of range")
    rem_len = (m * k + 7) // 8
    if len(buf) < 2 + rem_len:
        raise WireFormatError("gap section: truncated Rice remainders")
    if m > 8 * (len(buf) - 2 - rem_len):  # one stop bit per code, checked before allocating
        raise WireFormatError(
            f"gap section: expected {m} unary codes in {len(buf) - 2 - rem_len} bytes"
        )
    if m:
        data, err = _wire_kernels.rice_decode(
            buf[2 : 2 + rem_len], buf[2 + rem_len :], m, k, size, complement
        )
        if err is not None:
            raise WireFormatError(err)
        if data is not None:
            return data
    gaps = _rice_values(buf[2:], m, k, size, "gap section")
    data = np.ones(size, dtype=bool) if complement else np.zeros(size, dtype=bool)
    if m:
        # every gap < size (so no int64 overflow below); then the indices, strictly increasing
        # by construction, must all lie in [0, size)
        if int(gaps.max()) >= size:
            raise WireFormatError("gap section: gap out of range")
        idx = np.cumsum(gaps + 1) - 1
        if int(idx.max()) >= size:
            raise WireFormatError("gap section: index out of range")
        data[idx] = not complement
    return data


# runs: per run of members j, z_j = non-members before it (since the previous run), o_j = its
# length; coded canonically as zc = (z_0, z_1 - 1, ...) and oc = o - 1, each a Rice body
_RUNS_HEAD: Final = 18  # kz, ko, u64 number of runs, u64 bytes of the z body
_RUNS = struct.Struct("<BBQQ")


def _mask_runs(data: npt.NDArray[np.bool_], count: int) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64]
]:
    """(z, o) of a mask, from the transitions of the 0/1 array."""
    d = np.diff(data.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    z = starts - np.concatenate((np.zeros(1, np.int64), ends[:-1]))
    return z.astype(np.int64, copy=False), (ends - starts).astype(np.int64, copy=False)


def _rice_bits_lower_bound(n: int, zeros: int, total: int) -> int:
    """A lower bound on the bits of a Rice code (any k) of ``n`` values, ``zeros`` of them 0,
    summing to ``total`` (a nonzero ``v`` has ``v >> k >= (v - 2^k + 1) / 2^k``; exact at k=0)."""
    if n == 0:
        return 0
    best = n + total  # k = 0
    for k in range(1, 63):
        if n * (1 + k) >= best:
            break
        rest = max(0, total - (n - zeros) * ((1 << k) - 1))
        best = min(best, n * (1 + k) + (-(-rest >> k)))
    return best


def _run_stats(mask: Mask) -> tuple[int, int, int, int]:
    """(runs of members, runs of length 1, single non-members between two runs, one past the
    last member): popcounts over the packed mask."""
    if mask.count == 0:
        return 0, 0, 0, 0
    w = _packed_words(mask)
    back, ahead = _shift_back(w), _shift_words(w, 1)
    last_w = int(np.flatnonzero(w)[-1])
    return (
        _popcount(w & ~back),  # run starts
        _popcount(w & ~back & ~ahead),
        _popcount(~w & back & ahead),
        64 * last_w + int(w[last_w]).bit_length(),
    )


def _runs_lower_bound_bytes(mask: Mask) -> int:
    """A lower bound on the runs section's bytes from the run statistics: the number of runs,
    the runs of length 1 (oc = 0) and the single non-members between two runs (zc = 0)."""
    count = mask.count
    if count == 0:
        return _RUNS_HEAD
    n, o_zeros, z_zeros, end = _run_stats(mask)
    z_zeros += int(mask.data[0])  # z_0 = 0
    lb_z = _rice_bits_lower_bound(n, z_zeros, end - count - (n - 1))
    lb_o = _rice_bits_lower_bound(n, o_zeros, count - n)
    return _RUNS_HEAD + (lb_z + 7) // 8 + (lb_o + 7) // 8


@dataclass
class _RunsPlan:
    zc: npt.NDArray[np.int64]
    oc: npt.NDArray[np.int64]
    kz: int
    ko: int
    z_body: int
    o_body: int

    @property
    def nbytes(self) -> int:
        return _RUNS_HEAD + self.z_body + self.o_body


def _plan_runs(mask: Mask) -> _RunsPlan:
    z, o = _mask_runs(mask.data, mask.count)
    zc = z  # a fresh array: canonicalised in place
    zc[1:] -= 1
    oc = o
    oc -= 1
    kz, bz = _best_rice(zc)
    ko, bo = _best_rice(oc)
    n = zc.size
    return _RunsPlan(zc, oc, kz, ko, _rice_body_bytes(n, kz, bz), _rice_body_bytes(n, ko, bo))


def _encode_runs(plan: _RunsPlan) -> bytes:
    return b"".join((
        _RUNS.pack(plan.kz, plan.ko, plan.zc.size, plan.z_body),
        _rice_body(plan.zc, plan.kz, plan.z_body),
        _rice_body(plan.oc, plan.ko, plan.o_body),
    ))


def _decode_runs(buf: memoryview, size: int, count: int) -> npt.NDArray[np.bool_]:
    if len(buf) < _RUNS_HEAD:
        raise WireFormatError("runs section: truncated")
    kz, ko, n, zlen = _RUNS.unpack_from(buf)
    if n > min(count, size - count + 1) or (n == 0) != (count == 0):
        raise WireFormatError(f"runs section: {n} runs impossible for count {count} of {size}")
    if zlen > len(buf) - _RUNS_HEAD:
        raise WireFormatError("runs section: truncated")
    zc = _rice_values(buf[_RUNS_HEAD : _RUNS_HEAD + zlen], n, kz, size, "runs section")
    oc = _rice_values(buf[_RUNS_HEAD + zlen :], n, ko, size, "runs section")
    # each value <= size: the float sums bound the exact int64 sums below against overflow
    if float(zc.sum(dtype=np.float64)) + float(oc.sum(dtype=np.float64)) + 2 * n > 2 * size + 2:
        raise WireFormatError("runs section: runs exceed the size")
    z, o = zc, oc + 1
    z[1:] += 1
    if int(o.sum()) != count:
        raise WireFormatError(f"runs section: runs hold {int(o.sum())} members, header {count}")
    tail = size - int(z.sum()) - count
    if tail < 0:
        raise WireFormatError("runs section: runs exceed the size")
    lengths = np.empty(2 * n + 1, dtype=np.int64)
    lengths[0 : 2 * n : 2] = z
    lengths[1 : 2 * n : 2] = o
    lengths[-1] = tail
    flags = np.zeros(2 * n + 1, dtype=bool)
    flags[1::2] = True
    return np.repeat(flags, lengths)
