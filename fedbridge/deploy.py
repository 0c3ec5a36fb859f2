"""fedbridge on a real Flower deployment: one SuperLink and N SuperNodes, with TLS and SuperNode authentication.

On separate hosts an operator runs the scripts in ``deploy/`` (see docs/deployment.md). ``LoopbackDeployment``
runs the very same scripts on one machine, every process with its own Flower home as if on its own host: for the
integration test, the overhead benchmark and ``fedbridge deploy loopback``. It owns every process it starts,
including the SuperExec, ServerApp and ClientApp processes Flower spawns below them, and leaves none behind.

Flower 1.41 keeps SuperLink connections in ``$FLWR_HOME/config.toml`` (``flwr run . <connection>``), not in
pyproject.toml; ``write_connection`` adds one (on the command line: ``fedbridge deploy connection``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

from fedbridge.config import ExperimentConfig
from fedbridge.privacy.policy import POLICIES
from fedbridge.results import RunRecord
from fedbridge.simulations.runner import (  # noqa: F401 (DeploymentError, free_port, write_connection: re-exported)
    DeploymentError,
    _toml_value,
    app_dir,
    flwr_env,
    free_port,
    run_flwr,
    write_connection,
)

CONNECTION = "fedbridge-loopback"
SIGTERM_GRACE_SECONDS = 20.0  # a SuperNode deactivates itself at the SuperLink on SIGTERM; that takes a few seconds
GONE = (ProcessLookupError, psutil.NoSuchProcess)  # a process that exited meanwhile


def scripts_dir() -> Path:
    return app_dir() / "deploy"


def node_config_arg(node_config: Mapping[str, bool | int | float | str]) -> str:
    """The value of ``flower-supernode --node-config``: space-separated ``key=value`` pairs, values in TOML.

    Flower splits the pairs with a regex that knows no escapes: a string goes in single quotes (a TOML literal
    string, so backslashes stay as they are), or in double quotes if it holds a single quote, never both.
    """
    def value(v: bool | int | float | str) -> str:
        if not isinstance(v, str):
            return _toml_value(v)
        if "'" not in v and "\n" not in v:
            return f"'{v}'"
        if '"' not in v and "\n" not in v:
            return json.dumps(v)
        raise DeploymentError(f"Node config value {v!r} has both quote characters (or a newline), which "
                              "flower-supernode --node-config cannot carry; use a TOML file for --node-config.")

    return " ".join(f"{key}={value(v)}" for key, v in node_config.items())


def processes_naming(markers: list[str]) -> list[psutil.Process]:
    """Live processes (not this one or its parents) whose command line names one of ``markers``: a deployment's
    ports or directory, so that a test or a teardown finds what it left behind."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = " ".join(p.info["cmdline"] or ())
        if p.pid not in mine and p.info["status"] != psutil.STATUS_ZOMBIE and any(m in cmdline for m in markers):
            found.append(p)
    return found


class LoopbackDeployment:
    """A SuperLink (TLS, SuperNode authentication) and one registered SuperNode per node config, on 127.0.0.1.

    ``workdir`` gets ``certs/``, ``keys/``, ``logs/`` and one Flower home per "host" (``hosts/superlink``,
    ``hosts/operator`` for the ``flwr`` CLI, ``hosts/silo-<k>``). Use as a context manager; ``close()`` stops
    everything, and ``leftovers()`` lists any process of this deployment still alive (none, after ``close()``).
    ``tls=False`` runs the same federation in plaintext without authentication: only to measure what TLS costs.
    """

    def __init__(self, workdir: Path, node_configs: Sequence[Mapping[str, bool | int | float | str]],
                 start_timeout: float = 120.0, tls: bool = True) -> None:
        self.workdir = Path(workdir).resolve()
        self.node_configs = [dict(nc) for nc in node_configs]
        self.start_timeout, self.tls = start_timeout, tls
        self.port = free_port()
        self.node_ports = [free_port() for _ in self.node_configs]
        self.certs, self.keys, self.logs = (self.workdir / d for d in ("certs", "keys", "logs"))
        self.processes: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------ setup

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def home(self, host: str) -> Path:
        return self.workdir / "hosts" / host

    def env(self, host: str) -> dict[str, str]:
        return {**flwr_env(), "FLWR_HOME": str(self.home(host))}

    def start(self) -> LoopbackDeployment:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.script("make_certs.sh", str(self.certs))
            self.script("make_supernode_keys.sh", str(self.keys), *self.silo_names)
        write_connection(self.home("operator"), CONNECTION, self.address,
                         self.certs / "ca.crt" if self.tls else None, insecure=not self.tls)
        self.start_superlink()
        if self.tls:
            self.script("register_supernodes.sh", CONNECTION,
                        *(str(self.keys / f"{n}.pub") for n in self.silo_names))
        for i in range(len(self.node_configs)):
            self.start_supernode(i)
        self.wait_online(len(self.node_configs))
        return self

    @property
    def silo_names(self) -> list[str]:
        return [f"silo-{i}" for i in range(len(self.node_configs))]

    def script(self, name: str, *args: str, host: str = "operator") -> str:
        done = subprocess.run([str(scripts_dir() / name), *args], env=self.env(host), capture_output=True, text=True)
        if done.returncode != 0:
            raise DeploymentError(f"deploy/{name} failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
        return done.stdout

    def spawn(self, name: str, cmd: list[str], host: str) -> subprocess.Popen:
        """Start a process in its own session (so its process group is everything it spawns in it), logging to
        ``logs/<name>.log``."""
        self.home(host).mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(host),
                                    cwd=self.home(host), start_new_session=True)
        self.processes[name] = proc
        return proc

    def start_superlink(self) -> None:
        state, where = str(self.home("superlink") / "state.db"), ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.tls:
            cmd = [str(scripts_dir() / "start_superlink.sh"), str(self.certs), state, *where]
        else:
            cmd = ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--database", state,
                   *where]
        self.spawn("superlink", cmd, host="superlink")
        deadline = time.monotonic() + self.start_timeout
        while not self._accepts_connections():
            if self.processes["superlink"].poll() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"The SuperLink did not come up: {self.log('superlink')[-2000:]}")
            time.sleep(0.3)

    def _accepts_connections(self) -> bool:
        """The SuperLink's port completes a TCP (and with TLS, a verified TLS) handshake."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
                    context.wrap_socket(sock, server_hostname="127.0.0.1").close()
                return True
        except OSError:
            return False

    def start_supernode(self, i: int, key: Path | None = None, name: str | None = None,
                        extra_args: Sequence[str] = ()) -> subprocess.Popen:
        """SuperNode ``i`` (again, after a kill), or with another ``key`` (e.g. an unregistered one) under ``name``."""
        name = name or self.silo_names[i]
        node_config = node_config_arg(self.node_configs[i])
        if self.tls:
            cmd = [str(scripts_dir() / "start_supernode.sh"), self.address, str(self.certs / "ca.crt"),
                   str(key or self.keys / self.silo_names[i]), node_config]
        else:
            cmd = ["flower-supernode", "--insecure", "--superlink", self.address, "--node-config", node_config]
        port = self.node_ports[i] if name == self.silo_names[i] else free_port()
        return self.spawn(name, [*cmd, "--port", str(port), *extra_args], host=name)

    def restart_supernode(self, i: int, timeout: float = 180.0, retry_every: float = 5.0) -> None:
        """Bring silo ``i``'s SuperNode back after it died, as a supervisor (systemd ``Restart=on-failure``) would.

        After an unclean death the SuperLink still counts the node online until two heartbeats are missed (up to
        60 s): it refuses the new session ("Failed to activate SuperNode", exit code 305), and we try again.
        """
        name, deadline = self.silo_names[i], time.monotonic() + timeout
        while time.monotonic() < deadline:
            sessions = self.log(name).count("SuperNode ID:")  # logged once the SuperLink has activated it
            proc = self.start_supernode(i)
            while proc.poll() is None and self.log(name).count("SuperNode ID:") == sessions:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            if proc.poll() is None and self.log(name).count("SuperNode ID:") > sessions:
                return
            self.kill(name)
            time.sleep(retry_every)
        raise DeploymentError(f"{name} could not rejoin within {timeout:.0f} s: {self.log(name)[-1500:]}")

    # ------------------------------------------------------------ operations

    def flwr(self, *args: str, host: str = "operator") -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args],
                              env=self.env(host), capture_output=True, text=True)

    def nodes(self) -> list[dict]:
        """The SuperLink's SuperNodes (``flwr supernode list``): node-id, status (registered/online/offline), ..."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        try:
            return json.loads(done.stdout)["nodes"]
        except (ValueError, KeyError) as err:
            raise DeploymentError(f"flwr supernode list failed: {done.stdout[-1000:]} {done.stderr[-1000:]}") from err

    def wait_online(self, n: int, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while sum(node["status"] == "online" for node in self.nodes()) < n:
            crashed = [s for s in self.silo_names if s in self.processes and self.processes[s].poll() is not None]
            if crashed or time.monotonic() > deadline:
                raise DeploymentError(f"Only some SuperNodes came online (exited: {crashed or 'none'}). "
                                      f"Logs: {self.logs}")
            time.sleep(1.0)

    def run(self, cfg: ExperimentConfig, quiet: bool = True) -> RunRecord:
        """``flwr run <app> fedbridge-loopback --stream``; the record's checks as in ``runner.run_flwr``."""
        return run_flwr(cfg, CONNECTION, env=self.env("operator"), quiet=quiet)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, *names: str, sig: signal.Signals = signal.SIGKILL, timeout: float = SIGTERM_GRACE_SECONDS) -> None:
        """Signal processes and everything they spawned (SuperExec, ServerApp, ClientApps), and wait until all are
        gone; whatever outlives ``timeout`` is killed."""
        family: list[psutil.Process] = []
        for name in names:
            proc = self.processes.pop(name)
            if proc.poll() is not None:
                continue
            members = _family(proc.pid)
            family += members
            with contextlib.suppress(*GONE):
                os.killpg(proc.pid, sig)
            for p in members:  # spawned into a session of its own (the SuperLink's SuperExec): not in the group
                with contextlib.suppress(*GONE):
                    if os.getpgid(p.pid) != proc.pid:
                        p.send_signal(sig)
        _, alive = psutil.wait_procs(family, timeout=timeout)
        _kill_and_wait(alive)

    def close(self) -> None:
        """Stop the SuperNodes (each deactivates itself at the SuperLink), then the SuperLink, then anything left."""
        self.kill(*(n for n in self.processes if n != "superlink"), sig=signal.SIGTERM)
        self.kill(*self.processes, sig=signal.SIGTERM)
        _kill_and_wait(self.leftovers())

    def leftovers(self) -> list[psutil.Process]:
        """Live processes of this deployment: any whose command line names its ports or its work dir."""
        return processes_naming([f"127.0.0.1:{port}" for port in (self.port, *self.node_ports)] + [str(self.workdir)])

    def __enter__(self) -> LoopbackDeployment:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _family(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_and_wait(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(*GONE):
            p.kill()
    psutil.wait_procs(procs, timeout=5)


def silo_node_configs(data_paths: Sequence[str | Path], text_column: str = "", label_column: str = "",
                      privacy: str = "strict") -> list[dict]:
    """One SuperNode node config per silo data file (``partition-id`` = its position), with the silos' privacy
    policy (``fedbridge.privacy.policy``; strict: DP releases only, within a lifetime epsilon-budget of 8)."""
    if privacy not in POLICIES:
        raise DeploymentError(f"Silo privacy policy '{privacy}': use one of {', '.join(POLICIES)}.")
    configs = []
    for i, path in enumerate(data_paths):
        if not Path(path).is_file():
            raise DeploymentError(f"Silo data file '{path}' does not exist.")
        nc: dict[str, int | str] = {"partition-id": i, "data-path": str(Path(path).resolve()), "privacy": privacy}
        nc |= {"text-column": text_column} if text_column else {}
        nc |= {"label-column": label_column} if label_column else {}
        configs.append(nc)
    return configs


def partition_node_configs(num_silos: int) -> list[dict]:
    """SuperNodes that take partitions of the configured task, as simulated silos do (same data, same split)."""
    return [{"partition-id": i, "num-partitions": num_silos} for i in range(num_silos)]


def run_loopback(cfg: ExperimentConfig, node_configs: Sequence[Mapping[str, bool | int | float | str]],
                 workdir: Path | None = None, quiet: bool = False) -> RunRecord:
    """Bring a LoopbackDeployment up, run ``cfg`` on it, tear it down. The record goes to ``cfg.results_dir``."""
    with tempfile.TemporaryDirectory(prefix="fedbridge-deploy-") as tmp, \
            LoopbackDeployment(workdir or Path(tmp), node_configs) as deployment:
        return deployment.run(cfg, quiet=quiet)

