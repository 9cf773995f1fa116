"""Per-mask index cache for the Flower hot path (no round math lives here).

``Mask.indices`` runs ``np.flatnonzero`` on D booleans each call (≈ 4 ms for a random half mask of
1M coordinates: the branches are unpredictable), and boolean gather (``x[mask.data]``) is as slow.
Integer indexing is 5–10× faster, so the indices of the last few masks are kept, as numpy and as
one torch tensor per mask object: masks are immutable, and the seeded ones come out of the
``SeedSpec`` cache as the same object, so within a process one round computes them once (server:
selection, payload, aggregation; clients sharing a process, as in simulation: the decoded
downlink mask). The round core's server step accumulates replies whose index is the *same tensor
object* in the compact space, so handing out one tensor per mask is what makes it fast.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from psfed_robust.core.mask import Mask
from psfed_robust.core.round import gather as core_gather
from psfed_robust.flower._arrays import as_tensor

__all__ = ["aligned", "gather", "index_tensor", "mask_indices"]

_CACHE: OrderedDict[int, tuple[Mask, npt.NDArray[np.int64], torch.Tensor]] = OrderedDict()
_MAX = 16
_LOCK = threading.Lock()


def _entry(mask: Mask) -> tuple[Mask, npt.NDArray[np.int64], torch.Tensor]:
    with _LOCK:
        hit = _CACHE.get(id(mask))
        if hit is not None and hit[0] is mask:
            _CACHE.move_to_end(id(mask))
            return hit
    idx = mask.indices
    idx.setflags(write=False)
    entry = (mask, idx, as_tensor(idx))
    with _LOCK:
        _CACHE[id(mask)] = entry  # the entry keeps the mask alive: its id stays unique
        while len(_CACHE) > _MAX:
            _CACHE.popitem(last=False)
    return entry


def mask_indices(mask: Mask) -> npt.NDArray[np.int64]:
    """``mask.indices`` (read-only), cached per mask object."""
    return _entry(mask)[1]


def index_tensor(mask: Mask) -> torch.Tensor | None:
    """The mask's int64 indices as one cached tensor per mask object (``None``: every
    coordinate, the round core's dense form)."""
    if mask.count == mask.size:
        return None
    return _entry(mask)[2]


def aligned(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``values``, copied when misaligned: payload values follow the wire header and mask
    section (byte 37 for a seeded mask), and indexed copies from misaligned memory are ~3x
    slower than an aligned copy followed by the indexed one."""
    return values if values.flags.aligned else values.copy()


def gather(values: npt.NDArray[Any], mask: Mask) -> npt.NDArray[Any]:
    """``values[mask.data]`` via the core's gather (``values`` itself for a full mask)."""
    if mask.count == mask.size:
        return values
    return core_gather(as_tensor(values), index_tensor(mask)).numpy()
