"""fedbridge ServerApp: run config -> method -> run record on disk. The same app serves simulation and deployment."""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge.checkpoint import Checkpoint
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import FedbridgeError
from fedbridge.faults import FaultConfig
from fedbridge.methods.base import MeteredGrid, Session, default_run_name, label_non_private, server_task
from fedbridge.methods.registry import get_method
from fedbridge.results import RunRecord

log = logging.getLogger(__name__)
app = ServerApp()


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> RunRecord:
    """Run one method end to end and write its record, also when it fails (then re-raise).

    The run's checkpoint is kept while it runs and after a failure, and removed once the ``ok`` record is written;
    ``resume=true`` continues a failed run of the same name from it.
    """
    method = get_method(cfg.method)(cfg)
    record = RunRecord(run_name=default_run_name(cfg), method=cfg.method, seed=cfg.seed, config=cfg.to_run_config())
    if method.note:
        record.notes.append(method.note)
    faults = from_flat(FaultConfig, cfg.method_options, "faults")
    if faults.active:
        record.notes.append(faults.describe())
    t0, checkpoint = time.perf_counter(), None
    try:
        task, global_test = server_task(cfg)
        checkpoint = Checkpoint.for_run(cfg, record)
        session = Session(MeteredGrid(grid, record), cfg, record, task, global_test, checkpoint,
                          started=time.monotonic() - checkpoint.prior_elapsed)  # timelines go on where they stopped
        with session.phase("discover"):
            session.discover()
        method.run(session)
        label_non_private(record, method.non_private())
        record.status = "ok"
    except BaseException as err:
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        log.error("Run %s failed: %s", record.run_name, record.error,
                  exc_info=not isinstance(err, FedbridgeError))  # input errors need no traceback
        if checkpoint is not None and checkpoint.steps():
            record.notes.append(f"{len(checkpoint.steps())} completed steps are checkpointed in "
                                f"{checkpoint.directory}: rerun with resume=true run-name={record.run_name} to "
                                "continue from them")
        raise
    finally:
        record.wall_seconds = time.perf_counter() - t0 + (checkpoint.prior_elapsed if checkpoint else 0.0)
        path = record.write(cfg.results_dir)
        log.info("Run record: %s", path)
    checkpoint.remove()
    return record


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_experiment(grid, ExperimentConfig.from_run_config(context.run_config))
