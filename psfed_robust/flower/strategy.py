"""``PSFedAvg``: a Flower Message-API strategy for partial model sharing (PSO-Fed / PSFed).

Each round the server selects a mask per sampled client with any ``MaskSelector`` (data-dependent
selectors get ``flat_model``, client-reported ``gradients`` or the stable ``client_id``), sends each
client only the global values on its mask (wire-encoded; one shared payload object when masks are
identical, so Flower uploads it once), validates every reply (bad ones are dropped, logged and
counted, never aggregated) and aggregates with a pluggable rule from ``defenses`` (default
``mean`` = PSO-Fed's server step) in *fill* or *reporters* mode. See docs/flower.md.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from torch import nn

from psfed_robust.core.aggregation import server_weights
from psfed_robust.core.flatten import FlattenedModel, all_finite
from psfed_robust.core.mask import Mask, count_for_fraction
from psfed_robust.core.selectors import (
    ClientSpecificMaskSelector,
    GradientBasedSelector,
    MaskSelector,
    RandomMaskSelector,
    RoundRobinMaskSelector,
    StructuredMaskSelector,
    TopKMagnitudeSelector,
)
from psfed_robust.flower import _wire
from psfed_robust.flower._arrays import array_from_numpy, array_view, as_tensor
from psfed_robust.flower._masks import gather, mask_indices
from psfed_robust.flower.adversary import ServerAdversary
from psfed_robust.flower.metering import (
    ByteMeter,
    message_bytes,
    unique_bytes,
    update_floor_bytes,
)
from psfed_robust.flower.protocol import (
    CFG_CLIENT_ID,
    CFG_EVAL_MODEL,
    CFG_MODEL_DTYPE,
    CFG_MODEL_SIZE,
    CFG_QUERY,
    CFG_SEND_SCORES,
    CFG_SERVER_ROUND,
    CFG_UPLINK,
    CFG_UPLINK_ENCODING,
    CFG_UPLINK_FRACTION,
    DEFAULT_UPLINK,
    DEFAULT_UPLINK_ENCODING,
    KEY_ATTACK,
    KEY_CONFIG,
    KEY_DOWN,
    KEY_INIT,
    MSG_EVALUATE,
    MSG_QUERY,
    MSG_TRAIN,
    PAYLOAD,
)
from psfed_robust.flower.validation import (
    ClientId,
    EvalResult,
    ReplyRejected,
    ValidUpdate,
    count_reasons,
    parse_evaluate_reply,
    parse_query_reply,
    parse_train_reply,
)

__all__ = ["MASK_STRATEGIES", "PSFedAvg", "arrays_from_model", "make_selector"]

MASK_STRATEGIES: tuple[str, ...] = (
    "random",
    "topk",
    "gradient",
    "structured",
    "client_specific",
    "round_robin",
    "round_robin_per_client",
)
Weighting = Literal["participants", "expected", "all", "num-examples"]
Evaluation = Literal["merged", "local", "global", "none"]


def make_selector(name: str, fraction: float, seed: int | None = None) -> MaskSelector:
    """A selector from the seed package's ``mask_strategy`` string (see :data:`MASK_STRATEGIES`)."""
    key = name.strip().lower().replace("-", "_")
    if key == "random":
        return RandomMaskSelector(fraction, seed)
    if key in ("topk", "top_k", "topk_magnitude"):
        return TopKMagnitudeSelector(fraction)
    if key in ("gradient", "gradient_based"):
        return GradientBasedSelector(fraction)
    if key == "structured":
        return StructuredMaskSelector(fraction)
    if key == "client_specific":
        return ClientSpecificMaskSelector(fraction, seed)
    if key == "round_robin":
        return RoundRobinMaskSelector(fraction)
    if key == "round_robin_per_client":
        return RoundRobinMaskSelector(fraction, coordinated=False)
    raise ValueError(f"unknown mask_strategy {name!r}; allowed: {', '.join(MASK_STRATEGIES)}")


def arrays_from_model(
    model: nn.Module, *, include_buffers: bool = False, trainable_only: bool = False
) -> ArrayRecord:
    """The initial ArrayRecord in psfed's flat order (``FlattenedModel`` of the same options).

    Use the same ``include_buffers``/``trainable_only`` as the clients' ``PSFedClient``. Each
    tensor keeps its dtype (bf16 is widened to float32: numpy has no bfloat16).
    """
    fm = FlattenedModel(model, include_buffers=include_buffers, trainable_only=trainable_only)
    out: dict[str, Array] = {}
    for info, t in zip(fm.tensor_infos, fm._tensors, strict=True):
        x = t.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        out[info.name] = array_from_numpy(np.ascontiguousarray(x.numpy()))
    return ArrayRecord(out)


class _LayoutModule(nn.Module):
    """A parameter-only module mirroring an ArrayRecord's tensors, in the record's order."""

    def __init__(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self._names = names
        for i, t in enumerate(tensors):
            self.register_parameter(f"p{i}", nn.Parameter(t, requires_grad=False))

    def named_parameters(  # type: ignore[override]
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterable[tuple[str, nn.Parameter]]:
        for i, n in enumerate(self._names):
            yield prefix + n, getattr(self, f"p{i}")


@dataclass
class _Layout:
    keys: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[np.dtype[Any]]
    offsets: list[int]
    dtype: np.dtype[Any]  # promoted dtype of the flat global model
    size: int


@dataclass
class _Sent:
    mask: Mask
    client_id: ClientId | None
    bytes: int
    floor: int
    want_scores: bool


def _get_defense(name: str, params: dict[str, Any]) -> Any:
    """``defenses.get_defense`` (importing ``defenses.<name>`` if it is not registered yet)."""
    import importlib

    import defenses

    if name not in defenses.list_defenses() and name.isidentifier():
        try:
            importlib.import_module(f"defenses.{name}")
        except ImportError:
            pass
    return defenses.get_defense(name, **params)


def _axpy(x: npt.NDArray[Any], y: npt.NDArray[Any], a: float) -> None:
    """``y ← a·x + y`` in place, one pass (torch's vectorised add; its intra-op threads are the
    ones training already uses, unlike numpy's BLAS pool, whose spinning threads compete with
    them). ``x`` may be a read-only view of a reply payload: it is only read."""
    torch.from_numpy(y).add_(as_tensor(x), alpha=a)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n:.0f} B"


class PSFedAvg(Strategy):
    """Partial-sharing FedAvg/PSO-Fed strategy (all arguments keyword-only; see docs/flower.md).

    Sampling mirrors ``flwr.serverapp.strategy.FedAvg`` (``fraction_*``, ``min_*_nodes``,
    ``min_available_nodes``) but waits for ``max(min_available_nodes, min_*_nodes)`` nodes
    *before* sampling. Masks: ``mask_selector`` or ``mask_strategy`` + ``mask_fraction`` +
    ``mask_seed``. Aggregation: ``aggregator`` (a ``defenses`` name or Aggregator) in
    ``aggregation_mode`` with ``weighting``. Replies failing validation are dropped and counted;
    with ``accept_failures=False`` any rejected/failed reply skips the round's aggregation.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        mask_fraction: float = 0.5,
        mask_selector: MaskSelector | None = None,
        mask_seed: int | None = None,
        mask_strategy: str = "random",
        aggregator: Any = "mean",
        aggregator_params: Mapping[str, Any] | None = None,
        aggregation_mode: Literal["fill", "reporters"] = "fill",
        weighting: Weighting = "participants",
        evaluation: Evaluation = "merged",
        initial_arrays: ArrayRecord | None = None,
        accept_failures: bool = True,
        encoding: str = "auto",
        uplink: Literal["downlink", "client"] = "downlink",
        uplink_fraction: float | None = None,
        initial_sync: bool = True,
        gradient_fallback: MaskSelector | None = None,
        score_source: Literal["client", "mean"] = "client",
        adversary: ServerAdversary | None = None,
        client_attacks: Mapping[ClientId, tuple[str, Mapping[str, Any]]] | None = None,
        attack_seed: int = 0,
        expected_clients: Collection[ClientId] | None = None,
        identify_clients: bool | None = None,
        sample_seed: int | None = None,
        node_wait_timeout: float = 3600.0,
        poll_interval: float = 1.0,
        query_timeout: float = 600.0,
    ) -> None:
        for name, v in (("fraction_train", fraction_train),
                        ("fraction_evaluate", fraction_evaluate), ("mask_fraction", mask_fraction)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        for name, n in (("min_train_nodes", min_train_nodes),
                        ("min_evaluate_nodes", min_evaluate_nodes),
                        ("min_available_nodes", min_available_nodes)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        if aggregation_mode not in ("fill", "reporters"):
            raise ValueError(
                f"aggregation_mode must be 'fill' or 'reporters', got {aggregation_mode!r}"
            )
        if weighting not in ("participants", "expected", "all", "num-examples"):
            raise ValueError(
                "weighting must be one of 'participants', 'expected', 'all', 'num-examples', "
                f"got {weighting!r}"
            )
        if evaluation not in ("merged", "local", "global", "none"):
            raise ValueError(
                f"evaluation must be 'merged', 'local', 'global' or 'none', got {evaluation!r}"
            )
        if uplink not in ("downlink", "client"):
            raise ValueError(f"uplink must be 'downlink' or 'client', got {uplink!r}")
        if score_source not in ("client", "mean"):
            raise ValueError(f"score_source must be 'client' or 'mean', got {score_source!r}")
        if uplink_fraction is not None and not 0.0 <= uplink_fraction <= 1.0:
            raise ValueError(f"uplink_fraction must be in [0, 1], got {uplink_fraction!r}")

        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_train_nodes = 0 if fraction_train == 0.0 else min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0.0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.mask_fraction = float(mask_fraction)
        self.mask_seed = mask_seed
        self.mask_strategy = mask_strategy
        self.mask_selector = mask_selector or make_selector(mask_strategy, mask_fraction, mask_seed)
        self.gradient_fallback = gradient_fallback or RandomMaskSelector(
            self.mask_selector.fraction or mask_fraction, mask_seed
        )
        self.score_source = score_source
        if isinstance(aggregator, str):
            self.aggregator = _get_defense(aggregator, dict(aggregator_params or {}))
        else:
            if aggregator_params:
                raise ValueError("aggregator_params is only used when aggregator is a name")
            if not callable(aggregator):
                raise TypeError("aggregator must be a defenses name or an Aggregator")
            self.aggregator = aggregator
        self.aggregation_mode = aggregation_mode
        self.weighting: Weighting = weighting
        self.evaluation: Evaluation = "none" if fraction_evaluate == 0.0 else evaluation
        self.initial_arrays = initial_arrays
        self.accept_failures = accept_failures
        self.encoding = encoding
        self.uplink = uplink
        self.uplink_fraction = uplink_fraction
        self.initial_sync = initial_sync
        self.adversary = adversary
        self.client_attacks = {
            k: (str(v[0]), dict(v[1])) for k, v in (client_attacks or {}).items()
        }
        self.attack_seed = int(attack_seed)
        self.expected_clients = (
            frozenset(expected_clients) if expected_clients is not None else None
        )
        req = set(self.mask_selector.required_context)
        self._client_dependent = bool(self.mask_selector.per_client) or "client_id" in req or (
            "gradients" in req and score_source == "client"
        )
        self.identify_clients = (
            identify_clients
            if identify_clients is not None
            else (self._client_dependent or bool(self.client_attacks))
        )
        if self._client_dependent and identify_clients is False:
            raise ValueError(
                f"{type(self.mask_selector).__name__} selects per client and needs client ids "
                "before the first round: leave identify_clients as None or True"
            )
        self.sample_seed = sample_seed if sample_seed is not None else (mask_seed or 0)
        self.node_wait_timeout = float(node_wait_timeout)
        self.poll_interval = float(poll_interval)
        self.query_timeout = float(query_timeout)

        self._layout: _Layout | None = None
        self._global: npt.NDArray[Any] | None = None
        self._arrays: ArrayRecord | None = None
        self._own: tuple[ArrayRecord, list[tuple[str, Array, tuple[Any, ...]]]] | None = None
        self._layout_fm: FlattenedModel | None = None
        self._node_to_cid: dict[int, ClientId] = {}
        self._synced: set[int] = set()
        self._scores: dict[ClientId, npt.NDArray[np.float64]] = {}
        self._sent: dict[int, _Sent] = {}
        self._sent_round = 0
        self._down: dict[str, float] = {}
        self._last_masks: dict[int, Mask] = {}
        self._num_available = 0
        self._dense_ref_bytes = 0
        self._eval_sent: dict[int, _Sent] = {}
        self._eval_down: dict[str, float] = {}
        self.current_mask: Mask | None = None
        self.history: list[dict[str, float]] = []
        self._meter = ByteMeter()

    # ------------------------------------------------------------------ layout
    @property
    def num_parameters(self) -> int:
        """Length D of the flat global model (0 before the first round)."""
        return self._layout.size if self._layout else 0

    @property
    def global_flat(self) -> npt.NDArray[Any]:
        """A copy of the flat global model (promoted dtype of the ArrayRecord's tensors)."""
        if self._global is None:
            raise RuntimeError("no global model yet")
        return self._global.copy()

    @property
    def node_client_ids(self) -> dict[int, ClientId]:
        """The node_id → stable client id map learned so far."""
        return dict(self._node_to_cid)

    def _own_arrays(self, arrays: ArrayRecord) -> bool:
        """True when ``arrays`` is, unchanged, the record :meth:`_to_arrays` built from
        ``self._global`` (same record, same Array objects, same data bytes, one dtype): the
        flat global is then already at hand and need not be concatenated again."""
        own = self._own
        if own is None or arrays is not own[0] or len(arrays) != len(own[1]):
            return False
        for (k, arr, meta), (k2, arr2) in zip(own[1], arrays.items(), strict=True):
            if k != k2 or arr is not arr2 or (arr.data, arr.dtype, arr.shape) != meta:
                return False
        return True

    def _read_arrays(self, arrays: ArrayRecord) -> None:
        if self._global is not None and self._own_arrays(arrays):
            return  # the record this strategy returned last round (Strategy.start hands it back)
        self._own = None
        keys = list(arrays.keys())
        if not keys:
            raise ValueError("the global ArrayRecord is empty")
        nds = [array_view(arrays[k]) for k in keys]  # zero-copy; concatenated below
        for k, a in zip(keys, nds, strict=True):
            if a.dtype.kind != "f":
                raise ValueError(
                    f"ArrayRecord entry {k!r} has dtype {a.dtype}; psfed shares floating-point "
                    "tensors only (build it with psfed_robust.flower.arrays_from_model(model))"
                )
        shapes = [tuple(a.shape) for a in nds]
        dtypes = [a.dtype for a in nds]
        sizes = [int(a.size) for a in nds]
        offsets = [0, *np.cumsum(sizes).tolist()]
        dtype = np.result_type(*dtypes)
        lay = _Layout(keys, shapes, dtypes, [int(o) for o in offsets], np.dtype(dtype), offsets[-1])
        if self._layout is None or (lay.keys, lay.shapes, lay.dtypes) != (
            self._layout.keys, self._layout.shapes, self._layout.dtypes
        ):
            self._layout = lay
            self._layout_fm = None
            self._dense_ref_bytes = 0
        self._global = np.concatenate([a.reshape(-1) for a in nds], dtype=dtype)
        self._arrays = arrays

    def _to_arrays(self, flat: npt.NDArray[Any]) -> ArrayRecord:
        lay = self._layout
        assert lay is not None
        out: dict[str, Array] = {}
        for i, k in enumerate(lay.keys):
            part = flat[lay.offsets[i] : lay.offsets[i + 1]].reshape(lay.shapes[i])
            out[k] = array_from_numpy(np.ascontiguousarray(part.astype(lay.dtypes[i],
                                                                         copy=False)))
        rec = ArrayRecord(out)
        if flat is self._global and all(d == lay.dtype for d in lay.dtypes):
            # the record holds exactly the global's values: remember it (see _own_arrays)
            self._own = (rec, [(k, a, (a.data, a.dtype, a.shape)) for k, a in rec.items()])
        return rec

    def _flat_model(self) -> FlattenedModel:
        lay, g = self._layout, self._global
        assert lay is not None and g is not None
        if self._layout_fm is None:
            tensors = [
                torch.from_numpy(np.zeros(s, dtype=d)) for s, d in zip(lay.shapes, lay.dtypes,
                                                                       strict=True)
            ]
            self._layout_fm = FlattenedModel(_LayoutModule(lay.keys, tensors))
        self._layout_fm.unflatten(torch.from_numpy(g))
        return self._layout_fm

    # ------------------------------------------------------------------ nodes
    def _wait_and_sample(
        self, grid: Grid, fraction: float, min_nodes: int, server_round: int, purpose: str
    ) -> list[int]:
        need = max(self.min_available_nodes, min_nodes)
        t0 = time.monotonic()
        while len(ids := sorted(int(n) for n in grid.get_node_ids())) < need:
            if time.monotonic() - t0 > self.node_wait_timeout:
                log(WARNING, "psfed: waited %.0fs for %d nodes; going on with %d",
                    self.node_wait_timeout, need, len(ids))
                break
            log(INFO, "psfed: waiting for nodes: %d connected (need %d)", len(ids), need)
            time.sleep(self.poll_interval)
        self._num_available = len(ids)
        size = min(len(ids), max(int(len(ids) * fraction), min_nodes))
        from psfed_robust.core.seeding import stable_seed

        rng = random.Random(stable_seed("flower.sample", self.sample_seed, server_round, purpose))
        sampled = sorted(rng.sample(ids, size))
        log(INFO, "psfed %s: sampled %d nodes (out of %d)", purpose, len(sampled), len(ids))
        return sampled

    def _identify(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """Ask nodes with unknown client ids who they are (``query.psfed``); drop the silent."""
        unknown = [n for n in node_ids if n not in self._node_to_cid]
        if not unknown or not self.identify_clients:
            return node_ids
        rec = RecordDict({KEY_CONFIG: ConfigRecord({CFG_QUERY: "identity"})})
        msgs = [Message(rec, dst_node_id=n, message_type=MSG_QUERY) for n in unknown]
        answered: set[int] = set()
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
            try:
                nid = int(reply.metadata.src_node_id)
                if nid not in unknown:
                    raise ReplyRejected("unexpected-node")
                cid, has_local = parse_query_reply(reply)
                if self.expected_clients is not None and cid not in self.expected_clients:
                    raise ReplyRejected("unknown-client-id", repr(cid))
                if cid in self._node_to_cid.values():
                    raise ReplyRejected("duplicate-client-id", repr(cid))
                self._node_to_cid[nid] = cid
                if has_local:
                    self._synced.add(nid)
                answered.add(nid)
            except ReplyRejected as e:
                log(WARNING, "psfed: identity query reply dropped (%s)", e)
            except Exception as e:
                log(WARNING, "psfed: identity query reply dropped (malformed: %s)", e)
        dropped = [n for n in unknown if n not in answered]
        if dropped:
            log(WARNING, "psfed: %d node(s) did not identify themselves; skipped", len(dropped))
        return [n for n in node_ids if n not in dropped]

    # ------------------------------------------------------------------ masks
    def _select(self, server_round: int, cid: ClientId | None) -> tuple[Mask, bool]:
        """(mask, wants_scores) for one client (``cid`` None when masks are client-independent)."""
        sel = self.mask_selector
        d = self.num_parameters
        if type(sel) is RandomMaskSelector and count_for_fraction(d, sel.fraction) == d:
            return Mask.all_true(d), False  # every coordinate: no draw to make
        req = set(sel.required_context)
        ctx: dict[str, Any] = {}
        if "flat_model" in req:
            ctx["flat_model"] = self._flat_model()
        if "client_id" in req or sel.per_client:
            ctx["client_id"] = cid
        want_scores = "gradients" in req
        if want_scores:
            scores = self._scores_for(cid)
            if scores is None:
                fb = self.gradient_fallback
                fctx = {k: v for k, v in ctx.items() if k in set(fb.required_context)}
                if "flat_model" in fb.required_context and "flat_model" not in fctx:
                    fctx["flat_model"] = self._flat_model()
                if "client_id" in fb.required_context:
                    fctx["client_id"] = cid
                return fb.select(d, server_round, **fctx), True
            ctx["gradients"] = scores
        return sel.select(d, server_round, **ctx), want_scores

    def _scores_for(self, cid: ClientId | None) -> npt.NDArray[np.float64] | None:
        if self.score_source == "client":
            return self._scores.get(cid) if cid is not None else None
        if not self._scores:
            return None
        return np.mean(np.stack(list(self._scores.values())), axis=0)

    def _payload_record(self, mask: Mask, values: npt.NDArray[Any]) -> ArrayRecord:
        return ArrayRecord(
            {PAYLOAD: _wire.encode_array(mask, np.ascontiguousarray(values), self.encoding)}
        )

    def _dense_reference_bytes(self) -> int:
        """Bytes of a FedAvg train message carrying the dense global ArrayRecord."""
        if not self._dense_ref_bytes and self._arrays is not None:
            try:
                rec = RecordDict({"arrays": self._arrays,
                                  "config": ConfigRecord({"server-round": 1})})
                self._dense_ref_bytes = message_bytes(
                    Message(rec, dst_node_id=0, message_type="train")
                )
            except Exception:  # metering must never end a round
                return 0
        return self._dense_ref_bytes

    def _base_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        lay = self._layout
        assert lay is not None
        cfg: dict[str, Any] = dict(config.items())
        cfg[CFG_SERVER_ROUND] = server_round
        cfg[CFG_MODEL_SIZE] = lay.size
        cfg[CFG_MODEL_DTYPE] = str(lay.dtype)
        return cfg

    def _build_messages(
        self,
        server_round: int,
        node_ids: list[int],
        cfg: dict[str, Any],
        message_type: str,
        mask_for: Callable[[int], tuple[Mask | None, bool]],
        with_attacks: bool,
    ) -> tuple[list[Message], dict[int, _Sent]]:
        g, lay = self._global, self._layout
        assert g is not None and lay is not None
        self._meter = ByteMeter()  # one per batch: shared objects are sized once
        itemsize = lay.dtype.itemsize
        init_rec: ArrayRecord | None = None
        down_cache: dict[int, tuple[Mask, ArrayRecord]] = {}
        cfg_cache: dict[tuple[bool, Any], ConfigRecord] = {}
        content_cache: dict[tuple[int, bool, bool, Any], RecordDict] = {}
        msgs: list[Message] = []
        sent: dict[int, _Sent] = {}
        for nid in node_ids:
            cid = self._node_to_cid.get(nid)
            mask, want_scores = mask_for(nid)
            needs_init = self.initial_sync and nid not in self._synced
            if needs_init and init_rec is None:
                init_rec = self._payload_record(Mask.all_true(lay.size), g)
            down = None
            if mask is not None:
                key = id(mask)
                if key not in down_cache:
                    down_cache[key] = (mask, self._payload_record(mask, gather(g, mask)))
                down = down_cache[key][1]
            ckey = (want_scores, cid if self.identify_clients else None)
            if ckey not in cfg_cache:
                c = dict(cfg)
                c.pop(CFG_SEND_SCORES, None)  # absent means False (protocol.DEFAULT_UPLINK)
                c.pop(CFG_CLIENT_ID, None)
                if want_scores:
                    c[CFG_SEND_SCORES] = True
                if cid is not None and self.identify_clients:  # else one record for all nodes
                    c[CFG_CLIENT_ID] = cid
                cfg_cache[ckey] = ConfigRecord(c)
            attack = self.client_attacks.get(cid) if (with_attacks and cid is not None) else None
            rkey = (id(mask), needs_init, want_scores, (cid if attack or self.identify_clients
                                                        else None))
            content = content_cache.get(rkey)
            if content is None:
                recs: dict[str, Any] = {KEY_CONFIG: cfg_cache[ckey]}
                if down is not None:
                    recs[KEY_DOWN] = down
                if needs_init:
                    assert init_rec is not None
                    recs[KEY_INIT] = init_rec
                if attack is not None:
                    recs[KEY_ATTACK] = ConfigRecord(
                        {"name": attack[0], **attack[1], "seed": self.attack_seed}
                    )
                content = RecordDict(recs)
                content_cache[rkey] = content
            m = Message(content, dst_node_id=nid, message_type=message_type)
            msgs.append(m)
            floor = 0
            if mask is not None:
                floor += update_floor_bytes(mask, itemsize)
            if needs_init:
                floor += lay.size * itemsize
            sent[nid] = _Sent(
                mask=mask if mask is not None else Mask.all_false(lay.size),
                client_id=cid,
                bytes=message_bytes(m, self._meter),
                floor=floor,
                want_scores=want_scores,
            )
        return msgs, sent

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, select masks, send each node its shared values (wire-encoded)."""
        self._read_arrays(arrays)
        self._sent, self._sent_round, self._down = {}, server_round, {}
        if self.fraction_train == 0.0:
            return []
        nodes = self._wait_and_sample(
            grid, self.fraction_train, self.min_train_nodes, server_round, "train"
        )
        nodes = self._identify(grid, nodes)
        cfg = self._base_config(server_round, config)
        # switches at the client's defaults are not sent (see protocol.DEFAULT_UPLINK)
        for key, value, default in ((CFG_UPLINK, self.uplink, DEFAULT_UPLINK),
                                    (CFG_UPLINK_ENCODING, self.encoding,
                                     DEFAULT_UPLINK_ENCODING)):
            cfg.pop(key, None)
            if value != default:
                cfg[key] = value
        if self.uplink_fraction is not None:
            cfg[CFG_UPLINK_FRACTION] = float(self.uplink_fraction)

        shared: tuple[Mask, bool] | None = None

        def mask_for(nid: int) -> tuple[Mask | None, bool]:
            nonlocal shared
            if self._client_dependent:
                return self._select(server_round, self._node_to_cid.get(nid))
            if shared is None:
                shared = self._select(server_round, None)
            return shared

        msgs, sent = self._build_messages(server_round, nodes, cfg, MSG_TRAIN, mask_for, True)
        unique = float(unique_bytes(msgs, self._meter))
        self._meter = ByteMeter()  # do not keep the round's messages alive
        self._sent = sent
        self._last_masks = {n: s.mask for n, s in sent.items()}
        self.current_mask = shared[0] if shared is not None else None
        n = max(len(msgs), 1)
        self._down = {
            "bytes-down-total": float(sum(s.bytes for s in sent.values())),
            "bytes-down-per-client": sum(s.bytes for s in sent.values()) / n,
            "bytes-down-unique": unique,
            "bytes-down-floor-per-client": sum(s.floor for s in sent.values()) / n,
        }
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies (drop + count bad ones) and aggregate the valid ones."""
        lay, g0 = self._layout, self._global
        if lay is None or g0 is None:
            log(WARNING, "psfed: aggregate_train before configure_train; nothing to do")
            return None, None
        replies = list(replies)
        # With the fast mean, the per-reply NaN/Inf check is deferred to the aggregate: a
        # NaN/Inf value with a positive weight makes the weighted sum non-finite, so a finite
        # aggregate proves every accepted reply finite (one pass per reply saved). Otherwise
        # the replies are validated again with the check, exactly as if it had run first.
        defer = self._fast_mean(lay)
        valid, reasons, up_bytes, up_floor, dropped = self._validate_train(
            replies, lay, check_finite=not defer
        )
        pre: tuple[npt.NDArray[Any] | None, float] | None = None
        if defer and valid:
            pre = self._mean_fill(valid, g0, lay, warn=False)
            if pre[0] is None:
                pre = None
                valid, reasons, up_bytes, up_floor, dropped = self._validate_train(
                    replies, lay, check_finite=True
                )
        for detail in dropped:
            log(WARNING, "psfed round %d: reply dropped (%s)", server_round, detail)

        for upd in valid:  # learn identities and sync state only from valid replies
            self._node_to_cid.setdefault(upd.node_id, upd.client_id)
            if upd.fresh_state:
                self._synced.discard(upd.node_id)
            else:
                self._synced.add(upd.node_id)
            if upd.scores is not None:
                self._scores[upd.client_id] = upd.scores

        metrics: dict[str, float] = {
            "sampled-nodes": float(len(self._sent)),
            "accepted-replies": float(len(valid)),
            "missing-replies": float(max(len(self._sent) - len(valid) - sum(reasons.values()), 0)),
        }
        metrics.update({k: float(v) for k, v in count_reasons(reasons).items()})
        skip = not valid or (not self.accept_failures and (
            reasons or len(valid) < len(self._sent)))
        out_arrays: ArrayRecord | None
        if skip:
            if valid:
                log(WARNING, "psfed round %d: accept_failures=False and some replies failed; "
                    "global model unchanged", server_round)
            else:
                log(WARNING, "psfed round %d: no valid reply; global model unchanged",
                    server_round)
            out_arrays = self._arrays
            metrics["coverage"] = 0.0
        else:
            new, coverage = pre if pre is not None else self._aggregate(
                server_round, valid, g0, lay
            )
            if new is None:
                reasons["aggregation-failed"] += 1
                metrics["aggregation-failed"] = 1.0
                out_arrays = self._arrays
            else:
                self._global = new
                out_arrays = self._to_arrays(new)
                self._arrays = out_arrays
            metrics["coverage"] = coverage
            metrics["mask-fraction"] = float(np.mean([u.mask.fraction for u in valid]))
            metrics.update(self._mean_user_metrics([(u.num_examples, u.metrics) for u in valid]))

        metrics.update(self._down)
        k = max(len(up_bytes), 1)
        metrics["bytes-up-total"] = float(sum(up_bytes))
        metrics["bytes-up-per-client"] = sum(up_bytes) / k
        metrics["bytes-up-floor-per-client"] = sum(up_floor) / k
        metrics["bytes-dense-per-client"] = float(self._dense_reference_bytes())
        self.history.append({"round": float(server_round), **metrics})
        log(
            INFO,
            "psfed round %d: %d accepted, %d rejected | per client: down %s (floor %s), "
            "up %s (floor %s), dense FedAvg %s",
            server_round, len(valid), int(sum(reasons.values())),
            _fmt_bytes(metrics.get("bytes-down-per-client", 0.0)),
            _fmt_bytes(metrics.get("bytes-down-floor-per-client", 0.0)),
            _fmt_bytes(metrics["bytes-up-per-client"]),
            _fmt_bytes(metrics["bytes-up-floor-per-client"]),
            _fmt_bytes(metrics["bytes-dense-per-client"]),
        )
        return out_arrays, MetricRecord(dict(metrics))

    def _validate_train(
        self, replies: list[Message], lay: _Layout, *, check_finite: bool
    ) -> tuple[list[ValidUpdate], Counter[str], list[int], list[int], list[str]]:
        """``(valid, reasons, up bytes, up floor bytes, why each dropped reply was dropped)``."""
        reasons: Counter[str] = Counter()
        valid: list[ValidUpdate] = []
        by_node: dict[int, ValidUpdate] = {}
        up_bytes: list[int] = []
        up_floor: list[int] = []
        dropped: list[str] = []
        max_payload = 9 * lay.size + 65536
        for msg in replies:
            try:
                upd = self._check_train_reply(msg, lay, max_payload, check_finite)
                if upd.node_id in by_node:
                    raise ReplyRejected("duplicate-reply", f"node {upd.node_id}")
                cid_owner = {v.client_id: v.node_id for v in valid}
                if upd.client_id in cid_owner:
                    raise ReplyRejected("duplicate-client-id", repr(upd.client_id))
                by_node[upd.node_id] = upd
                valid.append(upd)
                try:
                    up_bytes.append(message_bytes(msg))
                except Exception:
                    up_bytes.append(0)
                up_floor.append(update_floor_bytes(upd.mask, lay.dtype.itemsize))
            except ReplyRejected as e:
                reasons[e.reason] += 1
                dropped.append(str(e))
            except Exception as e:
                reasons["malformed"] += 1
                dropped.append(f"malformed: {e}")
        return valid, reasons, up_bytes, up_floor, dropped

    def _check_train_reply(
        self, msg: Message, lay: _Layout, max_payload: int, check_finite: bool = True
    ) -> ValidUpdate:
        try:
            nid = int(msg.metadata.src_node_id)
            mtype = msg.metadata.message_type
        except Exception as e:
            raise ReplyRejected("malformed", f"metadata: {e}") from None
        if mtype != MSG_TRAIN:
            raise ReplyRejected("bad-keys", f"message type {mtype!r}")
        sent = self._sent.get(nid)
        if sent is None:
            raise ReplyRejected("unexpected-node", f"node {nid} was not sampled this round")
        return parse_train_reply(
            msg,
            model_size=lay.size,
            model_dtype=lay.dtype,
            expected_mask=sent.mask if self.uplink == "downlink" else None,
            expected_id=self._node_to_cid.get(nid),
            expected_clients=self.expected_clients,
            want_scores=sent.want_scores,
            max_payload_bytes=max_payload,
            check_finite=check_finite,
        )

    def _weights(self, valid: list[ValidUpdate], dtype: torch.dtype) -> torch.Tensor:
        k = len(valid)
        part = torch.ones(k, dtype=torch.bool)
        if self.weighting == "num-examples":
            n = torch.tensor([u.num_examples for u in valid], dtype=torch.float64)
            return (n / n.sum()).to(dtype)
        if self.weighting == "participants":
            return server_weights(part, "participants", dtype=dtype)
        total = max(self._num_available, k)
        if self.weighting == "all":
            return server_weights(part, "all", num_clients=total, dtype=dtype)
        return server_weights(part, "expected", num_clients=total, p_c=self.fraction_train or 1.0,
                              dtype=dtype)

    def _aggregate(
        self, server_round: int, valid: list[ValidUpdate], g0: npt.NDArray[Any], lay: _Layout
    ) -> tuple[npt.NDArray[Any] | None, float]:
        if self._fast_mean(lay):
            return self._mean_fill(valid, g0, lay)
        g = torch.from_numpy(g0.copy())
        k = len(valid)
        upd = g.unsqueeze(0).repeat(k, 1)
        masks = torch.zeros((k, lay.size), dtype=torch.bool)
        for i, u in enumerate(valid):
            idx = torch.from_numpy(np.array(mask_indices(u.mask)))
            upd[i, idx] = torch.from_numpy(np.array(u.values)).to(g.dtype)
            masks[i, idx] = True
        if self.adversary is not None:
            upd = self.adversary.apply(
                server_round, upd, masks, g, [u.client_id for u in valid], self.aggregator
            )
        coverage = float(masks.any(dim=0).double().mean()) if lay.size else 0.0
        try:
            new = self.aggregator(
                upd, masks, g, weights=self._weights(valid, g.dtype), mode=self.aggregation_mode
            )
        except Exception as e:
            log(WARNING, "psfed round %d: aggregator failed (%s); global unchanged",
                server_round, e)
            return None, coverage
        new_np = new.detach().cpu().numpy().astype(lay.dtype, copy=False)
        if new_np.shape != g0.shape or not bool(np.isfinite(new_np).all()):
            log(WARNING, "psfed round %d: aggregate not finite; global unchanged", server_round)
            return None, coverage
        return np.array(new_np, copy=True), coverage

    def _fast_mean(self, lay: _Layout) -> bool:
        """Whether :meth:`_mean_fill` aggregates (the default mean, fill mode, no adversary)."""
        return (self.adversary is None and self.aggregation_mode == "fill"
                and type(self.aggregator).__name__ == "Mean" and lay.dtype.kind == "f")

    def _mean_fill(
        self, valid: list[ValidUpdate], g0: npt.NDArray[Any], lay: _Layout, *, warn: bool = True
    ) -> tuple[npt.NDArray[Any] | None, float]:
        """PSO-Fed's step ``g + Σ_k ω_k T_k (u_k − g)`` without building dense ``[K, D]`` tensors.

        Same math as ``defenses.get_defense("mean")`` in fill mode; O(Σ_k count_k) instead of
        O(K·D). Replies on the same mask (every client-independent selector) are accumulated
        in the compact ``count``-long space and scattered once per distinct mask.
        """
        # float32 models accumulate in float32 (like FedAvg's numpy mean), others in float64
        acc_dtype: np.dtype[Any] = np.dtype(np.float32 if lay.dtype == np.float32 else np.float64)
        w = self._weights(valid, torch.float64).numpy().astype(acc_dtype)
        g: npt.NDArray[Any] = g0.astype(acc_dtype, copy=False)
        groups: dict[Any, list[tuple[Any, ValidUpdate]]] = {}
        for wi, u in zip(w, valid, strict=True):
            if u.mask.count == 0:
                continue
            if u.mask.count == lay.size:
                key: Any = "dense"
            elif u.mask.seed_spec is not None:
                key = u.mask.seed_spec
            else:
                key = id(u.mask)
            groups.setdefault(key, []).append((wi, u))
        # ``g + Σ_k ω_k (u_k − g)`` per mask group as ``(1 − Σ ω) g_m + Σ_k ω_k u_k``: one axpy
        # pass per reply (the order of Flower's FedAvg, which is exactly Σ ω_k u_k when the
        # weights sum to one), instead of subtract/scale/add passes
        acc: npt.NDArray[Any] | None = None
        cover = 0.0
        cover_mask: npt.NDArray[np.bool_] | None = None
        for key, items in groups.items():
            mask = items[0][1].mask
            dense = key == "dense"
            idx = None if dense else mask_indices(mask)
            g_m = g if idx is None else g.take(idx)
            sw = float(sum(wi for wi, _ in items))
            comp = np.multiply(g_m, acc_dtype.type(1.0 - sw), dtype=acc_dtype)
            for wi, u in items:
                vals = np.ascontiguousarray(u.values, dtype=acc_dtype)
                _axpy(vals, comp, float(wi))
            if dense:
                cover = 1.0
                acc = comp if acc is None else np.add(acc, comp - g, out=acc)
                continue
            if acc is None:
                acc = g.copy()
            acc[idx] += comp - g_m
            if cover < 1.0:
                if cover_mask is None:
                    cover_mask = np.zeros(lay.size, dtype=bool)
                if len(groups) > 1:
                    cover_mask[idx] = True
        if cover < 1.0 and cover_mask is not None:
            partial = [k for k in groups if k != "dense"]
            if len(partial) == 1:  # one mask: its fraction, without counting D booleans
                cover = groups[partial[0]][0][1].mask.fraction
            else:
                cover = float(cover_mask.mean()) if lay.size else 0.0
        if acc is None:
            acc = g.copy()
        new = acc.astype(lay.dtype, copy=False)
        if not all_finite(new):
            if warn:
                log(WARNING, "psfed: aggregate not finite; global unchanged")
            return None, cover
        return new, cover

    @staticmethod
    def _mean_user_metrics(items: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
        """Example-weighted mean of each user metric over the replies that reported it."""
        sums: dict[str, float] = {}
        wts: dict[str, float] = {}
        for n, m in items:
            for key, v in m.items():
                sums[key] = sums.get(key, 0.0) + n * v
                wts[key] = wts.get(key, 0.0) + n
        return {k: sums[k] / wts[k] for k in sums if wts[k] > 0}

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the evaluation payload: global values on the client's last mask (``merged``),
        nothing (``local``) or the dense global model (``global``)."""
        self._eval_sent, self._eval_down = {}, {}
        if self.evaluation == "none" or self.fraction_evaluate == 0.0:
            return []
        self._read_arrays(arrays)
        nodes = self._wait_and_sample(
            grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, "evaluate"
        )
        if self.evaluation == "merged" and self._client_dependent:
            nodes = self._identify(grid, nodes)
        cfg = self._base_config(server_round, config)
        cfg[CFG_EVAL_MODEL] = self.evaluation
        lay = self._layout
        assert lay is not None
        dense = Mask.all_true(lay.size)
        fresh_masks: dict[ClientId | None, Mask] = {}

        def mask_for(nid: int) -> tuple[Mask | None, bool]:
            if self.evaluation == "local":
                return None, False
            if self.evaluation == "global":
                return dense, False
            if nid in self._last_masks:
                return self._last_masks[nid], False
            cid = self._node_to_cid.get(nid) if self._client_dependent else None
            if cid not in fresh_masks:
                fresh_masks[cid] = self._select(server_round, cid)[0]
            return fresh_masks[cid], False

        msgs, sent = self._build_messages(server_round, nodes, cfg, MSG_EVALUATE, mask_for, False)
        self._eval_sent = sent
        n = max(len(msgs), 1)
        self._eval_down = {
            "bytes-down-per-client": sum(s.bytes for s in sent.values()) / n,
            "bytes-down-unique": float(unique_bytes(msgs, self._meter)),
        }
        self._meter = ByteMeter()
        return msgs

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of ``loss`` and user metrics over valid replies."""
        reasons: Counter[str] = Counter()
        results: list[EvalResult] = []
        seen: set[int] = set()
        up: list[int] = []
        for msg in replies:
            try:
                nid = int(msg.metadata.src_node_id)
                if nid not in self._eval_sent:
                    raise ReplyRejected("unexpected-node", f"node {nid}")
                r = parse_evaluate_reply(
                    msg, expected_id=self._node_to_cid.get(nid),
                    expected_clients=self.expected_clients,
                )
                if nid in seen:
                    raise ReplyRejected("duplicate-reply", f"node {nid}")
                seen.add(nid)
                up.append(message_bytes(msg))
                if r.num_examples > 0:
                    results.append(r)
            except ReplyRejected as e:
                reasons[e.reason] += 1
                log(WARNING, "psfed round %d: evaluate reply dropped (%s)", server_round, e)
            except Exception as e:
                reasons["malformed"] += 1
                log(WARNING, "psfed round %d: evaluate reply dropped (malformed: %s)",
                    server_round, e)
        metrics: dict[str, float] = {"evaluated-clients": float(len(results))}
        metrics.update({k: float(v) for k, v in count_reasons(reasons).items()})
        if results:
            tot = float(sum(r.num_examples for r in results))
            metrics["loss"] = sum(r.loss * r.num_examples for r in results) / tot
            metrics["num-examples"] = tot
            metrics.update(self._mean_user_metrics([(r.num_examples, r.metrics) for r in results]))
        metrics.update(self._eval_down)
        metrics["bytes-up-per-client"] = sum(up) / max(len(up), 1)
        return MetricRecord(dict(metrics))

    # ------------------------------------------------------------------ misc
    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> Sampling: fraction train %.2f | evaluate %.2f; min nodes train %d | "
            "evaluate %d | available %d", self.fraction_train, self.fraction_evaluate,
            self.min_train_nodes, self.min_evaluate_nodes, self.min_available_nodes)
        log(INFO, "\t├──> Masks: %r (fraction %.3f), uplink %s, encoding %s",
            self.mask_selector, self.mask_selector.fraction, self.uplink, self.encoding)
        log(INFO, "\t├──> Aggregation: %r, mode %s, weighting %s, accept_failures %s",
            self.aggregator, self.aggregation_mode, self.weighting, self.accept_failures)
        log(INFO, "\t└──> Evaluation: %s%s", self.evaluation,
            f"; server-side adversary {self.adversary!r} (simulation only)"
            if self.adversary else "")

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """``Strategy.start`` with ``initial_arrays`` defaulting to the constructor's."""
        arrays = initial_arrays if initial_arrays is not None else self.initial_arrays
        if arrays is None:
            raise ValueError("PSFedAvg.start needs initial_arrays (or PSFedAvg(initial_arrays=))")
        return super().start(
            grid, arrays, num_rounds=num_rounds, timeout=timeout, train_config=train_config,
            evaluate_config=evaluate_config, evaluate_fn=evaluate_fn,
        )
