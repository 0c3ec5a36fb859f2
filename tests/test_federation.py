"""The Flower app end to end, in process: every baseline, failure handling, byte metering, the protocol."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import threading
from collections.abc import Iterator

import pytest
from conftest import tiny_config, toy_frame
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.config import ExperimentConfig
from fedbridge.errors import ConfigError
from fedbridge.methods.fdkt.config import FDKTConfig
from fedbridge.results import SCHEMA_VERSION, RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.simulations.compare import group
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare, run_inprocess
from fedbridge.tasks import Examples

BASELINES = ("local", "fedavg", "centralized", "llm-zero-shot")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, tuple[RunRecord, ExperimentConfig]]:
    """One tiny in-process run per baseline, shared by the tests below."""
    out = {}
    for method in BASELINES:
        results = tmp_path_factory.mktemp(method)
        cfg = tiny_config(results, method=method, run_name=f"{method}-tiny")
        out[method] = (run_inprocess(cfg), cfg)
    return out


@contextlib.contextmanager
def _grid(cfg: ExperimentConfig, **kwargs) -> Iterator[InProcessGrid]:
    n = cfg.partition.num_silos
    grid = InProcessGrid(client_app, cfg.to_run_config(), [{"partition-id": i, "num-partitions": n} for i in range(n)],
                         **kwargs)
    try:
        yield grid
    finally:
        grid.close()


def _in_unit(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_record(records, method):
    record, cfg = records[method]
    assert record.status == "ok" and record.error is None
    assert record.method == method and record.run_name == f"{method}-tiny" and record.seed == 0
    gm = record.global_metrics
    for key in ("accuracy", "macro_f1", "silo_test_accuracy", "silo_test_macro_f1"):
        assert _in_unit(gm[key]), (key, gm)
    assert gm["n"] == 24  # 20% of 120 examples: the global test set
    silos = {k: v for k, v in record.silo_metrics.items() if k.startswith("silo-")}
    assert sorted(silos) == ["silo-0", "silo-1"]
    for name, metrics in silos.items():
        assert _in_unit(metrics["silo-test.accuracy"]) and _in_unit(metrics["silo-test.macro_f1"]), name
        assert metrics["num-train"] > 0 and metrics["num-test"] > 0
        assert metrics["silo-test.n"] == metrics["num-test"]
    # the sum over silos of train+test plus the global test set is the whole (capped) task
    assert sum(m["num-train"] + m["num-test"] for m in silos.values()) + gm["n"] == 120
    comm = record.communication
    assert comm["bytes_sent"] > 0 and comm["bytes_received"] > 0
    assert sum(r["sent"] for r in comm["by_round"].values()) == comm["bytes_sent"]
    assert sum(t["received"] for t in comm["by_message_type"].values()) == comm["bytes_received"]
    assert "query.info" in comm["by_message_type"]
    assert "discover" in record.seconds and record.wall_seconds > 0
    assert record.failures == []
    assert record.config == cfg.to_run_config()
    assert record.versions["flwr"] == "1.41.0"


@pytest.mark.parametrize("method", BASELINES)
def test_record_json_written_and_readable(records, method):
    record, cfg = records[method]
    path = record.path(cfg.results_dir)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    raw = json.loads(path.read_text())
    assert raw["schema"] == SCHEMA_VERSION and raw["status"] == "ok"
    back = RunRecord.read(path)
    assert back.global_metrics == pytest.approx(record.global_metrics, nan_ok=True)
    assert back.silo_metrics.keys() == record.silo_metrics.keys()
    assert back.communication["bytes_sent"] == record.communication["bytes_sent"]


def test_local_reports_each_silo_models_global_scores(records):
    record, _ = records["local"]
    silos = [record.silo_metrics[f"silo-{i}"] for i in range(2)]
    assert all("global-test.accuracy" in m and "train.seconds" in m for m in silos)
    mean = sum(m["global-test.accuracy"] for m in silos) / 2
    assert record.global_metrics["accuracy"] == pytest.approx(mean)
    assert set(record.communication["by_message_type"]) == {"query.info", "train.local"}
    assert record.privacy is None and record.notes == []


def test_fedavg_moves_weights(records, tmp_path):
    """Full mode averages every weight; head mode (the default) averages and moves the head alone, so a round's
    train messages shrink to the head's size."""
    from fedbridge.models.loading import load_slm

    local, fedavg = records["local"][0], records["fedavg"][0]
    cfg = tiny_config(tmp_path, method="fedavg", run_name="fedavg-full", **{"slm.mode": "full"})
    full = run_inprocess(cfg)
    assert full.communication["bytes_sent"] > 20 * local.communication["bytes_sent"]
    assert full.communication["bytes_received"] > 20 * local.communication["bytes_received"]
    for record in (fedavg, full):
        assert {"train", "evaluate"} <= set(record.communication["by_message_type"])
        assert "round-1.train-loss" in record.server_metrics
        assert "federated-training" in record.seconds
    sizes = {mode: sum(v.numel() * 4 for v in load_slm("tiny-bert", 3, options=dataclasses.replace(
        cfg.slm, mode=mode)).trainable_state().values()) for mode in ("head", "full")}
    for record, mode in ((fedavg, "head"), (full, "full")):
        sent = record.communication["by_message_type"]["train"]["sent"]  # 1 round x 2 silos
        assert 2 * sizes[mode] <= sent < 1.02 * 2 * sizes[mode] + 4096  # the weights and a little framing
    assert sizes["head"] < sizes["full"] / 20


def test_fedavg_rounds_and_local_epochs(tmp_path):
    cfg = tiny_config(tmp_path, method="fedavg", rounds=2, run_name="fedavg-2r",  # full: the model is big
                      **{"fedavg.local-epochs": 1, "task.max-examples": 60, "slm.mode": "full"})
    with _grid(cfg) as grid:
        record = run_experiment(grid, prepare(cfg))
    train_msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert len(train_msgs) == 2 * 2  # 2 rounds x 2 silos
    assert all(m.content[p.CONFIG]["epochs"] == 1 for m in train_msgs)
    assert set(record.server_metrics) >= {"round-1.train-loss", "round-2.train-loss"}
    by_round = record.communication["by_round"]
    assert {"0", "1", "2", "3"} == set(by_round)  # discovery, 2 training rounds, final evaluation
    assert by_round["1"]["sent"] == pytest.approx(by_round["2"]["sent"], rel=0.05)  # the model each round
    assert by_round["1"]["sent"] > 100 * by_round["0"]["sent"]


def test_centralized_carries_its_non_private_note(records):
    record, _ = records["centralized"]
    assert any("non-private" in n for n in record.notes)
    assert "server-train" in record.seconds
    # the server trained: the silos only evaluate the model they are sent
    assert set(record.communication["by_message_type"]) == {"query.info", "evaluate"}


def test_llm_zero_shot_uses_no_training(records):
    record, _ = records["llm-zero-shot"]
    assert set(record.communication["by_message_type"]) == {"query.info", "evaluate.llm"}
    assert all("llm.seconds" in record.silo_metrics[f"silo-{i}"] for i in range(2))
    assert "server-llm-eval" in record.seconds
    # no model weights cross the wire: all it sends is less than one broadcast of the (head-mode) model
    assert record.communication["bytes_sent"] < records["centralized"][0].communication["by_message_type"][
        "evaluate"]["sent"]


def test_a_failing_silo_is_recorded_and_the_run_completes(tmp_path):
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="one-fails", **{"partition.num-silos": 3,
                                                                                "task.max-examples": 90}))

    def boom(node_id: int, msg: Message) -> None:
        if node_id == 1001 and msg.metadata.message_type == p.TRAIN_LOCAL:
            raise RuntimeError("disk on fire")

    with _grid(cfg, before_handle=boom) as grid:
        record = run_experiment(grid, cfg)
    assert record.status == "ok"
    assert record.failures == [{"silo": "silo-1", "message_type": "train.local", "round": 1,
                                "reason": "RuntimeError: disk on fire"}]
    assert "silo-test.accuracy" in record.silo_metrics["silo-0"]
    assert "silo-test.accuracy" in record.silo_metrics["silo-2"]
    assert "silo-test.accuracy" not in record.silo_metrics["silo-1"]
    assert _in_unit(record.global_metrics["accuracy"])
    on_disk = RunRecord.read(record.path(cfg.results_dir))
    assert on_disk.failures == record.failures


def test_a_run_where_every_silo_fails_is_a_failed_run(tmp_path):
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="all-fail"))

    def boom(node_id: int, msg: Message) -> None:
        if msg.metadata.message_type == p.TRAIN_LOCAL:
            raise RuntimeError("disk on fire")

    with _grid(cfg, before_handle=boom) as grid:
        with pytest.raises(RuntimeError, match="No silo completed"):
            run_experiment(grid, cfg)
    on_disk = RunRecord.read(tmp_path / "all-fail.json")
    assert on_disk.status == "failed" and len(on_disk.failures) == 2


def test_a_silo_failing_discovery_is_left_out(tmp_path):
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="no-info"))

    def boom(node_id: int, msg: Message) -> None:
        if node_id == 1000 and msg.metadata.message_type == p.INFO:
            raise ConnectionError("unreachable")

    with _grid(cfg, before_handle=boom) as grid:
        record = run_experiment(grid, cfg)
    assert record.status == "ok"
    assert record.failures[0]["silo"] == "node-1000" and "unreachable" in record.failures[0]["reason"]
    assert [k for k in record.silo_metrics if k.startswith("silo-")] == ["silo-1"]
    assert all(m.metadata.dst_node_id == 1001 for m in grid.sent if m.metadata.message_type == p.TRAIN_LOCAL)


def test_a_silo_that_never_answers_times_out(tmp_path):
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="slow-silo", timeout=5.0))
    release = threading.Event()

    def stall(node_id: int, msg: Message) -> None:
        if node_id == 1001 and msg.metadata.message_type == p.TRAIN_LOCAL:
            release.wait(60)  # blocks until the server has given up on it
            raise TimeoutError("released after the run")  # then do no work (no RNG use after this test)

    with _grid(cfg, before_handle=stall, workers=2) as grid:
        try:
            record = run_experiment(grid, cfg)
        finally:
            release.set()  # then close() waits for the handler: no thread outlives the test
    assert record.status == "ok"
    assert [f["silo"] for f in record.failures] == ["silo-1"]
    assert "no reply within 5 s" in record.failures[0]["reason"]
    assert "silo-test.accuracy" in record.silo_metrics["silo-0"]


def test_server_side_failure_writes_a_failed_record_and_raises(tmp_path):
    cfg = prepare(tiny_config(tmp_path, method="fedavg", run_name="bad-labels", **{"task.labels": "good,bad"}))
    with _grid(cfg) as grid:
        with pytest.raises(Exception, match="task.labels"):
            run_experiment(grid, cfg)
    record = RunRecord.read(tmp_path / "bad-labels.json")
    assert record.status == "failed" and "DataError" in record.error


def test_unknown_method_is_a_config_error(tmp_path):
    with _grid(tiny_config(tmp_path)) as grid:
        with pytest.raises(ConfigError, match="Unknown method 'fdkt-typo'. Available: local, fedavg"):
            run_experiment(grid, dataclasses.replace(tiny_config(tmp_path), method="fdkt-typo"))


# ---------------------------------------------------------------- protocol


def _ask(grid: InProcessGrid, content: RecordDict, message_type: str = p.INFO, node: int = 1000) -> Message:
    msg = Message(content, dst_node_id=node, message_type=message_type, group_id="0", ttl=60)
    (reply,) = grid.send_and_receive([msg], timeout=60)
    return reply


def test_client_app_refuses_another_protocol_major_version(tmp_path):
    with _grid(tiny_config(tmp_path, **{"task.max-examples": 60})) as grid:
        ok = _ask(grid, p.request())
        assert not ok.has_error()
        assert ok.content[p.METRICS]["partition-id"] == 0

        minor = p.request()
        minor[p.CONFIG]["protocol"] = p.PROTOCOL_VERSION.split(".")[0] + ".99"
        assert not _ask(grid, minor).has_error()  # a newer minor version is compatible

        major = RecordDict({p.CONFIG: ConfigRecord({"protocol": "2.0"})})
        refused = _ask(grid, major)
        assert refused.has_error()
        assert "ProtocolError" in refused.error.reason and "not compatible" in refused.error.reason

        missing = _ask(grid, RecordDict({p.CONFIG: ConfigRecord({"round": 1})}))
        assert missing.has_error() and "protocol" in missing.error.reason


def test_check_version_and_global_test_records():
    assert p.check_version(p.request({"round": 3}))["round"] == 3
    with pytest.raises(p.ProtocolError, match="Protocol 0.9 is not compatible"):
        p.check_version(RecordDict({p.CONFIG: ConfigRecord({"protocol": "0.9"})}))
    ex = Examples.of(["a", "b", "c"], [0, 2, 1])
    assert p.read_global_test(p.request(global_test=ex), num_labels=3) == ex
    assert p.read_global_test(p.request(), num_labels=3) is None
    with pytest.raises(p.ProtocolError, match=r"global-test.*0\.\.1"):
        p.read_global_test(p.request(global_test=ex), num_labels=2)


def test_payload_bytes_counts_arrays():
    import torch

    small = p.request()
    big = p.request(arrays=ArrayRecord({"w": torch.zeros(1000)}))
    assert p.payload_bytes(small) > 0
    assert p.payload_bytes(big) - p.payload_bytes(small) >= 4000  # 1000 float32
    reply = p.metrics_reply({"a": 1.0}, arrays=ArrayRecord({"w": torch.zeros(10)}))
    assert set(reply.keys()) == {p.METRICS, p.ARRAYS}


# ---------------------------------------------------------------- records


def test_run_record_round_trip_and_schema_check(tmp_path):
    rec = RunRecord(run_name="r", method="local", seed=1, config={"seed": 1})
    rec.global_metrics = {"accuracy": 0.5, "macro_f1": float("nan")}
    path = rec.write(tmp_path / "sub")
    back = RunRecord.read(path)
    assert back.run_name == "r" and back.config == {"seed": 1} and back.status == "running"
    assert back.global_metrics["accuracy"] == 0.5 and math.isnan(back.global_metrics["macro_f1"])
    data = json.loads(path.read_text().replace('"schema": 1', '"schema": 99'))
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="schema 99 is not 1"):
        RunRecord.read(path)


def test_deployed_silos_read_their_own_files(tmp_path):
    """Deployment mode: each SuperNode's node config points at its own data file, which the silo alone reads."""
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="own-files"))
    frames = toy_frame(60, labels=("negative", "neutral", "positive"))
    nodes = []
    for i in range(2):
        path = tmp_path / f"silo{i}.csv"
        frames.iloc[i::2].rename(columns={"review": "body", "sentiment": "stars"}).to_csv(path, index=False)
        nodes.append({"partition-id": i, "data-path": str(path), "text-column": "body", "label-column": "stars",
                      "privacy": "permissive"})  # a strict silo (the deployed default) withholds its counts
    grid = InProcessGrid(client_app, cfg.to_run_config(), nodes)
    try:
        record = run_experiment(grid, cfg)
    finally:
        grid.close()
    assert record.status == "ok"
    assert [record.silo_metrics[f"silo-{i}"]["num-train"] + record.silo_metrics[f"silo-{i}"]["num-test"]
            for i in range(2)] == [30, 30]
    assert all("global-test.accuracy" in record.silo_metrics[f"silo-{i}"] for i in range(2))


EPSILON_DEFAULT = FDKTConfig().epsilon + FDKTConfig().vote_epsilon


@pytest.mark.parametrize("mode", ["head", "lora", "full"])
@pytest.mark.parametrize("method", ["local", "fedavg", "centralized", "fdkt", "crosslm"])
def test_every_slm_mode_runs_every_method(tmp_path, method, mode):
    """slm.mode is one option for every method that trains an SLM; FedAvg averages what the mode trains."""
    options = {"fdkt": {"fdkt.num-per-label": 1, "fdkt.max-tokens": 4, "fdkt.augment-per-label": 1,
                        "fdkt.llm-filter": False},
               "crosslm": {"crosslm.rounds": 1, "crosslm.per-label": 2, "crosslm.max-new-tokens": 8,
                           "crosslm.lora-steps": 1, "crosslm.llm-eval-examples": 4, "crosslm.ppl-passages": 2,
                           "crosslm.min-words": 1}}.get(method, {})
    cfg = tiny_config(tmp_path, method=method, run_name=f"{method}-{mode}", **{"slm.mode": mode,
                                                                            "task.max-examples": 60}, **options)
    record = run_inprocess(cfg)
    assert record.status == "ok" and record.failures == []
    assert 0 <= record.global_metrics["accuracy"] <= 1 and 0 <= record.global_metrics["macro_f1"] <= 1
    # every release is accounted or labelled: weights, scores and pooled raw data are epsilon inf, in the record
    # and in the table; only local, whose silos release nothing but their silo-test metrics, shows '—'
    [row] = group([record])
    if method in ("fedavg", "centralized"):
        assert record.privacy and all(math.isinf(v["epsilon"]) and v["private"] is False
                                      for v in record.privacy.values())
        assert row.epsilon == "∞"
    elif method == "crosslm":  # DP votes (crosslm.scores=dp-votes): the run's total per silo, within what it asked
        assert record.privacy and all(v["mechanism"] == "dp-nn-votes" and 3.9 < v["epsilon"] <= 4.0
                                      for v in record.privacy.values())
    elif method == "fdkt":  # DP demonstrations and the DP votes that label the augmented set, summed per silo
        assert record.privacy and all(v["mechanism"] == "dp-fewshot + dp-nn-votes (basic composition)"
                                      and EPSILON_DEFAULT - 0.1 < v["epsilon"] <= EPSILON_DEFAULT
                                      for v in record.privacy.values())
    else:
        assert row.epsilon == "—"
    if method == "fedavg":
        from fedbridge.models.loading import load_slm

        state = load_slm("tiny-bert", 3, options=cfg.slm).trainable_state()
        size, head = sum(v.numel() * 4 for v in state.values()), state["head.weight"].numel() * 4
        # at most the trained weights (Flower sends identical arrays once: LoRA's zero-initialised B matrices)
        assert 2 * head < record.communication["by_message_type"]["train"]["sent"] < 1.02 * 2 * size + 4096
