"""Thin adapter over :mod:`psfed_robust.wire` (imported lazily; keyword spelling tolerant)."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import numpy.typing as npt

from psfed_robust.core.mask import Mask

__all__ = ["WireFormatError", "decode", "encode"]


def _wire() -> Any:
    import psfed_robust.wire as wire

    return wire


try:  # the codec is a sibling module; keep importing this module cheap and safe
    from psfed_robust.wire import WireFormatError
except ImportError:  # pragma: no cover - only while the codec is being written

    class WireFormatError(ValueError):  # type: ignore[no-redef]
        """Stand-in until psfed_robust.wire is importable."""


def encode(mask: Mask, values: npt.NDArray[Any], encoding: str = "auto") -> Any:
    """``wire.encode_update(mask, values, encoding=...)`` → ``EncodedUpdate``."""
    return _wire().encode_update(mask, values, encoding=encoding)


_SIZE_KW: str | None = None


def decode(payload: bytes, size: int) -> tuple[Mask, npt.NDArray[Any]]:
    """``wire.decode_update(payload, expected_size=size)``: (mask, values) or WireFormatError."""
    global _SIZE_KW
    fn = _wire().decode_update
    if _SIZE_KW is None:
        params = inspect.signature(fn).parameters
        _SIZE_KW = "expected_size" if "expected_size" in params else "size"
    mask, values = fn(payload, **{_SIZE_KW: size})
    if not isinstance(mask, Mask):
        raise WireFormatError(f"decoder returned {type(mask).__name__}, not a Mask")
    if not isinstance(values, np.ndarray):  # bfloat16 comes back as a torch tensor
        import torch

        if isinstance(values, torch.Tensor):
            values = values.float().numpy()
    return mask, np.asarray(values)
