"""Parameter validators shared by attacks, defenses and their registry.

Every check raises :class:`ParamError` (a ``ValueError``) naming the owner (``attack 'alie'``),
the parameter, the value received and the allowed range or names, so a bad scenario value is
fixed from the message alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


class ParamError(ValueError):
    """A bad parameter of an attack or a defense (a ``ValueError``)."""


def _fmt(owner: str, name: str, value: Any, allowed: str) -> str:
    return f"{owner}: parameter {name!r} must be {allowed}, got {value!r}"


def check_real(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the given interval or raise ``ParamError``."""
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    allowed = f"a finite real number in {'(' if low_open or low is None else '['}{lo}, {hi}"
    allowed += ")" if high_open or high is None else "]"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(_fmt(owner, name, value, allowed))
    v = float(value)
    if not math.isfinite(v):
        raise ParamError(_fmt(owner, name, value, allowed))
    if low is not None and (v < low or (low_open and v == low)):
        raise ParamError(_fmt(owner, name, value, allowed))
    if high is not None and (v > high or (high_open and v == high)):
        raise ParamError(_fmt(owner, name, value, allowed))
    return v


def check_int(
    owner: str, name: str, value: Any, *, low: int | None = None, high: int | None = None
) -> int:
    """Return ``value`` as an int inside ``[low, high]`` or raise ``ParamError``."""
    lo = "-inf" if low is None else str(low)
    hi = "inf" if high is None else str(high)
    allowed = f"an integer in [{lo}, {hi}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(_fmt(owner, name, value, allowed))
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParamError(_fmt(owner, name, value, allowed))
    return int(value)


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed`` or raise ``ParamError``."""
    options = tuple(allowed)
    if value not in options:
        raise ParamError(_fmt(owner, name, value, "one of " + ", ".join(map(repr, options))))
    return value


def check_bool(owner: str, name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool or raise ``ParamError``."""
    if not isinstance(value, bool):
        raise ParamError(_fmt(owner, name, value, "a bool (True or False)"))
    return value


def unknown_params(owner: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise ``ParamError`` if ``given`` holds a name outside ``allowed``."""
    allowed_t = tuple(sorted(allowed))
    bad = sorted(set(given) - set(allowed_t))
    if bad:
        names = ", ".join(allowed_t) if allowed_t else "(none)"
        raise ParamError(
            f"{owner}: unknown parameter(s) {', '.join(map(repr, bad))}; allowed: {names}"
        )
