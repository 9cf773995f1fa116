"""Lazily built compiled kernels: :class:`InlineExtension`, a C++ torch extension
(``torch.utils.cpp_extension.load_inline``) for the engine's and the defenses' kernels, and
:class:`CLibrary`, a plain C library loaded with :mod:`ctypes` for the wire codec.

Built on first use and cached per machine; any failure (no compiler, no ninja, a sandbox)
leaves a kernel unavailable for the process and the callers use their torch/numpy paths, which
give identical results. ``PSFED_NO_CPP_KERNEL=1`` disables every compiled kernel (tests of the
fallbacks).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["CLibrary", "InlineExtension", "kernels_disabled"]


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


def _cache_dir() -> Path:
    """Where built shared libraries live: ``$PSFED_CACHE_DIR``, else the user cache."""
    env = os.environ.get("PSFED_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psfed-robust"


def _c_compiler() -> list[str]:
    """The first C compiler found: ``$CC``, Python's own build compiler, ``cc``, ``gcc``."""
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"):
        cmd = shlex.split(cand) if cand else []
        if cmd and shutil.which(cmd[0]):
            return cmd
    raise RuntimeError("no C compiler found")


class CLibrary:
    """A small C library (no Python or torch headers) compiled with the system C compiler on the
    first :meth:`get` and loaded with :mod:`ctypes` (calls release the GIL).

    About 0.3 s to build (against about 20 s for a torch extension), so codec hot paths can use
    it in every fresh process. The shared object is cached under :func:`_cache_dir` by a hash of
    the source, flags and compiler, written atomically (several processes may build at once).
    ``signatures`` maps each function to ``(restype, argtypes)``. Any failure (no compiler, a
    read-only cache, a sandbox) leaves it unavailable: callers keep their numpy paths.
    """

    def __init__(self, name: str, c_source: str,
                 signatures: Mapping[str, tuple[Any, Sequence[Any]]],
                 *, cflags: Sequence[str] = ("-O2",)) -> None:
        self.name = name
        self._source = c_source
        self._signatures = dict(signatures)
        self._cflags = list(cflags)
        self._lock = threading.Lock()
        self._lib: Any = None
        self._failed = False

    def get(self) -> Any:
        """The loaded library (``ctypes.CDLL``), or ``None`` (disabled, or the build failed)."""
        if kernels_disabled():
            return None
        if self._lib is not None or self._failed:
            return self._lib
        with self._lock:
            if self._lib is None and not self._failed:
                try:
                    self._lib = self._load()
                except Exception:  # no compiler, unwritable cache...: callers use numpy
                    self._failed = True
        return self._lib

    def _load(self) -> Any:
        cmd = _c_compiler()
        key = hashlib.sha256(
            "\0".join([self._source, *self._cflags, *cmd, platform.machine(), sys.platform])
            .encode()
        ).hexdigest()[:16]
        suffix = ".dll" if sys.platform == "win32" else ".so"
        path = _cache_dir() / f"{self.name}-{key}{suffix}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                src = Path(tmp) / f"{self.name}.c"
                src.write_text(self._source)
                out = Path(tmp) / f"{self.name}{suffix}"
                subprocess.run(
                    [*cmd, *self._cflags, "-shared", "-fPIC", "-o", str(out), str(src)],
                    check=True, capture_output=True, timeout=120,
                )
                os.replace(out, path)  # atomic: a concurrent builder's copy is identical
        lib = ctypes.CDLL(str(path))
        for fname, (restype, argtypes) in self._signatures.items():
            fn = getattr(lib, fname)
            fn.restype = restype
            fn.argtypes = list(argtypes)
        return lib
