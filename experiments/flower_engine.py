"""The driver's Flower engine: image classification under attack through PSFedAvg/PSFedClient.

Each Monte Carlo run is one Flower run of ``rounds`` rounds: the ``PSFedAvg`` strategy drives
``K`` ``PSFedClient`` ClientApps (the project's MLP, :func:`psfed_robust.tasks.make_mlp`, on
flattened images) through :class:`psfed_robust.flower.testing.LocalGrid`, the in-process Grid
that serializes every message as the Flower runtimes do (no Ray start-up per run; the same app
code runs under ``flwr run``, see docs/flower_app.md). Non-omniscient attacks run on the malicious
clients (client-side seam, with ``attack.persistent`` as the threat model's setting); omniscient
ones (ALIE, IPM, min-max, min-sum) run as the server-side adversary that sees the round's honest
replies — the simulation-only seam, which cannot make an attack persistent (refused).

Keys are read through the declared key model (``experiments.keys``; ``point.get``); schema
validation already refuses a non-default value of a key this engine does not honour, and
:func:`check_flower_point` refuses the combinations it cannot run.

Metrics per round: ``accuracy`` and ``loss`` of the global model on the held-out test set,
``bytes_down`` and ``bytes_up`` per client (serialized message bytes), ``rejected`` replies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from experiments.configs import attack_params_of, check_flower_point, defense_params_of
from experiments.datasets import ImageData, load_image_data, split_clients
from experiments.results import PointResult
from experiments.schema import SweepPoint
from psfed_robust.core.seeding import stable_seed
from psfed_robust.tasks import make_mlp

__all__ = ["check_flower_point", "make_mlp", "run_flower_point"]

def _evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = float(nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(1) == y).float().mean())
    return loss, acc


def _one_run(point: SweepPoint, data: ImageData, seed: int) -> dict[str, list[float]]:
    from flwr.app import ArrayRecord, MetricRecord

    from attacks import attack_class
    from psfed_robust.flower import (
        AggregationSettings,
        MaskSettings,
        ProtocolSettings,
        PSFedAvg,
        PSFedClient,
        ServerAdversary,
        ThreatSettings,
        make_client_app,
    )
    from psfed_robust.flower.testing import LocalGrid

    k = int(point.get("federation.clients"))
    hidden = int(point.get("task.hidden"))
    lr = float(point.get("task.lr"))
    epochs = int(point.get("task.local_epochs"))
    batch = int(point.get("task.batch_size"))
    parts = split_clients(data.y_train, k, point.get("task.partition"),
                          float(point.get("task.dirichlet_alpha")), seed)
    model_seed = stable_seed("experiments.flower.model", seed)

    class ImageClient(PSFedClient):
        def train_local(self, config: dict[str, Any]) -> int:
            cid = int(self.client_id) if self.client_id is not None else 0
            idx = torch.from_numpy(parts[cid])
            x, y = data.x_train[idx], data.y_train[idx]
            y = self.poison_labels(y, data.num_classes)
            gen = torch.Generator().manual_seed(
                stable_seed("experiments.flower.batches", seed, cid, self.server_round))
            opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
            self.model.train()
            for _ in range(epochs):
                order = torch.randperm(len(y), generator=gen)
                for s in range(0, len(y), batch):
                    b = order[s: s + batch]
                    opt.zero_grad()
                    nn.functional.cross_entropy(self.model(x[b]), y[b]).backward()
                    opt.step()
            return len(y)

    def model_fn() -> nn.Module:
        return make_mlp(data.num_features, hidden, data.num_classes, model_seed)

    app = make_client_app(lambda ctx: ImageClient(model_fn()))
    attack = str(point.get("attack.name"))
    malicious = list(range(int(point.get("attack.malicious")))) if attack != "none" else []
    params = attack_params_of(point) if malicious else {}
    params.pop("persistent", None)  # the threat model's setting, not an attack parameter
    persistent = bool(point.get("attack.persistent"))
    client_attacks: dict[Any, tuple[str, dict[str, Any]]] = {}
    adversary = None
    if malicious:
        if attack_class(attack).omniscient:
            adversary = ServerAdversary(attack, malicious, params=params,
                                        seed=stable_seed("experiments.flower.adv", seed))
        else:
            client_attacks = {cid: (attack, params) for cid in malicious}
    participants = int(point.get("federation.participants"))
    strategy = PSFedAvg(
        fraction_train=participants / k,
        fraction_evaluate=0.0,
        min_train_nodes=participants,
        min_evaluate_nodes=0,
        min_available_nodes=k,
        sample_seed=stable_seed("experiments.flower.sample", seed) % (1 << 31),
        masks=MaskSettings(
            fraction=float(point.get("sharing.fraction")),
            strategy=str(point.get("sharing.selector")),
            seed=stable_seed("experiments.flower.masks", seed) % (1 << 31)),
        aggregation=AggregationSettings(
            rule=str(point.get("defense.name")), params=defense_params_of(point),
            mode=point.get("defense.mode")),
        threat=ThreatSettings(
            adversary=adversary, client_attacks=client_attacks or None,
            persistent=persistent and not attack_class(attack).omniscient if malicious
            else False,
            attack_seed=stable_seed("experiments.flower.attack", seed) % (1 << 31),
            expected_clients=list(range(k))),
        protocol=ProtocolSettings(evaluation="none", poll_interval=0.0),
    )
    from psfed_robust.flower import arrays_from_model

    init = arrays_from_model(model_fn())
    eval_model = model_fn()
    from psfed_robust.core.flatten import FlattenedModel

    flat = FlattenedModel(eval_model)
    curve: dict[str, list[float]] = {"accuracy": [], "loss": []}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        vec = np.concatenate([a.numpy().reshape(-1) for a in arrays.values()])
        flat.unflatten(torch.from_numpy(vec.astype(np.float32)))
        loss, acc = _evaluate(eval_model, data.x_test, data.y_test)
        if server_round > 0:
            curve["accuracy"].append(acc)
            curve["loss"].append(loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    grid = LocalGrid(app, k)
    strategy.start(grid, init, num_rounds=int(point.get("rounds")), evaluate_fn=evaluate_fn)
    hist = strategy.history
    curve["bytes_down"] = [float(h.get("bytes-down-per-client", 0.0)) for h in hist]
    curve["bytes_up"] = [float(h.get("bytes-up-per-client", 0.0)) for h in hist]
    curve["rejected"] = [float(h.get("rejected-replies", 0.0)) for h in hist]
    return curve


def run_flower_point(point: SweepPoint, seed: int, *, progress: bool = False) -> PointResult:
    """Run ``runs`` Flower runs of one sweep point (run r seeded by ``stable_seed(seed, r)``)."""
    import logging

    import flwr.common.logger  # noqa: F401  (configures the "flwr" logger; quiet it below)

    check_flower_point(point)
    runs = int(point.get("runs"))
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        return _run_point(point, seed, runs, progress)
    finally:
        flwr_logger.setLevel(level)


def _run_point(point: SweepPoint, seed: int, runs: int, progress: bool) -> PointResult:
    from tqdm import tqdm

    data = load_image_data(point.get("task.kind"), point.get("task.data_dir"), seed=seed)
    per_run = []
    for r in tqdm(range(runs), desc="flower runs", disable=not progress, leave=False):
        per_run.append(_one_run(point, data, stable_seed("experiments.flower.run", seed, r)))
    rounds = int(point.get("rounds"))
    every = int(point.get("output.record_every"))
    keep = [i for i in range(rounds) if (i + 1) % every == 0 or i + 1 == rounds]
    metrics = {
        name: np.asarray([[run[name][i] for i in keep] for run in per_run], dtype=np.float64)
        for name in ("accuracy", "loss", "bytes_down", "bytes_up", "rejected")
    }
    return PointResult(
        rounds=np.asarray([i + 1 for i in keep]),
        metrics=metrics,
        info={"num_parameters": sum(p.numel() for p in make_mlp(
            data.num_features, int(point.get("task.hidden")), data.num_classes, 0).parameters()),
            "train_examples": len(data.y_train), "test_examples": len(data.y_test)},
    )
