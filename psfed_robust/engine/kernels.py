"""Optional compiled CPU accelerators of the batched engine (``csrc/engine_kernels.cpp``).

Torch (and numpy for the CPU mask sampler) is the reference; each accelerator sits behind one
engine function and matches it within a stated tolerance:

* :func:`floyd_pcg` behind :func:`psfed_robust.engine.masks.floyd_indices` (CPU): the numpy
  sampler's draws and picks, equal (integers);
* :func:`lms_rff_step` behind :meth:`psfed_robust.engine.loop.LocalStep.step` for float32 RFF
  tasks: within float32 rounding of the torch step (a different summation order and a polynomial
  cosine; ``tests/test_engine_kernels.py`` checks 2e-5 relative per step), NaN/Inf as torch.

``benchmarks/engine.py`` times each against its reference (both must earn at least 3x to stay).
The library is plain C-style C++ loaded with :mod:`ctypes` (no torch headers: about a second to
build, cached by source, compiler and CPU in :func:`psfed_robust._cpp.cache_dir`); any build
failure leaves it unavailable and the engine runs the reference paths.
``PSFED_NO_CPP_KERNEL=1`` disables it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psfed_robust._cpp import CLibrary, source

__all__ = ["available", "floyd_pcg", "lms_rff_step", "load"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float

_LIB = CLibrary(
    "psfed_engine_kernels",
    source("engine_kernels.cpp"),
    {
        "psfed_floyd_pcg": (ctypes.c_int, [_I, _I, _I, _P, _P, _P]),
        "psfed_lms_rff_f32": (None, [_I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _F, _F, _P]),
    },
    cflags=("-O3", "-march=native", "-fno-exceptions", "-fno-rtti"),
)


def load() -> Any:
    """The loaded library (``ctypes.CDLL``), or ``None`` (disabled, no compiler, or a failed
    build)."""
    return _LIB.get()


def available() -> bool:
    """Whether the accelerators can be used (builds them on the first call)."""
    return load() is not None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def floyd_pcg(rows: int, dim: int, m: int, state: np.ndarray,
              want_masks: bool) -> tuple[Tensor, Tensor | None]:
    """``(picks [rows, m] int64, masks [rows, dim] bool | None)`` of the numpy Floyd sampler
    seeded with PCG64 ``state`` (uint64 ``[state hi, state lo, inc hi, inc lo]``)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the compiled engine kernels are not available")
    st = np.ascontiguousarray(state, dtype=np.uint64)
    picks = torch.empty((rows, m), dtype=torch.long)
    masks = torch.empty((rows, dim), dtype=torch.bool) if want_masks else None
    rc = lib.psfed_floyd_pcg(rows, dim, m, st.ctypes.data, picks.data_ptr(), _ptr(masks))
    if rc != 0:
        raise MemoryError(f"psfed_floyd_pcg({rows}, {dim}, {m}) failed")
    return picks, masks


def lms_rff_step(W: Tensor, x: Tensor, omega: Tensor, b: Tensor, y: Tensor, mu_s: float,
                 scale: float, part: Tensor | None, e: Tensor) -> None:
    """One LMS step on RFF regressors, in place (float32, CPU, contiguous): ``W [B, K, D]``,
    ``x [B, K, L]``, ``omega [B, L, D]``, ``b [B, D]``, ``y [B, K]``, ``part`` ``[B, K]`` 0/1 or
    ``None``; the a-priori errors go to ``e [B, K]``."""
    lib = load()
    if lib is None:
        raise RuntimeError("the compiled engine kernels are not available")
    B, K, D = W.shape
    L = x.shape[-1]
    for name, t, shape in (("W", W, (B, K, D)), ("x", x, (B, K, L)), ("omega", omega, (B, L, D)),
                           ("b", b, (B, D)), ("y", y, (B, K)), ("e", e, (B, K)),
                           ("part", part, (B, K))):
        if t is None:
            continue
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() \
                or tuple(t.shape) != shape:
            raise ValueError(f"lms_rff_step: {name} must be a contiguous float32 CPU tensor of "
                             f"shape {shape}, got {t.dtype} {tuple(t.shape)} on {t.device}")
    lib.psfed_lms_rff_f32(B, K, L, D, W.data_ptr(), x.data_ptr(), omega.data_ptr(), b.data_ptr(),
                          y.data_ptr(), _ptr(part), float(mu_s), float(scale), e.data_ptr())
