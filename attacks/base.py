"""Attack interface, context and registry (contract: docs/contracts.md, "Attacks").

An attack maps the round's honest deltas ``[..., K, D]`` (``delta = local_after_training -
reference``) to the deltas actually sent. Only rows with ``malicious & participants`` (and, for
stochastic attacks, rows where the attack fires) may differ from the input. Leading batch dims
``...`` are Monte Carlo runs in the batched engine and absent in the Flower engine.

Threat model is declared by class attributes so engines can route attacks (FLPoison-style
capability tags): ``omniscient`` (sees the honest deltas of the round), ``mask_aware`` (uses the
uplink masks), ``kind`` ("model" poisons updates, "data" poisons training labels). Whether the
attacker keeps its poisoned model (persistent vs transmit-only) is the engine's threat-model
setting, not an attack parameter. An attack keeps nothing on ``self``: run state lives in
``ctx.state``, per-round diagnostics go to ``ctx.info``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from psfed_robust.params import ParamError
from psfed_robust.registry import FunctionAdapter, Registrable, Registry

if TYPE_CHECKING:
    from defenses.base import Aggregator

__all__ = [
    "Attack",
    "AttackContext",
    "FunctionAttack",
    "ParamError",
    "attack_class",
    "get_attack",
    "honest_statistics",
    "list_attacks",
    "register_attack",
    "shared_masks",
    "write_shared",
]


@dataclass
class AttackContext:
    """What the attacker may know in one round (shapes: ``...`` leading batch dims).

    ``state`` is the attack's explicit run state: the engine creates it empty at the start of a
    run block (per adversary) and passes the same dict every round, so a stateful attack reads and
    writes it there and gives the same result with any number of worker threads. ``info`` is
    fresh each round and receives diagnostics (``fired``, ``gamma``, ``z``).
    """

    round: int
    generator: torch.Generator  # explicit RNG (same device as the tensors)
    reference: Tensor  # [..., D] global (server) model of the round
    masks: Tensor | None  # [..., K, D] bool uplink masks, None = dense
    malicious: Tensor  # [..., K] bool rows controlled by the attacker
    participants: Tensor | None  # [..., K] bool, None = all
    honest: Tensor | None = None  # [..., K, D] honest deltas of the round (omniscient only)
    aggregator: Aggregator | None = None  # the server's rule (adaptive attacks may query it)
    state: dict[str, Any] = field(default_factory=dict)  # persistent per run block / adversary
    info: dict[str, Any] = field(default_factory=dict)  # this round's diagnostics


class Attack(Registrable):
    """Base class: subclass, set ``name`` via ``@register_attack(name)`` and implement ``craft``.

    Subclasses either override ``__call__`` entirely or implement ``craft(deltas, ctx) -> Tensor``
    returning the malicious deltas for every row (``[..., K, D]``); ``__call__`` then writes them
    into the active rows only (``malicious & participants``). Constructor parameters must be
    keyword-only: ``get_attack`` validates names against the constructor signature.
    """

    registry_label: ClassVar[str] = "attack"
    omniscient: ClassVar[bool] = False  # needs ctx.honest (honest deltas of the round)
    mask_aware: ClassVar[bool] = False  # uses ctx.masks
    kind: ClassVar[str] = "model"  # "model" (update poisoning) or "data" (training data)

    @staticmethod
    def active_rows(deltas: Tensor, ctx: AttackContext) -> Tensor:
        """``[..., K]`` bool: rows the attacker controls that take part in the round."""
        rows = ctx.malicious.to(torch.bool)
        if ctx.participants is not None:
            rows = rows & ctx.participants.to(torch.bool)
        return rows.expand(deltas.shape[:-1])

    @staticmethod
    def honest_rows(deltas: Tensor, ctx: AttackContext) -> Tensor:
        """``[..., K]`` bool: honest participants (the population omniscient attacks observe)."""
        rows = ~ctx.malicious.to(torch.bool)
        if ctx.participants is not None:
            rows = rows & ctx.participants.to(torch.bool)
        return rows.expand(deltas.shape[:-1])

    @staticmethod
    def honest_deltas(deltas: Tensor, ctx: AttackContext) -> Tensor:
        """Honest deltas of the round: ``ctx.honest`` if given, else the input deltas."""
        return deltas if ctx.honest is None else ctx.honest.to(deltas.dtype)

    def craft(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        """Malicious deltas for every row ``[..., K, D]`` (only active rows are used)."""
        raise NotImplementedError(f"{type(self).__name__} must implement craft() or __call__()")

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        """Return ``deltas`` with the active rows replaced by ``craft(deltas, ctx)``."""
        rows = self.active_rows(deltas, ctx)
        if not bool(rows.any()):
            return deltas
        crafted = self.craft(deltas, ctx).to(deltas.dtype).expand_as(deltas)
        return torch.where(rows.unsqueeze(-1), crafted, deltas)


class FunctionAttack(FunctionAdapter, Attack):
    """Adapter for a decorated function ``f(deltas, ctx, **params) -> deltas``.

    The function returns the full ``[..., K, D]`` tensor; rows outside ``malicious &
    participants`` are restored from the input, so a function cannot touch honest rows by mistake.
    """

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        out = self.call(deltas, ctx)
        if not isinstance(out, Tensor) or out.shape != deltas.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self._owner()}: returned {got}, expected {tuple(deltas.shape)}")
        rows = self.active_rows(deltas, ctx)
        return torch.where(rows.unsqueeze(-1), out.to(deltas.dtype), deltas)


_REGISTRY: Registry[Attack] = Registry("attack", Attack, FunctionAttack, skip_first=2)
_T = TypeVar("_T")


def register_attack(
    name: str,
    *,
    omniscient: bool = False,
    mask_aware: bool = False,
    kind: str = "model",
) -> Callable[[_T], _T]:
    """Register an ``Attack`` subclass (class decorator) or a function ``f(deltas, ctx, **params)``.

    For a function, keyword parameters with defaults become the attack's parameters and the
    capability tags come from this decorator's arguments; for a class they come from the class.
    Re-registering a name with a different object raises (silently shadowing an attack would make
    scenario files ambiguous).
    """
    if kind not in ("model", "data"):
        raise ParamError(f"register_attack: 'kind' must be one of 'model', 'data', got {kind!r}")
    return _REGISTRY.register(name, omniscient=omniscient, mask_aware=mask_aware, kind=kind)


def list_attacks() -> list[str]:
    """Sorted names of the registered attacks."""
    return _REGISTRY.names()


def attack_class(name: str) -> type[Attack]:
    """The registered class for ``name`` (error names the allowed attacks)."""
    return _REGISTRY.cls(name)


def get_attack(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name``; unknown names/params raise ``ParamError``."""
    return _REGISTRY.get(name, **params)


def shared_masks(deltas: Tensor, ctx: AttackContext) -> Tensor:
    """``[..., K, D]`` bool uplink masks (all True when ``ctx.masks`` is None)."""
    if ctx.masks is None:
        return torch.ones(deltas.shape, dtype=torch.bool, device=deltas.device)
    return ctx.masks.to(torch.bool).expand(deltas.shape)


def honest_statistics(
    deltas: Tensor, ctx: AttackContext, ddof: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask-aware per-coordinate mean, std and count of the honest deltas ``[..., D]`` each.

    Statistics run over the honest participants (``~malicious & participants``) that *report* the
    coordinate (``ctx.masks``), never over clients that did not send it. Coordinates with no honest
    reporter get mean 0, std 0 and count 0; the std is 0 where ``count <= ddof``.
    """
    x = Attack.honest_deltas(deltas, ctx)
    rows = Attack.honest_rows(deltas, ctx)
    m = shared_masks(deltas, ctx) & rows.unsqueeze(-1)
    mf = m.to(x.dtype)
    count = mf.sum(dim=-2)
    xz = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    mu = xz.sum(dim=-2) / count.clamp_min(1.0)
    dev = torch.where(m, x - mu.unsqueeze(-2), torch.zeros((), dtype=x.dtype, device=x.device))
    var = dev.square().sum(dim=-2) / (count - ddof).clamp_min(1.0)
    var = torch.where(count > ddof, var, torch.zeros_like(var))
    return mu, var.sqrt(), count


def write_shared(deltas: Tensor, crafted: Tensor, ctx: AttackContext, where: Tensor) -> Tensor:
    """Write ``crafted`` into active rows on their shared coordinates where ``where`` holds.

    ``where`` is ``[..., D]`` or ``[..., K, D]`` (e.g. "some honest client reported it"). Unshared
    coordinates never reach the server, so they keep the attacker's own delta.
    """
    rows = Attack.active_rows(deltas, ctx).unsqueeze(-1)
    sel = rows & shared_masks(deltas, ctx)
    sel = sel & (where.unsqueeze(-2) if where.dim() == deltas.dim() - 1 else where)
    return torch.where(sel, crafted.to(deltas.dtype).expand_as(deltas), deltas)
