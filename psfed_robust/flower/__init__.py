"""Flower (Message API, flwr 1.42) engine for psfed-robust: strategy, client, app builders.

Public API (stable; see docs/flower.md)::

    from psfed_robust.flower import (
        PSFedAvg, MaskSettings, AggregationSettings, ThreatSettings, ProtocolSettings,
        PSFedClient, FunctionClient, ServerAdversary,
        make_client_app, make_server_app, register_psfed_handlers, arrays_from_model,
    )
"""

from psfed_robust.flower.adversary import ServerAdversary
from psfed_robust.flower.builders import make_server_app
from psfed_robust.flower.client import (
    FunctionClient,
    PSFedClient,
    make_client_app,
    register_psfed_handlers,
    resolve_attack_spec,
    resolve_client_id,
)
from psfed_robust.flower.metering import message_bytes, unique_bytes
from psfed_robust.flower.protocol import MSG_EVALUATE, MSG_QUERY, MSG_TRAIN
from psfed_robust.flower.settings import (
    MASK_STRATEGIES,
    AggregationSettings,
    MaskSettings,
    ProtocolSettings,
    ThreatSettings,
    make_selector,
)
from psfed_robust.flower.strategy import PSFedAvg, arrays_from_model
from psfed_robust.flower.validation import REASONS, ReplyRejected

__all__ = [
    "MASK_STRATEGIES",
    "MSG_EVALUATE",
    "MSG_QUERY",
    "MSG_TRAIN",
    "REASONS",
    "AggregationSettings",
    "FunctionClient",
    "MaskSettings",
    "PSFedAvg",
    "PSFedClient",
    "ProtocolSettings",
    "ReplyRejected",
    "ServerAdversary",
    "ThreatSettings",
    "arrays_from_model",
    "make_client_app",
    "make_selector",
    "make_server_app",
    "message_bytes",
    "register_psfed_handlers",
    "resolve_attack_spec",
    "resolve_client_id",
    "unique_bytes",
]
