"""Attack interface, context and registry (contract: docs/contracts.md, "Attacks").

An attack maps the round's honest deltas ``[..., K, D]`` (``delta = local_after_training -
reference``) to the deltas actually sent. Only rows with ``malicious & participants`` (and, for
stochastic attacks, rows where the attack fires) may differ from the input. Leading batch dims
``...`` are Monte Carlo runs in the batched engine and absent in the Flower engine.

Threat model is declared by class attributes so engines can route attacks (FLPoison-style
capability tags): ``omniscient`` (sees the honest deltas of the round), ``mask_aware`` (uses the
uplink masks), ``kind`` ("model" poisons updates, "data" poisons training labels).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from attacks._params import ParamError, check_bool, unknown_params

if TYPE_CHECKING:
    from defenses.base import Aggregator

__all__ = [
    "Attack",
    "AttackContext",
    "FunctionAttack",
    "ParamError",
    "get_attack",
    "honest_statistics",
    "list_attacks",
    "register_attack",
    "shared_masks",
    "write_shared",
]


@dataclass
class AttackContext:
    """What the attacker may know in one round (shapes: ``...`` leading batch dims)."""

    round: int
    generator: torch.Generator  # explicit RNG (same device as the tensors)
    reference: Tensor  # [..., D] global (server) model of the round
    masks: Tensor | None  # [..., K, D] bool uplink masks, None = dense
    malicious: Tensor  # [..., K] bool rows controlled by the attacker
    participants: Tensor | None  # [..., K] bool, None = all
    honest: Tensor | None = None  # [..., K, D] honest deltas of the round (omniscient only)
    aggregator: Aggregator | None = None  # the server's rule (adaptive attacks may query it)


class Attack:
    """Base class: subclass, set ``name`` via ``@register_attack(name)`` and implement ``craft``.

    Subclasses either override ``__call__`` entirely or implement ``craft(deltas, ctx) -> Tensor``
    returning the malicious deltas for every row (``[..., K, D]``); ``__call__`` then writes them
    into the active rows only (``malicious & participants``). Constructor parameters must be
    keyword-only: ``get_attack`` validates names against the constructor signature.
    """

    name: ClassVar[str] = ""
    omniscient: ClassVar[bool] = False  # needs ctx.honest (honest deltas of the round)
    mask_aware: ClassVar[bool] = False  # uses ctx.masks
    kind: ClassVar[str] = "model"  # "model" (update poisoning) or "data" (training data)
    persistent: bool = False  # engine writes reference + attacked delta into the local model

    def __init__(self, *, persistent: bool = False) -> None:
        self.persistent = check_bool(self._owner(), "persistent", persistent)

    # ------------------------------------------------------------------ helpers
    @classmethod
    def _owner(cls) -> str:
        return f"attack {cls.name!r}"

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Keyword parameters accepted by ``get_attack(name, **params)``."""
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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class FunctionAttack(Attack):
    """Adapter for a decorated function ``f(deltas, ctx, **params) -> deltas``.

    The function returns the full ``[..., K, D]`` tensor; rows outside ``malicious &
    participants`` are restored from the input, so a function cannot touch honest rows by mistake.
    """

    func: ClassVar[Callable[..., Tensor]]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, persistent: bool = False, **params: Any) -> None:
        super().__init__(persistent=persistent)
        unknown_params(self._owner(), params, self.defaults)
        self.kwargs = {**self.defaults, **params}

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        return ("persistent", *cls.defaults)

    @property
    def params(self) -> dict[str, Any]:
        return {"persistent": self.persistent, **self.kwargs}

    def __call__(self, deltas: Tensor, ctx: AttackContext) -> Tensor:
        out = type(self).func(deltas, ctx, **self.kwargs)
        if out.shape != deltas.shape:
            raise ValueError(
                f"{self._owner()}: returned shape {tuple(out.shape)}, "
                f"expected {tuple(deltas.shape)}"
            )
        rows = self.active_rows(deltas, ctx)
        return torch.where(rows.unsqueeze(-1), out.to(deltas.dtype), deltas)


_REGISTRY: dict[str, type[Attack]] = {}
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
    if not isinstance(name, str) or not name.isidentifier():
        raise ParamError(f"register_attack: name must be an identifier string, got {name!r}")
    if kind not in ("model", "data"):
        raise ParamError(f"register_attack: 'kind' must be one of 'model', 'data', got {kind!r}")

    def deco(obj: _T) -> _T:
        if isinstance(obj, type) and issubclass(obj, Attack):
            cls: type[Attack] = obj
            cls.name = name
        elif callable(obj) and not isinstance(obj, type):
            sig = inspect.signature(obj)
            params = list(sig.parameters.values())
            if len(params) < 2:
                raise ParamError(
                    f"register_attack({name!r}): function must take (deltas, ctx, **params)"
                )
            defaults = {p.name: p.default for p in params[2:] if p.default is not p.empty}
            missing = [
                p.name for p in params[2:] if p.default is p.empty and p.kind != p.VAR_KEYWORD
            ]
            if missing:
                raise ParamError(
                    f"register_attack({name!r}): parameters {missing} need default values"
                )
            cls = type(
                f"{getattr(obj, '__name__', 'Function')}Attack",
                (FunctionAttack,),
                {
                    "func": staticmethod(obj),
                    "defaults": defaults,
                    "name": name,
                    "omniscient": omniscient,
                    "mask_aware": mask_aware,
                    "kind": kind,
                    "__doc__": obj.__doc__,
                },
            )
        else:
            raise ParamError(
                f"register_attack({name!r}): expected an Attack subclass or a function, got {obj!r}"
            )
        prev = _REGISTRY.get(name)
        if prev is not None and prev.__qualname__ != cls.__qualname__:
            raise ParamError(f"register_attack: name {name!r} is already registered to {prev!r}")
        _REGISTRY[name] = cls
        return obj

    return deco


def list_attacks() -> list[str]:
    """Sorted names of the registered attacks."""
    return sorted(_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    """The registered class for ``name`` (error names the allowed attacks)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ParamError(
            f"unknown attack {name!r}; allowed: {', '.join(list_attacks()) or '(none registered)'}"
        ) from None


def get_attack(name: str, **params: Any) -> Attack:
    """Build the attack registered as ``name``; unknown names/params raise ``ParamError``."""
    cls = attack_class(name)
    unknown_params(f"attack {name!r}", params, cls.param_names())
    return cls(**params)


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
