"""Batched local training: every client's minibatch SGD as one ``torch.func`` program.

Client models are rows of a ``[N, P]`` tensor (the flat layout of
:class:`~psfed_robust.core.flatten.FlattenedModel`); one SGD step of all rows is
``vmap(grad(loss))`` over (row parameters, row batch) followed by the momentum / weight-decay
update of ``torch.optim.SGD`` (dampening 0, no Nesterov) written on the stacked rows:
``g ← ∇ + wd·w``, ``b ← μ·b + g``, ``w ← w − lr·b``. Clients have different numbers of examples
(Dirichlet splits): batches are padded and carry per-example weights, a short last batch is the
mean over its real examples (as ``order[s:s+batch]`` in a plain loop), and a client whose epoch
has ended sits out the remaining steps unchanged (parameters and momentum).

Batch order: client ``k`` of a run draws ``torch.randperm(n_k)`` once per local epoch from a
generator seeded ``stable_seed("experiments.flower.batches", run_seed, k, round)`` — the Flower
engine's draw, so both engines visit a client's examples in the same order. ``local_steps``
mode draws a fresh permutation per step and trains on its first ``batch`` examples.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.seeding import _encode_part
from psfed_robust.nn import kernels
from psfed_robust.nn.fused import FusedModel, example_scale

__all__ = ["BatchPlan", "FunctionalModel", "batch_plan", "train_rows"]


class FunctionalModel:
    """A model as a pure function of its flat parameter vector ``w`` ``[P]``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flat = FlattenedModel(model)
        if any(True for _ in model.buffers()):
            raise ValueError("the batched NN engine needs models without buffers (no BatchNorm)")
        self.infos = self.flat.tensor_infos
        self.num_parameters = self.flat.num_parameters

    def params(self, w: Tensor) -> dict[str, Tensor]:
        return {i.name: w[i.start : i.end].view(i.shape) for i in self.infos}

    def logits(self, w: Tensor, x: Tensor) -> Tensor:
        out: Tensor = functional_call(self.model, self.params(w), (x,))
        return out

    def loss(self, w: Tensor, x: Tensor, y: Tensor, weight: Tensor) -> Tensor:
        """Weighted mean cross-entropy of one batch (weights 0 mark padding)."""
        ce = nn.functional.cross_entropy(self.logits(w, x), y, reduction="none")
        return (ce * weight).sum() / weight.sum().clamp_min(1.0)

    def grad_fn(self) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """``[N, P]`` gradients of the rows' batch losses (vmap over rows)."""
        return vmap(grad(self.loss))  # type: ignore[no-any-return]

    def activation_numel(self, input_shape: Sequence[int]) -> int:
        """Floats of every layer output for one example (for memory sizing)."""
        total = 0

        def hook(_m: nn.Module, _i: object, out: Tensor) -> None:
            nonlocal total
            total += out.numel()

        leaves = [m for m in self.model.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(hook) for m in leaves]
        try:
            with torch.no_grad():
                self.model(torch.zeros((1, *input_shape)))
        finally:
            for h in hooks:
                h.remove()
        return total


@dataclass(frozen=True)
class BatchPlan:
    """One round's batches for ``N`` rows: ``positions [N, S, B]`` index each row's example
    table, ``valid [N, S, B]`` marks real examples, ``active [N, S]`` the steps a row trains
    (``valid`` and ``active`` are shared by every round of the same rows: read-only)."""

    positions: Tensor
    valid: Tensor
    active: Tensor


_SEP = b"\x1e"
_BATCH_PREFIX = _encode_part("experiments.flower.batches") + _SEP


@functools.lru_cache(maxsize=65536)
def _seed_prefix(run_seed: int, client: int) -> Any:
    h = hashlib.sha256()
    for part in ("experiments.flower.batches", run_seed, client):
        h.update(_encode_part(part) + _SEP)
    return h


def _batch_seed(run_seed: int, client: int, tail: bytes) -> int:
    """``stable_seed("experiments.flower.batches", run_seed, client, round)`` from a cached
    hash of the first three parts (``tail``: the encoded round): one digest per client and
    round instead of re-encoding every part."""
    h = _seed_prefix(run_seed, client).copy()
    h.update(tail)
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


@functools.lru_cache(maxsize=64)
def _plan_layout(counts: tuple[int, ...], bs: int, local_epochs: int, local_steps: int
                 ) -> tuple[int, Tensor, Tensor]:
    """``(steps, valid [N, S, b], active [N, S])`` of rows with ``counts`` examples: the same
    every round for the same rows (cached; the tensors are shared, never written)."""
    n_rows = len(counts)
    cnt = np.asarray(counts, dtype=np.int64).reshape(n_rows, 1, 1)
    if local_steps > 0:
        steps = local_steps
        valid = np.broadcast_to(np.arange(bs) < np.minimum(cnt, bs), (n_rows, steps, bs))
        active = np.ones((n_rows, steps), dtype=np.bool_)
    else:  # step s of row i is step s % per_epoch of epoch s // per_epoch
        steps = local_epochs * max(-(-c // bs) for c in counts)
        per_epoch = -(-cnt // bs)
        s_idx = np.arange(steps).reshape(1, steps, 1)
        # (a client without examples has no epoch steps: modulo 1, never valid)
        in_epoch = (s_idx % np.maximum(per_epoch, 1)) * bs + np.arange(bs) < cnt
        on = s_idx < local_epochs * per_epoch
        valid = in_epoch & on
        active = on[:, :, 0]
    return (steps, torch.from_numpy(np.ascontiguousarray(valid)),
            torch.from_numpy(np.ascontiguousarray(active)))


def batch_plan(
    counts: Sequence[int], run_seeds: Sequence[int], client_ids: Sequence[int], round_num: int,
    *, batch_size: int, local_epochs: int, local_steps: int, shuffle: bool,
    compiled: bool = True,
) -> BatchPlan:
    """The round's batch order of rows with ``counts[i]`` examples (see the module docstring).

    ``compiled``: draw the permutations with :func:`psfed_robust.nn.kernels.batch_positions` (the
    same integers as ``torch.randperm``, without a torch call per row) when it is available.
    """
    n_rows = len(counts)
    bs = batch_size
    steps, valid_t, active_t = _plan_layout(tuple(map(int, counts)), bs, local_epochs,
                                            local_steps)
    pos = torch.zeros((n_rows, steps, bs), dtype=torch.long)
    if shuffle and compiled and kernels.available():
        kernels.batch_positions(pos, counts, _BATCH_PREFIX, run_seeds, client_ids,
                                int(round_num), local_epochs, local_steps,
                                torch.get_num_threads())
        return BatchPlan(pos, valid_t, active_t)
    flat = pos.view(-1)
    tail = _encode_part(int(round_num)) + _SEP
    gen = torch.Generator()  # re-seeded per row: the same draws as a fresh generator
    for i, (n, rs, k) in enumerate(zip(counts, run_seeds, client_ids, strict=True)):
        n = int(n)
        gen.manual_seed(_batch_seed(int(rs), int(k), tail))
        base = i * steps * bs
        if local_steps > 0:
            take = min(bs, n)
            for s in range(steps):
                order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
                flat[base + s * bs : base + s * bs + take] = order[:take]
            continue
        for e in range(local_epochs):  # epoch e: a permutation over the row's epoch block
            start = base + e * (-(-n // bs)) * bs
            if shuffle:
                torch.randperm(n, generator=gen, out=flat[start : start + n])
            else:
                torch.arange(n, out=flat[start : start + n])
    return BatchPlan(pos, valid_t, active_t)


def _kernel_spec(fused: FusedModel | None, w: Tensor, x: Tensor) -> kernels.MLPSpec | None:
    """The compiled kernel's spec when it can train these rows, else ``None``."""
    if fused is None or w.dtype != torch.float32 or x.dtype != torch.float32 \
            or w.device.type != "cpu" or x.device.type != "cpu":
        return None
    spec = kernels.mlp_spec(fused)
    return spec if spec is not None and kernels.available() else None


def train_rows(
    fmodel: FunctionalModel,
    w: Tensor,
    buf: Tensor,
    x: Tensor,
    y: Tensor,
    table: Tensor,
    plan: BatchPlan,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    chunk: int,
    fused: FusedModel | None = None,
    prefetch_bytes: int = 64 * 2**20,
    compiled: bool = True,
) -> str:
    """Train rows ``w`` ``[N, P]`` in place (momentum ``buf`` ``[N, P]`` in place too).

    ``x``/``y``: the task's training images and labels (``y`` ``[N, n]`` when labels differ per
    row, e.g. poisoned); ``table`` ``[N, n_max]``: each row's example ids; ``chunk``: rows per
    call (memory bound). ``fused``: compute the gradients with the hand-derived kernels of
    :class:`~psfed_robust.nn.fused.FusedModel` instead of ``vmap(grad)`` (same values within
    float tolerance); a chunk's batches of the whole round are gathered at once when they take at
    most ``prefetch_bytes``. ``compiled``: with ``fused``, an MLP in float32 on the CPU trains
    through the compiled kernel of :mod:`psfed_robust.nn.kernels` when it is available (same
    batches and update within float32 rounding; rows split over torch's intra-op thread count).

    Returns the path that trained: ``"compiled"``, ``"fused"`` or ``"vmap"``.
    """
    gfn = fmodel.grad_fn() if fused is None else None
    dev = w.device
    n_rows = w.shape[0]
    per_row_labels = y.dim() == 2
    x_rows = x.reshape(x.shape[0], -1)  # one example per row: index_select, not x[ids]
    example_bytes = x_rows.shape[1] * x.element_size()
    spec = _kernel_spec(fused, w, x) if compiled else None
    for c0 in range(0, n_rows, chunk):
        c1 = min(n_rows, c0 + chunk)
        wc, bc = w[c0:c1], buf[c0:c1]
        tab = table[c0:c1]
        if spec is not None:  # the compiled kernel: every step of the chunk in one call
            kernels.mlp_sgd(spec, wc, bc, x_rows, tab, plan.positions[c0:c1],
                            plan.valid[c0:c1], y[c0:c1] if per_row_labels else y,
                            plan.active[c0:c1], lr=lr, momentum=momentum,
                            weight_decay=weight_decay, threads=torch.get_num_threads())
            continue
        pos = plan.positions[c0:c1].to(dev)
        val = plan.valid[c0:c1].to(dev)
        act = plan.active[c0:c1]
        all_on = act.all(0).tolist()
        act = act.to(dev)
        rows, steps, bs = pos.shape
        # a step's batch is cut after its last real example in any row (the short last batch
        # of an epoch: padding has weight 0, so dropping it changes no gradient)
        last = (val * torch.arange(1, bs + 1, device=dev)).amax(2).amax(0)  # [steps]
        widths = last.clamp_min(1).tolist()
        scale = example_scale(val, w.dtype) if fused is not None else val.to(w.dtype)
        scale = scale.transpose(0, 1).contiguous()  # [steps, rows, batch]
        xs = ys = None
        if rows * steps * bs * example_bytes <= prefetch_bytes:  # [steps, rows, batch, ...]
            flat_pos = pos.view(rows, steps * bs)
            ids = tab.gather(1, flat_pos).view(rows, steps, bs).transpose(0, 1).reshape(-1)
            xs = x_rows.index_select(0, ids).view(steps, rows, bs, *x.shape[1:])
            ys = (y[c0:c1].gather(1, flat_pos).view(rows, steps, bs).transpose(0, 1)
                  .contiguous() if per_row_labels else y.index_select(0, ids).view(steps, rows, bs))
        # parameter and momentum blocks: [rows, numel] views of each parameter tensor's columns
        wv = fused.blocks(wc) if fused is not None else [wc]
        bv0 = fused.blocks(bc) if fused is not None else [bc]
        bv = bv0  # the momentum lives in the latest gradient tensors during the round
        ws = fused.workspace(rows, w.dtype, dev) if fused is not None else None
        for s in range(steps):
            wd = widths[s]
            if xs is not None and ys is not None:
                xb, yb = xs[s, :, :wd], ys[s, :, :wd]
            else:
                cols = pos[:, s, :wd]
                ids = tab.gather(1, cols)  # [C, B] example ids
                xb = x_rows.index_select(0, ids.reshape(-1)).view(rows, wd, *x.shape[1:])
                yb = y[c0:c1].gather(1, cols) if per_row_labels else y[ids]
            sb = scale[s, :, :wd]
            if fused is not None:
                assert ws is not None  # alternate sets: the other one holds the momentum
                gs = fused.grad_blocks(wv, xb, yb, sb, out=ws[s % 2])
            else:
                assert gfn is not None
                gs = [gfn(wc, xb, yb, sb)]
            # torch.optim.SGD's update (dampening 0) on every parameter block at once; the new
            # momentum g + μ·b is built in the fresh gradient tensors (two passes over the
            # state per step, not three) and written to ``buf`` once, after the round
            if weight_decay:
                torch._foreach_add_(gs, wv, alpha=weight_decay)
            if all_on[s]:
                torch._foreach_add_(gs, bv, alpha=momentum)
                torch._foreach_add_(wv, gs, alpha=-lr)
                bv = gs
            else:  # rows whose epoch has ended keep their parameters and momentum
                keep = act[:, s].unsqueeze(-1)
                bv = [torch.where(keep, g.add_(b, alpha=momentum), b)
                      for g, b in zip(gs, bv, strict=True)]
                for b, wb in zip(bv, wv, strict=True):
                    wb.copy_(torch.where(keep, wb - lr * b, wb))
        if bv is not bv0:
            torch._foreach_copy_(bv0, bv)
    return "compiled" if spec is not None else "fused" if fused is not None else "vmap"
