"""One registry for the testbed's plug-in components (attacks, defenses).

A component is a class with keyword-only constructor parameters, registered under an identifier
name; scenario files and ``get_attack`` / ``get_defense`` build it from ``name`` and a parameter
dict. The parameters are read from the constructor's signature, so an unknown name or parameter
fails with a :class:`~psfed_robust.params.ParamError` listing the allowed ones, before any work.
A plain function can be registered too: a :class:`FunctionAdapter` subclass is generated whose
parameters are the function's keyword arguments with defaults.

Components are pure with respect to a run: whatever they must carry from one round to the next
lives in the state the engine passes in (``AttackContext.state``), never on ``self`` — one object
may serve several run blocks at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any, ClassVar, Generic, TypeVar

from psfed_robust.params import ParamError, unknown_params

__all__ = [
    "FunctionAdapter",
    "Registrable",
    "Registry",
    "function_defaults",
    "keyword_params",
]

T = TypeVar("T", bound="Registrable")
Obj = TypeVar("Obj")


@functools.lru_cache(maxsize=1024)
def keyword_params(init: Callable[..., Any]) -> tuple[str, ...]:
    """Names of the keyword parameters of a constructor (``self``, ``*args``, ``**kw`` excluded;
    cached: ``inspect.signature`` of a class without its own ``__init__`` parses the builtin's
    text signature, ~0.3 ms per registry lookup)."""
    sig = inspect.signature(init)
    return tuple(
        p.name
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def function_defaults(
    owner: str, func: Callable[..., Any], skip_first: int, reserved: Collection[str] = ()
) -> dict[str, Any]:
    """The parameters of a registered function: its arguments after the first ``skip_first``,
    minus ``reserved`` names, each of which must have a default value."""
    params = list(inspect.signature(func).parameters.values())
    if len(params) < skip_first:
        raise ParamError(f"{owner}: the function must take at least {skip_first} arguments")
    extra = [
        p
        for p in params[skip_first:]
        if p.name not in reserved and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    missing = [p.name for p in extra if p.default is p.empty]
    if missing:
        raise ParamError(f"{owner}: parameters {missing} need default values")
    return {p.name: p.default for p in extra}


class Registrable:
    """Base of registered components: ``name``, parameter introspection, ``repr``."""

    name: ClassVar[str] = ""
    registry_label: ClassVar[str] = "component"  # "attack", "defense": used in error messages

    @classmethod
    def _owner(cls) -> str:
        return f"{cls.registry_label} {cls.name!r}"

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        """Keyword parameters accepted by the registry's ``get(name, **params)``."""
        return keyword_params(cls.__init__)

    @property
    def params(self) -> dict[str, Any]:
        """Current parameter values (for result records)."""
        return {n: getattr(self, n) for n in self.param_names() if hasattr(self, n)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class FunctionAdapter(Registrable):
    """A registered function as a component: its keyword defaults are the parameters.

    Subclasses (one per registered function, made by :meth:`Registry.register`) carry ``func``
    and ``defaults``; :meth:`call` runs the function with the instance's parameter values.
    """

    func: ClassVar[Callable[..., Any]]
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

    def call(self, *args: Any, **kwargs: Any) -> Any:
        return type(self).func(*args, **kwargs, **self.kwargs)


class Registry(Generic[T]):
    """Name -> class registry of one component kind.

    ``base`` is the class registered classes must derive from; ``adapter`` (a subclass of
    ``base`` and :class:`FunctionAdapter`) wraps registered functions, whose first
    ``skip_first`` arguments and ``reserved`` keyword arguments are inputs, not parameters.
    """

    def __init__(
        self,
        label: str,
        base: type[T],
        adapter: type[T],
        *,
        skip_first: int = 0,
        reserved: Collection[str] = (),
    ) -> None:
        self.label = label
        self.base = base
        self.adapter = adapter
        self.skip_first = skip_first
        self.reserved = tuple(reserved)
        self._classes: dict[str, type[T]] = {}

    def register(self, name: str, **tags: Any) -> Callable[[Obj], Obj]:
        """Decorator registering a ``base`` subclass or a function under ``name``.

        ``tags`` become class attributes of a function's generated class (a class states its own).
        Re-registering a name with a different object raises: silently shadowing a component
        would make scenario files ambiguous.
        """
        where = f"register_{self.label}({name!r})"
        if not isinstance(name, str) or not name.isidentifier():
            raise ParamError(
                f"register_{self.label}: name must be an identifier string, got {name!r}"
            )

        def deco(obj: Obj) -> Obj:
            if isinstance(obj, type) and issubclass(obj, self.base):
                cls: type[T] = obj
                cls.name = name
            elif callable(obj) and not isinstance(obj, type):
                defaults = function_defaults(where, obj, self.skip_first, self.reserved)
                attrs = {
                    "func": staticmethod(obj),
                    "defaults": defaults,
                    "name": name,
                    "__doc__": obj.__doc__,
                    **tags,
                }
                label = self.label.capitalize()
                cls = type(f"{getattr(obj, '__name__', 'Function')}{label}", (self.adapter,), attrs)
            else:
                raise ParamError(
                    f"{where}: expected a {self.base.__name__} subclass or a function, got {obj!r}"
                )
            prev = self._classes.get(name)
            if prev is not None and prev.__qualname__ != cls.__qualname__:
                raise ParamError(
                    f"register_{self.label}: name {name!r} is already registered to {prev!r}"
                )
            self._classes[name] = cls
            return obj

        return deco

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._classes)

    def cls(self, name: str) -> type[T]:
        """The class registered as ``name`` (the error names the allowed ones)."""
        try:
            return self._classes[name]
        except KeyError:
            allowed = ", ".join(self.names()) or "(none registered)"
            raise ParamError(f"unknown {self.label} {name!r}; allowed: {allowed}") from None

    def get(self, name: str, **params: Any) -> T:
        """Build ``name`` from keyword ``params`` (unknown names/params raise ``ParamError``)."""
        cls = self.cls(name)
        unknown_params(f"{self.label} {name!r}", params, cls.param_names())
        return cls(**params)


def import_submodules(package: str, path: Collection[str]) -> None:
    """Import every public module of a package folder, so dropping a file in registers it."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(list(path)):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
