"""Two fedbridge methods, one after the other, their options set in Python: first each silo's SLM on its own data
alone (``Local``, the baseline), then Private Evolution at ε = 4 per silo (the server's LLM writes candidates, the
silos' DP votes choose and label them, and every silo trains on the result). Each run writes its record to
``results-dir``; the log ends with the macro-F1 the transfer gained."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedbridge.config import ExperimentConfig
from fedbridge.methods.pe.config import PEConfig
from fedbridge.strategies import Local, PrivateEvolution

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The silos read their data, models and seed from the run config: both strategies start from it, and change
    # in Python only what the server alone reads (a change to the silos' settings fails, naming the key).
    experiment = ExperimentConfig.from_run_config(context.run_config)
    baseline = Local(experiment=experiment)
    baseline.start(grid=grid)
    options = PEConfig(epsilon=4.0, iterations=1, candidates_per_label=16, num_per_label=8, max_new_tokens=32)
    pe = PrivateEvolution(experiment=experiment, config=options)
    result = pe.start(grid=grid)  # Flower's Result: the global test set's metrics, at the run's last round
    [metrics] = result.evaluate_metrics_serverapp.values()
    gain = metrics["macro_f1"] - baseline.record.global_metrics["macro_f1"]
    logging.getLogger("flwr").info(  # Flower's own logger: the line shows among the ServerApp's
        "Private Evolution at ε = %g per silo: macro-F1 %.1f, %+.1f points over local (records in %s)",
        options.epsilon, 100 * metrics["macro_f1"], 100 * gain, experiment.results_dir)
