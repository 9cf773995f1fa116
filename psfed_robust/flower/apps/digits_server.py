"""ServerApp of the digits Flower App.

``[tool.flwr.app.components] serverapp = "psfed_robust.flower.apps.digits_server:app"``.

It trains the 2-layer digits MLP with ``strategy = "psfedavg"`` (partial sharing,
:class:`psfed_robust.flower.strategy.PSFedAvg`) or ``strategy = "fedavg"`` (Flower's own
:class:`flwr.serverapp.strategy.FedAvg`, the baseline), evaluates the global model centrally on
the fixed digits test set after every round, and counts the bytes of every message through a
:class:`~psfed_robust.flower.metering.MeteredGrid`. It logs one line per round and, at the
end, one machine-readable line ``PSFED-DIGITS-RESULT {json}`` (tests and the docs parse it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Strategy

from psfed_robust.flower import digits
from psfed_robust.flower.apps.digits_config import DigitsRunConfig
from psfed_robust.flower.metering import MeteredGrid

__all__ = [
    "RESULT_TAG",
    "DigitsResult",
    "app",
    "build_strategy",
    "central_evaluate_fn",
    "run_digits",
]

RESULT_TAG = "PSFED-DIGITS-RESULT"


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

    @property
    def final_accuracy(self) -> float:
        return self.accuracy[-1] if self.accuracy else self.initial_accuracy

    @property
    def train_bytes(self) -> int:
        return self.train_bytes_down + self.train_bytes_up


def build_strategy(cfg: DigitsRunConfig, model: Any) -> tuple[Strategy, ArrayRecord]:
    """The configured strategy and its initial ArrayRecord for ``model``."""
    if cfg.strategy == "fedavg":
        strategy: Strategy = FedAvg(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_nodes,
            min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
            min_available_nodes=cfg.min_nodes,
        )
        return strategy, ArrayRecord(model.state_dict())
    return _build_psfedavg(cfg, model)


def _build_psfedavg(cfg: DigitsRunConfig, model: Any) -> tuple[Strategy, ArrayRecord]:
    from psfed_robust.flower.settings import AggregationSettings, MaskSettings, ProtocolSettings
    from psfed_robust.flower.strategy import PSFedAvg, arrays_from_model

    strategy = PSFedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
        sample_seed=cfg.seed,
        masks=MaskSettings(fraction=cfg.fraction, strategy=cfg.selector, seed=cfg.seed),
        aggregation=AggregationSettings(
            rule=cfg.aggregator,
            mode="reporters" if cfg.aggregation_mode == "reporters" else "fill"),
        protocol=ProtocolSettings(initial_sync=cfg.initial_sync),
    )
    return strategy, arrays_from_model(model)


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
    cfg = DigitsRunConfig.from_run_config(run_config)
    t0 = time.perf_counter()
    model = digits.make_model(cfg.hidden, cfg.seed)
    num_params = sum(p.numel() for p in model.parameters())
    strategy, initial = build_strategy(cfg, model)
    metered = MeteredGrid(grid)
    eval_fn = central_evaluate_fn(cfg)
    last = {"down": 0, "up": 0}
    res = DigitsResult(
        strategy=cfg.strategy,
        fraction=cfg.fraction if cfg.strategy != "fedavg" else 1.0,
        rounds=cfg.num_server_rounds,
        num_parameters=num_params,
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
    res.seconds = time.perf_counter() - t0
    return res


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: train, then log ``PSFED-DIGITS-RESULT {json}``."""
    res = run_digits(grid, context.run_config)
    out = asdict(res)
    out["final_accuracy"] = res.final_accuracy
    log(INFO, "%s %s", RESULT_TAG, json.dumps(out, sort_keys=True))
