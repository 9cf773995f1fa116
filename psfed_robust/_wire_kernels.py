"""Compiled C kernels of the wire codec's gap (Golomb–Rice) and runs encodings, with the same
output bytes and the same accept/reject decisions as the numpy code in :mod:`psfed_robust.wire`,
and :func:`join`, the payload concatenation on huge pages.

Why: at d = 1e7 the numpy gap path makes about a dozen int64 passes over the coded indices
(≈ 40 ms for 1e6 members); one C pass each for the run scan, the cost, the packing and the
decoding makes it a few ms. The C source is ``psfed_robust/csrc/wire_kernels.c``, built
with the system C compiler on first use (:class:`~psfed_robust._cpp.CLibrary`, ≈ 0.3 s,
cached); without a compiler, or with ``PSFED_NO_CPP_KERNEL=1``, every function here returns
``None`` and the codec keeps its numpy path.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from psfed_robust._cpp import CLibrary, source

__all__ = [
    "JOIN_MIN_BYTES", "available", "gaps", "join", "rice_cost", "rice_decode", "rice_pack",
    "run_stats", "runs",
]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_LIB = CLibrary(
    "psfed_wire",
    source("wire_kernels.c"),
    {
        "psw_join": (None, (_P, _I64, _P, _P, _I64)),
        "psw_gaps": (_I64, (_P, _I64, ctypes.c_int, _P, _I64)),
        "psw_runs": (_I64, (_P, _I64, _P, _P, _I64)),
        "psw_run_stats": (None, (_P, _I64, _P)),
        "psw_rice_sum": (_I64, (_P, _I64, ctypes.c_int)),
        "psw_rice_pack": (_I64, (_P, _I64, ctypes.c_int, _P, _I64)),
        "psw_rice_decode": (
            _I64,
            (_P, _I64, _P, _I64, _I64, ctypes.c_int, _I64, ctypes.c_uint8, _P, _P),
        ),
    },
    cflags=("-O2", "-std=c99"),
)


def _lib() -> Any:
    return _LIB.get() if sys.byteorder == "little" else None


def available() -> bool:
    """Whether the compiled kernels are in use (builds them on the first call)."""
    return _lib() is not None


def _ptr(a: npt.NDArray[Any]) -> int:
    return int(a.ctypes.data)


#: Below this total, ``b"".join`` is as fast (small payloads come from the heap, not fresh mmaps).
JOIN_MIN_BYTES = 1 << 22

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def join(parts: Sequence[Any]) -> bytes:
    """``b"".join(parts)`` (bytes-like parts), the same bytes, with one huge-page-backed copy
    for large totals: a new ``bytes`` of the total size (``PyBytes_FromStringAndSize(NULL, n)``:
    uninitialised, filled here before anyone else holds it) filled by :c:func:`psw_join` with
    the GIL released. ``b"".join`` without the kernel or below :data:`JOIN_MIN_BYTES`."""
    total = sum(memoryview(p).nbytes for p in parts)
    lib = _lib() if total >= JOIN_MIN_BYTES else None
    if lib is None:
        return b"".join(parts)
    views = [np.frombuffer(p, dtype=np.uint8) for p in parts]
    out: bytes = _new_bytes(None, total)
    ptrs = np.array([_ptr(v) if v.size else 0 for v in views], dtype=np.uintp)
    lens = np.array([v.size for v in views], dtype=np.int64)
    lib.psw_join(_bytes_address(out), total, _ptr(ptrs), _ptr(lens), len(views))
    return out


def gaps(data: npt.NDArray[np.bool_], complement: bool, m: int) -> npt.NDArray[np.int64] | None:
    """Gaps of the coded set (members ``True``, or ``False`` when ``complement``); ``m`` members."""
    lib = _lib()
    if lib is None:
        return None
    data = np.ascontiguousarray(data)
    out = np.empty(m, dtype=np.int64)
    n = lib.psw_gaps(_ptr(data), data.size, int(complement), _ptr(out), m)
    if n != m:  # pragma: no cover - the caller's count is the mask's own
        raise AssertionError(f"gap scan found {n} members, expected {m}")
    return out


def runs(
    data: npt.NDArray[np.bool_], cap: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None:
    """(z, o): for each run of ``True``, the ``False`` before it (since the previous run) and its
    length; ``cap`` bounds the number of runs (``min(count, size - count + 1)``)."""
    lib = _lib()
    if lib is None:
        return None
    data = np.ascontiguousarray(data)
    z = np.empty(cap, dtype=np.int64)
    o = np.empty(cap, dtype=np.int64)
    n = lib.psw_runs(_ptr(data), data.size, _ptr(z), _ptr(o), cap)
    if n < 0:  # pragma: no cover - the caller's bound is exact
        raise AssertionError(f"more than {cap} runs")
    return z[:n], o[:n]


def run_stats(data: npt.NDArray[np.bool_]) -> tuple[int, int, int, int] | None:
    """(runs of ``True``, runs of length 1, single ``False`` between two ``True``, one past the
    last ``True``) in one pass."""
    lib = _lib()
    if lib is None:
        return None
    data = np.ascontiguousarray(data)
    out = np.zeros(4, dtype=np.int64)
    lib.psw_run_stats(_ptr(data), data.size, _ptr(out))
    return int(out[0]), int(out[1]), int(out[2]), int(out[3])


def rice_cost(g: npt.NDArray[np.int64], k: int) -> int | None:
    """``sum(g >> k)`` (the unary bits without the stop bits), or ``None`` without the kernel."""
    lib = _lib()
    if lib is None:
        return None
    return int(lib.psw_rice_sum(_ptr(g), g.size, k))


def rice_pack(g: npt.NDArray[np.int64], k: int, nbytes: int) -> bytes | None:
    """The remainders then the unary quotients, exactly ``nbytes`` bytes (planned by the caller)."""
    lib = _lib()
    if lib is None:
        return None
    out = np.empty(nbytes, dtype=np.uint8)
    n = lib.psw_rice_pack(_ptr(g), g.size, k, _ptr(out), nbytes)
    if n != nbytes:  # pragma: no cover - internal consistency
        raise AssertionError(f"Rice body of {n} bytes != planned {nbytes}")
    return out.tobytes()


_ERRORS = {
    1: "gap section: non-zero padding after the Rice remainders",
    3: "gap section: unary stream length does not match its codes",
    4: "gap section: gap out of range",
    5: "gap section: index out of range",
}


def rice_decode(
    rem: Any, unary: Any, m: int, k: int, size: int, complement: bool
) -> tuple[npt.NDArray[np.bool_] | None, str | None]:
    """(mask array, None), or (None, error message) for a bad section; ``(None, None)`` without
    the kernel. ``rem`` must hold exactly ``ceil(m*k/8)`` bytes and ``m >= 1``."""
    lib = _lib()
    if lib is None:
        return None, None
    r = np.frombuffer(rem, dtype=np.uint8)
    u = np.frombuffer(unary, dtype=np.uint8)
    data = np.ones(size, dtype=bool) if complement else np.zeros(size, dtype=bool)
    found = ctypes.c_int64(0)
    rc = lib.psw_rice_decode(
        _ptr(r) if r.size else None, r.size, _ptr(u) if u.size else None, u.size, m, k, size,
        0 if complement else 1, _ptr(data), ctypes.addressof(found),
    )
    if rc == 0:
        return data, None
    if rc == 2:
        return None, f"gap section: expected {m} unary codes, found {found.value}"
    if rc == 6:
        return None, f"gap section: expected {m} unary codes, found more"
    return None, _ERRORS.get(int(rc), f"gap section: invalid (code {rc})")
