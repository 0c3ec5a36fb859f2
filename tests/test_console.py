"""The console of ``fedbridge run`` and ``compare``: a line per run, the detail in the run's log file."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from conftest import TINY, tiny_config
from typer.testing import CliRunner

from fedbridge.results import RunRecord
from fedbridge.simulations.cli import cli
from fedbridge.simulations.console import RunConsole, own_code
from fedbridge.simulations.runner import RunFailed

runner = CliRunner()
ANSI = re.compile(r"\x1b\[")
TQDM = re.compile(r"\d+%\||step/s|it/s")


def tiny_sets() -> list[str]:
    return [arg for key, value in {**TINY, "task.max-examples": 60}.items() for arg in ("--set", f"{key}={value}")]


def test_a_piped_compare_prints_a_line_as_each_run_starts_and_ends_then_the_table(tmp_path, one_thread):
    out = tmp_path / "cmp"
    result = runner.invoke(cli, ["compare", "--methods", "local,fedavg", "--engine", "inprocess", "--out", str(out),
                                 *tiny_sets()], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert not ANSI.search(result.output) and not TQDM.search(result.output), result.output
    lines = result.output.splitlines()
    runs = lines[:lines.index(next(line for line in lines if "fedbridge comparison" in line))]
    assert [line.split(":")[0] for line in runs] == ["[1/2] local seed 0"] * 2 + ["[2/2] fedavg seed 0"] * 2, runs
    assert runs[0] == f"[1/2] local seed 0: started (inprocess), log: {out}/runs/local-drug-reviews-s0.log"
    assert re.fullmatch(r"\[2/2\] fedavg seed 0: ok, \d+ s, macro-F1 \d+\.\d", runs[3]), runs[3]
    assert lines[-1].startswith("table: ") and len(lines) < 20  # the table's few rows, then where it went
    record = RunRecord.read(out / "runs" / "fedavg-drug-reviews-s0.json")
    log = Path(record.artifacts["log"])
    assert log == (out / "runs" / "fedavg-drug-reviews-s0.log").resolve()
    detail = log.read_text()
    assert "silo-0 train: 100%|" in detail  # the silos' progress bars, one update a line
    assert "INFO flwr: aggregate_train: Received 2 results" in detail  # Flower's log
    assert not ANSI.search(detail)


def test_verbose_streams_the_run_s_output_as_well(tmp_path, one_thread):
    result = runner.invoke(cli, ["run", "--method", "fedavg", "--engine", "inprocess", "--results-dir", str(tmp_path),
                                 "--verbose", *tiny_sets()], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert TQDM.search(result.output) and "silo-0 train" in result.output
    [log] = tmp_path.glob("*.log")
    assert f"log: {log}" in result.output and "silo-0 train: 100%|" in log.read_text()
    assert RunRecord.read(log.with_suffix(".json")).artifacts["log"] == str(log.resolve())


# A simulation's output as `flwr run --stream` relays it: Flower's console and the root logger twice over, Ray's
# actor prefix, a library's Python warning, and fedbridge's own warning through the root logger only.
SIMULATION = """\x1b[92mINFO \x1b[0m:      Starting Flower Simulation
\x1b[93mWARNING \x1b[0m:   fraction_evaluate is set to 0.0. Federated evaluation will be skipped.
12/07/2026 21:08:58:WARNING:fraction_evaluate is set to 0.0. Federated evaluation will be skipped.
/venv/lib/python3.11/site-packages/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray
  warnings.warn(
\x1b[92mINFO \x1b[0m:      [ROUND 1/2]
\x1b[36m(ClientAppActor pid=17758)\x1b[0m 
silo-0 train:   0%|          | 0/10 [00:00<?, ?step/s]
silo-0 train: 100%|██████████| 10/10 [00:00<00:00, 1373.43step/s]
\x1b[36m(ClientAppActor pid=17757)\x1b[0m silo-1 train:  40%|████      | 4/10 [00:00<00:00, 1195.30step/s]
12/07/2026 21:11:45:WARNING:silo-1 failed train (round 1): no reply within 120 s
12/07/2026 21:11:45:WARNING:silo-1 failed train (round 1): no reply within 120 s
/root/.flwr/apps/fedbridge.0.1.0/fedbridge/methods/fdkt/server.py:9: UserWarning: few examples
  warnings.warn(
"""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_line_shows_phase_and_silos_done_and_only_warnings_that_matter(tmp_path):
    out, err = Terminal(), io.StringIO()
    console = RunConsole(out=out, err=err)
    cfg = tiny_config(tmp_path, run_name="sim")
    with console.run(cfg, "[1/1] fedavg seed 0", "simulation") as log:
        print(SIMULATION, end="")  # as runner._stream relays flwr run's output
        assert console._current.line().startswith("[1/1] fedavg seed 0: train, silos 1/2 done, ")
        RunRecord(run_name="sim", method="fedavg", seed=0, config={}, status="ok",
                  global_metrics={"macro_f1": 0.5}).write(tmp_path)
    assert "\r\x1b[K[1/1] fedavg seed 0: " in out.getvalue()
    assert re.search(r"\r\x1b\[K\[1/1\] fedavg seed 0: ok, \d+ s, macro-F1 50\.0\n$", out.getvalue())
    assert err.getvalue().splitlines() == ["warning: silo-1 failed train (round 1): no reply within 120 s",
                                           "warning: UserWarning: few examples"]
    assert not ANSI.search(log.read_text()) and "FutureWarning" in log.read_text()
    assert RunRecord.read(tmp_path / "sim.json").artifacts["log"] == str(log.resolve())


def test_a_failed_run_names_its_log_and_fedbridge_s_log_warnings_reach_the_console_once(tmp_path):
    out, err = io.StringIO(), io.StringIO()
    console = RunConsole(out=out, err=err)
    cfg = tiny_config(tmp_path, run_name="broken")
    with pytest.raises(RunFailed), console.run(cfg, "local seed 0", "inprocess") as log:
        for _ in range(2):
            logging.getLogger("fedbridge.methods.base").warning("silo-0 failed train: boom\nTraceback (...)")
        logging.getLogger("some.library").warning("a library's own business")
        RunRecord(run_name="broken", method="local", seed=0, config={}, status="failed").write(tmp_path)
        raise RunFailed("Run broken failed")
    started, ended = out.getvalue().splitlines()
    assert started == f"local seed 0: started (inprocess), log: {log}"
    assert re.fullmatch(rf"local seed 0: FAILED after \d+ s, log: {re.escape(str(log))}", ended)
    assert err.getvalue() == "warning: silo-0 failed train: boom\n"
    detail = log.read_text()
    assert "WARNING fedbridge.methods.base: silo-0 failed train: boom" in detail and "a library's own" in detail
    assert RunRecord.read(tmp_path / "broken.json").artifacts["log"] == str(log.resolve())


def test_own_code_is_fedbridge_s_files_wherever_they_are_installed():
    assert own_code("/work/fedbridge/fedbridge/models/slm.py")
    assert own_code("/venv/lib/python3.11/site-packages/fedbridge/models/slm.py")
    assert not own_code("/home/me/fedbridge/.venv/lib/python3.11/site-packages/ray/_private/worker.py")
    assert not own_code("/venv/lib/python3.11/site-packages/opacus/accountants/analysis/rdp.py")


def test_flower_logs_a_fedbridge_error_of_the_serverapp_as_one_line(caplog):
    """An error fedbridge explained (here every silo refusing) reaches the operator's terminal without a traceback;
    a bug keeps its traceback."""
    from flwr.common.logger import log

    import fedbridge.server_app  # noqa: F401 - installs the filter on Flower's logger
    from fedbridge.errors import SiloFailure

    def raised(error: Exception) -> str:
        caplog.clear()
        try:
            raise error
        except Exception as ex:  # noqa: BLE001 - what Flower's runner does
            log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
        return caplog.text

    shown = raised(SiloFailure("No silo completed FedAvg round 1: every silo refused: silo-0 refuses SLM weights"))
    assert "ServerApp raised an exception: No silo completed FedAvg round 1: every silo refused" in shown
    assert "Traceback" not in shown
    assert "Traceback" in raised(KeyError("a bug"))
