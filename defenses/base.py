"""Aggregator interface and registry (contract: docs/contracts.md, "Defenses").

``Aggregator.__call__(updates, masks, global_model, *, participants, weights, mode)`` returns the
new global model ``[..., D]``. Two views of partial updates (DESIGN.md):

- ``fill``: each participant's unshared entries are replaced by ``global_model`` (PSO-Fed's server
  step); the dense rule then runs over the participants' filled vectors (``dense``).
- ``reporters``: per coordinate, the rule runs over the participants that reported it
  (``reporters``); coordinates nobody reported keep ``global_model``'s value.

Subclasses implement ``dense`` and ``reporters``; coordinate-wise rules subclass
``CoordinatewiseAggregator`` and implement one masked kernel used by both modes. Never infer a mask
from zero values; never divide by the number of clients when not all of them reported a coordinate.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from attacks._params import ParamError, check_choice, unknown_params
from psfed_robust.core.aggregation import fill_unshared

__all__ = [
    "Aggregator",
    "CoordinatewiseAggregator",
    "Mode",
    "ParamError",
    "defense_class",
    "get_defense",
    "list_defenses",
    "register_defense",
]

Mode = Literal["fill", "reporters"]
MODES: tuple[str, ...] = ("fill", "reporters")


def _check_inputs(
    updates: Tensor,
    masks: Tensor | None,
    global_model: Tensor,
    participants: Tensor | None,
    weights: Tensor | None,
) -> None:
    if updates.dim() < 2:
        raise ValueError(f"updates must be [..., K, D], got shape {tuple(updates.shape)}")
    expect_g = updates.shape[:-2] + updates.shape[-1:]
    if global_model.shape != expect_g:
        raise ValueError(
            f"global_model shape {tuple(global_model.shape)} must be {tuple(expect_g)} "
            f"for updates of shape {tuple(updates.shape)}"
        )
    if masks is not None:
        if masks.shape != updates.shape:
            raise ValueError(
                f"masks shape {tuple(masks.shape)} must equal updates shape {tuple(updates.shape)}"
            )
        if masks.dtype != torch.bool:
            raise TypeError(f"masks must be a bool tensor, got {masks.dtype}")
    if participants is not None and participants.shape != updates.shape[:-1]:
        raise ValueError(
            f"participants shape {tuple(participants.shape)} must be {tuple(updates.shape[:-1])}"
        )
    if weights is not None and weights.shape != updates.shape[:-1]:
        raise ValueError(
            f"weights shape {tuple(weights.shape)} must be {tuple(updates.shape[:-1])}"
        )


class Aggregator:
    """Base class of server aggregation rules; register subclasses with ``@register_defense``.

    Constructor parameters must be keyword-only (``get_defense`` validates them against the
    signature). ``uses_weights`` documents whether ``weights`` change the result.
    """

    name: ClassVar[str] = ""
    uses_weights: ClassVar[bool] = False

    @classmethod
    def _owner(cls) -> str:
        return f"defense {cls.name!r}"

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Keyword parameters accepted by ``get_defense(name, **params)``."""
        sig = inspect.signature(cls.__init__)
        return tuple(
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )

    @property
    def params(self) -> dict[str, Any]:
        """Current parameter values (for result records)."""
        return {n: getattr(self, n) for n in self.param_names() if hasattr(self, n)}

    def __call__(
        self,
        updates: Tensor,
        masks: Tensor | None,
        global_model: Tensor,
        *,
        participants: Tensor | None = None,
        weights: Tensor | None = None,
        mode: Mode = "fill",
    ) -> Tensor:
        """New global model ``[..., D]`` from client values ``[..., K, D]`` (see module doc)."""
        check_choice(self._owner(), "mode", mode, MODES)
        _check_inputs(updates, masks, global_model, participants, weights)
        part = (
            torch.ones(updates.shape[:-1], dtype=torch.bool, device=updates.device)
            if participants is None
            else participants.to(torch.bool)
        )
        if masks is not None and bool(masks.all()):
            masks = None  # dense input: both modes coincide with the dense rule
        if mode == "fill" or masks is None:
            x = updates if masks is None else fill_unshared(updates, masks, global_model)
            return self.dense(x, part, global_model, weights)
        valid = masks & part.unsqueeze(-1)
        return self.reporters(updates, valid, part, global_model, weights)

    def dense(
        self, x: Tensor, part: Tensor, global_model: Tensor, weights: Tensor | None
    ) -> Tensor:
        """Dense rule over the rows ``x[..., k, :]`` with ``part[..., k]`` True."""
        raise NotImplementedError

    def reporters(
        self,
        x: Tensor,
        valid: Tensor,
        part: Tensor,
        global_model: Tensor,
        weights: Tensor | None,
    ) -> Tensor:
        """Rule over each coordinate's reporters (``valid[..., k, d]`` = participant k sent d)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class CoordinatewiseAggregator(Aggregator):
    """A rule that acts on each coordinate independently (median, trimmed mean, ...).

    Implement ``coordinatewise(x, valid, count) -> value [..., D]`` over the valid entries of each
    column ``x[..., :, d]`` (``valid`` None = all rows valid; ``count`` broadcastable to
    ``[..., D]``, the number of valid rows). Both modes share it: in fill mode every participant
    is valid on every coordinate, in reporters mode only the reporters are. Columns with no valid
    row keep the global value.
    """

    def coordinatewise(self, x: Tensor, valid: Tensor | None, count: Tensor) -> Tensor:
        raise NotImplementedError

    def dense(
        self, x: Tensor, part: Tensor, global_model: Tensor, weights: Tensor | None
    ) -> Tensor:
        if bool(part.all()):
            k = torch.full((), x.shape[-2], dtype=torch.long, device=x.device)
            return self.coordinatewise(x, None, k)
        valid = part.unsqueeze(-1).expand(x.shape)
        count = part.sum(dim=-1, keepdim=True)
        out = self.coordinatewise(x, valid, count)
        return torch.where(count > 0, out, global_model)

    def reporters(
        self,
        x: Tensor,
        valid: Tensor,
        part: Tensor,
        global_model: Tensor,
        weights: Tensor | None,
    ) -> Tensor:
        count = valid.sum(dim=-2)
        out = self.coordinatewise(x, valid, count)
        return torch.where(count > 0, out, global_model)


class FunctionAggregator(Aggregator):
    """Adapter for a decorated function ``f(updates, masks, global_model, *, participants,
    weights, mode, **params)`` (the function then handles both modes itself)."""

    func: ClassVar[Callable[..., Tensor]]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown_params(self._owner(), params, self.defaults)
        self.kwargs = {**self.defaults, **params}

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return tuple(cls.defaults)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def __call__(
        self,
        updates: Tensor,
        masks: Tensor | None,
        global_model: Tensor,
        *,
        participants: Tensor | None = None,
        weights: Tensor | None = None,
        mode: Mode = "fill",
    ) -> Tensor:
        check_choice(self._owner(), "mode", mode, MODES)
        _check_inputs(updates, masks, global_model, participants, weights)
        return type(self).func(
            updates,
            masks,
            global_model,
            participants=participants,
            weights=weights,
            mode=mode,
            **self.kwargs,
        )


_REGISTRY: dict[str, type[Aggregator]] = {}
_T = TypeVar("_T")
_RESERVED = ("updates", "masks", "global_model", "participants", "weights", "mode")


def register_defense(name: str) -> Callable[[_T], _T]:
    """Register an ``Aggregator`` subclass (class decorator) or an aggregation function.

    A function takes ``(updates, masks, global_model, *, participants, weights, mode, **params)``;
    its extra keyword parameters (with defaults) become the defense's parameters.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ParamError(f"register_defense: name must be an identifier string, got {name!r}")

    def deco(obj: _T) -> _T:
        if isinstance(obj, type) and issubclass(obj, Aggregator):
            cls: type[Aggregator] = obj
            cls.name = name
        elif callable(obj) and not isinstance(obj, type):
            sig = inspect.signature(obj)
            extra = [p for p in sig.parameters.values() if p.name not in _RESERVED]
            missing = [p.name for p in extra if p.default is p.empty and p.kind != p.VAR_KEYWORD]
            if missing:
                raise ParamError(
                    f"register_defense({name!r}): parameters {missing} need default values"
                )
            cls = type(
                f"{getattr(obj, '__name__', 'Function')}Aggregator",
                (FunctionAggregator,),
                {
                    "func": staticmethod(obj),
                    "defaults": {p.name: p.default for p in extra if p.default is not p.empty},
                    "name": name,
                    "__doc__": obj.__doc__,
                },
            )
        else:
            raise ParamError(
                f"register_defense({name!r}): expected an Aggregator subclass or a function"
            )
        prev = _REGISTRY.get(name)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            raise ParamError(f"register_defense: name {name!r} is already registered to {prev!r}")
        _REGISTRY[name] = cls
        return obj

    return deco


def list_defenses() -> list[str]:
    """Sorted names of the registered defenses."""
    return sorted(_REGISTRY)


def defense_class(name: str) -> type[Aggregator]:
    """The registered class for ``name`` (error names the allowed defenses)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ParamError(
            f"unknown defense {name!r}; allowed: "
            f"{', '.join(list_defenses()) or '(none registered)'}"
        ) from None


def get_defense(name: str, **params: Any) -> Aggregator:
    """Build the defense registered as ``name``; unknown names/params raise ``ParamError``."""
    cls = defense_class(name)
    unknown_params(f"defense {name!r}", params, cls.param_names())
    return cls(**params)
