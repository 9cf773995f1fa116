"""The :class:`Mask`: which coordinates of the flat model are shared in a round.

A mask is immutable (it copies its input and keeps a read-only array), so a mask handed to the
wire codec, a selector cache or an aggregator cannot change behind their back (the seed package's
frozen dataclass did not copy, and its "frozen" mask could be mutated through the caller's array).

A mask drawn from a seed can carry its :class:`SeedSpec` — the few integers from which the
receiver regenerates it — so the wire codec can send the spec instead of the mask.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from psfed_robust.core.seeding import stable_seed

__all__ = ["Mask", "SeedSpec", "random_indices", "random_mask_data", "round_robin_indices"]

SEED_KINDS = ("random", "round_robin", "overlap", "all", "none")


def _random_draw(size: int, count: int, seed: int) -> tuple[npt.NDArray[Any], bool]:
    """The raw draw behind :func:`random_indices`: ``(distinct indices in draw order, True when
    they are the complement)``. For ``count > size/2`` the complement is drawn (cheaper)."""
    if count < 0 or count > size:
        raise ValueError(f"count must be in [0, size={size}], got {count}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if count * 2 <= size:
        return rng.choice(size, count, replace=False, shuffle=False), False
    return rng.choice(size, size - count, replace=False, shuffle=False), True


def random_indices(size: int, count: int, seed: int) -> npt.NDArray[np.int64]:
    """Sorted ``count`` distinct indices out of ``range(size)`` drawn from ``seed`` (PCG64).

    The draw depends only on ``(size, count, seed)``: sender and receiver regenerate the same
    indices. For ``count > size/2`` the complement is drawn (cheaper).
    """
    idx, complement = _random_draw(size, count, seed)
    if not complement:
        idx = idx.astype(np.int64)
        idx.sort()
        return idx
    return np.flatnonzero(_random_data(size, idx, complement)).astype(np.int64)


def _random_data(size: int, idx: npt.NDArray[Any], complement: bool) -> npt.NDArray[np.bool_]:
    """The boolean mask of a :func:`_random_draw` (no sort: order does not matter here)."""
    data = np.full(size, complement, dtype=bool)
    data[idx] = not complement
    return data


def random_mask_data(size: int, count: int, seed: int) -> npt.NDArray[np.bool_]:
    """``data`` with ``data[random_indices(size, count, seed)] = True``, without sorting."""
    return _random_data(size, *_random_draw(size, count, seed))


def round_robin_indices(size: int, count: int, offset: int) -> npt.NDArray[np.int64]:
    """Sorted indices ``(offset + j) mod size`` for ``j < count`` (PSO-Fed's sequential scheme)."""
    if count < 0 or count > size:
        raise ValueError(f"count must be in [0, size={size}], got {count}")
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    idx = (offset % size + np.arange(count, dtype=np.int64)) % size
    idx.sort()
    return idx


@dataclass(frozen=True, slots=True)
class SeedSpec:
    """The small descriptor from which a seeded mask is regenerated.

    ``kind`` is one of ``"random"`` (``count`` indices drawn from ``seed``), ``"round_robin"``
    (``count`` consecutive indices from ``offset``, wrapping), ``"all"`` or ``"none"``.
    """

    kind: str
    size: int
    count: int = 0
    seed: int = 0
    offset: int = 0
    aux_seed: int = 0
    aux_count: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SEED_KINDS:
            raise ValueError(f"SeedSpec.kind must be one of {SEED_KINDS}, got {self.kind!r}")
        if self.size < 0:
            raise ValueError(f"SeedSpec.size must be >= 0, got {self.size}")
        if not 0 <= self.count <= self.size:
            raise ValueError(f"SeedSpec.count must be in [0, {self.size}], got {self.count}")
        if self.seed < 0 or self.seed >= 1 << 64:
            raise ValueError(f"SeedSpec.seed must be in [0, 2**64), got {self.seed}")
        if self.offset < 0:
            raise ValueError(f"SeedSpec.offset must be >= 0, got {self.offset}")
        if self.aux_seed < 0 or self.aux_seed >= 1 << 64:
            raise ValueError(f"SeedSpec.aux_seed must be in [0, 2**64), got {self.aux_seed}")
        if not 0 <= self.aux_count <= self.count:
            raise ValueError(
                f"SeedSpec.aux_count must be in [0, {self.count}], got {self.aux_count}"
            )
        if self.kind == "all" and self.count != self.size:
            raise ValueError(f"SeedSpec kind 'all' needs count == size, got {self.count}")
        if self.kind == "none" and self.count != 0:
            raise ValueError(f"SeedSpec kind 'none' needs count == 0, got {self.count}")

    def materialize(self) -> Mask:
        """Regenerate the mask this spec describes.

        Masks are immutable, so the last few regenerated masks are cached by spec: the server
        decodes one reply per client against the same seeded mask it sent (one draw, not 1+2K).
        """
        return _materialize_cached(self)

    def _materialize(self) -> Mask:
        if self.kind == "all":
            data = np.ones(self.size, dtype=bool)
        elif self.kind == "none":
            data = np.zeros(self.size, dtype=bool)
        elif self.kind == "overlap":
            # aux_count coordinates common to every client of the round (drawn from ``seed``),
            # the other count - aux_count drawn from the rest with the client's ``aux_seed``.
            data = random_mask_data(self.size, self.aux_count, self.seed)
            rest = np.flatnonzero(~data)
            own = random_mask_data(rest.size, self.count - self.aux_count, self.aux_seed)
            data[rest[own]] = True
        elif self.kind == "random":
            data = random_mask_data(self.size, self.count, self.seed)
        else:
            data = np.zeros(self.size, dtype=bool)
            data[round_robin_indices(self.size, self.count, self.offset)] = True
        return Mask._trusted(data, self)


@functools.lru_cache(maxsize=32)
def _materialize_cached(spec: SeedSpec) -> Mask:
    return spec._materialize()


class Mask:
    """An immutable boolean mask over the flat parameter vector (``True`` = shared)."""

    __slots__ = ("_count", "_data", "_seed_spec")

    _data: npt.NDArray[np.bool_]
    _count: int
    _seed_spec: SeedSpec | None

    def __init__(self, data: Any, *, seed_spec: SeedSpec | None = None) -> None:
        arr = np.array(data, dtype=bool, copy=True)
        if arr.ndim != 1:
            raise ValueError(f"Mask data must be 1-D, got shape {arr.shape}")
        arr.setflags(write=False)
        count = int(np.count_nonzero(arr))
        if seed_spec is not None:
            # a spec that does not regenerate the data would make the wire codec send a wrong mask
            if not isinstance(seed_spec, SeedSpec):
                raise TypeError(f"seed_spec must be a SeedSpec, got {type(seed_spec).__name__}")
            if (
                seed_spec.size != arr.shape[0]
                or seed_spec.count != count
                or not np.array_equal(seed_spec.materialize()._data, arr)
            ):
                raise ValueError("seed_spec does not regenerate the mask data")
        object.__setattr__(self, "_data", arr)
        object.__setattr__(self, "_count", count)
        object.__setattr__(self, "_seed_spec", seed_spec)

    @classmethod
    def _trusted(cls, arr: npt.NDArray[np.bool_], seed_spec: SeedSpec | None = None) -> Mask:
        """Wrap a freshly built bool array without copying (internal)."""
        obj = cls.__new__(cls)
        arr.setflags(write=False)
        object.__setattr__(obj, "_data", arr)
        object.__setattr__(obj, "_count", int(np.count_nonzero(arr)))
        object.__setattr__(obj, "_seed_spec", seed_spec)
        return obj

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Mask is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_mask, (self._data.copy(), self._seed_spec))

    # ------------------------------------------------------------------ properties
    @property
    def data(self) -> npt.NDArray[np.bool_]:
        """The read-only boolean array."""
        return self._data

    @property
    def size(self) -> int:
        return int(self._data.shape[0])

    @property
    def count(self) -> int:
        return self._count

    @property
    def fraction(self) -> float:
        return self._count / self.size if self.size else 0.0

    @property
    def indices(self) -> npt.NDArray[np.int64]:
        """Ascending int64 indices of the shared coordinates."""
        return np.flatnonzero(self._data).astype(np.int64, copy=False)

    @property
    def seed_spec(self) -> SeedSpec | None:
        """The descriptor that regenerates this mask, when it was drawn from one."""
        return self._seed_spec

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_indices(cls, indices: Iterable[int] | npt.ArrayLike, size: int) -> Mask:
        """Mask with ``True`` at ``indices``; rejects out-of-range, duplicate, non-integer ones."""
        size = _check_size(size)
        idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices))  # type: ignore[arg-type]
        if idx.size == 0:
            return cls._trusted(np.zeros(size, dtype=bool))
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if not np.issubdtype(idx.dtype, np.integer):
            if np.issubdtype(idx.dtype, np.floating) and np.all(np.mod(idx, 1) == 0):
                idx = idx.astype(np.int64)
            else:
                raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.min() < 0 or idx.max() >= size:
            raise ValueError(
                f"indices must be in range [0, {size}); got min {idx.min()}, max {idx.max()}"
            )
        data = np.zeros(size, dtype=bool)
        data[idx] = True
        n_unique = int(np.count_nonzero(data))
        if n_unique != idx.size:
            raise ValueError(f"indices contain {idx.size - n_unique} duplicate(s)")
        return cls._trusted(data)

    @classmethod
    def random(
        cls,
        size: int,
        fraction: float = 0.5,
        *,
        seed: int | None = None,
        round_num: int | None = None,
    ) -> Mask:
        """Exactly ``round(fraction*size)`` coordinates drawn uniformly without replacement.

        With a ``seed`` the draw is a pure function of ``(seed, round_num, size, count)`` via
        :func:`stable_seed` (no collisions between seeds and rounds, unlike the seed package's
        ``seed + round*1000003``) and the mask carries its :class:`SeedSpec`. Without a seed the
        draw is fresh entropy.
        """
        size = _check_size(size)
        count = count_for_fraction(size, fraction)
        if seed is None:
            entropy = int(np.random.SeedSequence().generate_state(1, np.uint64)[0]) >> 1
            spec = SeedSpec("random", size, count, entropy)
            return spec.materialize()
        spec = SeedSpec("random", size, count, stable_seed("mask.random", seed, round_num))
        return spec.materialize()

    @classmethod
    def all_true(cls, size: int) -> Mask:
        return SeedSpec("all", _check_size(size), _check_size(size)).materialize()

    @classmethod
    def all_false(cls, size: int) -> Mask:
        return SeedSpec("none", _check_size(size)).materialize()

    # ------------------------------------------------------------------ operators
    def _other(self, other: object, op: str) -> Mask:
        if not isinstance(other, Mask):
            raise TypeError(f"cannot apply {op} to Mask and {type(other).__name__}")
        if other.size != self.size:
            raise ValueError(f"mask sizes differ for {op}: {self.size} vs {other.size}")
        return other

    def __and__(self, other: Mask) -> Mask:
        return Mask._trusted(self._data & self._other(other, "&")._data)

    def __or__(self, other: Mask) -> Mask:
        return Mask._trusted(self._data | self._other(other, "|")._data)

    def __xor__(self, other: Mask) -> Mask:
        return Mask._trusted(self._data ^ self._other(other, "^")._data)

    def __invert__(self) -> Mask:
        return Mask._trusted(~self._data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if other is self:
            return True
        if self.size != other.size or self._count != other._count:
            return False
        if self._count in (0, self.size):
            return True
        if self._seed_spec is not None and self._seed_spec == other._seed_spec:
            return True  # a spec regenerates exactly one mask (checked when the mask was built)
        return bool(np.array_equal(self._data, other._data))

    def __hash__(self) -> int:
        return hash((self.size, self._data.tobytes()))

    def __array__(self, dtype: Any = None, copy: Any = None) -> npt.NDArray[Any]:
        return self._data.astype(dtype) if dtype is not None else self._data.copy()

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"Mask(count={self.count}, size={self.size}, fraction={self.fraction:.2%})"

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict[str, Any]:
        """``{"indices": [...], "size": n}`` (the seed package's format; verbose — prefer wire)."""
        return {"indices": self.indices.tolist(), "size": self.size}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mask:
        if not isinstance(d, dict) or "indices" not in d or "size" not in d:
            raise ValueError("Mask.from_dict needs a dict with keys 'indices' and 'size'")
        return cls.from_indices(d["indices"], int(d["size"]))

    def to_torch(self, device: Any = None) -> Any:
        """The mask as a torch bool tensor (a copy)."""
        import torch

        return torch.from_numpy(self._data.copy()).to(device) if device else torch.from_numpy(
            self._data.copy()
        )


def _rebuild_mask(data: npt.NDArray[np.bool_], spec: SeedSpec | None) -> Mask:
    return Mask._trusted(np.array(data, dtype=bool), spec)


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return int(size)


def count_for_fraction(size: int, fraction: float) -> int:
    """Number of shared coordinates for ``fraction`` of ``size`` (round half away from zero)."""
    if not isinstance(fraction, int | float | np.floating) or isinstance(fraction, bool):
        raise TypeError(f"fraction must be a number, got {type(fraction).__name__}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return min(size, int(np.floor(float(fraction) * size + 0.5)))


def as_index_array(values: Sequence[int]) -> npt.NDArray[np.int64]:
    """Helper: a sequence of ints as an int64 array."""
    return np.asarray(values, dtype=np.int64)
