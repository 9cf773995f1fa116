"""ServerApp of the digits Flower App.

``[tool.flwr.app.components] serverapp = "psfed_robust.flower.apps.digits_server:app"``.

It trains the 2-layer digits MLP with ``strategy = "psfedavg"`` (partial sharing,
:class:`psfed_robust.flower.strategy.PSFedAvg`) or ``strategy = "fedavg"`` (Flower's own
:class:`flwr.serverapp.strategy.FedAvg`, the baseline), evaluates the global model centrally on
the fixed digits test set after every round, and counts the bytes of every message through a
:class:`~psfed_robust.flower.metering.MeteredGrid`. It logs one line per round and, at the
end, one machine-readable line ``PSFED-DIGITS-RESULT {json}`` (tests and the docs parse it).

The threat model (``attack-*``, ``malicious-clients``, ``defense-*`` run-config keys,
:mod:`psfed_robust.flower.apps.digits_threat`) is validated before the first round; an invalid
run config ends the run with one ``ERROR`` line naming the key and the reason (it reaches the
user's terminal through ``flwr run --stream`` / ``flwr log``). Once the clients are identified
the server logs which node ids are malicious and which attack they run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from psfed_robust.flower import digits
from psfed_robust.flower.apps.digits_config import DigitsRunConfig
from psfed_robust.flower.apps.digits_threat import ThreatPlan, plan_threat
from psfed_robust.flower.metering import MeteredGrid
from psfed_robust.flower.strategy import PSFedAvg
from psfed_robust.flower.validation import ClientId

__all__ = [
    "RESULT_TAG",
    "DigitsResult",
    "InvalidRunConfig",
    "app",
    "build_strategy",
    "central_evaluate_fn",
    "run_digits",
    "validate_run",
]

RESULT_TAG = "PSFED-DIGITS-RESULT"


class InvalidRunConfig(ValueError):
    """The run config cannot run (the message names the key and the reason)."""


@dataclass
class DigitsResult:
    """What one digits run produced (the ``PSFED-DIGITS-RESULT`` JSON)."""

    strategy: str
    fraction: float
    rounds: int
    accuracy: list[float] = field(default_factory=list)  # central test accuracy after round r
    loss: list[float] = field(default_factory=list)
    train_bytes_down: int = 0  # train instructions (server -> clients), all rounds
    train_bytes_up: int = 0  # train replies
    eval_bytes_down: int = 0
    eval_bytes_up: int = 0
    initial_accuracy: float = 0.0
    num_parameters: int = 0
    num_nodes_seen: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)  # PSFedAvg per-round metrics
    threat: str = ""  # ThreatPlan.describe()
    attack: str = ""  # attack name ("" = none)
    attack_side: str = ""  # "client" or "server"
    malicious_clients: list[int | str] = field(default_factory=list)
    malicious_nodes: dict[str, int | str] = field(default_factory=dict)  # node id -> client id
    adversary_rows: list[int] = field(default_factory=list)  # server adversary: rows per round

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else self.initial_accuracy

    @property
    def train_bytes(self) -> int:
        return self.train_bytes_down + self.train_bytes_up


def build_strategy(
    cfg: DigitsRunConfig, model: Any, plan: ThreatPlan | None = None
) -> tuple[Strategy, ArrayRecord]:
    """The configured strategy and its initial ArrayRecord for ``model``."""
    if cfg.strategy == "fedavg":
        if plan is not None and (plan.attack is not None or plan.defense != "mean"
                                 or plan.defense_pre):
            raise InvalidRunConfig(
                "run config strategy=\"fedavg\" is Flower's plain FedAvg: attacks and "
                "defenses other than 'mean' need strategy=\"psfedavg\""
            )
        strategy: Strategy = FedAvg(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_nodes,
            min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=cfg.min_nodes,
        )
        return strategy, ArrayRecord(model.state_dict())
    return _build_psfedavg(cfg, model, plan)


class DigitsPSFedAvg(PSFedAvg):
    """PSFedAvg that logs, once per node, which identified nodes are malicious, and refuses
    listed malicious client ids that the (fully identified) federation does not have."""

    def __init__(self, *, plan: ThreatPlan | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan
        self.malicious_nodes: dict[int, ClientId] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        if self.plan is not None and self.plan.attack is not None:
            self._report_malicious(server_round, grid)
        return msgs

    def _report_malicious(self, server_round: int, grid: Grid) -> None:
        plan = self.plan
        assert plan is not None
        known = self.node_client_ids
        where = ("in the server-side adversary" if plan.side == "server"
                 else "at the client")
        for nid, cid in sorted(known.items()):
            if cid in plan.malicious and nid not in self.malicious_nodes:
                self.malicious_nodes[nid] = cid
                log(INFO, "psfed-digits malicious node %d (client id %r): attack %r %s %s",
                    nid, cid, plan.attack, plan.attack_params, where)
        if server_round == 1 and len(known) >= len(list(grid.get_node_ids())):
            missing = [c for c in plan.malicious if c not in set(known.values())]
            if missing:
                raise InvalidRunConfig(
                    f"run config 'malicious-clients': client ids {missing} are not in this "
                    f"federation; its client ids are {sorted(known.values(), key=str)} (the "
                    "nodes' partition-id, or client-id in their node config)"
                )


def _build_psfedavg(
    cfg: DigitsRunConfig, model: Any, plan: ThreatPlan | None
) -> tuple[Strategy, ArrayRecord]:
    from psfed_robust.flower.settings import AggregationSettings, MaskSettings, ProtocolSettings
    from psfed_robust.flower.strategy import arrays_from_model

    attacked = plan is not None and plan.attack is not None
    strategy = DigitsPSFedAvg(
        plan=plan,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
        sample_seed=cfg.seed,
        masks=MaskSettings(fraction=cfg.fraction, strategy=cfg.selector, seed=cfg.seed),
        aggregation=AggregationSettings(
            rule=plan.aggregator if plan is not None else cfg.defense_name,
            mode="reporters" if cfg.aggregation_mode == "reporters" else "fill"),
        threat=plan.threat_settings() if plan is not None else None,
        # attacks need stable client ids before the first round (and the log of who attacks)
        protocol=ProtocolSettings(initial_sync=cfg.initial_sync,
                                  identify_clients=True if attacked else None),
    )
    return strategy, arrays_from_model(model)


def validate_run(cfg: DigitsRunConfig, grid: Grid) -> ThreatPlan:
    """The run's validated threat model; raises :class:`InvalidRunConfig` with the reason.

    The federation size is the larger of ``min-nodes`` (the strategy waits for that many) and
    the nodes connected now (simulation registers them all before the ServerApp starts).
    """
    num_nodes = max(cfg.min_nodes, len(list(grid.get_node_ids())))
    try:
        return plan_threat(cfg, num_nodes)
    except InvalidRunConfig:
        raise
    except ValueError as e:
        raise InvalidRunConfig(str(e)) from None


def central_evaluate_fn(cfg: DigitsRunConfig) -> Any:
    """``evaluate_fn(round, arrays)``: the global model's loss/accuracy on the test set.

    Both strategies keep the global model as a per-tensor ArrayRecord keyed like the model's
    ``state_dict`` (PSFedAvg: ``arrays_from_model`` order), so one loader serves both.
    """
    split = digits.load_split(cfg.test_size, cfg.seed)
    model = digits.make_model(cfg.hidden, cfg.seed)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = digits.evaluate(model, split.x_test, split.y_test)
        return MetricRecord({"accuracy": acc, "loss": loss})

    return evaluate


def run_digits(grid: Grid, run_config: Mapping[str, Any]) -> DigitsResult:
    """Run the configured digits training on ``grid``; return what it measured."""
    try:
        cfg = DigitsRunConfig.from_run_config(run_config)
    except ValueError as e:
        raise InvalidRunConfig(str(e)) from None
    plan = validate_run(cfg, grid)
    log(INFO, "psfed-digits threat model: %s", plan.describe())
    t0 = time.perf_counter()
    model = digits.make_model(cfg.hidden, cfg.seed)
    num_params = sum(p.numel() for p in model.parameters())
    strategy, initial = build_strategy(cfg, model, plan)
    metered = MeteredGrid(grid)
    eval_fn = central_evaluate_fn(cfg)
    last = {"down": 0, "up": 0}
    res = DigitsResult(
        strategy=cfg.strategy,
        fraction=cfg.fraction if cfg.strategy != "fedavg" else 1.0,
        rounds=cfg.num_server_rounds,
        num_parameters=num_params,
        threat=plan.describe(),
        attack=plan.attack or "",
        attack_side=plan.side or "",
        malicious_clients=list(plan.malicious),
    )

    def logged_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        m = eval_fn(server_round, arrays)
        acc, loss = float(m["accuracy"]), float(m["loss"])  # type: ignore[arg-type]
        if server_round == 0:
            res.initial_accuracy = acc
        else:
            res.accuracy.append(acc)
            res.loss.append(loss)
            now = metered.totals()
            log(
                INFO,
                "psfed-digits round=%d accuracy=%.4f loss=%.4f bytes_down=%d bytes_up=%d",
                server_round,
                acc,
                loss,
                now["down"] - last["down"],
                now["up"] - last["up"],
            )
            last.update(now)
        return m

    strategy.start(
        grid=metered,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({}),
        evaluate_fn=logged_eval,
    )
    train = metered.totals("train")
    ev = metered.totals("evaluate")
    res.train_bytes_down, res.train_bytes_up = train["down"], train["up"]
    res.eval_bytes_down, res.eval_bytes_up = ev["down"], ev["up"]
    res.num_nodes_seen = len(list(grid.get_node_ids()))
    res.history = [dict(h) for h in getattr(strategy, "history", [])]
    if isinstance(strategy, DigitsPSFedAvg):
        res.malicious_nodes = {str(n): c for n, c in strategy.malicious_nodes.items()}
        unseen = [c for c in plan.malicious if c not in strategy.malicious_nodes.values()]
        if unseen:
            log(WARNING, "psfed-digits malicious client ids %s never took part (not sampled "
                "or not in the federation)", unseen)
    if plan.adversary is not None:
        res.adversary_rows = list(plan.adversary.attacked_rows)
    res.seconds = time.perf_counter() - t0
    return res


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: train, then log ``PSFED-DIGITS-RESULT {json}``.

    An invalid run config is logged as one ERROR line and re-raised, so the run ends as failed
    and the reason shows in ``flwr run --stream`` / ``flwr log <run-id>``."""
    try:
        res = run_digits(grid, context.run_config)
    except InvalidRunConfig as e:
        log(ERROR, "psfed-digits: invalid run config: %s", e)
        raise
    out = asdict(res)
    out["final_accuracy"] = res.final_accuracy
    log(INFO, "%s %s", RESULT_TAG, json.dumps(out, sort_keys=True))
