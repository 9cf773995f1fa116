"""``FlattenedModel``: a fixed, documented flat view of a torch model's tensors.

Order: the parameters in ``named_parameters()`` order (tied parameters once; frozen ones unless
``trainable_only=True``), then — with ``include_buffers=True`` — the floating-point buffers in
``named_buffers()`` order (BatchNorm ``running_mean``/``running_var``; integer buffers such as
``num_batches_tracked`` are not averaged and stay local). Tensors are resolved by object, never by
parsing names, so ``ModuleDict({"0": ...})`` works. Each tensor keeps its own dtype and device
(bf16, fp16 and fp64 included): the flat vector uses the promoted dtype of the tensors (or the one
you ask for) and writes back with a cast per tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor, nn

from psfed_robust.core.mask import Mask

__all__ = ["FlattenedModel", "TensorInfo", "all_finite"]


def _np_all_finite(a: npt.NDArray[Any]) -> bool:
    """Exact NaN/Inf check of a float array in one read pass without a temporary.

    A NaN or ±Inf operand makes every IEEE sum it enters NaN or ±Inf, so a finite sum proves
    every element finite; only a non-finite sum (a NaN/Inf, or an overflow of finite values)
    needs the element-wise check. ``np.isfinite(a).all()`` writes a D-byte mask first.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(a, axis=None)):
            return True
    return bool(np.isfinite(a).all())


def all_finite(t: Tensor | npt.NDArray[Any]) -> bool:
    """NaN/Inf check of a tensor or numpy array; numpy's on CPU (torch.isfinite is ~15x slower
    on one thread). Non-floating inputs are always finite."""
    if isinstance(t, np.ndarray):
        return t.dtype.kind != "f" or _np_all_finite(t)
    if not t.is_floating_point():
        return True
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:
        return _np_all_finite(t.detach().numpy())
    return bool(torch.isfinite(t).all())


@dataclass(frozen=True)
class TensorInfo:
    """Where one model tensor lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    numel: int
    start: int
    end: int
    dtype: torch.dtype
    kind: str  # "parameter" or "buffer"


class FlattenedModel:
    """Flatten/unflatten/extract/apply over a model's parameters (and optionally buffers)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        include_buffers: bool = False,
        trainable_only: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FlattenedModel needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.include_buffers = include_buffers
        self.trainable_only = trainable_only
        tensors: list[Tensor] = []
        infos: list[TensorInfo] = []
        offset = 0
        entries: list[tuple[str, Tensor, str]] = []
        for name, p in model.named_parameters():
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"parameter {name!r} is uninitialized (lazy module): run one forward pass "
                    "before wrapping the model"
                )
            if trainable_only and not p.requires_grad:
                continue
            entries.append((name, p, "parameter"))
        if include_buffers:
            for name, b in model.named_buffers():
                if b.is_floating_point():
                    entries.append((name, b, "buffer"))
        for name, t, kind in entries:
            n = t.numel()
            infos.append(TensorInfo(name, tuple(t.shape), n, offset, offset + n, t.dtype, kind))
            tensors.append(t)
            offset += n
        self._tensors = tensors
        self._infos = infos
        self._offsets = np.array([i.start for i in infos] + [offset], dtype=np.int64)
        self._num = offset
        if dtype is not None:
            self.dtype = dtype
        elif tensors:
            dt = tensors[0].dtype
            for t in tensors[1:]:
                dt = torch.promote_types(dt, t.dtype)
            self.dtype = dt
        else:
            self.dtype = torch.float32
        # Seed-package compatible attributes.
        self.param_shapes = [(i.name, torch.Size(i.shape)) for i in infos]
        self.param_numels = [i.numel for i in infos]

    # ------------------------------------------------------------------ info
    @property
    def num_parameters(self) -> int:
        """Length of the flat vector."""
        return self._num

    @property
    def device(self) -> torch.device:
        return self._tensors[0].device if self._tensors else torch.device("cpu")

    def parameter_info(self) -> list[dict[str, Any]]:
        """``[{"name", "shape", "numel", "start", "end", "dtype", "kind"}]`` in flat order."""
        return [
            {
                "name": i.name,
                "shape": i.shape,
                "numel": i.numel,
                "start": i.start,
                "end": i.end,
                "dtype": str(i.dtype).removeprefix("torch."),
                "kind": i.kind,
            }
            for i in self._infos
        ]

    @property
    def tensor_infos(self) -> Sequence[TensorInfo]:
        return tuple(self._infos)

    def get_param_index_range(self, name: str) -> tuple[int, int]:
        for i in self._infos:
            if i.name == name:
                return i.start, i.end
        raise KeyError(f"no tensor named {name!r}; known: {[i.name for i in self._infos]}")

    def get_layer_mask(self, prefixes: str | Iterable[str]) -> Mask:
        """Mask of every tensor whose name equals a prefix or starts with ``prefix + "."``.

        ``"fc1"`` matches ``fc1.weight`` but not ``fc10.weight`` (the seed used ``startswith``).
        """
        plist = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        data = np.zeros(self._num, dtype=bool)
        for i in self._infos:
            if any(i.name == p or i.name.startswith(p.rstrip(".") + ".") for p in plist):
                data[i.start : i.end] = True
        return Mask._trusted(data)

    # ------------------------------------------------------------------ flatten / unflatten
    def flatten(self, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
        """A new 1-D tensor of every tensor's values (cast to ``dtype``, default ``self.dtype``)."""
        dt = dtype or self.dtype
        dev = torch.device(device) if device is not None else self.device
        if not self._tensors:
            return torch.zeros(0, dtype=dt, device=dev)
        with torch.no_grad():
            return torch.cat(
                [t.detach().reshape(-1).to(device=dev, dtype=dt) for t in self._tensors]
            )

    def flatten_numpy(self) -> np.ndarray:
        """The flat vector as numpy (bf16 is widened to float32: numpy has no bfloat16)."""
        flat = self.flatten()
        if flat.dtype == torch.bfloat16:
            flat = flat.float()
        return flat.cpu().numpy()

    def _as_tensor(self, values: Any, what: str) -> Tensor:
        if isinstance(values, Tensor):
            t = values
        elif isinstance(values, np.ndarray | list | tuple):
            t = torch.as_tensor(np.asarray(values))
        else:
            raise TypeError(
                f"{what} must be a torch tensor or numpy array, got {type(values).__name__}"
            )
        if t.dim() != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
        return t

    def unflatten(self, flat: Any) -> None:
        """Write a full flat vector back into the model, in place (dtype/device per tensor)."""
        t = self._as_tensor(flat, "flat")
        if t.numel() != self._num:
            raise ValueError(f"Expected {self._num} parameters, got {t.numel()}")
        if not all_finite(t):
            raise ValueError("flat vector contains NaN or Inf")
        with torch.no_grad():
            for info, p in zip(self._infos, self._tensors, strict=True):
                chunk = t[info.start : info.end].view(info.shape)
                p.copy_(chunk.to(device=p.device, dtype=p.dtype))

    # ------------------------------------------------------------------ partial access
    def _check_mask(self, mask: Mask) -> None:
        if not isinstance(mask, Mask):
            raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
        if mask.size != self._num:
            raise ValueError(f"mask size {mask.size} != num_parameters {self._num}")

    def _spans(self, idx: npt.NDArray[np.int64]) -> Iterator[tuple[Tensor, int, int, Tensor]]:
        """``(tensor, lo, hi, local)`` per tensor holding some of the sorted flat indices ``idx``:
        ``idx[lo:hi]`` fall in ``tensor``, at its own flat positions ``local``."""
        bounds = np.searchsorted(idx, self._offsets)
        spans = zip(self._infos, self._tensors, bounds[:-1], bounds[1:], strict=True)
        for info, p, lo, hi in spans:
            if hi > lo:
                yield p, int(lo), int(hi), torch.from_numpy(idx[lo:hi] - info.start).to(p.device)

    def extract(self, mask: Mask, dtype: torch.dtype | None = None) -> Tensor:
        """Values at the mask's coordinates, in ascending index order (only those are read)."""
        self._check_mask(mask)
        dt = dtype or self.dtype
        idx = mask.indices
        out = torch.empty(idx.size, dtype=dt, device=self.device)
        if idx.size == 0:
            return out
        with torch.no_grad():
            for p, lo, hi, local in self._spans(idx):
                out[lo:hi] = p.detach().reshape(-1)[local].to(device=out.device, dtype=dt)
        return out

    def apply(self, partial: Any, mask: Mask) -> None:
        """Overwrite the mask's coordinates with ``partial`` (ascending index order), in place.

        Touches only the shared entries: O(count), not a full flatten/unflatten round trip.
        """
        t = self._as_tensor(partial, "partial")
        if t.numel() != mask.count:
            raise ValueError(f"partial has {t.numel()} values but the mask selects {mask.count}")
        self._check_mask(mask)
        if not all_finite(t):
            raise ValueError("partial values contain NaN or Inf")
        idx = mask.indices
        if idx.size == 0:
            return
        with torch.no_grad():
            for p, lo, hi, local in self._spans(idx):
                flat_view = p.view(-1) if p.is_contiguous() else None
                vals = t[lo:hi].to(device=p.device, dtype=p.dtype)
                if flat_view is not None:
                    flat_view[local] = vals
                else:  # pragma: no cover - non-contiguous parameters are rare
                    tmp = p.detach().reshape(-1).clone()
                    tmp[local] = vals
                    p.copy_(tmp.view_as(p))

    def __repr__(self) -> str:
        return f"FlattenedModel(num_parameters={self._num}, num_tensors={len(self._tensors)})"
