"""Thin adapter over :mod:`psfed_robust.wire` for Flower payloads.

Payloads travel as npy ``Array(uint8)`` objects; :func:`encode_array` frames the codec's output in
one copy and :func:`payload_view` reads it back without copying (``psfed_robust.flower._arrays``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array

from psfed_robust import wire
from psfed_robust.core.mask import Mask
from psfed_robust.flower._arrays import array_from_parts, array_view
from psfed_robust.wire import WireFormatError

__all__ = ["WireFormatError", "decode", "encode", "encode_array", "payload_view"]

_UINT8 = np.dtype(np.uint8)


def encode(mask: Mask, values: npt.NDArray[Any], encoding: str = "auto") -> Any:
    """``wire.encode_update(mask, values, encoding=...)`` → ``EncodedUpdate``."""
    return wire.encode_update(mask, values, encoding=encoding)


def encode_array(mask: Mask, values: npt.NDArray[Any], encoding: str = "auto") -> Array:
    """The wire payload of ``(mask, values)`` as an npy ``Array(uint8)`` (one copy of values)."""
    parts, _ = wire.encode_update_parts(mask, values, encoding=encoding)
    return array_from_parts(_UINT8, (sum(len(p) for p in parts),), parts)


def payload_view(arr: Array) -> memoryview:
    """The bytes of a 1-D ``uint8`` payload Array, zero-copy (ValueError for anything else)."""
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise ValueError(f"payload must be a 1-D uint8 Array, got {arr.dtype} {arr.shape}")
    data = array_view(arr)
    if data.dtype != _UINT8 or data.ndim != 1:
        raise ValueError(f"payload must be a 1-D uint8 array, got {data.dtype} {data.shape}")
    return memoryview(data)  # type: ignore[arg-type]


def decode(payload: Any, size: int, *, copy: bool = True) -> tuple[Mask, npt.NDArray[Any]]:
    """``wire.decode_update(payload, expected_size=size)``: (mask, values) or WireFormatError.

    ``copy=False``: the values are a read-only view of ``payload`` (no copy).
    """
    mask, values = wire.decode_update(payload, copy=copy, expected_size=size)
    if not isinstance(values, np.ndarray):  # bfloat16 comes back as a torch tensor
        import torch

        if isinstance(values, torch.Tensor):
            values = values.float().numpy()
    return mask, np.asarray(values)
