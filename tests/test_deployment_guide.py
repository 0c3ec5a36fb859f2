"""docs/deployment.md, followed as written: its ```` ```bash guide ```` blocks, extracted in order and run as one
shell script from the repository root, on loopback, with the variables the guide itself reads
(``FEDBRIDGE_DEPLOY_DIR``, ``SUPERLINK_*``, ``SUPERNODE_PORT``, ``SILO0_DATA``/``SILO1_DATA``) pointing at a temporary
directory, free ports and two CSVs. So the guide cannot drift from what works: certificates, keys, a SuperLink with
TLS and SuperNode authentication, the ``flwr`` connection, registration, two SuperNodes each on its own file, a DP
FedAvg run (``slm.dp-epsilon``, tiny models), a refused non-DP one, and the guide's own stop commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import toy_frame

from fedbridge.deploy import free_port, processes_naming
from fedbridge.simulations.runner import app_dir

GUIDE = app_dir() / "docs" / "deployment.md"
BLOCK = re.compile(r"^```bash guide\n(.*?)^```$", re.M | re.S)
LABELS = ("negative", "neutral", "positive")  # drug-reviews', the server's task in the guide
ROWS = (24, 30)


def guide_blocks() -> list[str]:
    return BLOCK.findall(GUIDE.read_text())


def test_the_guide_runs_its_steps_in_an_order_that_works():
    """Each command comes after what it needs: the SuperLink before the connection is used, the connection before
    registering, registering before the SuperNodes, the SuperNodes before a run, a run before stopping."""
    script = "\n".join(guide_blocks())
    order = ["export PATH=", "FEDBRIDGE_DEPLOY_DIR=", "make_certs.sh", "make_supernode_keys.sh", "start_superlink.sh",
             "fedbridge deploy connection prod", "register_supernodes.sh prod", "start_supernode.sh",
             '--port "$SUPERNODE_PORT"',
             "flwr run . prod", "slm.dp-epsilon=", "kill "]
    positions = [script.find(step) for step in order]
    assert all(p >= 0 for p in positions), dict(zip(order, positions))
    assert positions == sorted(positions), dict(zip(order, positions))


def free_port_pair() -> int:
    """A port p with p + 1 free too (the guide's second SuperNode on one host takes SUPERNODE_PORT + 1)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket.socket() as s:
            s.bind(("127.0.0.1", port + 1))
            return port
    raise RuntimeError("no two adjacent free ports")


def tear_down(work: Path, markers: list[str]) -> None:
    """Whatever the guide started and did not stop (a failed step): SuperNodes first, then the SuperLink, then
    anything of the deployment left."""
    for pattern in ("silo-*.pid", "superlink.pid"):
        family = []
        for pid_file in work.glob(pattern):
            with contextlib.suppress(ValueError, psutil.NoSuchProcess):
                root = psutil.Process(int(pid_file.read_text()))
                family += [root, *root.children(recursive=True)]
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    left = processes_naming(markers)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=5)


@pytest.mark.slow
def test_the_deployment_guide_followed_as_written(tmp_path):
    work = tmp_path / "deploy"
    frame = toy_frame(sum(ROWS), labels=LABELS).rename(columns={"sentiment": "rating"})
    data = [tmp_path / f"silo-{i}.csv" for i in range(len(ROWS))]
    frame.iloc[:ROWS[0]].to_csv(data[0], index=False)
    frame.iloc[ROWS[0]:].to_csv(data[1], index=False)
    superlink_port, supernode_port = free_port(), free_port_pair()
    env = {**os.environ, "FEDBRIDGE_DEPLOY_DIR": str(work), "SUPERLINK_HOST": "127.0.0.1",
           "SUPERLINK_PORT": str(superlink_port), "SUPERLINK_LISTEN": "127.0.0.1",
           "SUPERNODE_PORT": str(supernode_port), "SILO0_DATA": str(data[0]), "SILO1_DATA": str(data[1]),
           "FLWR_HOME": str(tmp_path / "operator")}  # the operator's connection, never ~/.flwr
    script = tmp_path / "guide.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(
        f"echo '### guide block {i}'\n{block}" for i, block in enumerate(guide_blocks(), 1)))
    markers = [str(work), *(f"127.0.0.1:{p}" for p in (superlink_port, supernode_port, supernode_port + 1))]
    output = tmp_path / "guide.log"
    try:
        with output.open("w") as out:
            done = subprocess.run(["bash", str(script)], cwd=app_dir(), env=env, stdout=out,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=1200)
        said = output.read_text(errors="replace")
        logs = {p.stem: p.read_text(errors="replace") for p in (work / "logs").glob("*.log")}
        context = said[-4000:] + "".join(f"\n--- {name}\n{text[-2000:]}" for name, text in logs.items())
        assert done.returncode == 0, context
        deadline = time.monotonic() + 60  # the guide's stop: every process of the deployment exits
        while processes_naming(markers) and time.monotonic() < deadline:
            time.sleep(1)
        assert not processes_naming(markers), [p.info["cmdline"] for p in processes_naming(markers)]
    finally:
        tear_down(work, markers)

    # register_supernodes.sh said which node id is which silo's key
    assert re.search(r"silo-0: registered, node id \d+", said) and re.search(r"silo-1: registered, node id \d+", said)

    # the DP FedAvg run: ok, each silo on its own file, counts withheld (strict) with the record saying so
    record = json.loads((work / "results" / "first-fedavg.json").read_text())
    assert record["status"] == "ok" and record["failures"] == [], record["error"]
    assert record["method"] == "fedavg" and record["config"]["slm.dp-epsilon"] == 4
    assert set(record["silo_metrics"]) == {"silo-0", "silo-1"}
    assert all(m["num-train"] == 0 for m in record["silo_metrics"].values())
    assert any("withheld" in note and "silo-0, silo-1" in note for note in record["notes"])
    assert set(record["privacy"]) >= {"silo-0", "silo-1"}
    assert all(0 < record["privacy"][s]["epsilon"] <= 4 for s in ("silo-0", "silo-1"))
    assert not (work / "results" / "first-fedavg.checkpoint").exists()  # removed with the ok record

    # the non-DP run: each strict silo refused, and both terminals read it as a refusal
    refused = json.loads((work / "results" / "refused-fedavg.json").read_text())
    assert refused["status"] == "failed"
    assert "No silo completed FedAvg round 1: every silo refused: silo-" in refused["error"]
    assert "refuses SLM weights" in refused["error"] and "allow-non-private=false" in refused["error"]
    assert "safe to delete" in refused["error"] and (work / "results" / "refused-fedavg.checkpoint").is_dir()
    assert {f["silo"] for f in refused["failures"]} == {"silo-0", "silo-1"}
    assert all(f["reason"].startswith("PolicyRefusal: ") for f in refused["failures"])
    assert "every silo refused" in said  # the operator's stream shows the reason, as one line
    assert "Traceback" not in said[said.index("every silo refused"):], said[-3000:]
    for silo in ("silo-0", "silo-1"):
        log = logs[silo]
        assert f"Refused train: {silo} refuses SLM weights" in log
        assert "Traceback" not in log and "Exit Code: 800" not in log  # a refusal is no crash
