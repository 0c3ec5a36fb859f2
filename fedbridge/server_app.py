"""fedbridge ServerApp: run config -> the method's strategy -> run record on disk. The same app serves simulation and
deployment; a ServerApp of your own composes the strategies itself (``fedbridge.strategies``, docs/strategies.md)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge.config import ExperimentConfig
from fedbridge.strategies import strategy_for
from fedbridge.strategies.base import run_experiment

__all__ = ["app", "run_experiment"]  # run_experiment: one run without a strategy object (the CLI, the tests)
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = ExperimentConfig.from_run_config(context.run_config)
    strategy_for(cfg.method)(experiment=cfg).start(grid=grid)
