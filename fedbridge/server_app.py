"""fedbridge ServerApp: run config -> the method's strategy -> run record on disk. The same app serves simulation and
deployment; a ServerApp of your own composes the strategies itself (``fedbridge.strategies``, docs/strategies.md)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge.config import ExperimentConfig
from fedbridge.errors import FedbridgeError
from fedbridge.strategies import strategy_for
from fedbridge.strategies.base import run_experiment

__all__ = ["app", "run_experiment"]  # run_experiment: one run without a strategy object (the CLI, the tests)
app = ServerApp()


class OneLineErrors(logging.Filter):
    """Flower logs whatever a ServerApp raises with its traceback. A fedbridge error already names the problem and
    the fix (a bad config, every silo refusing), and its traceback only shows fedbridge's internals to an operator:
    keep Flower's line, add the reason, drop the traceback. A bug (any other exception) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, FedbridgeError):
            record.msg, record.args, record.exc_info = f"{record.getMessage()}: {error}", (), None
        return True


logging.getLogger("flwr").addFilter(OneLineErrors())  # Flower's logger: every flwr module logs through it


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = ExperimentConfig.from_run_config(context.run_config)
    strategy_for(cfg.method)(experiment=cfg).start(grid=grid)
