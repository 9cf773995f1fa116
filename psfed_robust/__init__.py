"""psfed-robust: a poisoning-robustness testbed built on partial model sharing (PSO-Fed/PSFed).

The core (masks, flat models, selectors, wire codec, aggregation math) imports without Flower;
``PSFedAvg`` and ``PSFedClient`` are loaded from :mod:`psfed_robust.flower` on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from psfed_robust import core as _core
from psfed_robust.core import *  # noqa: F403 - the core's public names, listed once in its __all__

try:
    __version__ = version("psfed-robust")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["PSFedAvg", "PSFedClient", "__version__", "run"]  # noqa: F405 - PSFed* load lazily
__all__ += _core.__all__


def run(scenario: Any, *, overrides: Any = None, out: Any = None, plugins: Any = (),
        progress: bool = False, executor: Any = "local") -> Any:
    """Run a scenario (a shipped name, a TOML path or a dict) and return its results.

    ``overrides``: dotted keys like ``--set``; ``out``: a folder to write what the CLI writes
    (nothing is written without it); ``plugins``: files/modules registering extensions;
    ``progress``: print progress and tables (silent otherwise); ``executor``: ``"local"`` or
    ``"ray"`` (docs/executors.md), same results. Returns
    :class:`experiments.api.Result` (``.summary``, ``.tidy``, ``.meta``, ``.worst_case``).
    Imported on call, so ``import psfed_robust`` stays free of the experiment layer.
    """
    from experiments.api import run as _run

    return _run(scenario, overrides=overrides, out=out, plugins=plugins, progress=progress,
                executor=executor)


_LAZY = {"PSFedAvg": "psfed_robust.flower", "PSFedClient": "psfed_robust.flower"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'psfed_robust' has no attribute {name!r}")
