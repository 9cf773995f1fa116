"""The client replies: written by :func:`train_reply` / :func:`evaluate_reply` /
:func:`query_reply` (the client and the in-process test grids send only what these build), and
validated here on arrival: every reply is parsed defensively, never trusted.

``parse_train_reply`` turns a train reply into a :class:`ValidUpdate` or raises
:class:`ReplyRejected` with one of the :data:`REASONS`. Nothing else escapes: any unexpected
exception while reading a reply becomes reason ``"malformed"``. The strategy drops a rejected reply,
logs the reason and counts it in the round's metrics (``rejected-replies``,
``rejected.<reason>``); the global model never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from psfed_robust.core.flatten import all_finite
from psfed_robust.core.mask import Mask
from psfed_robust.flower import _wire
from psfed_robust.flower._arrays import array_view
from psfed_robust.flower.protocol import (
    KEY_META,
    KEY_METRICS,
    KEY_UPDATE,
    META_CLIENT_ID,
    META_FRESH_STATE,
    META_HAS_LOCAL,
    METRIC_NUM_EXAMPLES,
    PAYLOAD,
    SCORES,
)

__all__ = [
    "REASONS",
    "ClientId",
    "EvalResult",
    "ReplyRejected",
    "ValidUpdate",
    "check_client_id",
    "evaluate_reply",
    "parse_evaluate_reply",
    "parse_train_reply",
    "query_reply",
    "train_reply",
]

ClientId = int | str

#: every reason a reply can be rejected for (the ``rejected.<reason>`` metric keys)
REASONS: tuple[str, ...] = (
    "message-error",  # the reply carries a Flower Error (client crashed, timeout, ...)
    "unexpected-node",  # no instruction was sent to this node this round
    "duplicate-reply",  # a second reply from the same node in one round
    "bad-keys",  # missing/extra records, wrong record types, missing/extra arrays
    "bad-payload",  # payload is not a 1-D uint8 array, or too large
    "wire-decode",  # the wire codec rejected the payload (corrupt mask bytes, ...)
    "size-mismatch",  # the decoded mask's size differs from the model size
    "length-mismatch",  # number of values differs from the mask's count
    "bad-dtype",  # values are not floating point
    "non-finite",  # NaN/Inf values (also after casting to the model dtype)
    "bad-num-examples",  # missing, non-integer, <= 0 or above the plausible bound
    "missing-client-id",
    "bad-client-id",  # not a non-negative int or a short non-empty str
    "client-id-mismatch",  # differs from the id this node reported before
    "duplicate-client-id",  # another node already answered with this client id
    "unknown-client-id",  # not in the strategy's expected_clients
    "mask-mismatch",  # uplink mask differs from the mask the server sent (uplink="downlink")
    "over-budget",  # uplink mask shares more coordinates than agreed (uplink="client")
    "bad-scores",  # requested |grad| scores missing, wrong length/dtype or non-finite
    "bad-metrics",  # evaluate: loss missing or non-finite
    "malformed",  # anything else that could not be read
)

_MAX_ID_LEN = 256


class ReplyRejected(Exception):
    """A reply that must be dropped; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ValidUpdate:
    """A parsed, validated train reply."""

    node_id: int
    client_id: ClientId
    mask: Mask
    values: npt.NDArray[Any]  # (mask.count,) in the model dtype; read-only (may view the reply)
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    scores: npt.NDArray[np.float64] | None = None
    fresh_state: bool = False


@dataclass
class EvalResult:
    """A parsed, validated evaluate reply."""

    node_id: int
    client_id: ClientId
    loss: float
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def check_client_id(value: Any) -> ClientId:
    """Return a valid client id (int >= 0 or non-empty str <= 256 chars) or raise."""
    if isinstance(value, bool):
        raise ReplyRejected("bad-client-id", "bool is not a client id")
    if isinstance(value, int):
        if value < 0:
            raise ReplyRejected("bad-client-id", f"negative id {value}")
        return value
    if isinstance(value, str):
        if not value or len(value) > _MAX_ID_LEN:
            raise ReplyRejected("bad-client-id", f"str id of length {len(value)}")
        return value
    raise ReplyRejected("bad-client-id", f"type {type(value).__name__}")


def _content(msg: Message, allowed: set[str]) -> RecordDict:
    """A reply's content once it carries no error and no record outside ``allowed``."""
    if msg.has_error():
        err = msg.error
        raise ReplyRejected("message-error", f"code {err.code}: {str(err.reason)[:200]}")
    if not msg.has_content():
        raise ReplyRejected("bad-keys", "no content")
    content = msg.content
    extra = set(content.keys()) - allowed
    if extra:
        raise ReplyRejected("bad-keys", f"unexpected records {sorted(extra)}")
    return content


def _record(content: Any, key: str, kind: type) -> Any:
    if key not in content:
        raise ReplyRejected("bad-keys", f"missing record {key!r}")
    rec = content[key]
    if not isinstance(rec, kind):
        raise ReplyRejected(
            "bad-keys", f"record {key!r} is {type(rec).__name__}, not {kind.__name__}"
        )
    return rec


def _client_id(
    meta: ConfigRecord,
    expected_id: ClientId | None,
    expected_clients: Collection[ClientId] | None,
) -> ClientId:
    if META_CLIENT_ID not in meta:
        raise ReplyRejected("missing-client-id")
    cid = check_client_id(meta[META_CLIENT_ID])
    if expected_id is not None and cid != expected_id:
        raise ReplyRejected("client-id-mismatch", f"got {cid!r}, node reported {expected_id!r}")
    if expected_clients is not None and cid not in expected_clients:
        raise ReplyRejected("unknown-client-id", f"{cid!r}")
    return cid


def _num_examples(
    metrics: MetricRecord, *, allow_zero: bool = False, max_num_examples: int | None = None
) -> int:
    if METRIC_NUM_EXAMPLES not in metrics:
        raise ReplyRejected("bad-num-examples", "missing")
    n = metrics[METRIC_NUM_EXAMPLES]
    if isinstance(n, bool) or not isinstance(n, int):
        raise ReplyRejected("bad-num-examples", f"not an integer: {type(n).__name__}")
    if n < 0 or (n == 0 and not allow_zero):
        raise ReplyRejected("bad-num-examples", f"{n}")
    if max_num_examples is not None and n > max_num_examples:
        raise ReplyRejected("bad-num-examples",
                            f"{n} is implausible (bound max_num_examples={max_num_examples})")
    return n


def _user_metrics(
    metrics: MetricRecord, skip: tuple[str, ...], max_metric: float | None = None
) -> dict[str, float]:
    """Finite scalar metrics with ``|v| <= max_metric`` (others are ignored, never aggregated)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k in skip or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        f = float(v)
        if math.isfinite(f) and (max_metric is None or abs(f) <= max_metric):
            out[k] = f
    return out


def parse_train_reply(
    msg: Message,
    *,
    model_size: int,
    model_dtype: np.dtype[Any],
    expected_mask: Mask | None = None,
    expected_id: ClientId | None = None,
    expected_clients: Collection[ClientId] | None = None,
    want_scores: bool = False,
    max_payload_bytes: int | None = None,
    check_finite: bool = True,
    max_mask_count: int | None = None,
    max_num_examples: int | None = None,
    max_metric: float | None = None,
) -> ValidUpdate:
    """Validate a ``train.psfed`` reply; raise :class:`ReplyRejected` on any defect.

    The uplink budget: ``expected_mask`` (the mask the server dictated or seeded) must equal
    the reply's mask (``mask-mismatch``); ``max_mask_count`` bounds a client-chosen mask's
    count (``over-budget``). ``max_num_examples`` bounds the claimed example count
    (``bad-num-examples``); user metrics with ``|v| > max_metric`` are not kept.
    ``check_finite=False`` skips only the NaN/Inf check of the values (a caller that proves
    them finite otherwise, e.g. by a finite weighted sum, and re-validates when it cannot).
    """
    try:
        return _parse_train(
            msg,
            model_size=model_size,
            model_dtype=np.dtype(model_dtype),
            expected_mask=expected_mask,
            expected_id=expected_id,
            expected_clients=expected_clients,
            want_scores=want_scores,
            max_payload_bytes=max_payload_bytes,
            check_finite=check_finite,
            max_mask_count=max_mask_count,
            max_num_examples=max_num_examples,
            max_metric=max_metric,
        )
    except ReplyRejected:
        raise
    except _wire.WireFormatError as e:
        raise ReplyRejected("wire-decode", str(e)[:200]) from None
    except Exception as e:
        raise ReplyRejected("malformed", f"{type(e).__name__}: {str(e)[:200]}") from None


def _parse_train(
    msg: Message,
    *,
    model_size: int,
    model_dtype: np.dtype[Any],
    expected_mask: Mask | None,
    expected_id: ClientId | None,
    expected_clients: Collection[ClientId] | None,
    want_scores: bool,
    max_payload_bytes: int | None,
    check_finite: bool = True,
    max_mask_count: int | None = None,
    max_num_examples: int | None = None,
    max_metric: float | None = None,
) -> ValidUpdate:
    content = _content(msg, {KEY_UPDATE, KEY_METRICS, KEY_META})
    upd = _record(content, KEY_UPDATE, ArrayRecord)
    metrics = _record(content, KEY_METRICS, MetricRecord)
    meta = _record(content, KEY_META, ConfigRecord)
    allowed = {PAYLOAD, SCORES} if want_scores else {PAYLOAD}
    keys = set(upd.keys())
    if PAYLOAD not in keys or not keys <= allowed:
        raise ReplyRejected("bad-keys", f"update arrays {sorted(keys)}, allowed {sorted(allowed)}")
    if want_scores and SCORES not in keys:
        raise ReplyRejected("bad-scores", "scores were requested but not sent")

    cid = _client_id(meta, expected_id, expected_clients)
    n = _num_examples(metrics, max_num_examples=max_num_examples)

    arr = upd[PAYLOAD]
    if arr.dtype != "uint8" or len(arr.shape) != 1:
        raise ReplyRejected("bad-payload", f"dtype {arr.dtype!r} shape {arr.shape}")
    if max_payload_bytes is not None and len(arr.data) > max_payload_bytes + 1024:
        raise ReplyRejected("bad-payload", f"{len(arr.data)} bytes > limit {max_payload_bytes}")
    raw = array_view(arr)  # zero-copy view of the npy data (np.load's result otherwise)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ReplyRejected("bad-payload", f"npy data {raw.dtype} shape {raw.shape}")
    mask, values = _wire.decode(memoryview(raw), model_size, copy=False)  # type: ignore[arg-type]
    if mask.size != model_size:
        raise ReplyRejected("size-mismatch", f"mask size {mask.size} != model size {model_size}")
    values = np.asarray(values)
    if values.ndim != 1 or values.shape[0] != mask.count:
        raise ReplyRejected(
            "length-mismatch", f"{values.shape} values for a mask of count {mask.count}"
        )
    if values.dtype.kind != "f":
        raise ReplyRejected("bad-dtype", f"values dtype {values.dtype}")
    if expected_mask is not None and mask != expected_mask:
        raise ReplyRejected("mask-mismatch", "uplink mask differs from the mask the server sent")
    if max_mask_count is not None and mask.count > max_mask_count:
        raise ReplyRejected("over-budget", f"uplink mask shares {mask.count} coordinates, "
                            f"the agreed budget is {max_mask_count}")
    if check_finite and not all_finite(values):
        raise ReplyRejected("non-finite", "NaN or Inf in values")
    if values.dtype != model_dtype:
        with np.errstate(over="ignore", invalid="ignore"):
            cast = values.astype(model_dtype)
        if check_finite and not all_finite(cast):  # e.g. a float64 beyond float32's range
            raise ReplyRejected("non-finite", "NaN or Inf in values after the cast to "
                                f"{model_dtype}")
        cast.setflags(write=False)
    else:
        cast = values

    scores = None
    if want_scores:
        s = upd[SCORES]
        if s.dtype not in ("float16", "float32", "float64") or tuple(s.shape) != (model_size,):
            raise ReplyRejected("bad-scores", f"dtype {s.dtype!r} shape {s.shape}")
        scores = np.asarray(s.numpy(), dtype=np.float64)
        if not bool(np.isfinite(scores).all()):
            raise ReplyRejected("bad-scores", "non-finite scores")

    fresh = meta.get(META_FRESH_STATE, False)
    return ValidUpdate(
        node_id=int(msg.metadata.src_node_id),
        client_id=cid,
        mask=mask,
        values=cast,
        num_examples=n,
        metrics=_user_metrics(metrics, (METRIC_NUM_EXAMPLES,), max_metric),
        scores=scores,
        fresh_state=bool(fresh) if isinstance(fresh, bool) else False,
    )


def parse_evaluate_reply(
    msg: Message,
    *,
    expected_id: ClientId | None = None,
    expected_clients: Collection[ClientId] | None = None,
    max_num_examples: int | None = None,
    max_metric: float | None = None,
) -> EvalResult:
    """Validate an ``evaluate.psfed`` reply (``num-examples == 0`` means "nothing evaluated").

    ``max_num_examples`` and ``max_metric`` bound the claimed count and the loss (a reply
    beyond them is rejected) and the user metrics (dropped), as for train replies.
    """
    try:
        content = _content(msg, {KEY_METRICS, KEY_META})
        metrics = _record(content, KEY_METRICS, MetricRecord)
        meta = _record(content, KEY_META, ConfigRecord)
        cid = _client_id(meta, expected_id, expected_clients)
        n = _num_examples(metrics, allow_zero=True, max_num_examples=max_num_examples)
        loss = metrics.get("loss")
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            raise ReplyRejected("bad-metrics", "loss missing or not a number")
        if not math.isfinite(float(loss)):
            raise ReplyRejected("bad-metrics", "non-finite loss")
        if max_metric is not None and abs(float(loss)) > max_metric:
            raise ReplyRejected("bad-metrics", f"|loss| above max_metric={max_metric:g}")
        return EvalResult(
            node_id=int(msg.metadata.src_node_id),
            client_id=cid,
            loss=float(loss),
            num_examples=n,
            metrics=_user_metrics(metrics, (METRIC_NUM_EXAMPLES, "loss"), max_metric),
        )
    except ReplyRejected:
        raise
    except Exception as e:
        raise ReplyRejected("malformed", f"{type(e).__name__}: {str(e)[:200]}") from None


def parse_query_reply(msg: Message) -> tuple[ClientId, bool]:
    """Validate a ``query.psfed`` identity reply: ``(client_id, has_local)``."""
    try:
        if msg.has_error():
            raise ReplyRejected("message-error", str(msg.error.reason)[:200])
        meta = _record(msg.content, KEY_META, ConfigRecord)
        cid = check_client_id(meta.get(META_CLIENT_ID)) if META_CLIENT_ID in meta else None
        if cid is None:
            raise ReplyRejected("missing-client-id")
        has_local = meta.get(META_HAS_LOCAL, False)
        return cid, bool(has_local) if isinstance(has_local, bool) else False
    except ReplyRejected:
        raise
    except Exception as e:
        raise ReplyRejected("malformed", f"{type(e).__name__}: {str(e)[:200]}") from None


def count_reasons(reasons: Mapping[str, int]) -> dict[str, int]:
    """Metric entries ``{"rejected-replies": n, "rejected.<reason>": n_reason}``."""
    out = {"rejected-replies": int(sum(reasons.values()))}
    for r, c in sorted(reasons.items()):
        out[f"rejected.{r}"] = int(c)
    return out


# ---------------------------------------------------------------- the writers
def _reply_metrics(reserved: Mapping[str, float | int], user: Mapping[str, float]) -> MetricRecord:
    """The reserved entries, then the user's metrics as floats (a user entry never overrides a
    reserved one)."""
    rec = MetricRecord(dict(reserved))
    for k, v in user.items():
        if k not in reserved:
            rec[k] = float(v)
    return rec


def train_reply(
    instruction: Message,
    payload: Array,
    *,
    client_id: int | str,
    num_examples: int,
    fresh: bool,
    metrics: Mapping[str, float] | None = None,
    scores: Array | None = None,
) -> Message:
    """A ``train.psfed`` reply: the wire payload (and the optional scores), the example count and
    user metrics, the client id and whether the client started from a fresh state."""
    arrays = {PAYLOAD: payload}
    if scores is not None:
        arrays[SCORES] = scores
    content = RecordDict({
        KEY_UPDATE: ArrayRecord(arrays),
        KEY_METRICS: _reply_metrics({METRIC_NUM_EXAMPLES: int(num_examples)}, metrics or {}),
        KEY_META: ConfigRecord({META_CLIENT_ID: client_id, META_FRESH_STATE: bool(fresh)}),
    })
    return Message(content, reply_to=instruction)


def evaluate_reply(
    instruction: Message,
    *,
    client_id: int | str,
    loss: float,
    num_examples: int,
    metrics: Mapping[str, float] | None = None,
) -> Message:
    """An ``evaluate.psfed`` reply: loss, example count and user metrics, the client id."""
    reserved = {"loss": float(loss), METRIC_NUM_EXAMPLES: int(num_examples)}
    content = RecordDict({
        KEY_METRICS: _reply_metrics(reserved, metrics or {}),
        KEY_META: ConfigRecord({META_CLIENT_ID: client_id}),
    })
    return Message(content, reply_to=instruction)


def query_reply(instruction: Message, *, client_id: int | str, has_local: bool) -> Message:
    """A ``query.psfed`` (identity) reply: the client id and whether it holds a local model."""
    meta = ConfigRecord({META_CLIENT_ID: client_id, META_HAS_LOCAL: bool(has_local)})
    return Message(RecordDict({KEY_META: meta}), reply_to=instruction)
