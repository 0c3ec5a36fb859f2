"""Run one experiment: in-process (tests, quick runs) or on Flower's simulation engine via ``flwr run``.

``flwr run`` exits 0 even when the run failed, so success is decided by the run record the ServerApp writes:
it must exist and say ``status: ok``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fedbridge.config import ExperimentConfig
from fedbridge.errors import FedbridgeError
from fedbridge.methods.base import default_run_name
from fedbridge.results import RunRecord

ENGINES = ("simulation", "inprocess")
# Run in this environment: without the second variable, a local SuperLink builds a fresh env per run with
# `uv sync`, which pulls a multi-GB CUDA torch. A SuperLink started earlier without it keeps its setting.
RUN_STARTED = re.compile(r"Successfully started run (\d+)")
FLWR_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class RunFailed(FedbridgeError):
    """The run did not produce an ``ok`` record."""


class DeploymentError(FedbridgeError):
    """A deployment process did not start, or did not come up in time."""


def app_dir() -> Path:
    """The Flower app directory (this repository), which ``flwr run`` packages and runs."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise RunFailed(f"The simulation engine needs the fedbridge source tree (pyproject.toml) at {root}; "
                        "install fedbridge from a clone with 'pip install -e .', or use --engine inprocess.")
    return root


def prepare(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fix the run name and make the results dir absolute: the ServerApp may run in another directory."""
    return dataclasses.replace(cfg, run_name=default_run_name(cfg),
                               results_dir=str(Path(cfg.results_dir).expanduser().resolve()))


def run_inprocess(cfg: ExperimentConfig, workers: int = 1) -> RunRecord:
    from fedbridge.client_app import app as client_app
    from fedbridge.server_app import run_experiment
    from fedbridge.simulations.inprocess import InProcessGrid

    cfg = prepare(cfg)
    n = cfg.partition.num_silos
    grid = InProcessGrid(client_app, cfg.to_run_config(),
                         [{"partition-id": i, "num-partitions": n} for i in range(n)], workers=workers)
    try:
        return run_experiment(grid, cfg)
    finally:
        grid.close()


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def federation_config(cfg: ExperimentConfig) -> str:
    """Flower's simulation settings for ``cfg``: one SuperNode per silo, each with ``device.cpus-per-silo`` cores and
    a ``device.gpus-per-silo`` share of a GPU (Ray hides the GPUs from a silo whose share is 0)."""
    return (f"num-supernodes={cfg.partition.num_silos} client-resources-num-cpus={cfg.device.cpus_per_silo} "
            f"client-resources-num-gpus={cfg.device.gpus_per_silo:g}")


def run_simulation(cfg: ExperimentConfig, quiet: bool = False) -> RunRecord:
    """``flwr run <app> local --stream`` with one SuperNode per silo; raises ``RunFailed`` unless the record is ok.
    With ``device.ray-address``, on that Ray cluster instead, through a simulation SuperLink of the run's own."""
    extra = ["--federation-config", federation_config(cfg)]
    if not cfg.device.ray_address:
        return run_flwr(cfg, "local", extra, quiet=quiet)
    with ray_cluster_superlink(cfg.device.ray_address) as (connection, env):
        return run_flwr(cfg, connection, extra, env=env, quiet=quiet)


@contextlib.contextmanager
def ray_cluster_superlink(address: str, timeout: float = 60.0) -> Iterator[tuple[str, dict[str, str]]]:
    """A simulation SuperLink whose simulations join the running Ray cluster at ``address`` (Flower's Ray backend
    calls ``ray.init()``, which connects to ``RAY_ADDRESS``): yields the connection name and the environment
    ``flwr run`` needs to reach it. Stopped, and its Flower home removed, on exit. Every Ray node must have this
    environment and source tree at the same paths (Ray runs the silos' actors there)."""
    home, port = Path(tempfile.mkdtemp(prefix="fedbridge-ray-")), free_port()
    env = {**flwr_env(), "FLWR_HOME": str(home), "RAY_ADDRESS": address}
    write_connection(home, "ray-cluster", f"127.0.0.1:{port}", insecure=True)
    cmd = [str(Path(sys.executable).with_name("flower-superlink")), "--insecure", "--simulation",
           "--disable-runtime-dependency-installation", "--database", str(home / "state.db"),
           "--host", "127.0.0.1", "--port", str(port)]
    with (home / "superlink.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        if not wait_for_port(port, timeout, proc):
            raise DeploymentError(f"The simulation SuperLink for Ray cluster {address} did not come up: "
                                  f"{(home / 'superlink.log').read_text()[-2000:]}")
        yield "ray-cluster", env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Whether 127.0.0.1:``port`` accepts a TCP connection within ``timeout`` s (False at once if ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
        time.sleep(0.3)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None,
                     insecure: bool = False) -> Path:
    """Add the SuperLink connection ``name`` to ``flwr_home/config.toml`` (what ``flwr run . <name>`` reads)."""
    path = flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if re.search(rf"^\[superlink\.{re.escape(name)}\]", text, re.M):
        raise DeploymentError(f"{path} already defines the connection '{name}'.")
    lines = [f"\n[superlink.{name}]", f"address = {json.dumps(address)}"]
    if root_certificates is not None:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates))}")
    if insecure:
        lines.append("insecure = true")
    path.write_text(text + "\n".join(lines) + "\n")
    return path


def run_flwr(cfg: ExperimentConfig, connection: str, extra_args: list[str] | None = None,
             env: dict[str, str] | None = None, quiet: bool = False) -> RunRecord:
    """``flwr run <app> <connection> --stream`` with ``cfg`` as the run config, on the simulation engine or a
    deployed SuperLink (``env`` may set ``FLWR_HOME``, where ``flwr`` finds its connections); raises ``RunFailed``
    unless the record the ServerApp wrote is ok. A deployed ServerApp writes its record on the SuperLink's host:
    this check needs ``results-dir`` to be readable from here."""
    cfg = prepare(cfg)
    record_path = Path(cfg.results_dir) / f"{cfg.run_name}.json"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in cfg.to_run_config().items()))
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(app_dir()), connection, "--stream",
           "--run-config", f.name, *(extra_args or [])]
    try:
        returncode, output = _stream(cmd, quiet, env or flwr_env(), connection)
    finally:
        os.unlink(f.name)
    if not record_path.exists():
        tail = output[-3000:] if quiet else "Its output says why (fedbridge run and compare keep it in the run's log)."
        raise RunFailed(f"flwr run exited {returncode} without writing {record_path}: the run failed "
                        f"before the ServerApp finished. {tail}")
    record = RunRecord.read(record_path)
    if record.status != "ok":
        raise RunFailed(f"Run {cfg.run_name} failed: {record.error} (record: {record_path})")
    return record


def flwr_env() -> dict[str, str]:
    """This environment's bin dir first on PATH: `flwr` launches `flower-superlink` by name, which fails when the
    venv is used without being activated (as `make test` does)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **FLWR_ENV, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def _stream(cmd: list[str], quiet: bool, env: dict[str, str], connection: str) -> tuple[int, str]:
    """Run ``flwr run``, echoing its log; if we are interrupted, stop the Flower run too (it would go on)."""
    lines, run_id = [], None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            lines.append(line)
            if not quiet:
                sys.stdout.write(line)
            if run_id is None and (match := RUN_STARTED.search(line)):
                run_id = match.group(1)
        return proc.wait(), "".join(lines)
    except BaseException:
        proc.kill()
        if run_id:
            subprocess.run([cmd[0], "stop", run_id, connection], env=env, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        raise


def run(cfg: ExperimentConfig, engine: str = "simulation", quiet: bool = False) -> RunRecord:
    if engine == "inprocess":
        return run_inprocess(cfg)
    if engine == "simulation":
        return run_simulation(cfg, quiet=quiet)
    raise FedbridgeError(f"Unknown engine '{engine}'. Use one of: {', '.join(ENGINES)}.")
