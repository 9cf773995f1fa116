"""Zero-copy bridges between numpy buffers and Flower ``Array`` objects (npy format).

``flwr.app.Array(ndarray)`` runs ``np.save`` into a ``BytesIO`` (two passes over the data) and
``Array.numpy()`` runs ``np.load`` (a header parse with ``ast.literal_eval`` and a copy). On the
psfed hot path the arrays are large flat vectors, so:

- :func:`array_from_parts` builds the Array's bytes as ``npy header + parts`` with one
  concatenation (one pass; :func:`psfed_robust._wire_kernels.join`, on huge pages when
  large). The bytes are identical to ``np.save``'s (tests check it), so any reader —
  ``Array.numpy()``, Flower, another client — sees an ordinary npy Array.
- :func:`array_view` returns a read-only numpy view of an Array's data without copying, when the
  data starts with exactly the npy header ``np.save`` writes for the Array's declared dtype and
  shape and has the right length (so the view is what ``np.load`` would return). Anything else
  falls back to ``Array.numpy()`` (full npy parsing, ``allow_pickle=False``).
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array
from flwr.common.constant import SType

from psfed_robust._wire_kernels import join

__all__ = ["array_from_numpy", "array_from_parts", "array_view", "as_tensor", "npy_header"]

_VIEW_KINDS = frozenset("biuf")  # plain numeric dtypes only (never objects or structured ones)


@functools.lru_cache(maxsize=256)
def npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buf = io.BytesIO()
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header too long for format 1.0 (huge shapes): np.save uses 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def array_from_parts(dtype: np.dtype[Any], shape: tuple[int, ...], parts: Any) -> Array:
    """An npy ``Array`` of ``dtype``/``shape`` whose raw data is the concatenation of ``parts``.

    ``parts`` (bytes-like, C order) must hold exactly ``prod(shape) * itemsize`` bytes.
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    header = npy_header(dtype, shape)
    data = join((header, *parts))
    want = len(header) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != want:
        raise ValueError(f"array parts hold {len(data) - len(header)} bytes, expected "
                         f"{want - len(header)} for {dtype} {shape}")
    return Array(dtype=str(dtype), shape=shape, stype=SType.NUMPY, data=data)


def array_from_numpy(arr: npt.NDArray[Any]) -> Array:
    """``Array(arr)`` with one copy instead of ``np.save``'s two (same bytes)."""
    if (
        arr.dtype.kind not in _VIEW_KINDS
        or not arr.dtype.isnative
        or not arr.flags.c_contiguous
        or arr.ndim == 0
    ):
        return Array(arr)
    raw = memoryview(arr).cast("B")  # type: ignore[arg-type]
    return array_from_parts(arr.dtype, arr.shape, (raw,))


def array_view(arr: Array) -> npt.NDArray[Any]:
    """The Array's values as a read-only numpy array, zero-copy when the data is plain npy.

    Equal to ``arr.numpy()`` (which is used whenever the fast path does not apply). Raises
    what ``arr.numpy()`` raises for data that is not a valid npy array.
    """
    try:
        if arr.stype == SType.NUMPY and isinstance(arr.data, bytes):
            dtype = np.dtype(arr.dtype)
            shape = tuple(arr.shape)
            if (
                dtype.kind in _VIEW_KINDS
                and dtype.isnative
                and all(isinstance(s, int) and s >= 0 for s in shape)
            ):
                header = npy_header(dtype, shape)
                n = int(np.prod(shape, dtype=np.int64))
                data = arr.data
                if len(data) == len(header) + n * dtype.itemsize and data.startswith(header):
                    out = np.frombuffer(data, dtype=dtype, count=n, offset=len(header))
                    return out.reshape(shape)
    except (TypeError, ValueError):
        pass  # malformed metadata: let numpy's own parser decide
    return arr.numpy()


def as_tensor(arr: npt.NDArray[Any]) -> torch.Tensor:
    """``torch.from_numpy`` that also takes a read-only array (e.g. a view of a message payload),
    for tensors that are only read."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)
