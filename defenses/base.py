"""Aggregator interface and registry (contract: docs/contracts.md, "Defenses").

``Aggregator.__call__(updates, masks, global_model, *, participants, weights, mode, info,
generator)`` returns the new global model ``[..., D]``. Two views of partial updates:

- ``fill``: each participant's unshared entries are replaced by ``global_model`` (PSO-Fed's server
  step); the dense rule then runs over the participants' filled vectors (``dense``).
- ``reporters``: per coordinate, the rule runs over the participants that reported it
  (``reporters``); coordinates nobody reported keep ``global_model``'s value.

``__call__`` validates the inputs and the rule's precondition on the participant count
(``check_participants``) once, then calls ``aggregate``, which by default routes to ``dense`` or
``reporters``; coordinate-wise rules subclass ``CoordinatewiseAggregator`` and implement one masked
kernel used by both modes. Diagnostics (e.g. Krum's selected rows) go to the ``info`` dict, never
onto ``self``. Never infer a mask from zero values; never divide by the number of clients when not
all of them reported a coordinate.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal, TypeVar

import torch
from torch import Tensor

from psfed_robust.core.aggregation import check_round_shapes, fill_unshared
from psfed_robust.params import ParamError, check_choice
from psfed_robust.registry import FunctionAdapter, Registrable, Registry

__all__ = [
    "Aggregator",
    "CoordinatewiseAggregator",
    "Mode",
    "ParamError",
    "RoundInputs",
    "defense_class",
    "get_defense",
    "list_defenses",
    "register_defense",
]

Mode = Literal["fill", "reporters"]
MODES: tuple[str, ...] = ("fill", "reporters")


@dataclass
class RoundInputs:
    """One call's validated inputs, as ``aggregate``, ``dense`` and ``reporters`` see them.

    In ``dense`` (fill mode or dense input) ``x`` holds the participants' filled vectors and
    ``valid`` is None; in ``reporters`` ``valid[..., k, d]`` says participant k sent coordinate d.
    """

    x: Tensor  # [..., K, D] client values
    masks: Tensor | None  # [..., K, D] bool uplink masks as passed (None = dense)
    global_model: Tensor  # [..., D]
    participants: Tensor | None  # [..., K] bool as passed (None = all)
    part: Tensor  # [..., K] bool participants (never None)
    weights: Tensor | None  # [..., K] server weights (None = uniform over participants)
    mode: Mode
    info: dict[str, Any]  # receives the rule's diagnostics
    valid: Tensor | None = None  # [..., K, D] reporters: masks & participants
    generator: torch.Generator | None = None  # the round's RNG (randomised rules: bucketing)


class Aggregator(Registrable):
    """Base class of server aggregation rules; register subclasses with ``@register_defense``.

    Constructor parameters must be keyword-only (``get_defense`` validates them against the
    signature). ``uses_weights`` documents whether ``weights`` change the result. A rule with a
    precondition on the number of participants ``n`` (Krum: ``n > 2f + 2``) states it in
    ``check_participants``; ``__call__`` applies it to the smallest non-zero participant count of
    the batch, so a violating round raises instead of silently clamping.
    """

    registry_label: ClassVar[str] = "defense"
    uses_weights: ClassVar[bool] = False

    def check_participants(self, n: int) -> None:
        """Raise ``ParamError`` (naming the rule, ``n`` and ``f``) if the rule is not defined for
        ``n`` participants. Default: every ``n`` is fine."""

    def _needs(self, n: int, condition: str, hint: str = "") -> ParamError:
        f = getattr(self, "f", None)
        return ParamError(
            f"{self._owner()}: needs {condition} participants (f={f}), got n={n}"
            + (f"; {hint}" if hint else "")
        )

    def _check_counts(self, updates: Tensor, participants: Tensor | None) -> None:
        if type(self).check_participants is Aggregator.check_participants:
            return
        if participants is None:
            self.check_participants(int(updates.shape[-2]))
            return
        counts = participants.to(torch.bool).sum(-1)
        counts = counts[counts > 0]  # a round nobody joined keeps the global model
        if counts.numel():
            self.check_participants(int(counts.min()))

    def __call__(
        self,
        updates: Tensor,
        masks: Tensor | None,
        global_model: Tensor,
        *,
        participants: Tensor | None = None,
        weights: Tensor | None = None,
        mode: Mode = "fill",
        info: dict[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """New global model ``[..., D]`` from client values ``[..., K, D]`` (see module doc).

        ``info`` (optional) receives the rule's diagnostics of this call; ``generator`` is the
        round's explicit RNG for randomised rules (bucketing's shuffle), ignored by the others.
        """
        check_choice(self._owner(), "mode", mode, MODES)
        check_round_shapes(updates, masks, global_model, participants, weights)
        if updates.shape[-2] == 0:
            return global_model.clone()  # no client row at all: nothing to aggregate
        self._check_counts(updates, participants)
        part = (
            torch.ones(updates.shape[:-1], dtype=torch.bool, device=updates.device)
            if participants is None
            else participants.to(torch.bool)
        )
        inputs = RoundInputs(
            updates, masks, global_model, participants, part, weights, mode,
            {} if info is None else info, generator=generator,
        )
        return self.aggregate(inputs)

    def aggregate(self, a: RoundInputs) -> Tensor:
        """The rule on validated inputs; by default routes to ``dense`` or ``reporters``."""
        masks = None if a.masks is not None and bool(a.masks.all()) else a.masks
        if a.mode == "fill" or masks is None:  # dense input: both modes are the dense rule
            x = a.x if masks is None else fill_unshared(a.x, masks, a.global_model)
            return self.dense(replace(a, x=x, masks=masks))
        return self.reporters(replace(a, valid=masks & a.part.unsqueeze(-1)))

    def dense(self, a: RoundInputs) -> Tensor:
        """Dense rule over the rows ``a.x[..., k, :]`` with ``a.part[..., k]`` True."""
        raise NotImplementedError(f"{type(self).__name__} must implement dense() or aggregate()")

    def reporters(self, a: RoundInputs) -> Tensor:
        """Rule over each coordinate's reporters (``a.valid[..., k, d]``: k sent d)."""
        raise NotImplementedError(f"{type(self).__name__} must implement reporters()")


class CoordinatewiseAggregator(Aggregator):
    """A rule that acts on each coordinate independently (median, trimmed mean, ...).

    Implement ``coordinatewise(x, valid, count) -> value [..., D]`` over the valid entries of each
    column ``x[..., :, d]`` (``valid`` None = all rows valid; ``count`` broadcastable to
    ``[..., D]``, the number of valid rows). Both modes share it: in fill mode every participant
    is valid on every coordinate, in reporters mode only the reporters are. Columns with fewer
    than ``min_count()`` valid rows (default 1) keep the global value.
    """

    def coordinatewise(self, x: Tensor, valid: Tensor | None, count: Tensor) -> Tensor:
        raise NotImplementedError

    def min_count(self) -> int:
        """Fewest valid values a column needs for the rule to be defined (else: global kept)."""
        return 1

    def dense(self, a: RoundInputs) -> Tensor:
        if bool(a.part.all()):
            k = torch.full((), a.x.shape[-2], dtype=torch.long, device=a.x.device)
            return self.coordinatewise(a.x, None, k)
        count = a.part.sum(dim=-1, keepdim=True)
        out = self.coordinatewise(a.x, a.part.unsqueeze(-1).expand(a.x.shape), count)
        return torch.where(count >= self.min_count(), out, a.global_model)

    def reporters(self, a: RoundInputs) -> Tensor:
        assert a.valid is not None
        count = a.valid.sum(dim=-2)
        out = self.coordinatewise(a.x, a.valid, count)
        return torch.where(count >= self.min_count(), out, a.global_model)


class FunctionAggregator(FunctionAdapter, Aggregator):
    """Adapter for a decorated function ``f(updates, masks, global_model, *, participants,
    weights, mode, **params)`` (the function then handles both modes itself; it also receives
    ``info`` and ``generator`` if it declares those parameters)."""

    def aggregate(self, a: RoundInputs) -> Tensor:
        declared = inspect.signature(type(self).func).parameters
        extra: dict[str, Any] = {"info": a.info} if "info" in declared else {}
        if "generator" in declared:
            extra["generator"] = a.generator
        out: Tensor = self.call(
            a.x, a.masks, a.global_model, participants=a.participants, weights=a.weights,
            mode=a.mode, **extra,
        )
        return out


_RESERVED = (
    "updates", "masks", "global_model", "participants", "weights", "mode", "info", "generator",
)
_REGISTRY: Registry[Aggregator] = Registry(
    "defense", Aggregator, FunctionAggregator, reserved=_RESERVED
)
_T = TypeVar("_T")


def register_defense(name: str) -> Callable[[_T], _T]:
    """Register an ``Aggregator`` subclass (class decorator) or an aggregation function.

    A function takes ``(updates, masks, global_model, *, participants, weights, mode, **params)``;
    its extra keyword parameters (with defaults) become the defense's parameters.
    """
    return _REGISTRY.register(name)


def list_defenses() -> list[str]:
    """Sorted names of the registered defenses."""
    return _REGISTRY.names()


def defense_class(name: str) -> type[Aggregator]:
    """The registered class for ``name`` (error names the allowed defenses)."""
    return _REGISTRY.cls(name)


def get_defense(name: str, **params: Any) -> Aggregator:
    """Build the defense registered as ``name``; unknown names/params raise ``ParamError``.

    ``defenses.get_defense`` (``defenses.compose.get_defense``) also takes ``pre=[...]``.
    """
    return _REGISTRY.get(name, **params)
