"""Optional compiled CPU accelerator of local training for MLPs (``csrc/nn_kernels.cpp``).

:func:`mlp_sgd` runs one round of local SGD (momentum, weight decay) of a set of client rows of
a multilayer perceptron — ``Linear`` layers with ``ReLU`` between them on flattened inputs,
float32 on the CPU — behind :func:`psfed_robust.nn.train.train_rows`. Its reference is the torch
fused path (:class:`~psfed_robust.nn.fused.FusedModel` and ``torch.optim.SGD``'s update): the
same batches, loss gradient and update, within float32 rounding (a different summation order and
a polynomial exp; ``tests/test_nn_kernels.py``), NaN/Inf as torch. Each row trains all its steps
with its weights, momentum and batch in cache, which on small models removes the per-step cost
of ~25 torch kernel launches (``benchmarks/nn_engine.py`` times it against the torch path; it
must earn at least 3x to stay).

:func:`mlp_eval` sums the engine's test metrics of global models (cross-entropy, correct and
label-flip-aimed predictions) with the same forward pass, behind the engine's torch evaluation.
:func:`batch_positions` draws :func:`~psfed_robust.nn.train.batch_plan`'s shuffled batch
positions: the same integers as ``torch.randperm`` with a generator seeded per row (torch's CPU
generator is MT19937 on the seed's low 32 bits, and its ``randperm`` a Fisher-Yates shuffle;
tests compare the two), without one torch call per row and epoch; :func:`batch_seeds` derives
the rows' generator seeds (:func:`~psfed_robust.core.seeding.stable_seed`'s SHA-256, in C).

Rows are independent: they are split across ``threads`` threads (torch's own OpenMP team when
torch runs on GNU OpenMP, else threads of the library; the call releases the GIL), and the
result does not depend on the split. The library is plain C-style
C++ loaded with :mod:`ctypes` (about a second to build, cached by source, compiler and CPU); a
failed build leaves it unavailable and training runs the torch path. ``PSFED_NO_CPP_KERNEL=1``
disables it.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psfed_robust._cpp import CLibrary, source
from psfed_robust.nn.fused import FusedModel

__all__ = ["MLPEvaluator", "MLPSpec", "available", "batch_positions", "batch_seeds", "load",
           "mlp_eval", "mlp_sgd", "mlp_spec"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_D = ctypes.c_double

_LIB = CLibrary(
    "psfed_nn_kernels",
    source("nn_kernels.cpp"),
    {"psfed_mlp_sgd_f32": (ctypes.c_int, [_I, _I, _I, _I, _P, _I, _P, _I, _P, _I, _P, _I, _P, _P,
                                          _I, _P, _P, _P, _I, _P, _F, _F, _F, _I, _P, _P]),
     "psfed_batch_orders": (ctypes.c_int, [_I, _I, _I, _P, _P, _I, _I, _P]),
     "psfed_mlp_eval_f32": (ctypes.c_int, [_I, _I, _P, _I, _P, _I, _P, _I, _P, _P, _P, _D, _D,
                                           _D, _I, _P, _P]),
     "psfed_batch_seeds": (ctypes.c_int, [_I, _P, _I, _P, _P, _I, _P]),
     "psfed_batch_plan": (ctypes.c_int, [_I, _I, _I, _P, _P, _I, _P, _P, _I, _I, _I, _P, _I, _P,
                                         _P])},
    cflags=("-O3", "-march=native", "-ffp-contract=fast", "-fno-exceptions", "-fno-rtti",
            "-pthread"),
)

_ERRORS = {-1: "sizes or a batch position out of range, or out of memory",
           -2: "an example id is outside the training set",
           -3: "a label is outside [0, classes)"}


@functools.lru_cache(maxsize=1)
def _openmp_entry_points() -> tuple[int | None, int | None]:
    """``(GOMP_parallel, omp_get_thread_num)`` of the GNU OpenMP runtime torch runs its CPU
    ops on (its thread pool), or ``(None, None)`` where there is none (another backend, another
    platform): the kernel's row parts then run in threads of its own. Found among the loaded
    libraries, in torch's folders (torch ships its libgomp under its own name on some builds)."""
    if not torch.__config__.parallel_info().count("ATen parallel backend: OpenMP"):
        return None, None
    # torch's own copy (its lib/ folder, or torch.libs/ in auditwheel builds): other packages
    # load libgomp copies of their own (scikit-learn does), whose teams are other pools
    site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    homes = (os.path.join(site, "torch", "lib") + os.sep, os.path.join(site, "torch.libs") + os.sep)
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            paths = {line.split()[-1] for line in fh if "libgomp" in line}
        for path in sorted(paths):
            if os.path.basename(path).startswith("libgomp") and path.startswith(homes) \
                    and os.path.isfile(path):
                lib = ctypes.CDLL(path)  # the loaded instance: the same runtime and pool
                par = ctypes.cast(lib.GOMP_parallel, ctypes.c_void_p).value
                num = ctypes.cast(lib.omp_get_thread_num, ctypes.c_void_p).value
                return par, num
    except (OSError, AttributeError):
        pass
    return None, None


def load() -> Any:
    """The loaded library (``ctypes.CDLL``), or ``None`` (disabled, no compiler, failed build)."""
    return _LIB.get()


def available() -> bool:
    """Whether the accelerator can be used (builds it on the first call)."""
    return load() is not None


def _lib() -> Any:
    """The loaded library; raises when it is not available."""
    lib = load()
    if lib is None:
        raise RuntimeError("the compiled NN kernel is not available")
    return lib


@dataclass(frozen=True)
class MLPSpec:
    """The kernel's view of an MLP: per linear layer ``(in, out, weight offset, bias offset or
    -1, ReLU after it)`` in the flat parameter layout, as an int64 ``[layers, 5]`` tensor."""

    layers: Tensor
    num_parameters: int
    in_features: int
    classes: int


@functools.lru_cache(maxsize=8)
def mlp_spec(fused: FusedModel) -> MLPSpec | None:
    """The spec of ``fused``'s model when it is an MLP the kernel runs (optional leading
    ``Flatten``, then ``Linear`` layers with at most one ``ReLU`` between consecutive ones and
    none after the last), else ``None`` (cached per model: training asks every round)."""
    kinds = [layer.kind for layer in fused.layers]
    if kinds and kinds[0] == "flatten":
        kinds = kinds[1:]
        layers = fused.layers[1:]
    else:
        layers = fused.layers
    rows: list[list[int]] = []
    for i, (kind, layer) in enumerate(zip(kinds, layers, strict=True)):
        if kind == "linear":
            assert layer.weight is not None
            out, inp = layer.weight.shape
            if rows and rows[-1][1] != inp:
                return None
            b = layer.bias.start if layer.bias is not None else -1
            rows.append([int(inp), int(out), int(layer.weight.start), int(b), 0])
        elif kind == "relu" and rows and rows[-1][4] == 0 and i + 1 < len(kinds) \
                and kinds[i + 1] == "linear":
            rows[-1][4] = 1
        else:
            return None
    if not rows:
        return None
    return MLPSpec(torch.tensor(rows, dtype=torch.int64), fused.num_parameters, rows[0][0],
                   rows[-1][1])


def _check(who: str, name: str, t: Tensor, dtype: torch.dtype,
           shape: tuple[int, ...] | None = None, rowwise: bool = False) -> None:
    ok = t.dtype == dtype and t.device.type == "cpu"
    if rowwise:  # rows with a stride, contiguous within a row
        ok = ok and t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1)
    else:
        ok = ok and t.is_contiguous()
    if shape is not None:
        ok = ok and tuple(t.shape) == shape
    if not ok:
        layout = "row-contiguous" if rowwise else "contiguous"
        want = f" of shape {shape}" if shape else ""
        raise ValueError(f"{who}: {name} must be a {layout} {dtype} CPU tensor{want}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def mlp_sgd(spec: MLPSpec, w: Tensor, mom: Tensor, x: Tensor, table: Tensor, pos: Tensor,
            valid: Tensor, y: Tensor, active: Tensor, *, lr: float, momentum: float,
            weight_decay: float, threads: int = 1) -> None:
    """Train rows ``w`` ``[N, P]`` in place, momentum ``mom`` ``[N, P]`` in place (its values at
    the call are the rows' momentum buffers).

    ``x`` ``[n, in]``: the training examples; ``table`` ``[N, n_tab]``: each row's example ids
    (rows may be strided); ``pos``/``valid`` ``[N, S, b]``: each step's batch positions in the
    row's table and its real examples (bool; weights ``valid / max(1, Σ valid)``); ``y``: labels
    by example id ``[n]``, or per row by table position ``[N, >= n_tab]`` (poisoned labels);
    ``active`` bool ``[N, S]``: the steps a row trains. Each step processes the batch slots up to
    its last real example in any row (the torch path's cut).
    ``threads``: rows are split into this many parts trained in parallel, on the OpenMP team
    torch's CPU ops use when torch runs on GNU OpenMP (threads of the library would compete with
    that team's spinning idle threads), else on POSIX threads of the library.

    Raises ``ValueError`` for a position, example id or label out of range (checked for every
    row before any row trains).
    """
    lib = _lib()
    N, P = w.shape
    if P != spec.num_parameters:
        raise ValueError(f"mlp_sgd: w has {P} parameters per row, the model {spec.num_parameters}")
    _check("mlp_sgd", "w", w, torch.float32, rowwise=True)
    _check("mlp_sgd", "mom", mom, torch.float32, (N, P), rowwise=True)
    _check("mlp_sgd", "x", x, torch.float32)
    if x.dim() != 2 or x.shape[1] != spec.in_features:
        raise ValueError(f"mlp_sgd: x must be [examples, {spec.in_features}], got "
                         f"{tuple(x.shape)}")
    _check("mlp_sgd", "table", table, torch.int64, rowwise=True)
    if table.shape[0] != N or table.shape[1] < 1:
        raise ValueError(f"mlp_sgd: table must be [{N}, >= 1], got {tuple(table.shape)}")
    S, b = (int(pos.shape[1]), int(pos.shape[2])) if pos.dim() == 3 else (0, 0)
    _check("mlp_sgd", "pos", pos, torch.int64, (N, S, b))
    _check("mlp_sgd", "valid", valid, torch.bool, (N, S, b))
    _check("mlp_sgd", "active", active, torch.bool, (N, S))
    if y.dim() == 2:  # by table position: at least the table's columns
        _check("mlp_sgd", "y", y, torch.int64, rowwise=True)
        if y.shape[0] != N or y.shape[1] < table.shape[1]:
            raise ValueError(f"mlp_sgd: per-row labels y must be [{N}, >= {table.shape[1]}], "
                             f"got {tuple(y.shape)}")
        y_stride = max(1, int(y.stride(0)))
    else:
        _check("mlp_sgd", "y", y, torch.int64, (int(x.shape[0]),))
        y_stride = 0
    if N == 0 or S == 0:
        return
    rc = lib.psfed_mlp_sgd_f32(
        N, S, b, spec.layers.shape[0], spec.layers.data_ptr(), P, w.data_ptr(), w.stride(0),
        mom.data_ptr(), mom.stride(0), x.data_ptr(), x.shape[0], table.data_ptr(),
        max(1, int(table.stride(0))), table.shape[1], pos.data_ptr(), valid.data_ptr(),
        y.data_ptr(), y_stride, active.data_ptr(), float(lr), float(momentum),
        float(weight_decay), max(1, int(threads)), *_openmp_entry_points())
    if rc != 0:
        raise ValueError(f"mlp_sgd: {_ERRORS.get(rc, f'error {rc}')}")


class MLPEvaluator:
    """:func:`mlp_eval` bound to one test set (checked once): the engine evaluates the global
    models on the same examples every recorded round, where per-call checks would cost as much
    as the small models' arithmetic."""

    def __init__(self, spec: MLPSpec, x: Tensor, y: Tensor, aimed: Tensor) -> None:
        n = int(x.shape[0])
        _check("mlp_eval", "x", x, torch.float32)
        if x.dim() != 2 or x.shape[1] != spec.in_features:
            raise ValueError(f"mlp_eval: x must be [examples, {spec.in_features}], got "
                             f"{tuple(x.shape)}")
        _check("mlp_eval", "y", y, torch.int64, (n,))
        _check("mlp_eval", "aimed", aimed, torch.int64, (n,))
        if n and (int(y.min()) < 0 or int(y.max()) >= spec.classes):
            raise ValueError("mlp_eval: a label is outside [0, classes)")
        self.spec, self.x, self.y, self.aimed = spec, x, y, aimed
        self._static = (spec.layers.shape[0], spec.layers.data_ptr(), spec.num_parameters)
        self._data = (x.data_ptr(), n, y.data_ptr(), aimed.data_ptr())

    def __call__(self, g: Tensor, threads: int = 1,
                 divisors: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Tensor:
        """``[3, B]`` float64 sums of models ``g`` ``[B, P]`` (see :func:`mlp_eval`), each
        divided by its ``divisors`` entry (the engine's means)."""
        lib = _lib()
        B, P = g.shape
        if P != self.spec.num_parameters:
            raise ValueError(f"mlp_eval: g has {P} parameters per row, the model "
                             f"{self.spec.num_parameters}")
        _check("mlp_eval", "g", g, torch.float32, rowwise=True)
        out = torch.empty((3, B), dtype=torch.float64)
        rc = lib.psfed_mlp_eval_f32(B, *self._static, g.data_ptr(), g.stride(0), *self._data,
                                    out.data_ptr(), *divisors, max(1, int(threads)),
                                    *_openmp_entry_points())
        if rc != 0:
            raise ValueError(f"mlp_eval: {_ERRORS.get(rc, f'error {rc}')}")
        return out


def mlp_eval(spec: MLPSpec, g: Tensor, x: Tensor, y: Tensor, aimed: Tensor,
             threads: int = 1) -> Tensor:
    """``[3, B]`` float64 sums over the test set of models ``g`` ``[B, P]``: cross-entropy
    loss, correct predictions (first maximum), predictions equal to ``aimed`` (the label-flip
    target per example, -1 where none). ``x`` ``[n, in]`` float32, ``y``/``aimed`` int64 ``[n]``.
    Chunks of 32 examples are spread over ``threads`` (as :func:`mlp_sgd`) and summed in chunk
    order: the sums do not depend on the thread count.
    """
    return MLPEvaluator(spec, x, y, aimed)(g, threads)


def batch_seeds(prefix: bytes, run_seeds: Sequence[int], clients: Sequence[int],
                round_num: int) -> np.ndarray:
    """``stable_seed(<name>, run_seeds[i], clients[i], round_num)`` for every row, uint64:
    ``prefix`` is the encoded name part with its separator (``_encode_part(name) + b"\\x1e"``);
    the integers are encoded as :func:`~psfed_robust.core.seeding.stable_seed` does."""
    lib = _lib()
    rs = np.asarray(run_seeds, dtype=np.int64)
    cl = np.asarray(clients, dtype=np.int64)
    if rs.shape != cl.shape or rs.ndim != 1:
        raise ValueError(f"batch_seeds: run_seeds and clients must be equal-length lists, got "
                         f"{rs.shape} and {cl.shape}")
    out = np.empty(rs.shape[0], dtype=np.uint64)
    rc = lib.psfed_batch_seeds(rs.shape[0], prefix, len(prefix), rs.ctypes.data, cl.ctypes.data,
                               int(round_num), out.ctypes.data)
    if rc != 0:
        raise ValueError(f"batch_seeds: a name part of {len(prefix)} bytes is over 512")
    return out


def batch_positions(pos: Tensor, counts: Sequence[int], prefix: bytes, run_seeds: Sequence[int],
                    clients: Sequence[int], round_num: int, epochs: int, local_steps: int,
                    threads: int = 1) -> None:
    """Fill ``pos`` ``[rows, steps, b]`` (int64, zeros) with ``batch_plan``'s draws: row ``i``
    seeds a torch CPU generator with :func:`batch_seeds`'s seed and draws
    ``torch.randperm(counts[i])`` once per epoch (written from slot ``e * ceil(n / b) * b``), or
    once per step with ``local_steps > 0`` (its first ``min(b, n)`` entries); rows spread over
    ``threads`` (as :func:`mlp_sgd`; each row's draws are its own)."""
    lib = _lib()
    _check("batch_positions", "pos", pos, torch.int64)
    rows, steps, b = pos.shape
    cnt = np.asarray(counts, dtype=np.int64)
    rs = np.asarray(run_seeds, dtype=np.int64)
    cl = np.asarray(clients, dtype=np.int64)
    if cnt.shape != (rows,) or rs.shape != (rows,) or cl.shape != (rows,):
        raise ValueError(f"batch_positions: counts, run_seeds and clients must have {rows} "
                         f"entries, got {cnt.shape}, {rs.shape} and {cl.shape}")
    rc = lib.psfed_batch_plan(rows, steps, b, cnt.ctypes.data, prefix, len(prefix),
                              rs.ctypes.data, cl.ctypes.data, int(round_num), int(epochs),
                              int(local_steps), pos.data_ptr(), max(1, int(threads)),
                              *_openmp_entry_points())
    if rc != 0:
        raise ValueError(f"batch_positions: sizes out of range (rows {rows}, steps {steps}, "
                         f"batch {b}, epochs {epochs}, local steps {local_steps})")
