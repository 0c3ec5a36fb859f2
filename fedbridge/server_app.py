"""fedbridge ServerApp: run config -> method -> run record on disk. The same app serves simulation and deployment."""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import FedbridgeError
from fedbridge.faults import FaultConfig
from fedbridge.results import RunRecord
from fedbridge.strategies import get_method
from fedbridge.strategies.base import MeteredGrid, Session, default_run_name, server_task

log = logging.getLogger(__name__)
app = ServerApp()


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> RunRecord:
    """Run one method end to end and write its record, also when it fails (then re-raise)."""
    method = get_method(cfg.method)(cfg)
    record = RunRecord(run_name=default_run_name(cfg), method=cfg.method, seed=cfg.seed, config=cfg.to_run_config())
    if method.note:
        record.notes.append(method.note)
    faults = from_flat(FaultConfig, cfg.method_options, "faults")
    if faults.active:
        record.notes.append(faults.describe())
    t0 = time.perf_counter()
    try:
        task, global_test = server_task(cfg)
        session = Session(MeteredGrid(grid, record), cfg, record, task, global_test)
        with session.phase("discover"):
            session.discover()
        method.run(session)
        record.status = "ok"
    except BaseException as err:
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        log.error("Run %s failed: %s", record.run_name, record.error,
                  exc_info=not isinstance(err, FedbridgeError))  # input errors need no traceback
        raise
    finally:
        record.wall_seconds = time.perf_counter() - t0
        path = record.write(cfg.results_dir)
        log.info("Run record: %s", path)
    return record


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_experiment(grid, ExperimentConfig.from_run_config(context.run_config))
