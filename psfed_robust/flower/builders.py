"""``make_server_app``: a ready ServerApp running a :class:`PSFedAvg` (Message API only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result

from psfed_robust.flower.strategy import PSFedAvg

__all__ = ["make_server_app"]


def make_server_app(
    strategy_fn: Callable[[Context], PSFedAvg],
    initial_arrays_fn: Callable[[Context], ArrayRecord],
    *,
    num_rounds: int | None = None,
    timeout: float = 3600.0,
    train_config_fn: Callable[[Context], ConfigRecord] | None = None,
    evaluate_config_fn: Callable[[Context], ConfigRecord] | None = None,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    result_fn: Callable[[Result, Context, PSFedAvg], Any] | None = None,
) -> ServerApp:
    """A ServerApp whose ``main`` builds a fresh strategy per run and calls ``strategy.start``.

    ``num_rounds`` defaults to ``run_config["num-server-rounds"]`` (else 3). ``result_fn`` gets
    the :class:`flwr.serverapp.strategy.Result`, the Context and the strategy (e.g. to save the
    model or ``strategy.history``).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = strategy_fn(context)
        rounds = num_rounds
        if rounds is None:
            v = context.run_config.get("num-server-rounds", 3)
            rounds = int(v) if isinstance(v, int | float | str) else 3
        result = strategy.start(
            grid,
            initial_arrays_fn(context),
            num_rounds=rounds,
            timeout=timeout,
            train_config=train_config_fn(context) if train_config_fn else None,
            evaluate_config=evaluate_config_fn(context) if evaluate_config_fn else None,
            evaluate_fn=evaluate_fn,
        )
        if result_fn is not None:
            result_fn(result, context, strategy)

    return app
