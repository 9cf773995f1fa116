"""Pre-aggregators and their composition with any aggregation rule.

A *pre-aggregator* maps the round's client rows to new rows before the rule runs: NNM mixes each
row with its nearest neighbours (Allouah et al., AISTATS 2023), bucketing averages random buckets
(Karimireddy, He & Jaggi, ICLR 2022), ARC clips the largest updates (Allouah et al., NeurIPS
2024). ``compose(pre, rule)`` chains any number of them in front of any registered rule::

    agg = compose(["nnm", ("bucketing", {"s": 2})], get_defense("krum", f=2))
    agg = get_defense("krum", f=2, pre=["nnm", ("bucketing", {"s": 2})])   # the same

(``defenses.get_defense`` is this module's :func:`get_defense`, which adds ``pre`` to the
registry's ``defenses.base.get_defense``.)

A spec is a registered name, ``(name, params)``, a mapping ``{"name": ..., **params}`` or a
``PreAggregator`` object. A pre-aggregator's ``f=None`` (the default) means the composition's
``f``: the rule's ``f`` (``pre=["nnm"]`` with ``krum(f=2)`` mixes ``n - 2`` rows), or, for a rule
without one, ``compose(..., f=...)`` / ``get_defense("median", f=2, pre=["nnm"])``. NNM and ARC
without any ``f`` raise (with ``f = 0`` NNM would mix every row into the mean).

Both aggregation modes: in *fill* mode the pre-aggregator sees the participants' filled vectors
and hands dense rows to the rule; in *reporters* mode it sees each row's reported coordinates
(``masks & participants``) and hands the rule new rows with new masks (a mixed row or a bucket
reports the coordinates any of its members reported; see each module). Weights follow the rows
(NNM, ARC: unchanged; bucketing: summed per bucket). Preconditions chain: ``check_participants``
checks each stage on the row count the previous stage leaves (bucketing leaves ``ceil(n/s)``).

Each pre-aggregator is also registered as a defense on its own: pre-aggregation then the plain
mean (PSO-Fed's step), e.g. ``get_defense("arc", f=2)`` is ARC-clipped averaging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from defenses.base import Aggregator, ParamError, RoundInputs, defense_class, list_defenses
from defenses.base import get_defense as get_rule
from defenses.mean import Mean
from psfed_robust.core.aggregation import fill_unshared
from psfed_robust.params import check_int

__all__ = ["Composed", "PreAggregator", "compose", "get_defense", "pre_aggregator", "rows_view"]


def rows_view(a: RoundInputs) -> tuple[Tensor, Tensor | None]:
    """``(x, valid)``: the rows a pre-aggregator works on.

    fill mode or dense input: ``x`` are the filled vectors and ``valid`` None (every participant
    holds every coordinate); reporters: ``x`` as sent and ``valid = masks & participants``.
    Non-participant rows are never read by the pre-aggregators (they mask them out).
    """
    masks = None if a.masks is not None and bool(a.masks.all()) else a.masks
    if masks is None:
        return a.x, None
    if a.mode == "fill":
        return fill_unshared(a.x, masks, a.global_model), None
    return a.x, masks & a.part.unsqueeze(-1)


def new_rows(
    a: RoundInputs, x: Tensor, valid: Tensor | None, part: Tensor, weights: Tensor | None
) -> RoundInputs:
    """The rule's inputs after a pre-aggregation stage (rows ``x``, masks ``valid``)."""
    return replace(a, x=x, masks=valid, participants=part, part=part, weights=weights, valid=None)


class PreAggregator(Aggregator):
    """Base of pre-aggregators: ``transform`` maps the round's rows to new rows.

    Subclasses implement ``transform(a, f)`` (``f``: the resolved number of Byzantine clients),
    and, if they change the row count, ``out_count(n)``; ``check_rows(n, f)`` states their
    precondition. On its own (a registered defense) a pre-aggregator is followed by the mean.
    """

    uses_weights = True
    uses_f: ClassVar[bool] = True  # transform depends on f (NNM, ARC; not bucketing)
    f: int | None = None

    def resolve_f(self, default: int) -> int:
        """``self.f`` if set, else ``default`` (the composed rule's ``f``)."""
        return default if self.f is None else self.f

    def out_count(self, n: int) -> int:
        """Rows left from ``n`` participant rows (default: the same)."""
        return n

    def check_rows(self, n: int, f: int) -> None:
        """Raise ``ParamError`` if the stage is undefined for ``n`` rows (default: never)."""

    def transform(self, a: RoundInputs, f: int) -> RoundInputs:
        raise NotImplementedError(f"{type(self).__name__} must implement transform()")

    def check_participants(self, n: int) -> None:
        self.check_rows(n, self.resolve_f(0))

    def aggregate(self, a: RoundInputs) -> Tensor:
        return Mean().aggregate(self.transform(a, self.resolve_f(0)))


def _rule_f(rule: Aggregator) -> int | None:
    f = getattr(rule, "f", None)
    return f if isinstance(f, int) and not isinstance(f, bool) else None


def pre_aggregator(spec: Any) -> PreAggregator:
    """A ``PreAggregator`` from a spec: name, ``(name, params)``, ``{"name": ..., **params}``
    (or ``{"name": ..., "params": {...}}``) or an object."""
    if isinstance(spec, PreAggregator):
        return spec
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ParamError(f"pre-aggregator spec {dict(spec)!r} has no 'name'")
        rest = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
        params = dict(rest["params"]) if set(rest) == {"params"} else rest
    elif isinstance(spec, Sequence) and len(spec) == 2 and isinstance(spec[1], Mapping):
        name, params = spec[0], dict(spec[1])
    else:
        raise ParamError(
            f"pre-aggregator spec must be a name, (name, params), {{'name': ..., **params}} or "
            f"a PreAggregator, got {spec!r}"
        )
    cls = defense_class(str(name))
    if not issubclass(cls, PreAggregator):
        pres = ", ".join(_pre_names()) or "(none registered)"
        raise ParamError(f"defense {name!r} is not a pre-aggregator; pre-aggregators: {pres}")
    obj = get_rule(str(name), **params)
    assert isinstance(obj, PreAggregator)
    return obj


def _pre_names() -> list[str]:
    return [n for n in list_defenses() if issubclass(defense_class(n), PreAggregator)]


class Composed(Aggregator):
    """Pre-aggregators ``pre`` (in order) then ``rule``; built by :func:`compose`."""

    name: ClassVar[str] = "composed"

    def __init__(
        self, *, pre: Sequence[PreAggregator], rule: Aggregator, f: int | None = None
    ) -> None:
        if isinstance(rule, PreAggregator | Composed) or not isinstance(rule, Aggregator):
            raise ParamError(f"compose: the rule must be an aggregation rule, got {rule!r}")
        self.pre = tuple(pre)
        self.rule = rule
        own = _rule_f(rule)
        self.f = own if f is None else check_int("compose", "f", f, low=0)
        for p in self.pre:
            if p.uses_f and p.f is None and self.f is None:
                raise ParamError(
                    f"{p._owner()}: needs f, and rule {rule.name!r} has none: give it as "
                    f"({p.name!r}, {{'f': ...}}) or pass f to compose/get_defense"
                )

    def _f(self, p: PreAggregator) -> int:
        return p.resolve_f(0 if self.f is None else self.f)

    @property
    def uses_weights(self) -> bool:  # type: ignore[override]
        return bool(self.rule.uses_weights)

    @property
    def params(self) -> dict[str, Any]:
        return {"pre": [(p.name, p.params) for p in self.pre], "rule": (self.rule.name,
                                                                        self.rule.params)}

    def __repr__(self) -> str:
        return f"Composed(pre={list(self.pre)!r}, rule={self.rule!r})"

    def check_participants(self, n: int) -> None:
        for p in self.pre:
            p.check_rows(n, self._f(p))
            n = p.out_count(n)
        self.rule.check_participants(n)

    def aggregate(self, a: RoundInputs) -> Tensor:
        for p in self.pre:
            a = p.transform(a, self._f(p))
        return self.rule.aggregate(a)


def compose(
    pre: Sequence[Any] | Any, rule: Aggregator | str, *, f: int | None = None
) -> Aggregator:
    """``rule`` preceded by the pre-aggregators ``pre`` (specs, see :func:`pre_aggregator`).

    ``rule`` is an ``Aggregator`` or a registered name (default parameters). ``pre`` may be one
    spec or a sequence of them; an empty sequence returns the rule itself. ``f``: the
    pre-aggregators' default ``f`` (default: the rule's).
    """
    r = get_rule(rule) if isinstance(rule, str) else rule
    one = isinstance(pre, str | Mapping | PreAggregator) or (
        isinstance(pre, tuple) and len(pre) == 2 and isinstance(pre[1], Mapping)
    )
    specs = [pre] if one else list(pre)
    stages = [pre_aggregator(s) for s in specs]
    if not stages:
        return r
    if isinstance(r, Composed):
        return Composed(pre=[*stages, *r.pre], rule=r.rule, f=r.f if f is None else f)
    return Composed(pre=stages, rule=r, f=f)


def get_defense(name: str, *, pre: Any = None, **params: Any) -> Aggregator:
    """Build the defense ``name`` (``defenses.get_defense``), with pre-aggregators ``pre``.

    ``get_defense("krum", f=2, pre=["nnm", ("bucketing", {"s": 2})])`` is
    ``compose(pre, krum(f=2))``; an empty or None ``pre`` gives the plain rule. With ``pre``, an
    ``f`` the rule does not take (``median``) is the pre-aggregators' ``f``.
    """
    if not pre:
        return get_rule(name, **params)
    takes_f = "f" in defense_class(name).param_names()
    f = params.pop("f") if "f" in params and not takes_f else None
    return compose(pre, get_rule(name, **params), f=f)


def masked_mix(w: Tensor, x: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``[..., R, D]`` rows mixing ``x`` ``[..., K, D]`` with ``w`` ``[..., R, K]`` (0/1).

    ``valid`` None: ``(w @ x) / sum_k w`` (plain means). Otherwise per coordinate over the
    members that reported it; the new row reports a coordinate if any member did. inf/NaN
    members contribute as IEEE sums would (a member with weight 0 never does), computed without
    ``0 * inf``.
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if valid is None:
        v = torch.ones((), dtype=x.dtype, device=x.device).expand(x.shape)
        keep = None
    else:
        v = valid.to(x.dtype)
        keep = valid
    finite = torch.isfinite(x)
    ok = finite if keep is None else finite & keep
    xs = torch.where(ok, x, zero)
    cnt = w @ v
    out = (w @ xs) / cnt.clamp_min(1.0)
    if not bool(finite.all()):
        bad = ~finite if keep is None else ~finite & keep
        pos = w @ (bad & (x > 0)).to(x.dtype)
        neg = w @ (bad & (x < 0)).to(x.dtype)
        nan = w @ (bad & torch.isnan(x)).to(x.dtype)
        inf = torch.full((), float("inf"), dtype=x.dtype, device=x.device)
        out = torch.where(pos > 0, inf, out)
        out = torch.where(neg > 0, -inf, out)
        out = torch.where((nan > 0) | ((pos > 0) & (neg > 0)), torch.nan, out)
    if valid is None:
        return out, None
    return out, cnt > 0
