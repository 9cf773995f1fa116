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
from psfed_robust._wire_coding import (
    _RUNS_HEAD,
    WireFormatError,
    _decode_gap,
    _decode_runs,
    _encode_gap,
    _encode_runs,
    _plan_gap,
    _plan_runs,
    _runs_lower_bound_bytes,
)
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
