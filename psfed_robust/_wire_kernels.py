"""Compiled C kernels of the wire codec (``psfed_robust/csrc/wire_kernels.c``), each with the
same output bytes and the same accept/reject decisions as its numpy reference in
:mod:`psfed_robust.wire`, kept only where ``benchmarks/wire.py`` (``--kernels-only``) shows at
least 3x over that reference at d = 1e7:

- :func:`rice_decode`, the gap section decoder (one pass with 64-bit bit windows instead of a
  dozen int64 passes; 3.8-5.4x at f = 0.01-0.9; 2.8-3.0x when it read byte by byte);
- :func:`join`, the payload concatenation on huge pages, from :data:`JOIN_MIN_BYTES` (a fresh
  ``b"".join`` above glibc's mmap threshold faults in 4 KiB pages; 3.5x at 34 MiB).

The gap scan, the Rice cost sum, the Rice packer, the run scan and the run statistics had
kernels too; numpy was as fast (0.4-0.9x) or within 3x (the packer 1.5-3.1x, the run scan
2.7-3.2x), so they were removed. Built with
the system C compiler on first use (:class:`~psfed_robust._cpp.CLibrary`, ≈ 0.3 s, cached);
without a compiler, or with ``PSFED_NO_CPP_KERNEL=1``, every function here returns ``None``
(``join``: ``b"".join``) and the codec keeps its numpy path.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from psfed_robust._cpp import CLibrary, source

__all__ = ["JOIN_MIN_BYTES", "available", "join", "rice_decode"]

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_LIB = CLibrary(
    "psfed_wire",
    source("wire_kernels.c"),
    {
        "psw_join": (None, (_P, _I64, _P, _P, _I64)),
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


#: Below this total ``b"".join`` is as fast: glibc serves allocations under its dynamic mmap
#: threshold (at most 32 MiB) from recycled heap memory, not fresh page-faulting mmaps.
JOIN_MIN_BYTES = 1 << 25

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
