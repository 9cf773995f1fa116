"""Compact wire codec for a partial update: (mask, values) as one ``bytes`` payload.

Layout (all integers little-endian; full description and byte costs in ``docs/wire.md``)::

    offset  size  field
    0       4     magic b"PSFW"
    4       1     version (1)
    5       1     mask encoding id (0 dense, 1 seeded, 2 bitmap, 3 gap, 4 runs)
    6       1     value dtype id (0 none = mask only, 1 float16, 2 float32, 3 float64, 4 bfloat16)
    7       1     reserved (0)
    8       8     size   (u64: length of the flat vector)
    16      8     count  (u64: number of shared coordinates = number of values)
    24      4     CRC-32 (zlib) of bytes [0, 24) followed by every byte after the header
    28      ...   mask section (encoding-specific, may be empty)
    ...     ...   values: ``count`` little-endian floats of the dtype, ascending index order

Mask encodings:

- ``dense``: no mask section; only valid for a full mask (``count == size``).
- ``seeded``: the mask's :class:`~psfed_robust.core.mask.SeedSpec` (kind byte + the u64 fields that
  kind uses); the receiver regenerates the mask with ``SeedSpec.materialize()``.
- ``bitmap``: ``np.packbits(mask, bitorder="little")`` — ``ceil(size/8)`` bytes, zero padding.
- ``gap``: gap-coded sorted indices of the *smaller* of the mask and its complement,
  Golomb–Rice with the exactly optimal parameter ``k`` (remainders packed at ``k`` bits each, then
  the quotients in unary): sparse or very dense scattered masks.
- ``runs``: the mask as runs (per run of members: the non-members before it, its length), each
  sequence Golomb–Rice coded with its own optimal ``k``: a few bytes for clustered masks such as
  whole layers (structured selectors), where a bitmap costs ``size/8``.

Everything is vectorised numpy (no Python loop over indices); two steps use small compiled C
kernels (:mod:`psfed_robust._wire_kernels`: the gap decoder, and the concatenation of payloads
above 32 MiB on huge pages) when a C compiler is available, with the same bytes and the same
verdicts, because they earn at least 3x there (``benchmarks/wire.py --kernels-only``).

``encoding="auto"`` picks the cheapest exact encoding (ties: dense, seeded, bitmap, gap, runs);
a candidate is skipped only when a cheap lower bound shows it cannot be cheaper.

Declared sizes are capped before anything is allocated: ``MAX_SIZE`` always, and without
``expected_size`` a size the payload's length cannot plausibly carry (:data:`UNCHECKED_MAX_SIZE`
and friends); pass ``expected_size`` (the receiver's model size) for larger models.

Decoding never yields a wrong mask: the CRC covers the header and the body, and every structural
property is checked as well (lengths exact, no trailing bytes, padding bits zero, count equals the
popcount, indices in range and strictly increasing). Any failure raises :class:`WireFormatError`.

Values are carried bit-exactly (NaN/Inf included: rejecting non-finite values is the aggregator's
job). ``decode_update`` returns float16/32/64 values as a writable numpy array and bfloat16 values
as a ``torch.bfloat16`` tensor (numpy has no bfloat16).
"""

from __future__ import annotations

import functools
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from psfed_robust import _wire_kernels
from psfed_robust.core.mask import Mask, SeedSpec

__all__ = [
    "CRC32_BACKEND",
    "ENCODINGS",
    "HEADER_SIZE",
    "EncodedUpdate",
    "WireFormatError",
    "crc32",
    "crc32_combine",
    "decode_mask",
    "decode_update",
    "encode_mask",
    "encode_update",
    "encode_update_parts",
    "encoded_size",
    "encoding_costs",
]

MAGIC: Final = b"PSFW"
VERSION: Final = 1
HEADER_SIZE: Final = 28
#: Largest flat-vector size a payload may declare (the format's limit; with ``expected_size``).
MAX_SIZE: Final = 1 << 40
#: Without ``expected_size`` a decoder trusts a declared size only up to
#: ``min(UNCHECKED_MAX_SIZE, max(UNCHECKED_FREE_SIZE, UNCHECKED_SIZE_PER_BYTE * len(payload)))``:
#: it allocates about one byte per coordinate (the mask), so a few bytes must not make it
#: allocate gigabytes (a 29-byte seeded payload declaring 2^40 asked for 1 TiB). Real payloads
#: stay far below: a seeded or gap-coded update at f = 0.001 declares < 700 coordinates per byte.
UNCHECKED_MAX_SIZE: Final = 1 << 32
UNCHECKED_FREE_SIZE: Final = 1 << 24
UNCHECKED_SIZE_PER_BYTE: Final = 1 << 10

_HEADER = struct.Struct("<4sBBBBQQI")
_PREFIX = struct.Struct("<4sBBBBQQ")  # the CRC-covered part of the header

ENCODINGS: Final = ("dense", "seeded", "bitmap", "gap", "runs")
_ENC_ID: Final = {name: i for i, name in enumerate(ENCODINGS)}

# dtype id -> (name, numpy little-endian dtype, item size)
_DTYPES: Final[dict[int, tuple[str, str, int]]] = {
    0: ("none", "", 0),
    1: ("float16", "<f2", 2),
    2: ("float32", "<f4", 4),
    3: ("float64", "<f8", 8),
    4: ("bfloat16", "<u2", 2),
}
_DT_NONE, _DT_BF16 = 0, 4
_NP_DTYPE_ID: Final = {np.dtype("<f2"): 1, np.dtype("<f4"): 2, np.dtype("<f8"): 3}

_SEED_KIND_ID: Final = {"random": 0, "round_robin": 1, "overlap": 2, "all": 3, "none": 4}
_SEED_KIND: Final = {v: k for k, v in _SEED_KIND_ID.items()}
_SEED_FIELDS: Final = {
    "random": ("seed",),
    "round_robin": ("offset",),
    "overlap": ("seed", "aux_seed", "aux_count"),
    "all": (),
    "none": (),
}

_U64 = struct.Struct("<Q")


class WireFormatError(ValueError):
    """A payload is corrupt, truncated or otherwise not a valid psfed-robust wire message."""


@dataclass(frozen=True, slots=True)
class EncodedUpdate:
    """An encoded payload and its byte accounting (``value + mask + framing == len(payload)``).

    ``framing_bytes`` is the fixed header; ``mask_bytes`` the whole mask section (including the
    few bytes of its own parameters, e.g. the Rice parameter); ``value_bytes`` the raw values.
    """

    payload: bytes
    encoding: str
    value_bytes: int
    mask_bytes: int
    framing_bytes: int

    @property
    def total_bytes(self) -> int:
        return len(self.payload)


# ====================================================================== CRC helpers
_crc32_fast: Callable[[Any, int], int] | None
try:  # ISA-L's CRC-32 (PCLMUL/AVX): the same zlib CRC-32, about 6x faster on 4 MB payloads
    from isal.isal_zlib import crc32 as _crc32_fast
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _crc32_fast = None

#: which implementation computes the CRC-32 ("isal" or "zlib"); both give identical values
CRC32_BACKEND: Final = "isal" if _crc32_fast is not None else "zlib"


def crc32(data: Any, value: int = 0) -> int:
    """zlib's CRC-32 of ``data`` continuing from ``value`` (ISA-L when installed, else zlib)."""
    if _crc32_fast is not None:
        return int(_crc32_fast(data, value))
    return zlib.crc32(data, value)


_CRC_POLY: Final = 0xEDB88320
#: values at least this long get their CRC computed in a helper thread (zlib releases the GIL)
_PARALLEL_CRC_BYTES: Final = 1 << 24  # below this a thread costs more than it overlaps


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected bit order, as in zlib)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^n) mod p
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=64)
def _x8n(len2: int) -> int:
    """x^(8·len2) mod p: the operator that shifts a CRC over ``len2`` zero bytes (cached: a
    model's payloads repeat the same few lengths)."""
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's algorithm)."""
    return _multmodp(_x8n(len2), crc1) ^ crc2


class _CrcThread:
    """``crc32(buf)`` in a helper thread for large buffers, inline for small ones."""

    def __init__(self, buf: Any) -> None:
        self._value: int | None = None
        self._thread: threading.Thread | None = None
        if len(buf) >= _PARALLEL_CRC_BYTES:
            self._thread = threading.Thread(target=self._run, args=(buf,), daemon=True)
            self._thread.start()
        else:
            self._value = crc32(buf)

    def _run(self, buf: Any) -> None:
        self._value = crc32(buf)

    def result(self) -> int:
        if self._thread is not None:
            self._thread.join()
        assert self._value is not None
        return self._value


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


# ====================================================================== seeded
def _encode_seed(spec: SeedSpec) -> bytes:
    out = bytearray((_SEED_KIND_ID[spec.kind],))
    for name in _SEED_FIELDS[spec.kind]:
        v = int(getattr(spec, name))
        if name == "offset" and v >= 1 << 64:
            v %= max(spec.size, 1)  # the mask depends on offset mod size only
        out += _U64.pack(v)
    return bytes(out)


def _decode_seed(buf: memoryview, size: int, count: int) -> Mask:
    if len(buf) < 1 or buf[0] not in _SEED_KIND:
        raise WireFormatError("seeded section: unknown seed kind")
    kind = _SEED_KIND[buf[0]]
    names = _SEED_FIELDS[kind]
    if len(buf) != 1 + 8 * len(names):
        raise WireFormatError(f"seeded section: {len(buf)} bytes, expected {1 + 8 * len(names)}")
    fields = {n: _U64.unpack_from(buf, 1 + 8 * i)[0] for i, n in enumerate(names)}
    try:
        spec = SeedSpec(kind, size, count, **fields)
    except ValueError as exc:
        raise WireFormatError(f"seeded section: invalid seed spec ({exc})") from None
    mask = spec.materialize()
    if mask.size != size or mask.count != count:
        raise WireFormatError("seeded section: regenerated mask does not match size/count")
    return mask


# ====================================================================== values
def _values_to_array(values: Any) -> tuple[int, npt.NDArray[Any]]:
    """(dtype id, 1-D little-endian contiguous array viewing the raw value bytes)."""
    if values is None:
        return _DT_NONE, np.zeros(0, dtype=np.uint8)
    if type(values).__module__.startswith("torch"):
        import torch

        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a numpy array or torch tensor, got {type(values)}")
        t = values.detach()
        if t.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            return _DT_BF16, t.view(torch.int16).numpy().view("<u2")
        if t.dtype not in (torch.float16, torch.float32, torch.float64):
            raise TypeError(f"values dtype must be float16/32/64 or bfloat16, got {t.dtype}")
        arr = t.numpy()
    elif isinstance(values, np.ndarray):
        arr = values
    else:
        raise TypeError(
            f"values must be a numpy array or torch tensor, got {type(values).__name__}"
        )
    if arr.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"values dtype must be float16/32/64 (or torch bfloat16), got {arr.dtype}")
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return _NP_DTYPE_ID[le.dtype], le


# ====================================================================== encode
def _check_mask(mask: Mask) -> None:
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
    if mask.size > MAX_SIZE:
        raise ValueError(f"mask size {mask.size} exceeds the wire limit {MAX_SIZE}")


def _resolve_spec(mask: Mask, seed_spec: SeedSpec | None) -> SeedSpec | None:
    if seed_spec is None:
        return mask.seed_spec
    if not isinstance(seed_spec, SeedSpec):
        raise TypeError(f"seed_spec must be a SeedSpec, got {type(seed_spec).__name__}")
    if seed_spec is not mask.seed_spec and seed_spec.materialize() != mask:
        raise ValueError("seed_spec does not regenerate this mask")
    return seed_spec


def _mask_section(mask: Mask, encoding: str, spec: SeedSpec | None) -> tuple[str, bytes]:
    size, count = mask.size, mask.count
    if encoding == "dense":
        if count != size:
            raise ValueError(f"encoding 'dense' needs a full mask, got count {count} of {size}")
        return "dense", b""
    if encoding == "seeded":
        if spec is None:
            raise ValueError("encoding 'seeded' needs a mask that carries a SeedSpec")
        return "seeded", _encode_seed(spec)
    if encoding == "bitmap":
        return "bitmap", np.packbits(mask.data, bitorder="little").tobytes()
    if encoding == "gap":
        plan = _plan_gap(mask, None)
        assert plan is not None
        return "gap", _encode_gap(plan)
    if encoding == "runs":
        return "runs", _encode_runs(_plan_runs(mask))
    if encoding != "auto":
        raise ValueError(f"unknown encoding {encoding!r}; allowed: 'auto', {', '.join(ENCODINGS)}")
    # auto: the cheapest exact encoding (ties: dense, seeded, bitmap, gap, runs); each
    # candidate's exact cost, unless a lower bound already shows it is not cheaper
    if count == size:
        return "dense", b""
    best: tuple[int, str] = ((size + 7) // 8, "bitmap")
    if spec is not None:
        seeded = _encode_seed(spec)
        if len(seeded) <= best[0]:
            best = (len(seeded), "seeded")
    plan = _plan_gap(mask, best[0])
    if plan is not None and plan.nbytes < best[0]:
        best = (plan.nbytes, "gap")
    # a run costs >= 2 bits: runs >= 18 + 2 bytes unless the mask is empty
    if best[0] > _RUNS_HEAD + 2 and _runs_lower_bound_bytes(mask) < best[0]:
        runs = _plan_runs(mask)
        if runs.nbytes < best[0]:
            return "runs", _encode_runs(runs)
    if best[1] == "gap":
        assert plan is not None
        return "gap", _encode_gap(plan)
    if best[1] == "seeded":
        assert spec is not None
        return "seeded", _encode_seed(spec)
    return "bitmap", np.packbits(mask.data, bitorder="little").tobytes()


def _header(
    enc: str, dtype_id: int, size: int, count: int, msec: bytes, vals: Any, vcrc: int
) -> bytes:
    """The 28-byte header (CRC over the prefix, the mask section and the values)."""
    prefix = _PREFIX.pack(MAGIC, VERSION, _ENC_ID[enc], dtype_id, 0, size, count)
    crc = crc32_combine(crc32(msec, crc32(prefix)), vcrc, len(vals))
    return prefix + struct.pack("<I", crc)


def _assemble(
    enc: str, dtype_id: int, size: int, count: int, msec: bytes, vals: Any, vcrc: int
) -> bytes:
    return b"".join((_header(enc, dtype_id, size, count, msec, vals, vcrc), msec, vals))


def encode_update(
    mask: Mask,
    values: Any,
    *,
    encoding: str = "auto",
    seed_spec: SeedSpec | None = None,
) -> EncodedUpdate:
    """Encode ``values`` (one per shared coordinate, ascending index order) with ``mask``.

    ``values``: a 1-D numpy array (float16/32/64) or torch tensor (also bfloat16), of length
    ``mask.count``. ``encoding``: ``"auto"`` (cheapest exact) or one of :data:`ENCODINGS`.
    ``seed_spec`` overrides ``mask.seed_spec`` (it is checked to regenerate ``mask``).
    """
    parts, enc = encode_update_parts(mask, values, encoding=encoding, seed_spec=seed_spec)
    payload = _wire_kernels.join(parts)
    return EncodedUpdate(payload, enc, len(parts[2]), len(parts[1]), HEADER_SIZE)


def encode_update_parts(
    mask: Mask,
    values: Any,
    *,
    encoding: str = "auto",
    seed_spec: SeedSpec | None = None,
) -> tuple[tuple[bytes, bytes, Any], str]:
    """:func:`encode_update` without the final concatenation: ``((header, mask section,
    values), encoding)``, where ``b"".join(parts) == encode_update(...).payload`` and the values
    part is a zero-copy ``memoryview`` of ``values`` (keep ``values`` unchanged until the parts
    are joined). For callers that frame the payload further (e.g. inside an npy Array) with one
    copy instead of two.
    """
    _check_mask(mask)
    dtype_id, arr = _values_to_array(values)
    if dtype_id == _DT_NONE or arr.shape[0] != mask.count:
        n = 0 if dtype_id == _DT_NONE else arr.shape[0]
        raise ValueError(f"values has {n} entries but the mask selects {mask.count}")
    spec = _resolve_spec(mask, seed_spec)
    vals = arr.data.cast("B") if arr.size else b""
    vcrc = _CrcThread(vals)  # overlaps with the mask encoding below
    enc, msec = _mask_section(mask, encoding, spec)
    header = _header(enc, dtype_id, mask.size, mask.count, msec, vals, vcrc.result())
    return (header, msec, vals), enc


def encode_mask(
    mask: Mask, *, encoding: str = "auto", seed_spec: SeedSpec | None = None
) -> EncodedUpdate:
    """Encode a mask alone (dtype id 0, no values); decode with :func:`decode_mask`."""
    _check_mask(mask)
    spec = _resolve_spec(mask, seed_spec)
    enc, msec = _mask_section(mask, encoding, spec)
    payload = _assemble(enc, _DT_NONE, mask.size, mask.count, msec, b"", 0)
    return EncodedUpdate(payload, enc, 0, len(msec), HEADER_SIZE)


def encoded_size(mask: Mask, itemsize: int = 4, *, encoding: str = "auto") -> int:
    """Bytes of the payload ``encode_update`` would produce for values of ``itemsize`` bytes."""
    _check_mask(mask)
    _, msec = _mask_section(mask, encoding, mask.seed_spec)
    return HEADER_SIZE + len(msec) + itemsize * mask.count


# ====================================================================== decode
def _parse(
    payload: Any, expected_size: int | None, values: bool, copy: bool = True
) -> tuple[str, int, int, int, memoryview, Any]:
    """Validate the framing and the CRC.

    Returns (encoding, dtype id, size, count, mask section, values or None). The value bytes
    are copied (when ``values`` and ``copy``; a large copy overlaps with a helper thread
    computing their CRC) or, with ``copy=False``, viewed in place (read-only when the payload
    is); either way they are handed out only once the CRC over the whole payload has matched.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    buf = memoryview(payload).cast("B") if isinstance(payload, memoryview) else memoryview(payload)
    if len(buf) < HEADER_SIZE:
        raise WireFormatError(f"payload too short: {len(buf)} bytes < header {HEADER_SIZE}")
    magic, version, enc_id, dtype_id, reserved, size, count, crc = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {bytes(magic)!r} (not a psfed-robust payload)")
    if version != VERSION:
        raise WireFormatError(f"unsupported wire version {version} (this codec reads {VERSION})")
    if enc_id >= len(ENCODINGS) or dtype_id not in _DTYPES or reserved != 0:
        raise WireFormatError(
            f"bad header: encoding id {enc_id}, dtype id {dtype_id}, reserved {reserved}"
        )
    if size > MAX_SIZE or count > size:
        raise WireFormatError(f"bad header: size {size}, count {count}")
    if expected_size is not None and size != expected_size:
        raise WireFormatError(f"payload is for size {size}, expected {expected_size}")
    if expected_size is None:
        limit = min(UNCHECKED_MAX_SIZE,
                    max(UNCHECKED_FREE_SIZE, UNCHECKED_SIZE_PER_BYTE * len(buf)))
        if size > limit:
            raise WireFormatError(
                f"a {len(buf)}-byte payload declares size {size}, above {limit} trusted "
                "without expected_size (pass the model size as expected_size to decode it)"
            )
    body = buf[HEADER_SIZE:]
    vlen = count * _DTYPES[dtype_id][2]
    mlen = len(body) - vlen
    if mlen < 0:
        raise WireFormatError(f"payload truncated: {len(body)} body bytes < {vlen} value bytes")
    vbuf = body[mlen:]
    vcrc = _CrcThread(vbuf)
    calc = crc32(body[:mlen], crc32(buf[:24]))
    vals = None
    if values and dtype_id != _DT_NONE:
        vals = np.frombuffer(vbuf, dtype=_DTYPES[dtype_id][1])
        if copy:
            vals = vals.copy()
    calc = crc32_combine(calc, vcrc.result(), vlen)
    if calc != crc:
        raise WireFormatError(
            f"CRC mismatch: payload is corrupt (stored {crc:#010x}, computed {calc:#010x})"
        )
    return ENCODINGS[enc_id], dtype_id, size, count, body[:mlen], vals


def _decode_mask_section(enc: str, msec: memoryview, size: int, count: int) -> Mask:
    if enc == "dense":
        if len(msec):
            raise WireFormatError(f"dense payload has {len(msec)} unexpected mask bytes")
        if count != size:
            raise WireFormatError(f"dense payload with count {count} != size {size}")
        return Mask.all_true(size)
    if enc == "seeded":
        return _decode_seed(msec, size, count)
    if enc == "bitmap":
        if len(msec) != (size + 7) // 8:
            raise WireFormatError(f"bitmap of {len(msec)} bytes, expected {(size + 7) // 8}")
        raw = np.frombuffer(msec, dtype=np.uint8)
        if size % 8 and raw[-1] >> (size % 8):
            raise WireFormatError("bitmap: non-zero padding bits")
        data = np.unpackbits(raw, count=size, bitorder="little").view(bool)
    elif enc == "gap":
        data = _decode_gap(msec, size, count)
    else:
        data = _decode_runs(msec, size, count)
    mask = Mask._trusted(data)
    if mask.count != count or mask.size != size:
        raise WireFormatError(f"mask has {mask.count} of {mask.size} set, header says {count}")
    return mask


def decode_update(
    payload: bytes,
    size: int | None = None,
    *,
    expected_size: int | None = None,
    copy: bool = True,
) -> tuple[Mask, Any]:
    """Decode a payload of :func:`encode_update` into ``(mask, values)``.

    ``expected_size`` (or its alias ``size``, the contract's name) makes a payload for another
    model size fail before anything is allocated. Values come back as a writable numpy array
    (float16/32/64, native byte order) or, for bfloat16, a ``torch.bfloat16`` tensor.
    ``copy=False`` returns the float values as a zero-copy view of ``payload`` instead (read-only
    for ``bytes``; a copy is still made where the byte order must change).
    Raises :class:`WireFormatError` for any corrupt, truncated or inconsistent payload.
    """
    want = _merge_size(size, expected_size)
    enc, dtype_id, n, count, msec, vals = _parse(payload, want, values=True, copy=copy)
    if dtype_id == _DT_NONE:
        raise WireFormatError("payload carries a mask only (use decode_mask)")
    mask = _decode_mask_section(enc, msec, n, count)
    if dtype_id == _DT_BF16:
        import torch

        if not copy:
            vals = vals.copy()  # torch wants a writable buffer
        return mask, torch.from_numpy(vals.view(np.int16)).view(torch.bfloat16)
    return mask, vals.astype(vals.dtype.newbyteorder("="), copy=False)


def decode_mask(payload: bytes, *, expected_size: int | None = None) -> Mask:
    """Decode the mask of a payload (mask-only from :func:`encode_mask`, or a full update)."""
    enc, _, n, count, msec, _ = _parse(payload, expected_size, values=False)
    return _decode_mask_section(enc, msec, n, count)


def _merge_size(size: int | None, expected_size: int | None) -> int | None:
    if size is not None and expected_size is not None and size != expected_size:
        raise ValueError(f"size={size} and expected_size={expected_size} disagree")
    want = expected_size if expected_size is not None else size
    if want is not None and (isinstance(want, bool) or not isinstance(want, int | np.integer)):
        raise TypeError(f"expected_size must be an int, got {type(want).__name__}")
    return None if want is None else int(want)


def encoding_costs(mask: Mask, itemsize: int = 4) -> dict[str, int]:
    """Exact payload bytes of every applicable forced encoding (for benchmarks and tests)."""
    out: dict[str, int] = {}
    names: Sequence[str] = ENCODINGS
    for name in names:
        try:
            _, msec = _mask_section(mask, name, mask.seed_spec)
        except ValueError:
            continue
        out[name] = HEADER_SIZE + len(msec) + itemsize * mask.count
    return out
