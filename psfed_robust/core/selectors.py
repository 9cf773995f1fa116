"""Mask selectors: which coordinates are shared in a round.

``MaskSelector.select(num_parameters, round_num, **context) -> Mask`` keeps the seed package's
signature, so a user subclass written as in its README works unchanged. Selectors that need data
declare it in ``required_context`` (the Flower strategy supplies it) and name any missing key:

- ``flat_model``: the global flat model (``FlattenedModel``, tensor or array) — top-k, structured;
- ``gradients``: per-coordinate scores reported by a client — gradient-based;
- ``client_id``: the client's stable id — client-specific and per-client round-robin.

Seeded selectors return masks that carry a :class:`SeedSpec`, so only a few integers travel.
Fraction 0 selects nothing and fraction 1 everything, for every selector.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
import torch

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.mask import Mask, SeedSpec, count_for_fraction
from psfed_robust.core.seeding import stable_seed

__all__ = [
    "MASK_STRATEGIES",
    "ClientSpecificMaskSelector",
    "CompositeMaskSelector",
    "FixedMaskSelector",
    "GradientBasedSelector",
    "MaskSelector",
    "RandomMaskSelector",
    "RoundRobinMaskSelector",
    "StructuredMaskSelector",
    "TopKMagnitudeSelector",
    "client_index",
    "make_selector",
]


def _validate_fraction(fraction: float) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating):
        raise TypeError(f"fraction must be a number in [0, 1], got {type(fraction).__name__}")
    if not 0.0 <= float(fraction) <= 1.0 or np.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return float(fraction)


def client_index(client_id: Any) -> int:
    """A non-negative integer for a client id: ints as they are, strings via a stable hash."""
    if isinstance(client_id, bool):
        raise TypeError("client_id must be an int or str, not bool")
    if isinstance(client_id, int | np.integer):
        if client_id < 0:
            raise ValueError(f"client_id must be >= 0, got {client_id}")
        return int(client_id)
    if isinstance(client_id, str):
        return stable_seed("client_id", client_id)
    raise TypeError(f"client_id must be an int or str, got {type(client_id).__name__}")


class MaskSelector(ABC):
    """Base class: subclass and implement :meth:`select`."""

    #: context keys this selector needs in ``select(..., **context)``
    required_context: ClassVar[tuple[str, ...]] = ()
    #: True when masks differ between clients in the same round (needs ``client_id``)
    per_client: ClassVar[bool] = False
    #: True when the receiver can regenerate the mask from its SeedSpec
    seeded: ClassVar[bool] = False

    def __init__(self, fraction: float = 0.5) -> None:
        self.fraction = _validate_fraction(fraction)

    @abstractmethod
    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        """Return the mask for ``round_num`` over ``num_parameters`` coordinates."""

    def get_count(self, num_parameters: int) -> int:
        return count_for_fraction(num_parameters, self.fraction)

    def _need(self, context: dict[str, Any], key: str) -> Any:
        if key not in context or context[key] is None:
            raise ValueError(
                f"{type(self).__name__} needs context key {key!r} in select(..., {key}=...); "
                f"got keys {sorted(context)}"
            )
        return context[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fraction={self.fraction})"


def _scores_array(x: Any, n: int, what: str) -> npt.NDArray[np.float64]:
    if isinstance(x, FlattenedModel):
        t = x.flatten()
        arr = t.float().cpu().numpy() if t.dtype == torch.bfloat16 else t.cpu().numpy()
    elif isinstance(x, torch.Tensor):
        t = x.detach()
        arr = (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
    else:
        arr = np.asarray(x)
    arr = np.asarray(arr, dtype=np.float64).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{what} has {arr.size} entries but num_parameters is {n}")
    return arr


def _top_k_mask(scores: npt.NDArray[np.float64], k: int) -> Mask:
    n = scores.size
    data = np.zeros(n, dtype=bool)
    if k >= n:
        data[:] = True
    elif k > 0:
        s = np.abs(scores)
        s = np.where(np.isnan(s), -np.inf, s)  # NaN never ranks as largest
        data[np.argpartition(-s, k - 1)[:k]] = True
    return Mask._trusted(data)


class RandomMaskSelector(MaskSelector):
    """Fresh uniform draw of exactly ``round(fraction·n)`` coordinates each round (seeded)."""

    seeded = True

    def __init__(self, fraction: float = 0.5, seed: int | None = None) -> None:
        super().__init__(fraction)
        self.seed = seed

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        return Mask.random(num_parameters, self.fraction, seed=self.seed, round_num=round_num)


class TopKMagnitudeSelector(MaskSelector):
    """The largest-magnitude coordinates of the global model (needs ``flat_model``)."""

    required_context = ("flat_model",)

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        scores = _scores_array(self._need(context, "flat_model"), num_parameters, "flat_model")
        return _top_k_mask(scores, self.get_count(num_parameters))


class GradientBasedSelector(MaskSelector):
    """The coordinates with the largest reported gradient magnitude (needs ``gradients``)."""

    required_context = ("gradients",)

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        scores = _scores_array(self._need(context, "gradients"), num_parameters, "gradients")
        return _top_k_mask(scores, self.get_count(num_parameters))


class StructuredMaskSelector(MaskSelector):
    """Whole tensors, rotating round by round; ``fraction`` counts parameters, not tensors.

    With ``layer_names`` the named layers (prefixes at ``.`` boundaries) are always shared.
    Otherwise tensors are taken in flat order starting at tensor ``(round−1) mod T`` (or 0 without
    rotation), wrapping, and each next tensor is added while that brings the number of selected
    parameters closer to ``round(fraction·n)``.
    """

    required_context = ("flat_model",)

    def __init__(
        self,
        fraction: float = 0.5,
        layer_names: Sequence[str] | None = None,
        rotate_layers: bool = True,
    ) -> None:
        super().__init__(fraction)
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.rotate_layers = rotate_layers

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        fm = self._need(context, "flat_model")
        if not isinstance(fm, FlattenedModel):
            raise TypeError(
                "StructuredMaskSelector needs flat_model to be a FlattenedModel (tensor layout), "
                f"got {type(fm).__name__}"
            )
        if fm.num_parameters != num_parameters:
            raise ValueError(
                f"flat_model has {fm.num_parameters} parameters but num_parameters is "
                f"{num_parameters}"
            )
        if self.layer_names is not None:
            return fm.get_layer_mask(self.layer_names)
        infos = fm.tensor_infos
        target = self.get_count(num_parameters)
        data = np.zeros(num_parameters, dtype=bool)
        if not infos or target == 0:
            return Mask._trusted(data)
        t = len(infos)
        start = (round_num - 1) % t if self.rotate_layers else 0
        chosen = 0
        for j in range(t):
            info = infos[(start + j) % t]
            if chosen >= target:
                break
            if abs(chosen + info.numel - target) <= abs(chosen - target) or chosen == 0:
                data[info.start : info.end] = True
                chosen += info.numel
        return Mask._trusted(data)


class FixedMaskSelector(MaskSelector):
    """The same user-given indices every round."""

    def __init__(self, indices: Sequence[int] | npt.ArrayLike) -> None:
        super().__init__(0.0)
        self.indices = np.asarray(indices, dtype=np.int64).copy()

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        mask = Mask.from_indices(self.indices, num_parameters)
        self.fraction = mask.fraction
        return mask


class ClientSpecificMaskSelector(MaskSelector):
    """A different random mask per client, identical in every process (SHA-256 seeding).

    ``overlap_fraction`` of each client's ``round(fraction·n)`` coordinates comes from a draw common
    to all clients of the round; the rest is drawn per client from the remaining coordinates. The
    mask is seeded: its :class:`SeedSpec` (kind ``"overlap"``) regenerates it.
    """

    required_context = ("client_id",)
    per_client = True
    seeded = True

    def __init__(
        self, fraction: float = 0.5, seed: int | None = None, overlap_fraction: float = 0.5
    ) -> None:
        super().__init__(fraction)
        self.seed = 0 if seed is None else int(seed)
        self.overlap_fraction = _validate_fraction(overlap_fraction)

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        cid = client_index(self._need(context, "client_id"))
        count = self.get_count(num_parameters)
        common = count_for_fraction(count, self.overlap_fraction)
        spec = SeedSpec(
            "overlap",
            num_parameters,
            count,
            seed=stable_seed("mask.client_specific.common", self.seed, round_num),
            aux_seed=stable_seed("mask.client_specific.own", self.seed, round_num, cid),
            aux_count=common,
        )
        return spec.materialize()


class RoundRobinMaskSelector(MaskSelector):
    """PSO-Fed's sequential selection: the shared window shifts by ``M`` every round.

    Coordinated: every client shares ``[(r−1)·M, r·M) mod n``. Per-client (``coordinated=False``):
    client ``c`` starts at offset ``c·M`` (integer ids; strings via a stable hash), so different
    clients cover different entries in the same round. Each entry is shared every ``⌈n/M⌉`` rounds.
    """

    seeded = True

    def __init__(
        self,
        fraction: float | None = None,
        *,
        count: int | None = None,
        coordinated: bool = True,
        offset: int = 0,
    ) -> None:
        if (fraction is None) == (count is None):
            raise ValueError("RoundRobinMaskSelector needs exactly one of fraction= or count=")
        super().__init__(0.0 if fraction is None else fraction)
        if count is not None and (isinstance(count, bool) or count < 0):
            raise ValueError(f"count must be a non-negative int, got {count}")
        self.count = count
        self.coordinated = coordinated
        self.offset = int(offset)

    @property
    def per_client(self) -> bool:  # type: ignore[override]
        return not self.coordinated

    @property
    def required_context(self) -> tuple[str, ...]:  # type: ignore[override]
        return () if self.coordinated else ("client_id",)

    def get_count(self, num_parameters: int) -> int:
        if self.count is not None:
            if self.count > num_parameters:
                raise ValueError(f"count {self.count} exceeds num_parameters {num_parameters}")
            return self.count
        return super().get_count(num_parameters)

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        m = self.get_count(num_parameters)
        start = self.offset + (round_num - 1) * m
        if not self.coordinated:
            start += client_index(self._need(context, "client_id")) * m
        if num_parameters == 0:
            return Mask.all_false(0)
        if m == num_parameters:
            return Mask.all_true(num_parameters)
        spec = SeedSpec("round_robin", num_parameters, m, offset=start % num_parameters)
        return spec.materialize()


class CompositeMaskSelector(MaskSelector):
    """Union or intersection of several selectors' masks (context is passed to each)."""

    def __init__(self, selectors: Sequence[MaskSelector], mode: str = "union") -> None:
        super().__init__(0.0)
        if mode not in ("union", "intersection"):
            raise ValueError(f"mode must be 'union' or 'intersection', got {mode!r}")
        self.selectors = list(selectors)
        self.mode = mode

    @property
    def required_context(self) -> tuple[str, ...]:  # type: ignore[override]
        keys: list[str] = []
        for s in self.selectors:
            keys.extend(k for k in s.required_context if k not in keys)
        return tuple(keys)

    @property
    def per_client(self) -> bool:  # type: ignore[override]
        return any(s.per_client for s in self.selectors)

    def select(self, num_parameters: int, round_num: int, **context: Any) -> Mask:
        if not self.selectors:
            return Mask.all_false(num_parameters)
        masks = [s.select(num_parameters, round_num, **context) for s in self.selectors]
        out = masks[0]
        for m in masks[1:]:
            out = (out | m) if self.mode == "union" else (out & m)
        self.fraction = out.fraction
        return out


MASK_STRATEGIES: tuple[str, ...] = (
    "random",
    "topk",
    "gradient",
    "structured",
    "client_specific",
    "round_robin",
    "round_robin_per_client",
)


def make_selector(name: str, fraction: float, seed: int | None = None) -> MaskSelector:
    """A selector from the seed package's ``mask_strategy`` string (see :data:`MASK_STRATEGIES`)."""
    key = name.strip().lower().replace("-", "_")
    if key == "random":
        return RandomMaskSelector(fraction, seed)
    if key in ("topk", "top_k", "topk_magnitude"):
        return TopKMagnitudeSelector(fraction)
    if key in ("gradient", "gradient_based"):
        return GradientBasedSelector(fraction)
    if key == "structured":
        return StructuredMaskSelector(fraction)
    if key == "client_specific":
        return ClientSpecificMaskSelector(fraction, seed)
    if key == "round_robin":
        return RoundRobinMaskSelector(fraction)
    if key == "round_robin_per_client":
        return RoundRobinMaskSelector(fraction, coordinated=False)
    raise ValueError(f"unknown mask_strategy {name!r}; allowed: {', '.join(MASK_STRATEGIES)}")
