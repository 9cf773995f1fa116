"""Per-mask index cache for the Flower hot path.

``Mask.indices`` runs ``np.flatnonzero`` on D booleans each call (≈ 4 ms for a random half mask of
1M coordinates: the branches are unpredictable), and boolean scatter/gather (``x[mask.data]``) is
as slow. Integer ``take``/scatter with the indices is 5–10× faster, so the indices of the last few
masks are kept: masks are immutable, and the seeded ones come out of the ``SeedSpec`` cache as the
same object, so within a process one round computes them once (server: selection, payload,
aggregation; clients sharing a process, as in simulation: the decoded downlink mask).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import numpy.typing as npt

from psfed_robust.core.mask import Mask

__all__ = ["gather", "mask_indices", "scatter"]

_CACHE: OrderedDict[int, tuple[Mask, npt.NDArray[np.int64]]] = OrderedDict()
_MAX = 16
_LOCK = threading.Lock()


def mask_indices(mask: Mask) -> npt.NDArray[np.int64]:
    """``mask.indices`` (read-only), cached per mask object."""
    with _LOCK:
        hit = _CACHE.get(id(mask))
        if hit is not None and hit[0] is mask:
            _CACHE.move_to_end(id(mask))
            return hit[1]
    idx = mask.indices
    idx.setflags(write=False)
    with _LOCK:
        _CACHE[id(mask)] = (mask, idx)  # the entry keeps the mask alive: its id stays unique
        while len(_CACHE) > _MAX:
            _CACHE.popitem(last=False)
    return idx


def gather(values: npt.NDArray[Any], mask: Mask) -> npt.NDArray[Any]:
    """``values[mask.data]`` (a new contiguous array; ``values`` itself for a full mask)."""
    if mask.count == mask.size:
        return values
    return values.take(mask_indices(mask))


def scatter(target: npt.NDArray[Any], mask: Mask, values: npt.NDArray[Any]) -> None:
    """``target[mask.data] = values`` in place.

    ``values`` is often a view into a wire payload, where the values start at byte 28 + the
    mask section (37 for a seeded mask) and so are misaligned: numpy's fancy assignment from a
    misaligned source is ~3x slower than an aligned copy followed by the assignment."""
    if mask.count == mask.size:
        target[...] = values
    elif mask.count:
        if not values.flags.aligned:
            values = values.copy()
        target[mask_indices(mask)] = values
