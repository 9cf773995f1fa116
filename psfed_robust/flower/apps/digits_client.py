"""ClientApp of the digits Flower App.

``[tool.flwr.app.components] clientapp = "psfed_robust.flower.apps.digits_client:app"``.

One app speaks both protocols, so the same clients serve both strategies of the comparison:

- ``train.psfed`` / ``evaluate.psfed`` / ``query.psfed``: partial sharing, through
  :func:`psfed_robust.flower.client.register_psfed_handlers` (the full local model persists in
  ``context.state``);
- ``train`` / ``evaluate``: Flower's own FedAvg protocol (``"arrays"`` = the model's state dict,
  ``"metrics"`` with ``num-examples``), stateless.

The client's data is its ``partition-id`` share of the digits training set (see
:mod:`psfed_robust.flower.digits`); simulation sets ``partition-id``/``num-partitions`` itself,
deployment passes them with ``flower-supernode --node-config "partition-id=0 num-partitions=2"``.

Attacks: the ServerApp assigns each client-side attack in the train message of the malicious
client (``psfed.attack``; see :mod:`psfed_robust.flower.apps.digits_threat`). The app's
threat-model run-config keys (``malicious-clients``, ``attack-persistent``, ...) are for the
server only, so the handlers hide them from the library's run-config attack seam (which would
otherwise read ``malicious-clients`` as its own, differently shaped key). A data attack (label
flipping) poisons the labels of the local training set through ``PSFedClient.poison_labels``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from psfed_robust.core.seeding import torch_generator
from psfed_robust.flower import digits
from psfed_robust.flower.apps.digits_config import THREAT_KEYS, DigitsRunConfig
from psfed_robust.flower.client import PSFedClient
from psfed_robust.flower.protocol import MSG_EVALUATE, MSG_QUERY, MSG_TRAIN, STATE_META

__all__ = ["DigitsClient", "app", "model_fn", "psfed_client", "server_only_view"]

torch.set_num_threads(1)  # many clients share few cores; intra-op threads only add contention


def _cfg(context: Context) -> DigitsRunConfig:
    return DigitsRunConfig.from_run_config(context.run_config)


def _partition(context: Context) -> tuple[int, int]:
    nc = context.node_config
    try:
        pid, num = int(nc["partition-id"]), int(nc["num-partitions"])
    except KeyError as err:
        raise ValueError(
            f"node_config lacks {err.args[0]!r}: start the SuperNode with --node-config "
            '"partition-id=<i> num-partitions=<n>" (simulation sets both itself)'
        ) from None
    return pid, num


def model_fn(context: Context) -> nn.Module:
    """The 2-layer MLP, identically initialised on every node (the run's ``seed``)."""
    cfg = _cfg(context)
    return digits.make_model(cfg.hidden, cfg.seed)


def _data(context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = _cfg(context)
    pid, num = _partition(context)
    return digits.client_data(
        pid,
        num,
        partitioning=cfg.partitioning,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        test_size=cfg.test_size,
    )


def _train(
    model: nn.Module,
    context: Context,
    server_round: int,
    poison: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> tuple[int, float]:
    cfg = _cfg(context)
    x, y = _data(context)
    if poison is not None:
        y = poison(y, digits.NUM_CLASSES)
    pid, _ = _partition(context)
    gen = torch_generator(cfg.seed, "digits-batches", pid, server_round)
    loss = digits.train_epochs(
        model,
        x,
        y,
        epochs=cfg.local_epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        batch_size=cfg.batch_size,
        generator=gen,
    )
    return len(x), loss


def _evaluate_test(model: nn.Module, context: Context) -> tuple[float, int, dict[str, float]]:
    cfg = _cfg(context)
    split = digits.load_split(cfg.test_size, cfg.seed)
    loss, acc = digits.evaluate(model, split.x_test, split.y_test)
    return loss, len(split.y_test), {"accuracy": acc}


class DigitsClient(PSFedClient):
    """The psfed client: local SGD on this node's partition, evaluation on the test set.

    It reports ``local-rounds`` (how many rounds this node's persisted local model has been
    trained, this one included) with each update: the strategy's example-weighted mean of it
    equals the round number exactly when every client kept its state (``context.state``).
    """

    def train_local(self, config: dict[str, Any]) -> int:
        assert self.context is not None
        prior = 0
        if STATE_META in self.context.state:
            meta = self.context.state[STATE_META]
            if isinstance(meta, ConfigRecord):
                v = meta.get("rounds-trained", 0)
                prior = v if isinstance(v, int) else 0
        n, loss = _train(
            self.model, self.context, int(config.get("server-round", self.server_round)),
            self.poison_labels,
        )
        self.train_metrics = {
            "train-loss": loss,
            "local-rounds": float(prior + 1),
            # 1 on a client running a (server-assigned) attack: the example-weighted mean in
            # the round's history is the malicious share of the training examples
            "attacking": 1.0 if self.attack is not None else 0.0,
        }
        return n

    def evaluate_local(self, config: dict[str, Any]) -> tuple[float, int, dict[str, float]]:
        assert self.context is not None
        return _evaluate_test(self.model, self.context)


def psfed_client(context: Context) -> DigitsClient:
    """The psfed client of this node (rebuilt per message; its local model is in the state)."""
    return DigitsClient(model_fn(context))


def server_only_view(context: Context) -> Context:
    """``context`` with the server-only threat keys removed from its run config (the state is
    the same object, so everything the client stores persists)."""
    if not any(k in context.run_config for k in THREAT_KEYS):
        return context
    rc = {k: v for k, v in context.run_config.items() if k not in THREAT_KEYS}
    return Context(context.run_id, context.node_id, context.node_config, context.state, rc,
                   context.series_id)


app = ClientApp()


@app.train(MSG_TRAIN.removeprefix("train."))
def psfed_train(msg: Message, context: Context) -> Message:
    """``train.psfed``: the psfed client's round (attacks as assigned by the server)."""
    return psfed_client(context).handle_train(msg, server_only_view(context))


@app.evaluate(MSG_EVALUATE.removeprefix("evaluate."))
def psfed_evaluate(msg: Message, context: Context) -> Message:
    """``evaluate.psfed``."""
    return psfed_client(context).handle_evaluate(msg, server_only_view(context))


@app.query(MSG_QUERY.removeprefix("query."))
def psfed_query(msg: Message, context: Context) -> Message:
    """``query.psfed``: the node's stable client id."""
    return psfed_client(context).handle_query(msg, server_only_view(context))


@app.train()
def fedavg_train(msg: Message, context: Context) -> Message:
    """Flower's FedAvg protocol: load ``arrays``, train, reply with the full state dict."""
    model = model_fn(context)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    config = msg.content.config_records.get("config")
    rnd = config.get("server-round", 0) if config is not None else 0
    server_round = rnd if isinstance(rnd, int) else 0
    n, loss = _train(model, context, server_round)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": n, "train-loss": loss}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def fedavg_evaluate(msg: Message, context: Context) -> Message:
    """Flower's FedAvg protocol: evaluate the received model on the test set."""
    model = model_fn(context)
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    loss, n, metrics = _evaluate_test(model, context)
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": n, "eval-loss": loss, **metrics}),
        }
    )
    return Message(content, reply_to=msg)
