"""``aggregate_train``'s steps after the wire: validate, decode to tensors, the core's server step.

Nothing here re-implements round math: the new global model is
:func:`psfed_robust.core.round.server_step` over the replies as sequences (values on their index
lists; replies on one mask share one cached index tensor, so the mean accumulates them in the
compact space and scatters once), or over the dense form when the server-side adversary needs it
(:func:`psfed_robust.core.round.densify`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import Message
from flwr.supercore import log

from psfed_robust.core.aggregation import server_weights
from psfed_robust.core.flatten import all_finite
from psfed_robust.core.mask import Mask
from psfed_robust.core.round import densify, server_step
from psfed_robust.core.seeding import torch_generator
from psfed_robust.flower._arrays import as_tensor
from psfed_robust.flower._masks import index_tensor, mask_indices
from psfed_robust.flower._model import Layout
from psfed_robust.flower.adversary import ServerAdversary
from psfed_robust.flower.metering import message_bytes, update_floor_bytes
from psfed_robust.flower.protocol import MSG_TRAIN
from psfed_robust.flower.validation import (
    ClientId,
    EvalResult,
    ReplyRejected,
    ValidUpdate,
    parse_evaluate_reply,
    parse_train_reply,
)

__all__ = [
    "Checked",
    "Limits",
    "Sent",
    "aggregate",
    "coverage",
    "mean_metrics",
    "reply_weights",
    "validate_evaluate",
    "validate_train",
]


@dataclass
class Sent:
    """What the server sent one node this round (the mask it dictated or seeded)."""

    mask: Mask
    client_id: ClientId | None
    bytes: int
    floor: int
    want_scores: bool


@dataclass
class Checked:
    """One round's replies after validation."""

    valid: list[ValidUpdate] = field(default_factory=list)
    masks: list[Mask] = field(default_factory=list)  # the mask each valid reply is on
    reasons: Counter[str] = field(default_factory=Counter)
    up_bytes: list[int] = field(default_factory=list)
    up_floor: list[int] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """What a reply may claim: the uplink rule and budget, example and metric bounds."""

    uplink: str
    uplink_count: int | None  # budget of a client-chosen mask (uplink="client")
    max_num_examples: int
    max_metric: float
    expected_clients: Collection[ClientId] | None


def validate_train(
    replies: Iterable[Message],
    sent: Mapping[int, Sent],
    node_to_cid: Mapping[int, ClientId],
    lay: Layout,
    limits: Limits,
    *,
    check_finite: bool,
) -> Checked:
    """Validate every reply (drop and count the bad ones, never raise)."""
    out = Checked()
    by_node: set[int] = set()
    owners: set[ClientId] = set()
    max_payload = 9 * lay.size + 65536
    for msg in replies:
        try:
            try:
                nid = int(msg.metadata.src_node_id)
                mtype = msg.metadata.message_type
            except Exception as e:
                raise ReplyRejected("malformed", f"metadata: {e}") from None
            if mtype != MSG_TRAIN:
                raise ReplyRejected("bad-keys", f"message type {mtype!r}")
            s = sent.get(nid)
            if s is None:
                raise ReplyRejected("unexpected-node", f"node {nid} was not sampled this round")
            dictated = limits.uplink == "downlink"
            upd = parse_train_reply(
                msg, model_size=lay.size, model_dtype=lay.dtype,
                expected_mask=s.mask if dictated else None,
                expected_id=node_to_cid.get(nid),
                expected_clients=limits.expected_clients,
                want_scores=s.want_scores, max_payload_bytes=max_payload,
                check_finite=check_finite,
                max_mask_count=None if dictated else limits.uplink_count,
                max_num_examples=limits.max_num_examples, max_metric=limits.max_metric,
            )
            if upd.node_id in by_node:
                raise ReplyRejected("duplicate-reply", f"node {upd.node_id}")
            if upd.client_id in owners:
                raise ReplyRejected("duplicate-client-id", repr(upd.client_id))
            by_node.add(upd.node_id)
            owners.add(upd.client_id)
            out.valid.append(upd)
            # a dictated mask was checked equal: aggregate on the sent object, whose index
            # tensor the other replies of this mask share
            out.masks.append(s.mask if dictated else upd.mask)
            try:
                out.up_bytes.append(message_bytes(msg))
            except Exception:
                out.up_bytes.append(0)
            out.up_floor.append(update_floor_bytes(upd.mask, lay.dtype.itemsize))
        except ReplyRejected as e:
            out.reasons[e.reason] += 1
            out.dropped.append(str(e))
        except Exception as e:
            out.reasons["malformed"] += 1
            out.dropped.append(f"malformed: {e}")
    return out


def validate_evaluate(
    replies: Iterable[Message],
    sent: Mapping[int, Sent],
    node_to_cid: Mapping[int, ClientId],
    limits: Limits,
    server_round: int,
) -> tuple[list[EvalResult], Counter[str], list[int]]:
    """``(results with examples, rejection reasons, reply bytes)`` of evaluate replies."""
    reasons: Counter[str] = Counter()
    results: list[EvalResult] = []
    seen: set[int] = set()
    up: list[int] = []
    for msg in replies:
        try:
            nid = int(msg.metadata.src_node_id)
            if nid not in sent:
                raise ReplyRejected("unexpected-node", f"node {nid}")
            r = parse_evaluate_reply(
                msg, expected_id=node_to_cid.get(nid), expected_clients=limits.expected_clients,
                max_num_examples=limits.max_num_examples, max_metric=limits.max_metric,
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
    return results, reasons, up


def reply_weights(
    valid: list[ValidUpdate], weighting: str, num_available: int, fraction_train: float
) -> torch.Tensor:
    """The server weights ω of the valid replies (float64)."""
    k = len(valid)
    part = torch.ones(k, dtype=torch.bool)
    if weighting == "num-examples":
        n = torch.tensor([u.num_examples for u in valid], dtype=torch.float64)
        return n / n.sum()
    if weighting == "participants":
        return server_weights(part, "participants", dtype=torch.float64)
    total = max(num_available, k)
    if weighting == "all":
        return server_weights(part, "all", num_clients=total, dtype=torch.float64)
    return server_weights(part, "expected", num_clients=total, p_c=fraction_train or 1.0,
                          dtype=torch.float64)


def coverage(masks: list[Mask], size: int) -> float:
    """Fraction of coordinates some valid reply shared."""
    distinct = {id(m): m for m in masks if m.count}
    if not distinct or not size:
        return 0.0
    if any(m.count == m.size for m in distinct.values()):
        return 1.0
    if len(distinct) == 1:
        return next(iter(distinct.values())).fraction
    cover = np.zeros(size, dtype=bool)
    for m in distinct.values():
        cover[mask_indices(m)] = True
    return float(cover.mean())


def aggregate(
    aggregator: Any,
    checked: Checked,
    g0: npt.NDArray[Any],
    lay: Layout,
    weights: torch.Tensor,
    *,
    mode: str,
    server_round: int,
    adversary: ServerAdversary | None = None,
    info: dict[str, Any] | None = None,
    seed: int = 0,
) -> npt.NDArray[Any] | None:
    """The core's server step over the valid replies; ``None`` when the result is not finite.

    Exceptions of the rule propagate (the caller counts them as a failed aggregation). A
    randomised rule (bucketing's shuffle) draws from ``torch_generator("flower.defense", seed,
    server_round)``.
    """
    gen = torch_generator("flower.defense", seed, server_round)
    g = as_tensor(g0)
    values = [as_tensor(u.values) for u in checked.valid]
    index = [index_tensor(m) for m in checked.masks]
    # float32 models weigh in float32 (like FedAvg's numpy mean), others in float64
    w = weights.to(torch.float32 if g.dtype == torch.float32 else torch.float64)
    if adversary is not None:
        upd, masks = densify(values, index, g)
        assert masks is not None
        upd = adversary.apply(server_round, upd, masks, g,
                              [u.client_id for u in checked.valid], aggregator)
        new = server_step(aggregator, upd, g, masks=masks, weights=w,
                          mode=mode, info=info, generator=gen)  # type: ignore[arg-type]
    else:
        new = server_step(aggregator, values, g, index=index, weights=w,
                          mode=mode, info=info, generator=gen)  # type: ignore[arg-type]
    out = new.detach().cpu().numpy()
    if out.dtype != lay.dtype:
        out = out.astype(lay.dtype)
    if out.shape != g0.shape or not all_finite(out):
        return None
    if out is g0 or np.shares_memory(out, g0):
        out = out.copy()
    return out


def mean_metrics(items: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Example-weighted mean of each user metric over the replies that reported it.

    Weights are normalised before summing (``Σ (n_k / N) v_k``): with every value bounded by
    ``AggregationSettings.max_metric`` (<= 1e300) the result is a convex combination and stays
    finite, whatever the counts.
    """
    totals: dict[str, float] = {}
    for n, m in items:
        for key in m:
            totals[key] = totals.get(key, 0.0) + float(n)
    out: dict[str, float] = {}
    for n, m in items:
        for key, v in m.items():
            if totals[key] > 0:
                out[key] = out.get(key, 0.0) + (float(n) / totals[key]) * v
    return out
