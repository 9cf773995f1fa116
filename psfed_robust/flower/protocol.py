"""The psfed message protocol: message types, record keys and config keys (see docs/flower.md).

Every message the library sends or expects is described here, so the strategy, the client and the
tests agree on one spelling. All library messages use their own message *actions* (``train.psfed``,
``evaluate.psfed``, ``query.psfed``), so a user ClientApp can keep its own plain ``train`` and
``evaluate`` handlers next to the library's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, Final

__all__ = [
    "CFG_CLIENT_ID",
    "CFG_EVAL_MODEL",
    "CFG_MODEL_DTYPE",
    "CFG_MODEL_SIZE",
    "CFG_QUERY",
    "CFG_SEND_SCORES",
    "CFG_SERVER_ROUND",
    "CFG_UPLINK",
    "CFG_UPLINK_ENCODING",
    "CFG_UPLINK_FRACTION",
    "DEFAULT_UPLINK",
    "DEFAULT_UPLINK_ENCODING",
    "KEY_ATTACK",
    "KEY_CONFIG",
    "KEY_DOWN",
    "KEY_INIT",
    "KEY_META",
    "KEY_METRICS",
    "KEY_UPDATE",
    "META_CLIENT_ID",
    "META_FRESH_STATE",
    "META_HAS_LOCAL",
    "METRIC_NUM_EXAMPLES",
    "MSG_EVALUATE",
    "MSG_QUERY",
    "MSG_TRAIN",
    "PAYLOAD",
    "SCORES",
    "STATE_LOCAL",
    "STATE_META",
    "STATE_THETA",
    "read_uplink_switches",
    "write_uplink_switches",
]

#: message types (``<category>.<action>``)
MSG_TRAIN: Final = "train.psfed"
MSG_EVALUATE: Final = "evaluate.psfed"
MSG_QUERY: Final = "query.psfed"

# ---------------------------------------------------------------- record keys (Message.content)
#: ArrayRecord ``{"payload": uint8 Array}``: wire-encoded (downlink mask, global values on it)
KEY_DOWN: Final = "psfed.down"
#: ArrayRecord ``{"payload": uint8 Array}``: the dense global model, sent on first contact (or
#: after a client lost its state) to initialise the local model; shared by all such messages
KEY_INIT: Final = "psfed.init"
#: ConfigRecord: server round, model size/dtype, protocol switches and the user's config entries
KEY_CONFIG: Final = "psfed.config"
#: ConfigRecord (optional, server-assigned client-side attack): ``{"name": str, <param>: value}``
KEY_ATTACK: Final = "psfed.attack"
#: reply ArrayRecord ``{"payload": uint8 Array[, "scores": float Array (D,)]}``
KEY_UPDATE: Final = "psfed.update"
#: reply MetricRecord ``{"num-examples": int, <user metrics>}`` (evaluate: also ``"loss"``)
KEY_METRICS: Final = "psfed.metrics"
#: reply ConfigRecord ``{"client-id": int|str, "fresh-state": bool[, "has-local": bool]}``
KEY_META: Final = "psfed.meta"

#: Array names inside the ArrayRecords
PAYLOAD: Final = "payload"
SCORES: Final = "scores"

# ---------------------------------------------------------------- config keys (KEY_CONFIG)
CFG_SERVER_ROUND: Final = "server-round"
CFG_MODEL_SIZE: Final = "psfed-model-size"
CFG_MODEL_DTYPE: Final = "psfed-model-dtype"
#: "downlink" (reply on the downlink mask) or "client" (client picks its uplink mask)
CFG_UPLINK: Final = "psfed-uplink"
CFG_UPLINK_FRACTION: Final = "psfed-uplink-fraction"
CFG_UPLINK_ENCODING: Final = "psfed-uplink-encoding"
#: True when the server wants per-coordinate |grad| scores in the reply (gradient selector)
CFG_SEND_SCORES: Final = "psfed-send-scores"
#: what a client assumes when a switch is absent. The server sends ``psfed-uplink``,
#: ``psfed-uplink-encoding`` and ``psfed-send-scores`` only when they differ from these
#: (``False`` for send-scores): every config entry is rebuilt as protobuf objects many times
#: per message by Flower's serialization (object ids are recomputed level by level)
DEFAULT_UPLINK: Final = "downlink"
DEFAULT_UPLINK_ENCODING: Final = "auto"
#: evaluate: "merged" (local model + global shared values, in a copy), "local" or "global"
CFG_EVAL_MODEL: Final = "psfed-eval-model"
#: query: what is asked ("identity")
CFG_QUERY: Final = "psfed-query"
#: the client id the server expects from this node (absent when unknown)
CFG_CLIENT_ID: Final = "psfed-client-id"

# ---------------------------------------------------------------- reply meta / metric keys
META_CLIENT_ID: Final = "client-id"
META_FRESH_STATE: Final = "fresh-state"
META_HAS_LOCAL: Final = "has-local"
METRIC_NUM_EXAMPLES: Final = "num-examples"

# ---------------------------------------------------------------- client state (context.state)
#: ArrayRecord ``{"theta": Array (D,) in the model's dtype}``: the full local model
STATE_LOCAL: Final = "psfed.local"
STATE_THETA: Final = "theta"
#: ConfigRecord ``{"client-id", "rounds-trained", "last-round"}``
STATE_META: Final = "psfed.meta"


# ---------------------------------------------------------------- the uplink switches
def write_uplink_switches(
    cfg: MutableMapping[str, Any], *, uplink: str, encoding: str, fraction: float | None
) -> None:
    """Put the train config's uplink switches into ``cfg``: a switch at the client's default is
    left out (and dropped if the user's config had it), ``fraction`` only when given."""
    for key, value, default in ((CFG_UPLINK, uplink, DEFAULT_UPLINK),
                                (CFG_UPLINK_ENCODING, encoding, DEFAULT_UPLINK_ENCODING)):
        cfg.pop(key, None)
        if value != default:
            cfg[key] = value
    if fraction is not None:
        cfg[CFG_UPLINK_FRACTION] = float(fraction)


def read_uplink_switches(cfg: Mapping[str, Any]) -> tuple[str, str, float | None]:
    """``(uplink, encoding, fraction)`` of a train config, the defaults where a switch is absent
    (``fraction`` ``None``: the client uses its downlink mask's fraction)."""
    fraction = cfg.get(CFG_UPLINK_FRACTION)
    return (str(cfg.get(CFG_UPLINK, DEFAULT_UPLINK)),
            str(cfg.get(CFG_UPLINK_ENCODING, DEFAULT_UPLINK_ENCODING)),
            None if fraction is None else float(fraction))
