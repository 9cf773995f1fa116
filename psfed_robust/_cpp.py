"""One lazily built C++ extension (``torch.utils.cpp_extension.load_inline``), shared by the
engine's and the defenses' kernels.

Built on first use and cached per machine by torch; any failure (no compiler, no ninja, a
sandbox) leaves it unavailable for the process and the callers use their torch paths.
``PSFED_NO_CPP_KERNEL=1`` disables every extension (tests of the fallbacks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["InlineExtension", "kernels_disabled"]


def kernels_disabled() -> bool:
    """Whether ``PSFED_NO_CPP_KERNEL`` asks for the torch paths only."""
    return os.environ.get("PSFED_NO_CPP_KERNEL", "") not in ("", "0")


class InlineExtension:
    """A C++ module compiled from source on the first :meth:`get` (thread-safe, at most once)."""

    def __init__(self, name: str, cpp_sources: str, *, functions: Sequence[str] | None = None,
                 extra_cflags: Sequence[str] = (), extra_ldflags: Sequence[str] = ()) -> None:
        self.name = name
        self._sources = cpp_sources
        self._functions = list(functions) if functions is not None else None
        self._cflags = list(extra_cflags)
        self._ldflags = list(extra_ldflags)
        self._lock = threading.Lock()
        self._module: Any = None
        self._failed = False

    @property
    def built(self) -> bool:
        """Whether the module is already built in this process (never builds)."""
        return self._module is not None

    def get(self) -> Any:
        """The compiled module, or ``None`` (disabled, no compiler, or the build failed)."""
        if kernels_disabled():
            return None
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is not None or self._failed:
                return self._module
            try:
                from torch.utils.cpp_extension import load_inline

                self._module = load_inline(
                    name=self.name, cpp_sources=self._sources, functions=self._functions,
                    extra_cflags=self._cflags, extra_ldflags=self._ldflags or None,
                    verbose=False,
                )
            except Exception:  # no compiler, no ninja, sandbox...: callers keep their torch paths
                self._failed = True
                self._module = None
        return self._module
