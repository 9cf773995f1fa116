"""The strategy's global model: the ArrayRecord's layout and its flat vector.

Flower hands a strategy the global model as an ArrayRecord (one Array per tensor); the round core
works on one flat vector. :class:`GlobalModel` converts between them without redundant copies:
the record it returned last round is recognised unchanged (``Strategy.start`` hands it back) and
not concatenated again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.flower._arrays import array_from_numpy, array_view

__all__ = ["GlobalModel", "Layout", "arrays_from_model"]


def arrays_from_model(
    model: nn.Module, *, include_buffers: bool = False, trainable_only: bool = False
) -> ArrayRecord:
    """The initial ArrayRecord in psfed's flat order (``FlattenedModel`` of the same options).

    Use the same ``include_buffers``/``trainable_only`` as the clients' ``PSFedClient``. Each
    tensor keeps its dtype (bf16 is widened to float32: numpy has no bfloat16).
    """
    fm = FlattenedModel(model, include_buffers=include_buffers, trainable_only=trainable_only)
    out: dict[str, Array] = {}
    for info, t in zip(fm.tensor_infos, fm._tensors, strict=True):
        x = t.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        out[info.name] = array_from_numpy(np.ascontiguousarray(x.numpy()))
    return ArrayRecord(out)


class _LayoutModule(nn.Module):
    """A parameter-only module mirroring an ArrayRecord's tensors, in the record's order."""

    def __init__(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self._names = names
        for i, t in enumerate(tensors):
            self.register_parameter(f"p{i}", nn.Parameter(t, requires_grad=False))

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterable[tuple[str, nn.Parameter]]:
        for i, n in enumerate(self._names):
            yield prefix + n, getattr(self, f"p{i}")


@dataclass
class Layout:
    """Keys, shapes and dtypes of the record's tensors and where each sits in the flat vector."""

    keys: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype[Any]]
    offsets: list[int]
    dtype: np.dtype[Any]  # promoted dtype of the flat global model
    size: int


class GlobalModel:
    """The flat global model, its layout and the ArrayRecord it came from / goes to."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.flat: npt.NDArray[Any] | None = None
        self.arrays: ArrayRecord | None = None
        self._own: tuple[ArrayRecord, list[tuple[str, Array, tuple[Any, ...]]]] | None = None
        self._fm: FlattenedModel | None = None

    def _own_arrays(self, arrays: ArrayRecord) -> bool:
        """True when ``arrays`` is, unchanged, the record :meth:`set` built last (same record,
        same Array objects, same data bytes, one dtype)."""
        own = self._own
        if own is None or arrays is not own[0] or len(arrays) != len(own[1]):
            return False
        for (k, arr, meta), (k2, arr2) in zip(own[1], arrays.items(), strict=True):
            if k != k2 or arr is not arr2 or (arr.data, arr.dtype, arr.shape) != meta:
                return False
        return True

    def read(self, arrays: ArrayRecord) -> bool:
        """Take ``arrays`` as the global model; True when the layout changed."""
        if self.flat is not None and self._own_arrays(arrays):
            return False
        self._own = None
        keys = list(arrays.keys())
        if not keys:
            raise ValueError("the global ArrayRecord is empty")
        nds = [array_view(arrays[k]) for k in keys]  # zero-copy; concatenated below
        for k, a in zip(keys, nds, strict=True):
            if a.dtype.kind != "f":
                raise ValueError(
                    f"ArrayRecord entry {k!r} has dtype {a.dtype}; psfed shares floating-point "
                    "tensors only (build it with psfed_robust.flower.arrays_from_model(model))"
                )
        sizes = [int(a.size) for a in nds]
        offsets = [0, *np.cumsum(sizes).tolist()]
        dtype = np.dtype(np.result_type(*[a.dtype for a in nds]))
        lay = Layout(keys, [tuple(a.shape) for a in nds], [a.dtype for a in nds],
                     [int(o) for o in offsets], dtype, offsets[-1])
        changed = self.layout is None or (lay.keys, lay.shapes, lay.dtypes) != (
            self.layout.keys, self.layout.shapes, self.layout.dtypes)
        if changed:
            self.layout = lay
            self._fm = None
        self.flat = np.concatenate([a.reshape(-1) for a in nds], dtype=dtype)
        self.arrays = arrays
        return changed

    def set(self, flat: npt.NDArray[Any]) -> ArrayRecord:
        """Make ``flat`` the global model; return (and keep) its ArrayRecord."""
        lay = self.layout
        assert lay is not None
        self.flat = flat
        out: dict[str, Array] = {}
        for i, k in enumerate(lay.keys):
            part = flat[lay.offsets[i] : lay.offsets[i + 1]].reshape(lay.shapes[i])
            out[k] = array_from_numpy(np.ascontiguousarray(part.astype(lay.dtypes[i],
                                                                         copy=False)))
        rec = ArrayRecord(out)
        if all(d == lay.dtype for d in lay.dtypes):  # the record holds exactly the flat values
            self._own = (rec, [(k, a, (a.data, a.dtype, a.shape)) for k, a in rec.items()])
        self.arrays = rec
        return rec

    def flat_model(self) -> FlattenedModel:
        """A ``FlattenedModel`` holding the current global values (for data-dependent
        selectors)."""
        lay, g = self.layout, self.flat
        assert lay is not None and g is not None
        if self._fm is None:
            tensors = [torch.from_numpy(np.zeros(s, dtype=d))
                       for s, d in zip(lay.shapes, lay.dtypes, strict=True)]
            self._fm = FlattenedModel(_LayoutModule(lay.keys, tensors))
        self._fm.unflatten(torch.from_numpy(g))
        return self._fm
