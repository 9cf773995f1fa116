"""Hand-derived batched forward/backward of the engine's models: the fast training path.

The reference formulation of local training is ``vmap(grad(loss))`` over client rows with
``functional_call`` (:class:`~psfed_robust.nn.train.FunctionalModel`). On small models each
``torch.func`` call costs milliseconds of dispatch (transform layers, one ``nn.Module`` call per
row batch), more than the arithmetic. :class:`FusedModel` computes the same per-row gradients of
the same weighted cross-entropy with a handful of batched kernels per layer, for
``nn.Sequential`` models built from ``Linear``, ``ReLU``, ``Flatten``, ``Conv2d`` and
``MaxPool2d`` (every model of :mod:`psfed_robust.nn.models`):

- ``Linear`` on rows: ``baddbmm`` forward; backward ``dW = dzᵀ a``, ``db = Σ dz``, ``da = dz W``
  as ``bmm`` over rows;
- ``Conv2d`` on rows: one grouped convolution with ``groups = rows`` (row ``r``'s channels are
  the ``r``-th channel group of a ``[batch, rows·C, H, W]`` tensor, channels-last), backward
  through ``aten.convolution_backward`` — the same computation vmap's conv batching rule does,
  without its per-call overhead;
- ``ReLU`` / ``MaxPool2d``: ``threshold_backward`` / ``max_pool2d_with_indices_backward``;
- loss: ``softmax − onehot`` scaled by each example's weight over the row's weight sum (weights
  0 mark padding), the gradient of :meth:`FunctionalModel.loss`.

Equal to the ``vmap(grad)`` path within float tolerance (tests/test_nn_fused.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from psfed_robust.core.flatten import FlattenedModel, TensorInfo

__all__ = ["FusedModel", "example_scale", "supports"]

_CL = torch.channels_last


def _pair(v: int | tuple[int, ...] | str) -> list[int]:
    if isinstance(v, str):
        raise ValueError(f"string padding {v!r} is not supported by the fused path")
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


@dataclass(frozen=True)
class _Layer:
    kind: str  # linear | relu | flatten | conv | pool
    weight: TensorInfo | None = None
    bias: TensorInfo | None = None
    args: tuple[Any, ...] = ()


def _parse(model: nn.Module) -> list[_Layer]:
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"the fused path needs an nn.Sequential, got {type(model).__name__}")
    if any(True for _ in model.buffers()):
        raise ValueError("the fused path needs a model without buffers")
    infos = {i.name: i for i in FlattenedModel(model).tensor_infos}
    layers: list[_Layer] = []
    flat = False
    for idx, m in enumerate(model):
        w, b = infos.get(f"{idx}.weight"), infos.get(f"{idx}.bias")
        if isinstance(m, nn.Linear):
            flat = True
            layers.append(_Layer("linear", w, b))
        elif isinstance(m, nn.ReLU):
            layers.append(_Layer("relu"))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise ValueError("the fused path supports Flatten(1, -1) only")
            if not flat:
                layers.append(_Layer("flatten"))
            flat = True
        elif isinstance(m, nn.Conv2d) and not flat:
            if m.groups != 1 or m.padding_mode != "zeros" or m.transposed:
                raise ValueError("the fused path supports plain Conv2d (groups 1, zero padding)")
            layers.append(_Layer("conv", w, b, (_pair(m.stride), _pair(m.padding),
                                                _pair(m.dilation), int(m.out_channels))))
        elif isinstance(m, nn.MaxPool2d) and not flat:
            ks = _pair(m.kernel_size)  # type: ignore[arg-type]
            st = _pair(m.stride) if m.stride is not None else ks  # type: ignore[arg-type]
            layers.append(_Layer("pool", None, None, (ks, st, _pair(m.padding),  # type: ignore[arg-type]
                                                      _pair(m.dilation), bool(m.ceil_mode))))  # type: ignore[arg-type]
        else:
            raise ValueError(f"the fused path does not support layer {idx}: {m!r}")
    if not flat:
        raise ValueError("the fused path needs a model that ends in Linear layers")
    # ReLU then MaxPool == MaxPool then ReLU (ReLU is monotone: the pooled maximum is the same
    # element, and its gradient is 0 exactly when the maximum is <= 0 in both orders); pooling
    # first runs the ReLU and its backward on the 4x smaller pooled map
    for i in range(len(layers) - 1):
        if layers[i].kind == "relu" and layers[i + 1].kind == "pool":
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return layers


def supports(model: nn.Module) -> bool:
    """Whether :class:`FusedModel` can run ``model``."""
    try:
        _parse(model)
    except ValueError:
        return False
    return True


Params = Tensor | list[Tensor]  # flat rows [N, P], or one [N, numel] block per parameter tensor


class FusedModel:
    """Per-row logits and gradients of a supported ``nn.Sequential`` (see the module docstring).

    Parameters are rows of ``w`` ``[N, P]`` in :class:`FlattenedModel` order; inputs are
    ``[N, b, *input_shape]`` (each row its own batch).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = _parse(model)
        self.flat = FlattenedModel(model)
        self.num_parameters = self.flat.num_parameters
        self._order = [i.name for i in self.flat.tensor_infos]
        self._index = {name: i for i, name in enumerate(self._order)}
        self._workspaces: dict[tuple[int, torch.dtype, str], tuple[list[Tensor], list[Tensor]]] \
            = {}
        self._buffers: dict[tuple[Any, ...], Tensor] = {}
        self._last = len(self.layers) - 1  # the output layer (transposed when a Linear)

    def _param(self, w: Params, info: TensorInfo) -> Tensor:
        """Parameter ``info`` of every row, ``[N, *shape]`` (a view)."""
        if isinstance(w, list):
            blk = w[self._index[info.name]]
            return blk.view(blk.shape[0], *info.shape)
        return w[:, info.start : info.end].view(w.shape[0], *info.shape)

    # ------------------------------------------------------------------ forward
    def _forward(self, w: Params, x: Tensor, tape: list[Any] | None) -> Tensor:
        N, b = x.shape[0], x.shape[1]
        a: Tensor = x
        grouped = False  # activations as [b, N*C, H, W] channels-last
        for i, layer in enumerate(self.layers):
            k = layer.kind
            if k == "conv":
                if not grouped:
                    a = a.transpose(0, 1).reshape(b, N * a.shape[2], *a.shape[3:])
                    a = a.contiguous(memory_format=_CL)
                    grouped = True
                stride, pad, dil, cout = layer.args
                assert layer.weight is not None
                wt = self._param(w, layer.weight)
                wt = wt.reshape(N * cout, *wt.shape[2:]).contiguous(memory_format=_CL)
                bias = (self._param(w, layer.bias).reshape(N * cout)
                        if layer.bias is not None else None)
                out = F.conv2d(a, wt, bias, stride, pad, dil, N)
                if tape is not None:
                    tape.append((a, wt))
                a = out
            elif k == "pool":
                ks, st, pad, dil, ceil = layer.args
                out, ind = torch.ops.aten.max_pool2d_with_indices(a, ks, st, pad, dil, ceil)
                if tape is not None:
                    tape.append((a, ind))
                a = out
            elif k == "relu":
                a = torch.relu(a)
                if tape is not None:
                    tape.append(a)
            elif k == "flatten":
                if grouped:
                    shape = a.shape
                    if tape is not None:
                        tape.append(shape)
                    a = a.reshape(b, N, -1).transpose(0, 1).contiguous()
                    grouped = False
                else:
                    if tape is not None:
                        tape.append(a.shape)
                    a = a.reshape(N, b, -1)
            else:  # linear
                assert layer.weight is not None
                wl = self._param(w, layer.weight)
                if tape is not None:
                    tape.append((a, wl))
                bias = self._param(w, layer.bias) if layer.bias is not None else None
                if i == self._last:
                    # the output layer as (W aᵀ)ᵀ: MKL's batched GEMM is 1.1-4x faster with the
                    # few output classes as rows than as columns (same dot products), and the
                    # transposed view feeds the loss as is
                    a = (torch.baddbmm(bias.unsqueeze(2), wl, a.transpose(1, 2))
                         if bias is not None else torch.bmm(wl, a.transpose(1, 2))
                         ).transpose(1, 2)
                elif bias is not None:
                    a = torch.baddbmm(bias.unsqueeze(1), a, wl.transpose(1, 2))
                else:
                    a = torch.bmm(a, wl.transpose(1, 2))
        return a

    def logits(self, w: Tensor, x: Tensor) -> Tensor:
        """``[N, b, classes]`` logits of rows ``w`` ``[N, P]`` on their batches ``x``."""
        with torch.no_grad():
            return self._forward(w, x, None)

    def logits_shared(self, w: Tensor, x: Tensor) -> Tensor:
        """``[B, n, classes]``: each model of ``w`` ``[B, P]`` on the same inputs ``x``."""
        return self.logits(w, x.unsqueeze(0).expand(w.shape[0], *x.shape))

    # ------------------------------------------------------------------ backward
    def blocks(self, w: Tensor) -> list[Tensor]:
        """Views ``[N, numel]`` of each parameter tensor's columns of ``w`` ``[N, P]`` (in the
        order of :meth:`grad_blocks`)."""
        return [w[:, i.start : i.end] for i in self.flat.tensor_infos]

    def grad(self, w: Tensor, x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
        """``[N, P]`` gradients of ``Σ_i scale_i · CE(f(w_r, x_ri), y_ri)`` per row ``r``.

        ``scale`` ``[N, b]``: example weights over the row's weight sum (clamped at 1), so the
        loss is :meth:`FunctionalModel.loss`'s weighted mean.
        """
        return torch.cat(self.grad_blocks(w, x, y, scale), 1)

    def grad_blocks(self, w: Params, x: Tensor, y: Tensor, scale: Tensor,
                    out: list[Tensor] | None = None) -> list[Tensor]:
        """:meth:`grad` as one ``[N, numel]`` tensor per parameter tensor (no concatenation:
        the optimiser updates parameter blocks in place); ``w`` may be such blocks too.

        ``out``: contiguous ``[N, numel]`` tensors (:meth:`workspace`) that receive the linear
        layers' gradients (the returned list holds them); others are fresh tensors."""
        with torch.no_grad():
            tape: list[Any] = []
            z = self._forward(w, x, tape)
            # softmax by hand: aten's softmax over a last dimension of ~10 classes is ~10x
            # slower than these three element-wise kernels on the CPU
            dz = (z - z.amax(-1, keepdim=True)).exp_()
            sc = scale.unsqueeze(-1)
            dz.mul_(sc / dz.sum(-1, keepdim=True))
            dz.scatter_add_(2, y.unsqueeze(-1), sc.neg())
            return self._backward(w, dz, tape, out)

    def workspace(self, rows: int, dtype: torch.dtype, device: torch.device
                  ) -> tuple[list[Tensor], list[Tensor]]:
        """Two sets of gradient blocks ``[rows, numel]`` for ``grad_blocks(out=...)``, kept
        for the model's lifetime: training alternates between them (one holds the momentum
        while the other receives the next gradient), so the large per-step gradient tensors
        are not allocated anew — fresh multi-megabyte allocations cost page faults (measured
        ~13 ms of system time per round of the 400-row digits CNN)."""
        key = (rows, dtype, str(device))
        if key not in self._workspaces:
            if len(self._workspaces) >= 4:
                self._workspaces.clear()
            self._workspaces[key] = tuple(  # type: ignore[assignment]
                [torch.empty((rows, i.numel), dtype=dtype, device=device)
                 for i in self.flat.tensor_infos] for _ in range(2))
        return self._workspaces[key]

    def _buffer(self, layer: int, like: Tensor) -> Tensor:
        """A tensor shaped and strided as ``like``, reused by layer ``layer``'s backward from
        step to step (a fresh multi-megabyte gradient map per step costs page faults)."""
        key = (layer, tuple(like.shape), like.stride(), like.dtype, str(like.device))
        buf = self._buffers.get(key)
        if buf is None:
            if len(self._buffers) >= 32:
                self._buffers.clear()
            buf = self._buffers[key] = torch.empty_strided(
                like.shape, like.stride(), dtype=like.dtype, device=like.device)
        return buf

    def _backward(self, w: Params, d: Tensor, tape: list[Any],
                  out: list[Tensor] | None = None) -> list[Tensor]:
        N = d.shape[0]
        grads: dict[str, Tensor] = {}
        target = {} if out is None else dict(zip(self._order, out, strict=True))
        first = next(i for i, layer in enumerate(self.layers) if layer.weight is not None)
        for i in range(len(self.layers) - 1, first - 1, -1):  # nothing to do below the first
            layer = self.layers[i]
            k = layer.kind
            saved = tape[i]
            need_input = i > first
            if k == "linear":
                a, wl = saved
                assert layer.weight is not None
                o = target.get(layer.weight.name)
                grads[layer.weight.name] = torch.bmm(d.transpose(1, 2), a) if o is None else \
                    torch.bmm(d.transpose(1, 2), a, out=o.view(N, *layer.weight.shape))
                if layer.bias is not None:
                    o = target.get(layer.bias.name)
                    grads[layer.bias.name] = d.sum(1) if o is None else torch.sum(d, 1, out=o)
                if need_input:
                    d = torch.bmm(d, wl)
            elif k == "relu":  # in place: d is this backward pass's own intermediate
                d = torch.ops.aten.threshold_backward.grad_input(d, saved, 0, grad_input=d)
            elif k == "flatten":
                shape = saved
                if len(shape) == 4:  # grouped [b, N*C, H, W] -> back to the grouped layout
                    d = d.transpose(0, 1).reshape(shape).contiguous(memory_format=_CL)
                else:
                    d = d.reshape(shape)
            elif k == "pool":
                a, ind = saved
                ks, st, pad, dil, ceil = layer.args
                d = torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                    d, a, ks, st, pad, dil, ceil, ind, grad_input=self._buffer(i, a))
            else:  # conv
                a, wt = saved
                stride, pad, dil, cout = layer.args
                assert layer.weight is not None
                if not d.is_contiguous(memory_format=_CL):
                    d = d.contiguous(memory_format=_CL)
                gi, gw, gb = torch.ops.aten.convolution_backward(
                    d, a, wt, [N * cout] if layer.bias is not None else None, stride, pad, dil,
                    False, [0, 0], N, [need_input, True, layer.bias is not None])
                grads[layer.weight.name] = gw.reshape(N, -1)
                if layer.bias is not None:
                    assert layer.bias is not None
                    grads[layer.bias.name] = gb.reshape(N, -1)
                if need_input:
                    d = gi
        return [grads[n].reshape(N, -1) for n in self._order]


def example_scale(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """``valid / max(1, Σ valid)`` over the last dimension (batch): the loss weights."""
    v = valid.to(dtype)
    return v / v.sum(-1, keepdim=True).clamp_min(1.0)
