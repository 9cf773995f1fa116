"""One build helper for the optional compiled kernels, whose sources live in ``psfed_robust/csrc/``.

Two entry points, built lazily on the first ``get()`` and cached on disk:

- :class:`CLibrary` ``(name, source, signatures, *, cflags)``: a plain C library (no Python or
  torch headers) compiled with the system C compiler and loaded with :mod:`ctypes`. Sub-second
  build, so hot paths (the wire codec) can use it in every fresh process.
- :class:`TorchExtension` ``(name, sources, *, cflags, ldflags)``: a C++ torch extension (its
  source file includes torch's extension header and declares the pybind11 module named by
  ``TORCH_EXTENSION_NAME``), compiled with the system C++ compiler against the installed torch
  and imported as a module (about 20-25 s to build).

Both take real files: :func:`source` ``("defense_kernels.cpp")`` is the path of a file of
``psfed_robust/csrc/``. ``get()`` returns the loaded library/module, or ``None`` (disabled, no
compiler, build failure: ``.error`` says why) and the caller keeps its torch/numpy reference
path; ``built`` says whether it is already loaded in this process and ``cache_path()`` where its
build is cached (neither builds).
There is no string-source form: C/C++ lives in ``csrc/`` files, never in Python strings.

Why not ``torch.utils.cpp_extension``: its build folder (``~/.cache/torch_extensions``) is keyed
by the module name and a hash that includes the ``ninja`` found on ``PATH``, so two environments
on one machine (or a venv's and the system's ninja) rebuild each other's builds (80-100 s per
run), and importing it prints "No CUDA runtime is found" on a CPU-only machine. Here the cache
(``$PSFED_CACHE_DIR``, else ``$XDG_CACHE_HOME/psfed-robust``, else ``~/.cache/psfed-robust``)
holds ``<name>-<key>.so`` where ``key`` hashes everything the binary depends on: the source
bytes, the compiler's resolved path and ``--version``, the flags, and for torch extensions the
torch version, the Python ABI and ``sys.prefix`` (the environment); with ``-march=native`` also
the CPU's feature flags. Two environments never rebuild or overwrite each other's builds (a
torch extension is per environment; a plain C library, which links neither Python nor torch,
is shared by identical toolchains), a second run builds nothing, and a file lock makes
concurrent processes build once (the others wait, then load). ``PSFED_NO_CPP_KERNEL=1``
disables every compiled kernel (tests of the reference paths).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CSRC",
    "CLibrary",
    "TorchExtension",
    "cache_dir",
    "kernels_disabled",
    "source",
]

#: The folder of the kernels' C/C++ sources (shipped as package data).
CSRC = Path(__file__).resolve().parent / "csrc"

_SUFFIX = ".dll" if sys.platform == "win32" else ".so"
_BUILD_TIMEOUT_S = 600


def kernels_disabled() -> bool:
    """Whether ``PSFED_NO_CPP_KERNEL`` asks for the reference (torch/numpy) paths only."""
    return os.environ.get("PSFED_NO_CPP_KERNEL", "") not in ("", "0")


def source(name: str) -> Path:
    """The path of ``psfed_robust/csrc/<name>``. A missing file (an install without the package
    data, e.g. a Flower App bundle of ``*.py`` files) is not an error here: the kernel's
    ``get()`` returns ``None`` and the reference path runs."""
    return CSRC / name


def cache_dir() -> Path:
    """Where built kernels live: ``$PSFED_CACHE_DIR``, else the user cache's ``psfed-robust``."""
    env = os.environ.get("PSFED_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "psfed-robust"


# ---------------------------------------------------------------------------------- toolchain
def _find_compiler(candidates: Sequence[str | None], what: str) -> list[str]:
    for cand in candidates:
        cmd = shlex.split(cand) if cand else []
        if cmd and shutil.which(cmd[0]):
            return cmd
    raise RuntimeError(f"no {what} compiler found (tried {[c for c in candidates if c]})")


def _c_compiler() -> list[str]:
    """``$CC``, Python's own build compiler, ``cc``, ``gcc``: the first found."""
    return _find_compiler(
        (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc"), "C"
    )


def _cxx_compiler() -> list[str]:
    """``$CXX``, ``c++``, ``g++``: the first found (torch's own choice is ``$CXX`` or ``c++``)."""
    return _find_compiler((os.environ.get("CXX"), "c++", "g++"), "C++")


@functools.lru_cache(maxsize=8)
def _compiler_identity(cmd: tuple[str, ...]) -> str:
    """The compiler's resolved path and ``--version`` output (part of every cache key)."""
    exe = shutil.which(cmd[0]) or cmd[0]
    try:
        out = subprocess.run(
            [*cmd, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        out = f"? ({exc})"
    return f"{os.path.realpath(exe)}\n{' '.join(cmd[1:])}\n{out}"


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """The CPU's feature flags (Linux), keyed only by builds with ``-march=native``: a cache on a
    shared home folder must not hand one machine's instructions to another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return line.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _key(parts: Sequence[str | bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else p.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (a no-op where ``fcntl`` is missing: the atomic
    rename alone keeps concurrent builds correct there, only not single)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build(name: str, key: str, srcs: Sequence[tuple[str, bytes]], command: Sequence[str],
           link: Sequence[str]) -> Path:
    """``<cache>/<name>-<key>.so``, compiled unless present: ``command`` + sources + ``-o`` +
    ``link``, in a temporary folder beside it, moved in place atomically under a file lock."""
    root = cache_dir()
    path = root / f"{name}-{key}{_SUFFIX}"
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{name}-{key}.lock"):
        if path.exists():  # another process built it while this one waited
            return path
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            files = []
            for fname, data in srcs:
                (Path(tmp) / fname).write_bytes(data)
                files.append(str(Path(tmp) / fname))
            out = Path(tmp) / f"{name}{_SUFFIX}"
            res = subprocess.run(
                [*command, *files, "-o", str(out), *link],
                capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False,
            )
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip()[-2000:]
                raise RuntimeError(f"building {name} failed (exit {res.returncode}):\n{tail}")
            os.replace(out, path)
    return path


@dataclass(frozen=True)
class _Plan:
    key: str  # the cache key: hash of everything the binary depends on
    srcs: list[tuple[str, bytes]]
    command: list[str]  # compiler and flags, before the sources
    link: list[str]  # after ``-o out``


class _Lazy:
    """Build-once-per-process state shared by the entry points (thread-safe)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.error: str | None = None  #: why the last build failed (None if it did not)
        self._lock = threading.Lock()
        self._obj: Any = None
        self._failed = False

    @property
    def built(self) -> bool:
        """Whether the kernel is already loaded in this process (never builds)."""
        return self._obj is not None

    def get(self) -> Any:
        """The loaded kernel, or ``None`` (disabled, no compiler, or the build failed)."""
        if kernels_disabled():
            return None
        if self._obj is not None or self._failed:
            return self._obj
        with self._lock:
            if self._obj is None and not self._failed:
                try:
                    self._obj = self._load()
                except Exception as exc:  # no compiler, unwritable cache, sandbox...
                    self._failed = True
                    self.error = f"{type(exc).__name__}: {exc}"
        return self._obj

    def cache_path(self) -> Path:
        """Where this kernel's build is (or would be) cached; computes the key, never builds
        (raises if there is no compiler or the source is missing)."""
        return cache_dir() / f"{self.name}-{self._plan().key}{_SUFFIX}"

    def _plan(self) -> _Plan:  # pragma: no cover - abstract
        raise NotImplementedError

    def _load(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _read_sources(sources: Path | str | Sequence[Path | str]) -> list[Path]:
    seq = [sources] if isinstance(sources, Path | str) else list(sources)
    if not seq:
        raise ValueError("at least one source file is needed")
    return [Path(s) for s in seq]


def _native(flags: Sequence[str]) -> list[str]:
    return [_cpu_identity()] if any("native" in f for f in flags) else []


class CLibrary(_Lazy):
    """A C library compiled from ``source`` with the system C compiler and loaded with
    :mod:`ctypes` (calls release the GIL). ``signatures`` maps each function to
    ``(restype, argtypes)``. It links neither Python nor torch, so its key is the source, the
    compiler and the flags (and the CPU with ``-march=native``): environments share it."""

    def __init__(self, name: str, source: Path | str,
                 signatures: Mapping[str, tuple[Any, Sequence[Any]]],
                 *, cflags: Sequence[str] = ("-O2",)) -> None:
        super().__init__(name)
        self.source = Path(source)
        self._signatures = dict(signatures)
        self._cflags = list(cflags)

    def _plan(self) -> _Plan:
        cmd = _c_compiler()
        data = self.source.read_bytes()
        key = _key([
            "clib-v1", data, _compiler_identity(tuple(cmd)), *self._cflags,
            platform.machine(), sys.platform, *_native(self._cflags),
        ])
        return _Plan(key, [(self.source.name, data)], [*cmd, *self._cflags, "-shared", "-fPIC"],
                     [])

    def _load(self) -> Any:
        plan = self._plan()
        lib = ctypes.CDLL(str(_build(self.name, plan.key, plan.srcs, plan.command, plan.link)))
        for fname, (restype, argtypes) in self._signatures.items():
            fn = getattr(lib, fname)
            fn.restype = restype
            fn.argtypes = list(argtypes)
        return lib


def _torch_build_flags(name: str) -> tuple[list[str], list[str], list[str]]:
    """(key parts, compile flags, link flags) of a torch extension, as
    ``torch.utils.cpp_extension`` composes them for a CPU build (without importing it)."""
    import torch

    root = Path(torch.__file__).resolve().parent
    inc = root / "include"
    py_inc = sysconfig.get_path("include", scheme="nt" if os.name == "nt" else "posix_prefix")
    cflags = [
        f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))}",
        "-isystem", str(inc), "-isystem", str(inc / "torch" / "csrc" / "api" / "include"),
        "-isystem", str(py_inc), "-fPIC", "-std=c++20", "-shared",
    ]
    lib = root / "lib"
    ldflags = [f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
    key = [
        torch.__version__, str(getattr(torch.version, "git_version", "")), str(root),
        sys.implementation.cache_tag or "", str(sysconfig.get_config_var("EXT_SUFFIX")),
        sys.abiflags if hasattr(sys, "abiflags") else "", sys.version, sys.prefix,
        platform.machine(), sys.platform,
    ]
    return key, cflags, ldflags


class TorchExtension(_Lazy):
    """A C++ torch extension compiled from ``sources`` (each with ``#include
    <torch/extension.h>``; one holds ``PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)``) and imported
    as module ``name``. Keyed on the sources, the C++ compiler, the flags, the torch version,
    the Python ABI and ``sys.prefix``."""

    def __init__(self, name: str, sources: Path | str | Sequence[Path | str], *,
                 cflags: Sequence[str] = (), ldflags: Sequence[str] = ()) -> None:
        super().__init__(name)
        self.sources = _read_sources(sources)
        self._cflags = list(cflags)
        self._ldflags = list(ldflags)

    def _sources(self) -> list[tuple[str, bytes]]:
        return [(p.name, p.read_bytes()) for p in self.sources]

    def _plan(self) -> _Plan:
        cmd = _cxx_compiler()
        srcs = self._sources()
        tkey, tflags, tld = _torch_build_flags(self.name)
        key = _key([
            "torchext-v1", *(f"{n}\0" for n, _ in srcs), *(d for _, d in srcs),
            _compiler_identity(tuple(cmd)), *self._cflags, "\0", *self._ldflags, *tkey,
            *_native(self._cflags),
        ])
        return _Plan(key, srcs, [*cmd, *tflags, *self._cflags], [*self._ldflags, *tld])

    def _load(self) -> Any:
        plan = self._plan()
        path = _build(self.name, plan.key, plan.srcs, plan.command, plan.link)
        spec = importlib.util.spec_from_file_location(self.name, path)
        if spec is None or spec.loader is None:  # pragma: no cover - suffix is an extension's
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
