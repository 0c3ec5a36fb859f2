"""Deployment: the pieces (node configs, connections, certificates, a deployed silo's data) and, marked slow, a real
deployment on loopback: a SuperLink with TLS and SuperNode authentication, three SuperNodes each reading its own
CSV, all started through the scripts in deploy/ (fedbridge.deploy.LoopbackDeployment).

The slow tests show: a method runs end to end with weight messages far above Flower's 5 MiB array chunk; an
unregistered SuperNode and plaintext clients are refused; a silo killed mid-round fails only its round (within the
timeout) and is served again once restarted; and no process of the deployment is left behind.
"""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import psutil
import pytest
from conftest import tiny_config, toy_frame
from flwr.cli.flower_config import read_superlink_connection
from flwr.common.config import parse_config_args
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.deploy import (
    DeploymentError,
    LoopbackDeployment,
    free_port,
    node_config_arg,
    scripts_dir,
    silo_node_configs,
    write_connection,
)
from fedbridge.errors import ConfigError, SiloFailure
from fedbridge.methods.base import Session, refusal_reason
from fedbridge.methods.fedavg.messages import TRAIN_FEDAVG
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.silo import _silo
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare

ROWS = (24, 30, 36)  # rows in each silo's file: a silo's size in the record tells which file it read
LABELS = ("negative", "neutral", "positive")  # the server's task (drug-reviews) fixes the label set


# ---------------------------------------------------------------- the pieces (fast)


def test_node_configs_reach_the_silo_as_flower_parses_them():
    config = {"partition-id": 2, "data-path": "/data/silo 2/reviews \"2024\".csv", "text-column": "body",
              "windows": r"C:\data\it's.csv", "weighted": True, "share": 0.5}
    assert parse_config_args([node_config_arg(config)]) == config
    with pytest.raises(DeploymentError, match="both quote characters"):
        node_config_arg({"data-path": "it's \"quoted\""})


def test_a_written_connection_is_what_flwr_reads(tmp_path, monkeypatch):
    write_connection(tmp_path, "prod", "superlink.example.org:9093", tmp_path / "ca.crt")
    write_connection(tmp_path, "plain", "127.0.0.1:9093", insecure=True)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    prod, plain = read_superlink_connection("prod"), read_superlink_connection("plain")
    assert (prod.address, prod.root_certificates, prod.insecure) == ("superlink.example.org:9093",
                                                                     str(tmp_path / "ca.crt"), False)
    assert (plain.address, plain.insecure) == ("127.0.0.1:9093", True)
    with pytest.raises(DeploymentError, match="already defines"):
        write_connection(tmp_path, "prod", "elsewhere:1")


def test_make_certs_signs_a_server_certificate_for_loopback_and_the_given_names(tmp_path):
    subprocess.run([str(scripts_dir() / "make_certs.sh"), str(tmp_path), "superlink.example.org", "10.1.2.3"],
                   check=True, capture_output=True)
    verify = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "ca.crt", tmp_path / "server.pem"],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(["openssl", "x509", "-in", tmp_path / "server.pem", "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink.example.org", "IP Address:10.1.2.3"):
        assert san in text
    assert "TLS Web Server Authentication" in text and "CA:FALSE" in text
    assert oct((tmp_path / "server.key").stat().st_mode)[-3:] == "600"


def test_a_deployed_silo_needs_the_label_list_not_the_servers_task_file(tmp_path):
    own = tmp_path / "own.csv"
    toy_frame(20).rename(columns={"review": "body", "sentiment": "stars"}).to_csv(own, index=False)
    run = tiny_config(tmp_path, **{"task.name": str(tmp_path / "only-on-the-server.csv"), "task.labels": "pos,neg"})
    node = {"partition-id": 1, "data-path": str(own), "text-column": "body", "label-column": "stars"}
    silo = _silo(tuple(sorted(run.to_run_config().items())), tuple(sorted(node.items())))
    assert silo.labels == ("pos", "neg")  # the server's order, so label indices agree
    assert len(silo.data.train) + len(silo.data.test) == 20
    examples = zip(silo.data.train.texts + silo.data.test.texts, silo.data.train.labels + silo.data.test.labels)
    assert all(f"{silo.labels[y]}word" in text for text, y in examples)  # toy_frame writes the label into the text
    without_labels = tiny_config(tmp_path, **{"task.name": str(tmp_path / "only-on-the-server.csv")})
    with pytest.raises(ConfigError, match="does not know its label set"):  # never read from a server-named file
        _silo(tuple(sorted(without_labels.to_run_config().items())), tuple(sorted(node.items())))
    own_labels = {**node, "labels": "neg,pos"}  # or from its own node config, in the order the server uses
    assert _silo(tuple(sorted(without_labels.to_run_config().items())), tuple(sorted(own_labels.items()))).labels == \
        ("neg", "pos")


class GridWithAHostDown(InProcessGrid):
    """Silo 1's node answers round 1's train message, then its host goes down (no longer among the online nodes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, before_handle=self._maybe_go_down, **kwargs)
        self.down: set[int] = set()

    def _maybe_go_down(self, node: int, msg) -> None:  # noqa: ANN001
        if node == 1001 and msg.metadata.message_type == TRAIN_FEDAVG:
            self.down.add(node)

    def get_node_ids(self):  # noqa: ANN201
        return [n for n in super().get_node_ids() if n not in self.down]


def test_fedavg_goes_on_without_a_silo_whose_host_stays_down(tmp_path, one_thread):
    # Flower's own sampling would wait for all nodes forever; the round waits `timeout`, then trains the others
    cfg = prepare(tiny_config(tmp_path, method="fedavg", rounds=2, timeout=8.0, run_name="host-down"))
    grid = GridWithAHostDown(client_app, cfg.to_run_config(), [{"partition-id": i} for i in range(2)])
    try:
        t0 = time.monotonic()
        record = run_experiment(grid, cfg)
    finally:
        grid.close()
    assert record.status == "ok" and time.monotonic() - t0 >= 8.0
    assert [(f["silo"], f["round"], f["reason"]) for f in record.failures] == \
        [("silo-1", 2, "offline when the round started")]
    assert record.server_metrics["round-1.silos"] == 2 and record.server_metrics["round-2.silos"] == 1


def test_a_refusal_reads_as_a_refusal_on_the_silo_and_in_the_runs_error(tmp_path, one_thread, caplog):
    """Strict silos asked for non-DP FedAvg weights: each logs one warning (no traceback) and answers with its
    reason; the run's error says every silo refused, and why, and what to do with the checkpoint left behind."""
    nodes = []
    for i, rows in enumerate((20, 24)):
        path = tmp_path / f"silo{i}.csv"
        toy_frame(rows, labels=LABELS).to_csv(path, index=False)
        nodes.append({"partition-id": i, "data-path": str(path), "text-column": "review", "label-column": "sentiment",
                      "state-dir": str(tmp_path / f"state{i}")})
    cfg = prepare(tiny_config(tmp_path, method="fedavg", run_name="refused"))
    grid = InProcessGrid(client_app, cfg.to_run_config(), nodes)
    try:
        with caplog.at_level("WARNING", logger="fedbridge.silo"), pytest.raises(SiloFailure) as failed:
            run_experiment(grid, cfg)
    finally:
        grid.close()
    error = str(failed.value)
    assert re.fullmatch(r"No silo completed FedAvg round 1: every silo refused: silo-[01] refuses SLM weights: its "
                        r"node config does not allow non-private releases \(privacy=strict, allow-non-private=false\)"
                        r"\. .*\. Its checkpoint .*refused\.checkpoint holds no completed step: safe to delete .*",
                        error), error
    refusals = [r for r in caplog.records if r.name == "fedbridge.silo"]
    assert len(refusals) == 2 and all(r.levelname == "WARNING" and r.exc_info is None for r in refusals)
    assert all(r.getMessage().startswith("Refused train: silo-") for r in refusals)
    record = RunRecord.read(tmp_path / "refused.json")
    assert all(f["reason"].startswith("PolicyRefusal: ") for f in record.failures) and len(record.failures) == 2
    assert any("silo-0, silo-1: num-train and num-test 0 mean withheld" in note for note in record.notes)
    assert (tmp_path / "refused.checkpoint").is_dir()  # kept for resume=true, as the error says


def test_the_runs_error_gives_one_reason_where_the_silos_differ_only_in_names_and_numbers():
    refusal = "silo-{} refuses SLM weights: its node config does not allow non-private releases"
    flower = "<class 'fedbridge.errors.PrivacyBudgetExceeded'>:<'silo-{}: this run's epsilon {} of the 2 is spent'>"
    def error(*reasons: str) -> str:
        record = SimpleNamespace(failures=[{"silo": f"silo-{i}", "reason": r} for i, r in enumerate(reasons)])
        return str(Session.no_silo_completed(SimpleNamespace(record=record), "round 1"))
    assert error(*(f"PolicyRefusal: {refusal.format(i)}" for i in range(3))) == \
        f"No silo completed round 1: every silo refused: {refusal.format(0)}"
    assert error(flower.format(0, 1.99), flower.format(1, 2.0)) == \
        "No silo completed round 1: every silo refused: silo-0: this run's epsilon 1.99 of the 2 is spent"
    assert error(f"PolicyRefusal: {refusal.format(0)}", flower.format(1, 2)).endswith(
        "(and 1 other reason: see the record's failures)")
    assert error("no reply within 60 s", f"PolicyRefusal: {refusal.format(1)}").endswith(
        "every one failed or timed out (see the record's failures)")
    assert refusal_reason("ModelSpecError: Could not load SLM 'x'") is None


def test_a_failed_runs_error_says_how_to_resume_from_its_checkpoint(tmp_path):
    record = SimpleNamespace(run_name="r1", failures=[{"silo": "silo-0", "reason": "PolicyRefusal: no."}])
    checkpoint = SimpleNamespace(directory=tmp_path, record=record, steps=lambda: {"a": {}, "b": {}})
    error = str(Session.no_silo_completed(SimpleNamespace(record=record, checkpoint=checkpoint), "round 2"))
    assert error == (f"No silo completed round 2: every silo refused: no. Its checkpoint {tmp_path} keeps 2 completed "
                     "steps: rerun with resume=true run-name=r1 to continue from them, or delete it to start over")


def test_deploy_connection_writes_what_flwr_reads(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from fedbridge.simulations.cli import cli

    (tmp_path / "ca.crt").write_text("")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    done = CliRunner().invoke(cli, ["deploy", "connection", "prod", "--address", "127.0.0.1:9093",
                                    "--root-cert", str(tmp_path / "ca.crt")])
    assert done.exit_code == 0, done.output
    prod = read_superlink_connection("prod")
    assert (prod.address, prod.root_certificates, prod.insecure) == ("127.0.0.1:9093", str(tmp_path / "ca.crt"),
                                                                     False)


# ---------------------------------------------------------------- a real deployment on loopback (slow)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    work = tmp_path_factory.mktemp("deployment")
    frame = toy_frame(sum(ROWS), labels=LABELS).rename(columns={"review": "body", "sentiment": "stars"})
    paths, start = [], 0
    for i, rows in enumerate(ROWS):
        paths.append(work / f"silo{i}.csv")
        frame.iloc[start:start + rows].to_csv(paths[-1], index=False)
        start += rows
    # permissive silos: these tests are about transport (FedAvg weights are a non-private release)
    dep = LoopbackDeployment(work / "federation", silo_node_configs(paths, "body", "stars", privacy="permissive"))
    with dep:
        yield dep


def config(deployment, results, **overrides):
    return tiny_config(results, **{"partition.num-silos": len(deployment.node_configs), **overrides})


@pytest.mark.slow
def test_a_method_runs_end_to_end_with_uploads_far_above_flowers_chunk_size(deployment, tmp_path):
    # MiniLM with one layer, fine-tuned whole: 55 MB of weights per message, sent to and uploaded by every silo
    # over TLS (the default head mode moves kilobytes)
    cfg = config(deployment, tmp_path, method="fedavg", run_name="deployed-fedavg",
                 **{"slm.model": "minilm-l1", "slm.mode": "full", "timeout": 300.0})
    record = deployment.run(cfg)
    assert record.status == "ok" and record.failures == [] and record.method == "fedavg"
    assert record.config["slm.model"] == "minilm-l1"
    # each silo trained and evaluated on its own file (the server's task has other sizes)
    assert {s: m["num-train"] + m["num-test"] for s, m in record.silo_metrics.items()} == \
        {f"silo-{i}": rows for i, rows in enumerate(ROWS)}
    assert all(0.0 <= m["silo-test.accuracy"] <= 1.0 for m in record.silo_metrics.values())
    assert 0.0 <= record.global_metrics["accuracy"] <= 1.0 and record.global_metrics["n"] == 24  # 20% of 120
    train = record.communication["by_message_type"][TRAIN_FEDAVG]
    per_silo = train["received"] / len(ROWS)
    assert per_silo > 50e6 > 9 * FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE  # every upload went through in >= 10 chunks
    assert train["sent"] > len(ROWS) * 50e6  # and so did the global model, to every silo


@pytest.mark.slow
def test_the_pipeline_runs_deployed_with_each_silo_on_its_own_file(deployment, tmp_path):
    """DP demonstrations from each SuperNode's own file seed the server's batches; scores and enhancements go
    over TLS like every other message."""
    from test_crosslm import FAST as FAST_CROSSLM
    from test_fdkt import FAST as FAST_FDKT

    cfg = config(deployment, tmp_path, method="pipeline", run_name="deployed-pipeline",
                 **{**FAST_FDKT, **FAST_CROSSLM, "timeout": 300.0})
    record = deployment.run(cfg)
    assert record.status == "ok" and record.failures == [] and record.method == "pipeline"
    assert record.server_metrics["crosslm.seeded-batches"] == record.server_metrics["crosslm.batches"] == 2
    for i in range(len(ROWS)):
        metrics = record.silo_metrics[f"silo-{i}"]
        assert metrics["synth.examples"] > 0 and 0.0 <= metrics["round-2.global-test.accuracy"] <= 1.0
        privacy = record.privacy[f"silo-{i}"]  # demonstrations + DP-vote scores, each within its ε
        assert privacy["private"] is True and 0 < privacy["other"]["epsilon"] <= 4.0 < privacy["epsilon"] <= 8.0


@pytest.mark.slow
def test_private_evolution_runs_deployed_and_each_silo_votes_from_its_own_file(deployment, tmp_path):
    """Every SuperNode's DP votes, from its own file, label the server's candidates; the voted set goes back over
    TLS; the record carries each silo's ε over its vote releases."""
    from test_pe import FAST as FAST_PE

    cfg = config(deployment, tmp_path, method="pe", run_name="deployed-pe", **{**FAST_PE, "timeout": 300.0})
    record = deployment.run(cfg)
    assert record.status == "ok" and record.failures == [] and record.method == "pe"
    for i in range(len(ROWS)):
        privacy = record.privacy[f"silo-{i}"]
        assert privacy["mechanism"] == "dp-nn-votes" and 1.9 < privacy["epsilon"] <= 2.0
        assert record.silo_metrics[f"silo-{i}"]["train.synthetic"] > 0
    assert record.communication["by_message_type"][p.DP_VOTE]["received"] > 0


@pytest.mark.slow
def test_an_unregistered_supernode_is_refused(deployment):
    deployment.script("make_supernode_keys.sh", str(deployment.workdir / "unregistered"), "intruder")
    before = {n["node-id"] for n in deployment.nodes()}
    intruder = deployment.start_supernode(0, key=deployment.workdir / "unregistered" / "intruder", name="intruder")
    assert intruder.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.log("intruder")
    deployment.kill("intruder")
    assert {n["node-id"] for n in deployment.nodes()} == before  # nothing was added


@pytest.mark.slow
def test_plaintext_clients_cannot_connect(deployment):
    # the operator's CLI, configured without TLS
    write_connection(deployment.home("plain-operator"), "plain", deployment.address, insecure=True)
    listing = deployment.flwr("supernode", "list", "plain", host="plain-operator")
    assert listing.returncode != 0 and "unavailable" in listing.stdout + listing.stderr
    # a SuperNode without TLS (and so without authentication)
    plain = deployment.spawn("plain-supernode", ["flower-supernode", "--insecure", "--superlink", deployment.address,
                                                 "--max-retries", "1", "--port", str(free_port()),
                                                 "--node-config", "partition-id=0"], host="plain-supernode")
    assert plain.wait(timeout=120) != 0
    assert "Failed to initialize the connection" in deployment.log("plain-supernode")
    deployment.kill("plain-supernode")
    # and at the HTTP level: plain HTTP gets no answer; HTTPS with the CA does
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"http://{deployment.address}/", timeout=10)
    https = httpx.get(f"https://{deployment.address}/", timeout=10,
                      verify=ssl.create_default_context(cafile=str(deployment.certs / "ca.crt")))
    assert https.status_code == 404  # an HTTP answer: the SuperLink is up, and speaks TLS only


@pytest.mark.slow
def test_a_silo_killed_mid_round_fails_that_round_only_and_is_served_again(deployment, tmp_path):
    # round 1 must outlast the SuperLink's expiry of the dead session (two missed heartbeats, up to 60 s) plus a
    # retry: with 60 s the restarted silo raced round 2's start and sometimes missed it
    timeout = 90.0
    cfg = config(deployment, tmp_path, method="fedavg", run_name="deployed-kill", rounds=2, timeout=timeout)
    pool = ThreadPoolExecutor(1)
    run = pool.submit(deployment.run, cfg)
    try:
        wait_for_log(deployment, "silo-2", "Receiving: train message", run)  # round 1 reached silo 2
        family = [psutil.Process(deployment.processes["silo-2"].pid)]
        family += family[0].children(recursive=True)  # its SuperExec and the ClientApp training round 1
        deployment.kill("silo-2", sig=signal.SIGKILL)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family)
        # the silo comes back: refused until the SuperLink has expired its dead session, then served again
        deployment.restart_supernode(2)
        assert "Failed to activate SuperNode" in deployment.log("silo-2")
        record = run.result(timeout=600)
    finally:
        if not run.done():
            deployment.close()  # a failed check must not leave the run waiting for silo 2: stop everything
        pool.shutdown()
    assert record.status == "ok"
    assert [(f["silo"], f["message_type"], f["round"]) for f in record.failures] == [("silo-2", TRAIN_FEDAVG, 1)]
    events = {(e["event"], e["round"]): e["t"] for e in record.timelines["silo-2"]
              if e["message_type"] == TRAIN_FEDAVG}
    assert events[("failed", 1)] - events[("sent", 1)] <= timeout + 15  # the round ended at the timeout
    assert ("received", 2) in events  # served again in round 2
    assert record.server_metrics["round-1.silos"] == 2 and record.server_metrics["round-2.silos"] == 3
    assert "silo-test.accuracy" in record.silo_metrics["silo-2"]  # and evaluated with the others


def wait_for_log(deployment, name: str, text: str, run: Future, timeout: float = 300.0) -> None:
    """Wait until ``text`` appears once more in process ``name``'s log than now; fail if the run ends first."""
    count, deadline = deployment.log(name).count(text) + 1, time.monotonic() + timeout
    while deployment.log(name).count(text) < count:
        if run.done():
            run.result()  # raises what stopped it
            pytest.fail(f"the run ended before {name} logged {text!r}")
        assert time.monotonic() < deadline, f"{name} did not log {text!r} within {timeout:.0f} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_closing_leaves_no_process_behind(deployment):
    running = deployment.leftovers()
    superexecs = [p for p in running if "flower-superexec" in " ".join(p.cmdline())]
    assert len(superexecs) == 1 + len(ROWS)  # the SuperLink's and one per SuperNode: what must not survive
    deployment.close()
    time.sleep(1)
    assert deployment.leftovers() == []
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in running)
