"""``run_nn``: PSO-Fed on neural networks, every client and Monte Carlo run as one torch program.

State: the global models ``G [B, P]`` and every client's full local model ``W [B, K, P]`` (flat
:class:`~psfed_robust.core.flatten.FlattenedModel` layout; ``B`` runs, ``K`` clients). A round
(Gogineni et al., ICASSP 2022; Lari et al., IEEE TSIPN 2025), with the round core
(:mod:`psfed_robust.core.round`) doing every step's math:

1. each run's selector picks the shared coordinates (the core selectors, seeded as the Flower
   engine seeds them): index lists ``[B, K, M]``; participants ``[B, K]`` are sampled;
2. downlink: :func:`~psfed_robust.core.round.merge_` writes the global values on the mask into
   each participant's local model (the rest of the local model is kept);
3. local training: minibatch SGD with momentum / weight decay over client rows
   (:mod:`psfed_robust.nn.train`: the fused kernels of :mod:`psfed_robust.nn.fused`, or the
   ``vmap(grad)`` reference path), in row chunks sized to a memory budget; a data attack
   (``kind == "data"``, e.g. label flip) trains the malicious clients on poisoned labels;
4. uplink: :func:`~psfed_robust.core.round.local_deltas` against the global model on the
   uplink mask (= the downlink mask, as in the Flower path), then the attack seam
   :func:`~psfed_robust.core.round.attack_step` (omniscient attacks see the honest deltas);
5. :func:`~psfed_robust.core.round.server_step` with the defense in fill or reporters mode and
   PSO-Fed's weights ``1/|K_n|``; a run whose aggregate is not finite keeps its global model
   (the Flower strategy's rule).

When every client of a run shares the same coordinates (coordinated selectors) the attack sees
the shared columns only (``[B, K, M]``, no mask): coordinates nobody sends are zero in the
server's view of a delta, so statistics and norms are unchanged. Per-client masks give the
attack the dense ``[B, K, P]`` deltas (zero where unshared) with bool masks, as the Flower
server adversary does.

Seeds follow ``experiments/flower_engine.py`` (run seed, split, initial model, masks, batch
order), so both engines draw the same split, start model, masks and batches for a scenario seed.
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psfed_robust.core.aggregation import server_weights
from psfed_robust.core.flatten import FlattenedModel
from psfed_robust.core.mask import Mask
from psfed_robust.core.round import attack_step, gather, local_deltas, merge_, server_step
from psfed_robust.core.seeding import stable_seed, torch_generator
from psfed_robust.core.selectors import (  # make_selector re-exported: the scenario's names
    MaskSelector,
    RandomMaskSelector,
    StructuredMaskSelector,
    make_selector,
)
from psfed_robust.nn import kernels
from psfed_robust.nn.config import NNConfig
from psfed_robust.nn.data import ImageTask, client_table, load_task, split
from psfed_robust.nn.fused import FusedModel, supports
from psfed_robust.nn.models import build_model
from psfed_robust.nn.train import FunctionalModel, batch_plan, train_rows
from psfed_robust.wire import HEADER_SIZE, encoded_size

__all__ = ["NNResult", "evaluate", "make_selector", "poison_rows", "run_nn", "run_seed",
           "shared_columns_step"]

_ITEMSIZE = 4  # float32 values on the wire


@dataclass(frozen=True)
class NNResult:
    """Recorded rounds ``[R]`` and metrics ``name -> [runs, R]`` (``accuracy``, ``loss``,
    ``bytes_down``, ``bytes_up`` per participating client, ``asr`` for data attacks)."""

    rounds: np.ndarray
    metrics: dict[str, np.ndarray]
    info: dict[str, Any]
    seconds: float
    final_global: Tensor  # [runs, P] on the CPU


def run_seed(seed: int, run: int) -> int:
    """Run ``run``'s seed (the Flower engine's derivation)."""
    return stable_seed("experiments.flower.run", seed, run)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("NNConfig.device is 'cuda' but torch sees no CUDA device")
    return torch.device(name)


def evaluate(fm: FunctionalModel | FusedModel, g: Tensor, x: Tensor, y: Tensor,
             num_classes: int, chunk: int = 2048, *, flips: bool = True
             ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(loss, accuracy, flip success)`` ``[B]`` of global models ``g`` ``[B, P]`` on (x, y).

    Flip success: the fraction of examples predicted as the label-flip target ``C − 1 − y``
    (examples with ``C − 1 − y = y`` excluded), the attack success rate of label flipping;
    ``None`` unless ``flips``.
    """
    sums = _Evaluator(fm, x, y, num_classes, chunk, flips=flips)(g)
    return sums[0], sums[1], sums[2] if flips else None


class _Evaluator:
    """:func:`evaluate` with the test set's constants built once (chunks, label-flip targets
    and their count): the engine evaluates every recorded round on the same test set, where
    these small kernels and their Python overhead are a large share of an evaluation."""

    def __init__(self, fm: FunctionalModel | FusedModel, x: Tensor, y: Tensor, num_classes: int,
                 chunk: int = 2048, *, flips: bool = True) -> None:
        self.fwd = fm.logits_shared if isinstance(fm, FusedModel) else \
            torch.func.vmap(fm.logits, in_dims=(0, None))
        target = num_classes - 1 - y
        flippable = target != y
        # an example that cannot be flipped aims at -1, which no prediction equals
        aimed = torch.where(flippable, target, torch.full_like(target, -1))
        self.chunks = [(x[s : s + chunk], y[s : s + chunk], aimed[s : s + chunk])
                       for s in range(0, len(y), chunk)]
        self.n = float(len(y))
        self.flips = flips
        self.n_flip = max(1.0, float(flippable.sum())) if flips else 1.0
        self._labels: dict[int, list[Tensor]] = {}
        # an MLP on the CPU in float32: the compiled kernel's sums (same forward pass)
        spec = kernels.mlp_spec(fm) if isinstance(fm, FusedModel) else None
        self.spec = spec if spec is not None and x.device.type == "cpu" and \
            x.dtype == torch.float32 and kernels.available() else None
        self.compiled = kernels.MLPEvaluator(
            self.spec, x.reshape(len(y), -1).contiguous(), y.contiguous(),
            aimed.contiguous()) if self.spec is not None else None

    def __call__(self, g: Tensor) -> Tensor:
        """``[3, B]`` float64 (``[2, B]`` without flips): loss, accuracy, flip success."""
        B = g.shape[0]
        if self.compiled is not None and g.dtype == torch.float32 and g.device.type == "cpu":
            sums = self.compiled(g, torch.get_num_threads(), (self.n, self.n, self.n_flip))
            return sums if self.flips else sums[:2]
        labels = self._labels.get(B)
        if labels is None:  # each chunk's labels expanded over the B models (views)
            labels = self._labels[B] = [yb.expand(B, -1) for _, yb, _ in self.chunks]
        sums = torch.zeros((3 if self.flips else 2, B), dtype=torch.float64, device=g.device)
        with torch.no_grad():
            for i, (xb, yb, aimed) in enumerate(self.chunks):
                # [B, C, n]: the fused output layer's memory layout (class reductions run across
                # contiguous examples, not along 10-element rows)
                out = self.fwd(g, xb).transpose(1, 2)
                ce = torch.nn.functional.cross_entropy(out, labels[i], reduction="none")
                pred = out.max(1).indices  # argmax (first maximum), ~10x faster on this layout
                if i == 0:  # written in place: a sum of 0 and x is x
                    torch.sum(ce, -1, dtype=torch.float64, out=sums[0])
                    torch.sum(pred == yb, -1, dtype=torch.float64, out=sums[1])
                    if self.flips:
                        torch.sum(pred == aimed, -1, dtype=torch.float64, out=sums[2])
                else:
                    sums[0] += ce.sum(-1, dtype=torch.float64)
                    sums[1] += (pred == yb).sum(-1, dtype=torch.float64)
                    if self.flips:
                        sums[2] += (pred == aimed).sum(-1, dtype=torch.float64)
        sums[:2].div_(self.n)
        if self.flips:
            sums[2].div_(self.n_flip)
        return sums


def poison_rows(labels: Tensor, bad: Tensor, attack: Any, num_classes: int,
                generator: torch.Generator | None) -> Tensor:
    """Labels ``[R, n]`` with rows ``bad`` ``[R]`` passed through ``attack.poison_labels``
    (a data attack's training-time poisoning); every other row is returned unchanged."""
    out = labels.clone()
    if bool(bad.any()):
        out[bad] = attack.poison_labels(labels[bad], num_classes, generator)
    return out


_ACCEPTS_INFO: dict[type, bool] = {}


def _accepts_info(defense: Any) -> bool:
    """Whether calling ``defense`` takes ``info`` (its class's ``__call__``, which a call
    uses; cached per class — ``inspect.signature`` costs ~25 µs)."""
    cls = type(defense)
    if cls not in _ACCEPTS_INFO:
        try:
            _ACCEPTS_INFO[cls] = "info" in inspect.signature(cls.__call__).parameters
        except (TypeError, ValueError):
            _ACCEPTS_INFO[cls] = False
    return _ACCEPTS_INFO[cls]


class _Masks:
    """One round's masks: index lists ``[B, K, M]`` (None = all shared) and wire bytes
    ``[B, K]`` (float64)."""

    def __init__(self, idx: Tensor | None, per_client: bool, nbytes: np.ndarray) -> None:
        self.idx, self.per_client, self.nbytes = idx, per_client, nbytes


def _round_masks(sels: list[MaskSelector], n: int, P: int, K: int, G: Tensor,
                 flat: FlattenedModel, dev: torch.device) -> _Masks:
    B = len(sels)
    rows: list[list[Mask]] = []
    per_client = bool(sels[0].per_client)
    for b, sel in enumerate(sels):
        ctx: dict[str, Any] = {}
        if "flat_model" in sel.required_context:
            ctx["flat_model"] = flat if isinstance(sel, StructuredMaskSelector) else \
                G[b].detach().cpu().numpy()
        if type(sel) is RandomMaskSelector and round(sel.fraction * P) >= P:
            rows.append([Mask.all_true(P)])
        elif per_client:
            rows.append([sel.select(P, n, client_id=k, **ctx) for k in range(K)])
        else:
            rows.append([sel.select(P, n, **ctx)])
    nbytes = np.broadcast_to(np.array([[encoded_size(m, _ITEMSIZE) for m in r] for r in rows],
                                      dtype=np.float64), (B, K))
    counts = {m.count for r in rows for m in r}
    if len(counts) != 1:
        raise ValueError(f"round {n}: masks of different sizes {sorted(counts)} cannot be "
                         "stacked; use a selector with a fixed count")
    if counts == {P}:
        return _Masks(None, False, nbytes)
    if len({len(r) for r in rows}) == 1:  # one stack of every mask's indices
        idx = torch.from_numpy(np.stack([m.indices for r in rows for m in r])).view(
            B, len(rows[0]), -1)
    else:
        idx = torch.from_numpy(np.stack([np.stack([m.indices for m in r]) for r in rows]))
    return _Masks(idx.to(dev).expand(B, K, -1), per_client, nbytes)


def shared_columns_step(defense: Any, values: Tensor, global_model: Tensor, *, index: Tensor,
                        **kw: Any) -> Tensor:
    """:func:`~psfed_robust.core.round.server_step` of a coordinate-wise rule when every client
    of a run shares the same coordinates (``index`` ``[B, K, M]``, equal over ``K``): the rule
    runs on the ``M`` shared columns only (dense values, global model gathered on them) and the
    result is scattered into the global model. Exact for coordinate-wise rules: an unshared
    column holds the global value in every row (fill) or has no reporter, so the rule keeps the
    global value there; ``server_step`` would densify to ``[B, K, D]`` and sort ``D − M``
    constant columns too."""
    cols = index[..., 0, :]  # [B, M]
    g_shared = global_model.gather(-1, cols.long())
    new = server_step(defense, values, g_shared, **kw)
    return global_model.scatter(-1, cols.long(), new)


def _lap(phases: dict[str, float], name: str, since: float) -> float:
    """Add the time since ``since`` to ``phases[name]``; returns now (per-phase timing)."""
    now = time.perf_counter()
    phases[name] += now - since
    return now


_ACTIVATIONS: dict[tuple[Any, ...], int] = {}


def _chunk_rows(cfg: NNConfig, fm: FunctionalModel, shape: tuple[int, int, int],
                rows: int, num_classes: int) -> tuple[int, int]:
    """``(rows per vmap call, bytes per row)`` under ``memory_budget_mb``."""
    # the activation count is the architecture's (a forward pass with hooks: cached)
    arch = (cfg.model, tuple(shape), num_classes, cfg.hidden)
    act = _ACTIVATIONS.get(arch)
    if act is None:
        act = _ACTIVATIONS[arch] = fm.activation_numel(shape)
    per_row = 4 * (8 * fm.num_parameters + cfg.batch_size * (4 * act + 2 * int(np.prod(shape))))
    chunk = max(1, int(cfg.memory_budget_mb * 2**20 // per_row))
    if cfg.max_chunk:
        chunk = min(chunk, cfg.max_chunk)
    return min(chunk, rows), per_row


def _metrics(scores: list[Tensor], recorded: list[int], part_log: list[Tensor],
             nbytes_log: list[np.ndarray], first_bytes: int) -> dict[str, np.ndarray]:
    """``name -> [B, recorded rounds]``: the evaluations, and the wire bytes per participating
    client averaged over the rounds since the last record (a client's first contact adds the
    dense initial model, ``first_bytes``). Byte counts are whole numbers, exact in float64, so
    computing them for every round at once after the loop gives each round's value."""
    ev = torch.stack(scores, -1).cpu().numpy().astype(np.float64)  # [3 | 2, B, R]
    part = np.stack([p.numpy() for p in part_log])  # [rounds, B, K]
    pf = part.astype(np.float64)
    npart = np.maximum(pf.sum(-1), 1.0)
    before = np.zeros_like(part)  # clients that took part in an earlier round
    np.logical_or.accumulate(part[:-1], axis=0, out=before[1:])
    first = (part & ~before).astype(np.float64) * first_bytes
    sent = (np.stack(nbytes_log) * pf).sum(-1)
    per_down = (sent + first.sum(-1)) / npart  # [rounds, B]
    per_up = sent / npart
    down: list[np.ndarray] = []
    up: list[np.ndarray] = []
    B = part.shape[1]
    down_acc, up_acc, last = np.zeros(B), np.zeros(B), 0
    for n in recorded:  # rounds are 1-based; each record closes the span since the last one
        for r in range(last, n):
            down_acc += per_down[r]
            up_acc += per_up[r]
        span = float(n - last)
        down.append(down_acc / span)
        up.append(up_acc / span)
        down_acc, up_acc, last = np.zeros(B), np.zeros(B), n
    metrics = {"accuracy": ev[1].copy(), "loss": ev[0].copy(), "bytes_down": np.stack(down, 1),
               "bytes_up": np.stack(up, 1)}
    if ev.shape[0] == 3:
        metrics["asr"] = ev[2].copy()
    return metrics


def run_nn(config: NNConfig, *, task: ImageTask | None = None, progress: bool = False
           ) -> NNResult:
    """Run every Monte Carlo run of ``config`` at once (see the module docstring).

    ``task`` overrides the data ``config.task`` names (tests, custom data).
    """
    if not isinstance(config, NNConfig):
        raise TypeError(f"run_nn needs an NNConfig, got {type(config).__name__}")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, task, progress)
    finally:
        torch.set_num_threads(threads)


def _run(config: NNConfig, task: ImageTask | None, progress: bool) -> NNResult:
    import attacks
    import defenses

    t0 = time.perf_counter()
    cfg = config
    dev = _device(cfg.device)
    data = task if task is not None else load_task(cfg.task, cfg.data_dir, seed=cfg.seed)
    B, K, C = cfg.runs, cfg.clients, data.num_classes
    shape = data.input_shape
    seeds = [run_seed(cfg.seed, r) for r in range(B)]

    # data: per-run splits as one example-id table [B*K, n_max]
    tables, counts = [], []
    for rs in seeds:
        tab, cnt = client_table(split(data.y_train, K, cfg.partition, cfg.dirichlet_alpha, rs))
        tables.append(tab)
        counts.append(cnt)
    n_max = max(t.shape[1] for t in tables)
    table = torch.cat([torch.cat([t, t[:, :1].expand(-1, n_max - t.shape[1])], 1)
                       for t in tables]).to(dev)
    count = torch.cat(counts)
    x_train, y_train = data.x_train.to(dev), data.y_train.to(dev)
    x_test, y_test = data.x_test.to(dev), data.y_test.to(dev)

    # models: run b starts from the Flower engine's initial model of its run seed
    models = [build_model(cfg.model, shape, C, hidden=cfg.hidden,
                          seed=stable_seed("experiments.flower.model", rs)) for rs in seeds]
    fm = FunctionalModel(models[0].to(dev))
    fz = FusedModel(models[0]) if cfg.fused and supports(models[0]) else None
    P = fm.num_parameters
    G = torch.stack([FlattenedModel(m).flatten() for m in models]).to(dev)
    W = G.unsqueeze(1).repeat(1, K, 1)
    Wf = W.view(B * K, P)
    momentum_state = torch.zeros_like(Wf) if cfg.momentum_scope == "persistent" else None
    chunk, row_bytes = _chunk_rows(cfg, fm, shape, B * K, C)

    sels = [make_selector(cfg.selector, cfg.fraction,
                          stable_seed("experiments.flower.masks", rs) % (1 << 31)) for rs in seeds]
    attack = attacks.get_attack(cfg.attack, **cfg.attack_params) \
        if cfg.attack != "none" and cfg.malicious > 0 else None
    data_attack = attack is not None and getattr(attack, "kind", "model") == "data"
    defense = defenses.get_defense(cfg.defense, **cfg.defense_params)
    pass_info = _accepts_info(defense)
    from defenses.base import CoordinatewiseAggregator

    coordwise = isinstance(defense, CoordinatewiseAggregator) and \
        getattr(defense, "indexed", None) is None
    mal = torch.zeros((B, K), dtype=torch.bool, device=dev)
    mal[:, : cfg.malicious] = attack is not None
    attack_state: dict[str, Any] = {}
    labels = y_train[table] if data_attack else None  # [B*K, n_max] per-row labels
    poison = data_attack and float(getattr(attack, "p", 1.0)) >= 1.0
    if poison and labels is not None:  # p = 1: the same flipped labels every round
        labels = poison_rows(labels, mal.view(-1), attack, C, None)

    row_run = torch.arange(B * K) // K
    row_client = torch.arange(B * K) % K
    full_part = cfg.num_participants == K
    row_lists: tuple[list[int], list[int], list[int], Tensor] | None = None  # fixed when full
    recorded: list[int] = []
    evaluator = _Evaluator(fz if fz is not None else fm, x_test, y_test, C, flips=data_attack)
    scores: list[Tensor] = []  # per recorded round: [3 | 2, B] (loss, accuracy, flip success)
    part_log: list[Tensor] = []  # per round: participants [B, K] and wire bytes per mask
    nbytes_log: list[np.ndarray] = []
    if full_part:  # every client, every round: one participants tensor and row list
        part = torch.ones((B, K), dtype=torch.bool)
        part_d = part.to(dev)
        rows = part.view(-1).nonzero().squeeze(1)
        rows_d = rows.to(dev)
    # PSO-Fed's weights 1/|K_n|: one tensor for every round when every client takes part
    full_weights = server_weights(torch.ones((B, K), dtype=torch.bool, device=dev),
                                  "participants", dtype=G.dtype) if full_part else None
    fresh_buf: Tensor | None = None  # engine-owned workspaces, reused across rounds
    cur_buf: Tensor | None = None
    phases: dict[str, float] = {"masks_merge": 0.0, "train": 0.0, "attack": 0.0, "server": 0.0,
                                "evaluate": 0.0}
    iterator: Any = range(1, cfg.rounds + 1)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="nn rounds", leave=False)
    for n in iterator:
        tick = time.perf_counter()
        # 1. participants and masks
        if not full_part:
            part = torch.zeros((B, K), dtype=torch.bool)
            for b in range(B):
                g = torch_generator("nn.sample", seeds[b], n)
                part[b, torch.randperm(K, generator=g)[: cfg.num_participants]] = True
            part_d = part.to(dev)
            rows = part.view(-1).nonzero().squeeze(1)
            rows_d = rows.to(dev)
        masks = _round_masks(sels, n, P, K, G, fm.flat, dev)
        idx = masks.idx
        part_log.append(part)
        nbytes_log.append(masks.nbytes)

        # 2. downlink merge into the participants' local models (in place when every client
        # takes part: no copies of the [runs x clients, P] state)
        if idx is not None:  # the global values on the masks [B, K, M]; coordinated masks:
            # gathered once per run ([B, 1, M], also the uplink reference) and expanded over the
            # clients (a view, no [B, K, M] index copy)
            if masks.per_client:
                down = gather(G, idx)
            else:
                g_cols = gather(G, idx[:, :1])
                down = g_cols.expand(idx.shape)
        if full_part:
            sub = Wf
            if idx is None:
                merge_(W, None, G.unsqueeze(1))
            else:
                merge_(W, idx, down)
        else:
            sub = Wf.index_select(0, rows_d)
            if idx is None:
                merge_(sub, None, G.index_select(0, row_run[rows].to(dev)))
            else:
                idx_rows = idx.reshape(B * K, -1).index_select(0, rows_d)
                merge_(sub, idx_rows, down.reshape(B * K, -1).index_select(0, rows_d))

        tick = _lap(phases, "masks_merge", tick)

        # 3. local training
        if momentum_state is None:  # fresh momentum each round, in one reused buffer (a
            # new [rows, P] zero tensor each round costs page faults)
            if fresh_buf is None or fresh_buf.shape != sub.shape:
                fresh_buf = torch.zeros_like(sub)
            buf = fresh_buf.zero_()
        else:
            buf = momentum_state if full_part else momentum_state.index_select(0, rows_d)
        if not full_part or row_lists is None:  # the rows' counts, run seeds and clients
            row_lists = (count[rows].tolist(), [seeds[b] for b in row_run[rows].tolist()],
                         row_client[rows].tolist(), table.index_select(0, rows_d))
        plan = batch_plan(row_lists[0], row_lists[1], row_lists[2], n,
                          batch_size=cfg.batch_size, local_epochs=cfg.local_epochs,
                          local_steps=cfg.local_steps, shuffle=cfg.shuffle)
        if data_attack and not poison:
            assert labels is not None
            gen = torch_generator("nn.label_flip", cfg.seed, n, device=dev)
            y_rows = poison_rows(labels.index_select(0, rows_d),
                                 mal.view(-1).index_select(0, rows_d), attack, C, gen)
        else:
            y_rows = labels.index_select(0, rows_d) if labels is not None else y_train
        train_path = train_rows(
            fm, sub, buf, x_train, y_rows, row_lists[3], plan,
            lr=cfg.lr_at(n), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
            chunk=chunk, fused=fz)
        if not full_part:
            Wf.index_copy_(0, rows_d, sub)
            if momentum_state is not None:
                momentum_state.index_copy_(0, rows_d, buf)

        tick = _lap(phases, "train", tick)

        # 4. uplink deltas and the attack seam
        if idx is None:
            ref, cur, amasks = G, W, None
        elif not masks.per_client:  # the clients' values on the masks, into a reused buffer
            if cur_buf is None or cur_buf.shape != idx.shape:
                cur_buf = torch.empty(idx.shape, dtype=W.dtype, device=dev)
            ref, cur, amasks = g_cols[:, 0], torch.gather(W, -1, idx, out=cur_buf), None
        else:
            dense = torch.zeros((B, K, P), dtype=torch.bool, device=dev)
            dense.scatter_(-1, idx, True)
            ref, cur, amasks = G, W, dense
        honest = local_deltas(cur, ref)
        if amasks is not None:
            honest = torch.where(amasks, honest, torch.zeros((), dtype=honest.dtype,
                                                             device=dev))
        sent = honest
        if attack is not None and not data_attack:
            from attacks import AttackContext

            ctx = AttackContext(
                round=n, generator=torch_generator("nn.attack", cfg.seed, n, device=dev),
                reference=ref, masks=amasks, malicious=mal,
                participants=None if full_part else part_d,
                honest=honest.clone() if getattr(attack, "omniscient", False) else None,
                aggregator=defense, state=attack_state)
            sent, changed = attack_step(attack, honest, ctx, persistent=cfg.persistent)
            if changed is not None and bool(changed.any()):
                keep = changed.unsqueeze(-1)
                new = ref.unsqueeze(-2) + sent
                if idx is None:
                    W.copy_(torch.where(keep, new, W))
                elif amasks is None:
                    merge_(W, idx, torch.where(keep, new, cur))
                else:
                    W.copy_(torch.where(keep & amasks, new, W))

        tick = _lap(phases, "attack", tick)

        # 5. server step
        if idx is None:
            values, index = G.unsqueeze(-2) + sent, None
        elif amasks is None:
            values, index = ref.unsqueeze(-2) + sent, idx
        else:
            values, index = gather(G, idx) + sent.gather(-1, idx), idx
        weights = full_weights if full_weights is not None else \
            server_weights(part_d, "participants", dtype=G.dtype)
        extra: dict[str, Any] = {"info": {}} if pass_info else {}
        kw: dict[str, Any] = {"participants": None if full_part else part_d,
                              "weights": weights, "mode": cfg.mode, **extra}
        if index is not None and amasks is None and coordwise:  # coordinated masks
            new_g = shared_columns_step(defense, values, G, index=index, **kw)
        else:
            new_g = server_step(defense, values, G, index=index, **kw)
        # a run whose new model is not finite keeps its model. On the CPU a finite sum of all
        # the new models shows that every value is finite (an inf or NaN would make it inf
        # or NaN); only otherwise (or an overflowing sum) are the runs checked one by one
        if dev.type != "cpu" or not math.isfinite(float(new_g.sum())):
            G = torch.where(torch.isfinite(new_g).all(-1, keepdim=True), new_g, G)
        else:
            G = new_g

        tick = _lap(phases, "server", tick)

        if n % cfg.record_every == 0 or n == cfg.rounds:
            scores.append(evaluator(G))
            recorded.append(n)
            _lap(phases, "evaluate", tick)
    metrics = _metrics(scores, recorded, part_log, nbytes_log, HEADER_SIZE + _ITEMSIZE * P)
    seconds = time.perf_counter() - t0
    state_bytes = 4 * P * (2 if momentum_state is not None else 1)
    info = {
        "engine": "nn-batched", "device": str(dev), "num_parameters": P, "model": cfg.model,
        "train_examples": len(data.y_train), "test_examples": len(data.y_test),
        "chunk_rows": chunk, "train_bytes_per_row": row_bytes,
        "state_bytes_per_client": state_bytes, "seconds": round(seconds, 3),
        "train_path": train_path,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }
    final = G.detach().cpu()
    if final.untyped_storage().nbytes() != final.numel() * final.element_size():
        final = final.clone()  # a defense's view into a larger tensor: keep only the model
    return NNResult(np.asarray(recorded), metrics, info, seconds, final)
