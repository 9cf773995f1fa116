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

:func:`batch_orders` draws :func:`~psfed_robust.nn.train.batch_plan`'s shuffled batch positions:
the same integers as ``torch.randperm`` with a generator seeded per row (torch's CPU generator
is MT19937 on the seed's low 32 bits, and its ``randperm`` a Fisher-Yates shuffle; tests compare
the two), without one torch call per row and epoch.

Rows are independent: they are split across ``threads`` (the call releases the GIL), and the
result does not depend on the split. The library is plain C-style C++ loaded with
:mod:`ctypes` (about a second to build, cached by source, compiler and CPU); a failed build
leaves it unavailable and training runs the torch path. ``PSFED_NO_CPP_KERNEL=1`` disables it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psfed_robust._cpp import CLibrary, source
from psfed_robust.nn.fused import FusedModel

__all__ = ["MLPSpec", "available", "batch_orders", "load", "mlp_sgd", "mlp_spec"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float

_LIB = CLibrary(
    "psfed_nn_kernels",
    source("nn_kernels.cpp"),
    {"psfed_mlp_sgd_f32": (ctypes.c_int, [_I, _I, _I, _I, _P, _I, _P, _I, _P, _I, _P, _I, _P, _P,
                                          _P, _P, _P, _F, _F, _F]),
     "psfed_batch_orders": (ctypes.c_int, [_I, _I, _I, _P, _P, _I, _I, _P])},
    cflags=("-O3", "-march=native", "-ffp-contract=fast", "-fno-exceptions", "-fno-rtti"),
)

_POOL: list[ThreadPoolExecutor] = []  # one shared worker pool (an execution resource, no state)
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if not _POOL:
            _POOL.append(ThreadPoolExecutor(os.cpu_count() or 1,
                                            thread_name_prefix="psfed-nn-kernel"))
        return _POOL[0]


_ERRORS = {-1: "sizes out of range or out of memory",
           -2: "an example id is outside the training set",
           -3: "a label is outside [0, classes)"}


def load() -> Any:
    """The loaded library (``ctypes.CDLL``), or ``None`` (disabled, no compiler, failed build)."""
    return _LIB.get()


def available() -> bool:
    """Whether the accelerator can be used (builds it on the first call)."""
    return load() is not None


@dataclass(frozen=True)
class MLPSpec:
    """The kernel's view of an MLP: per linear layer ``(in, out, weight offset, bias offset or
    -1, ReLU after it)`` in the flat parameter layout, as an int64 ``[layers, 5]`` tensor."""

    layers: Tensor
    num_parameters: int
    in_features: int
    classes: int


def mlp_spec(fused: FusedModel) -> MLPSpec | None:
    """The spec of ``fused``'s model when it is an MLP the kernel runs (optional leading
    ``Flatten``, then ``Linear`` layers with at most one ``ReLU`` between consecutive ones and
    none after the last), else ``None``."""
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


def _check(name: str, t: Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None,
           rowwise: bool = False) -> None:
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
        raise ValueError(f"mlp_sgd: {name} must be a {layout} {dtype} CPU tensor{want}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def mlp_sgd(spec: MLPSpec, w: Tensor, mom: Tensor, x: Tensor, ids: Tensor, labels: Tensor,
            scale: Tensor, active: Tensor, widths: Tensor, *, lr: float, momentum: float,
            weight_decay: float, threads: int = 1) -> None:
    """Train rows ``w`` ``[N, P]`` in place, momentum ``mom`` ``[N, P]`` in place (its values at
    the call are the rows' momentum buffers).

    ``x`` ``[n, in]``: the training examples; ``ids``/``labels``/``scale`` ``[N, S, b]``: each
    row's example id, label and loss weight per step and batch slot (weight 0: padding);
    ``active`` bool ``[N, S]``: the steps a row trains; ``widths`` int64 ``[S]``: the batch
    slots processed at each step (the torch path's cut after the last real example).
    ``threads``: rows are split into this many parts run in parallel.

    Raises ``ValueError`` for an example id or label out of range (the run cannot go on: some
    rows may already be trained).
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the compiled NN kernel is not available")
    N, P = w.shape
    S = int(widths.shape[0])
    b = int(ids.shape[-1]) if ids.dim() == 3 else 0
    if P != spec.num_parameters:
        raise ValueError(f"mlp_sgd: w has {P} parameters per row, the model {spec.num_parameters}")
    _check("w", w, torch.float32, rowwise=True)
    _check("mom", mom, torch.float32, (N, P), rowwise=True)
    _check("x", x, torch.float32)
    if x.dim() != 2 or x.shape[1] != spec.in_features:
        raise ValueError(f"mlp_sgd: x must be [examples, {spec.in_features}], got "
                         f"{tuple(x.shape)}")
    _check("ids", ids, torch.int64, (N, S, b))
    _check("labels", labels, torch.int64, (N, S, b))
    _check("scale", scale, torch.float32, (N, S, b))
    _check("active", active, torch.bool, (N, S))
    _check("widths", widths, torch.int64, (S,))
    if N == 0 or S == 0:
        return
    layers = spec.layers

    def call(r0: int, r1: int) -> int:
        rc: int = lib.psfed_mlp_sgd_f32(
            r1 - r0, S, b, layers.shape[0], layers.data_ptr(), P,
            w.data_ptr() + r0 * w.stride(0) * 4, w.stride(0),
            mom.data_ptr() + r0 * mom.stride(0) * 4, mom.stride(0), x.data_ptr(), x.shape[0],
            ids[r0].data_ptr(), labels[r0].data_ptr(), scale[r0].data_ptr(),
            active[r0].data_ptr(), widths.data_ptr(), float(lr), float(momentum),
            float(weight_decay))
        return rc

    parts = max(1, min(int(threads), N))
    if parts == 1:
        codes = [call(0, N)]
    else:
        bounds = [N * i // parts for i in range(parts + 1)]
        codes = list(_pool().map(call, bounds[:-1], bounds[1:]))
    bad = [c for c in codes if c != 0]
    if bad:
        raise ValueError(f"mlp_sgd: {_ERRORS.get(bad[0], f'error {bad[0]}')}")


def batch_orders(pos: Tensor, counts: np.ndarray, seeds: np.ndarray, epochs: int,
                 local_steps: int) -> None:
    """Fill ``pos`` ``[rows, steps, b]`` (int64, zeros) with each row's shuffled positions:
    row ``i`` draws from a torch CPU generator seeded ``seeds[i]`` ``torch.randperm(counts[i])``
    once per epoch (written from slot ``e * ceil(n / b) * b``), or once per step with
    ``local_steps > 0`` (its first ``min(b, n)`` entries)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the compiled NN kernel is not available")
    _check("pos", pos, torch.int64)
    rows, steps, b = pos.shape
    cnt = np.ascontiguousarray(counts, dtype=np.int64)
    sd = np.ascontiguousarray(seeds, dtype=np.uint64)
    if cnt.shape != (rows,) or sd.shape != (rows,):
        raise ValueError(f"batch_orders: counts and seeds must have {rows} entries, got "
                         f"{cnt.shape} and {sd.shape}")
    rc = lib.psfed_batch_orders(rows, steps, b, cnt.ctypes.data, sd.ctypes.data, int(epochs),
                                int(local_steps), pos.data_ptr())
    if rc != 0:
        raise ValueError(f"batch_orders: sizes out of range (rows {rows}, steps {steps}, batch "
                         f"{b}, epochs {epochs}, local steps {local_steps})")
