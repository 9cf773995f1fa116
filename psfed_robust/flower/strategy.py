"""``PSFedAvg``: a Flower Message-API strategy for partial model sharing (PSO-Fed / PSFed).

Thin glue between Flower and the round core. Each round the server selects a mask per sampled
client with any ``MaskSelector`` (data-dependent selectors get ``flat_model``, client-reported
``gradients`` or the stable ``client_id``) and sends each client only the global values on its
mask (wire-encoded; one shared payload object when masks are identical, so Flower uploads it
once). ``aggregate_train`` reads validate -> decode -> :func:`psfed_robust.core.round.server_step`:
every reply is validated (bad ones, including replies over the uplink budget, are dropped,
logged and counted, never aggregated) and the valid ones go to a ``defenses`` rule (default
``mean`` = PSO-Fed's server step) in *fill* or *reporters* mode. Settings are grouped in
:mod:`psfed_robust.flower.settings`; see docs/flower.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from psfed_robust.core.mask import Mask, count_for_fraction
from psfed_robust.core.seeding import stable_seed
from psfed_robust.core.selectors import RandomMaskSelector
from psfed_robust.flower._aggregate import (
    Checked,
    Limits,
    Sent,
    aggregate,
    coverage,
    mean_metrics,
    reply_weights,
    validate_evaluate,
    validate_train,
)
from psfed_robust.flower._downlink import build_messages, identify, wait_and_sample
from psfed_robust.flower._model import GlobalModel, Layout, arrays_from_model
from psfed_robust.flower.metering import (
    ByteMeter,
    message_bytes,
    unique_bytes,
)
from psfed_robust.flower.protocol import (
    CFG_EVAL_MODEL,
    CFG_MODEL_DTYPE,
    CFG_MODEL_SIZE,
    CFG_SERVER_ROUND,
    MSG_EVALUATE,
    MSG_TRAIN,
    write_uplink_switches,
)
from psfed_robust.flower.settings import (
    MASK_STRATEGIES,
    AggregationSettings,
    Evaluation,
    MaskSettings,
    ProtocolSettings,
    ThreatSettings,
    make_selector,
)
from psfed_robust.flower.validation import (
    ClientId,
    count_reasons,
)

__all__ = ["MASK_STRATEGIES", "PSFedAvg", "arrays_from_model", "make_selector"]


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n:.0f} B"


def _linear(aggregator: Any, mode: str) -> bool:
    """Whether the rule is PSO-Fed's mean in fill mode: a positive-weight sum, in which one
    NaN/Inf value makes the aggregate non-finite (so a finite aggregate proves every reply
    finite and the per-reply check can be deferred)."""
    from defenses.mean import Mean

    return mode == "fill" and isinstance(aggregator, Mean)


class PSFedAvg(Strategy):
    """Partial-sharing FedAvg/PSO-Fed strategy (all arguments keyword-only; docs/flower.md).

    Sampling mirrors ``flwr.serverapp.strategy.FedAvg`` (``fraction_*``, ``min_*_nodes``,
    ``min_available_nodes``, ``accept_failures``) but waits for
    ``max(min_available_nodes, min_*_nodes)`` nodes *before* sampling (seeded by
    ``sample_seed``). The rest comes in four groups: ``masks``, ``aggregation``, ``threat``
    and ``protocol`` (:mod:`psfed_robust.flower.settings`). With ``accept_failures=False`` any
    rejected/failed reply skips the round's aggregation.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        accept_failures: bool = True,
        initial_arrays: ArrayRecord | None = None,
        sample_seed: int | None = None,
        masks: MaskSettings | None = None,
        aggregation: AggregationSettings | None = None,
        threat: ThreatSettings | None = None,
        protocol: ProtocolSettings | None = None,
    ) -> None:
        for name, v in (("fraction_train", fraction_train),
                        ("fraction_evaluate", fraction_evaluate)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        for name, n in (("min_train_nodes", min_train_nodes),
                        ("min_evaluate_nodes", min_evaluate_nodes),
                        ("min_available_nodes", min_available_nodes)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{name} must be a non-negative int, got {n!r}")
        for name, group, cls in (("masks", masks, MaskSettings),
                                 ("aggregation", aggregation, AggregationSettings),
                                 ("threat", threat, ThreatSettings),
                                 ("protocol", protocol, ProtocolSettings)):
            if group is not None and not isinstance(group, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(group).__name__}")
        self.masks = masks or MaskSettings()
        self.aggregation = aggregation or AggregationSettings()
        self.threat = threat or ThreatSettings()
        self.protocol = protocol or ProtocolSettings()

        self.fraction_train = float(fraction_train)
        self.fraction_evaluate = float(fraction_evaluate)
        self.min_train_nodes = 0 if fraction_train == 0.0 else min_train_nodes
        self.min_evaluate_nodes = 0 if fraction_evaluate == 0.0 else min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.accept_failures = accept_failures
        self.initial_arrays = initial_arrays
        self.mask_selector, self.gradient_fallback = self.masks.build()
        self.aggregator = self.aggregation.build()
        self.evaluation: Evaluation = ("none" if fraction_evaluate == 0.0
                                       else self.protocol.evaluation)
        self.adversary = self.threat.adversary
        self.client_attacks = {k: (str(v[0]), dict(v[1]))
                               for k, v in (self.threat.client_attacks or {}).items()}
        ec = self.threat.expected_clients
        self.expected_clients = frozenset(ec) if ec is not None else None
        req = set(self.mask_selector.required_context)
        self._client_dependent = bool(self.mask_selector.per_client) or "client_id" in req or (
            "gradients" in req and self.masks.score_source == "client"
        )
        ident = self.protocol.identify_clients
        self.identify_clients = (ident if ident is not None
                                 else (self._client_dependent or bool(self.client_attacks)))
        if self._client_dependent and ident is False:
            raise ValueError(
                f"{type(self.mask_selector).__name__} selects per client and needs client ids "
                "before the first round: leave ProtocolSettings.identify_clients None or True"
            )
        self.sample_seed = sample_seed if sample_seed is not None else (self.masks.seed or 0)

        self._model = GlobalModel()
        self._node_to_cid: dict[int, ClientId] = {}
        self._synced: set[int] = set()
        self._scores: dict[ClientId, npt.NDArray[np.float64]] = {}
        self._sent: dict[int, Sent] = {}
        self._down: dict[str, float] = {}
        self._last_masks: dict[int, Mask] = {}
        self._num_available = 0
        self._dense_ref_bytes = 0
        self._eval_sent: dict[int, Sent] = {}
        self._eval_down: dict[str, float] = {}
        self.current_mask: Mask | None = None
        self.history: list[dict[str, float]] = []
        self._meter = ByteMeter()

    # ------------------------------------------------------------------ layout
    @property
    def num_parameters(self) -> int:
        """Length D of the flat global model (0 before the first round)."""
        return self._model.layout.size if self._model.layout else 0

    @property
    def global_flat(self) -> npt.NDArray[Any]:
        """A copy of the flat global model (promoted dtype of the ArrayRecord's tensors)."""
        if self._model.flat is None:
            raise RuntimeError("no global model yet")
        return self._model.flat.copy()

    @property
    def node_client_ids(self) -> dict[int, ClientId]:
        """The node_id → stable client id map learned so far."""
        return dict(self._node_to_cid)

    def _read_arrays(self, arrays: ArrayRecord) -> None:
        if self._model.read(arrays):
            self._dense_ref_bytes = 0

    # ------------------------------------------------------------------ nodes
    def _wait_and_sample(
        self, grid: Grid, fraction: float, min_nodes: int, server_round: int, purpose: str
    ) -> list[int]:
        sampled, self._num_available = wait_and_sample(
            grid, max(self.min_available_nodes, min_nodes), fraction, min_nodes,
            stable_seed("flower.sample", self.sample_seed, server_round, purpose), purpose,
            self.protocol)
        return sampled

    def _identify(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """Ask nodes with unknown client ids who they are (``query.psfed``); drop the silent."""
        if not self.identify_clients:
            return node_ids
        return identify(grid, node_ids, self._node_to_cid, self._synced, self.expected_clients,
                        self.protocol.query_timeout)

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
            ctx["flat_model"] = self._model.flat_model()
        if "client_id" in req or sel.per_client:
            ctx["client_id"] = cid
        want_scores = "gradients" in req
        if want_scores:
            scores = self._scores_for(cid)
            if scores is None:
                fb = self.gradient_fallback
                fctx = {k: v for k, v in ctx.items() if k in set(fb.required_context)}
                if "flat_model" in fb.required_context and "flat_model" not in fctx:
                    fctx["flat_model"] = self._model.flat_model()
                if "client_id" in fb.required_context:
                    fctx["client_id"] = cid
                return fb.select(d, server_round, **fctx), True
            ctx["gradients"] = scores
        return sel.select(d, server_round, **ctx), want_scores

    def _scores_for(self, cid: ClientId | None) -> npt.NDArray[np.float64] | None:
        if self.masks.score_source == "client":
            return self._scores.get(cid) if cid is not None else None
        if not self._scores:
            return None
        return np.mean(np.stack(list(self._scores.values())), axis=0)

    def _dense_reference_bytes(self) -> int:
        """Bytes of a FedAvg train message carrying the dense global ArrayRecord."""
        if not self._dense_ref_bytes and self._model.arrays is not None:
            try:
                rec = RecordDict({"arrays": self._model.arrays,
                                  "config": ConfigRecord({"server-round": 1})})
                self._dense_ref_bytes = message_bytes(
                    Message(rec, dst_node_id=0, message_type="train")
                )
            except Exception:  # metering must never end a round
                return 0
        return self._dense_ref_bytes

    def _base_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        lay = self._model.layout
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
    ) -> tuple[list[Message], dict[int, Sent]]:
        g, lay = self._model.flat, self._model.layout
        assert g is not None and lay is not None
        self._meter = ByteMeter()  # one per batch: shared objects are sized once
        attacks = {}
        if with_attacks:
            attacks = {cid: {"name": name, **params, "seed": self.threat.attack_seed,
                             "persistent": self.threat.persistent}
                       for cid, (name, params) in self.client_attacks.items()}
        return build_messages(
            g, lay.size, node_ids, cfg, message_type, mask_for,
            node_to_cid=self._node_to_cid,
            needs_init=lambda nid: self.protocol.initial_sync and nid not in self._synced,
            identify=self.identify_clients, attacks=attacks, encoding=self.masks.encoding,
            meter=self._meter,
        )

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, select masks, send each node its shared values (wire-encoded)."""
        self._read_arrays(arrays)
        self._sent, self._down = {}, {}
        if self.fraction_train == 0.0:
            return []
        nodes = self._wait_and_sample(
            grid, self.fraction_train, self.min_train_nodes, server_round, "train"
        )
        nodes = self._identify(grid, nodes)
        cfg = self._base_config(server_round, config)
        write_uplink_switches(cfg, uplink=self.protocol.uplink, encoding=self.masks.encoding,
                              fraction=self.protocol.uplink_fraction)

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

    def _limits(self) -> Limits:
        """What a reply may claim this round (the agreed uplink budget and the bounds)."""
        size = self.num_parameters
        frac = self.protocol.uplink_fraction
        if frac is None:  # the client defaults to the downlink mask's fraction
            frac = self.mask_selector.fraction or self.masks.fraction
        return Limits(
            uplink=self.protocol.uplink,
            uplink_count=count_for_fraction(size, frac),
            max_num_examples=self.aggregation.max_num_examples,
            max_metric=float(self.aggregation.max_metric),
            expected_clients=self.expected_clients,
        )

    def _checked(
        self, replies: list[Message], lay: Layout, g0: npt.NDArray[Any], server_round: int
    ) -> tuple[Checked, npt.NDArray[Any] | None]:
        """Validate, then aggregate: ``(checked replies, new global or None)``.

        For PSO-Fed's mean the per-reply NaN/Inf check is deferred to the aggregate: a NaN/Inf
        value with a positive weight makes the weighted sum non-finite, so a finite aggregate
        proves every accepted reply finite (one pass per reply saved). Otherwise the replies
        are validated again with the check, exactly as if it had run first.
        """
        limits = self._limits()
        defer = self.adversary is None and _linear(self.aggregator, self.aggregation.mode)
        checked = validate_train(replies, self._sent, self._node_to_cid, lay, limits,
                                 check_finite=not defer)
        if not self._aggregates(checked):
            return checked, None
        new, failed = self._run_rule(checked, lay, g0, server_round, warn=not defer)
        if defer and new is None and not failed:
            checked = validate_train(replies, self._sent, self._node_to_cid, lay, limits,
                                     check_finite=True)
            if self._aggregates(checked):
                new, _ = self._run_rule(checked, lay, g0, server_round, warn=True)
        return checked, new

    def _aggregates(self, checked: Checked) -> bool:
        return bool(checked.valid) and (self.accept_failures or (
            not checked.reasons and len(checked.valid) >= len(self._sent)))

    def _run_rule(
        self, checked: Checked, lay: Layout, g0: npt.NDArray[Any], server_round: int,
        *, warn: bool,
    ) -> tuple[npt.NDArray[Any] | None, bool]:
        w = reply_weights(checked.valid, self.aggregation.weighting, self._num_available,
                          self.fraction_train)
        try:
            new = aggregate(self.aggregator, checked, g0, lay, w,
                            mode=self.aggregation.mode, server_round=server_round,
                            adversary=self.adversary, seed=self.sample_seed)
        except Exception as e:
            log(WARNING, "psfed round %d: aggregator failed (%s); global unchanged",
                server_round, e)
            return None, True
        if new is None and warn:
            log(WARNING, "psfed round %d: aggregate not finite; global unchanged", server_round)
        return new, False

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies (drop + count bad ones) and aggregate the valid ones."""
        lay, g0 = self._model.layout, self._model.flat
        if lay is None or g0 is None:
            log(WARNING, "psfed: aggregate_train before configure_train; nothing to do")
            return None, None
        checked, new = self._checked(list(replies), lay, g0, server_round)
        valid, reasons = checked.valid, checked.reasons
        for detail in checked.dropped:
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
        out_arrays: ArrayRecord | None
        if not self._aggregates(checked):
            if valid:
                log(WARNING, "psfed round %d: accept_failures=False and some replies failed; "
                    "global model unchanged", server_round)
            else:
                log(WARNING, "psfed round %d: no valid reply; global model unchanged",
                    server_round)
            out_arrays = self._model.arrays
            metrics["coverage"] = 0.0
        else:
            if new is None:
                metrics["aggregation-failed"] = 1.0
                out_arrays = self._model.arrays
            else:
                out_arrays = self._model.set(new)
            metrics["coverage"] = coverage(checked.masks, lay.size)
            metrics["mask-fraction"] = float(np.mean([u.mask.fraction for u in valid]))
            metrics.update(mean_metrics([(u.num_examples, u.metrics) for u in valid]))

        metrics.update(self._down)
        k = max(len(checked.up_bytes), 1)
        metrics["bytes-up-total"] = float(sum(checked.up_bytes))
        metrics["bytes-up-per-client"] = sum(checked.up_bytes) / k
        metrics["bytes-up-floor-per-client"] = sum(checked.up_floor) / k
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
        lay = self._model.layout
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
        results, reasons, up = validate_evaluate(replies, self._eval_sent, self._node_to_cid,
                                                 self._limits(), server_round)
        metrics: dict[str, float] = {"evaluated-clients": float(len(results))}
        metrics.update({k: float(v) for k, v in count_reasons(reasons).items()})
        if results:
            tot = float(sum(r.num_examples for r in results))
            metrics["loss"] = mean_metrics([(r.num_examples, {"loss": r.loss})
                                            for r in results])["loss"]
            metrics["num-examples"] = tot
            metrics.update(mean_metrics([(r.num_examples, r.metrics) for r in results]))
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
            self.mask_selector, self.mask_selector.fraction, self.protocol.uplink,
            self.masks.encoding)
        log(INFO, "\t├──> Aggregation: %r, mode %s, weighting %s, accept_failures %s",
            self.aggregator, self.aggregation.mode, self.aggregation.weighting,
            self.accept_failures)
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
