"""Broken or hostile messages: the server records a bad reply as a failure of its silo (with the reason) and goes on
with the others, whose results it leaves untouched; a silo answers a bad request with a clear error reply."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from conftest import tiny_config
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedbridge import protocol as p
from fedbridge.checkpoint import Checkpoint
from fedbridge.client_app import app as client_app
from fedbridge.config import ExperimentConfig
from fedbridge.methods.base import MeteredGrid, Session, server_task
from fedbridge.methods.fdkt.messages import SYNTHESIZE
from fedbridge.methods.fedavg.messages import TRAIN_FEDAVG
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare

pytestmark = pytest.mark.usefixtures("one_thread")
GOOD, BAD = 1000, 1001  # InProcessGrid's node ids for partition-id 0 and 1
Handler = Callable[[Message, Context], Message]


@contextlib.contextmanager
def federation(cfg: ExperimentConfig, app: Handler = client_app, tmp_path=None) -> Iterator[InProcessGrid]:
    n = cfg.partition.num_silos
    nodes = [{"partition-id": i, "num-partitions": n, **({"state-dir": str(tmp_path)} if tmp_path else {})}
             for i in range(n)]
    grid = InProcessGrid(app, cfg.to_run_config(), nodes)
    try:
        yield grid
    finally:
        grid.close()


def tampered(message_type: str, tamper: Callable[[RecordDict], RecordDict], node: int = BAD,
             app: Handler = client_app) -> Handler:
    """The real ClientApp, except that ``node``'s replies to ``message_type`` pass through ``tamper``."""
    def handle(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if msg.metadata.dst_node_id == node and msg.metadata.message_type == message_type:
            return Message(tamper(reply.content), reply_to=msg)
        return reply
    return handle


def with_metric(**values) -> Callable[[RecordDict], RecordDict]:
    def tamper(content: RecordDict) -> RecordDict:
        for key, value in values.items():
            content[p.METRICS][key.replace("_", "-").replace("-test-", "-test.")] = value
        return content
    return tamper


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def only_reason(record: RunRecord) -> str:
    assert len(record.failures) == 1, record.failures
    failure = record.failures[0]
    assert failure["silo"] == "silo-1" and failure["reason"].startswith("rejected: ")
    return failure["reason"]


# ------------------------------------------------------------------ the Session's reply validation, no models


def fake_silos(replies: dict[int, RecordDict]) -> Handler:
    """A ClientApp stand-in: node n answers every message with ``replies[n]``."""
    return lambda msg, context: Message(replies[context.node_id], reply_to=msg)


@contextlib.contextmanager
def bare_session(tmp_path, replies: dict[int, RecordDict]) -> Iterator[Session]:
    cfg = prepare(tiny_config(tmp_path, run_name="bare"))
    record = RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config())
    with federation(cfg, fake_silos(replies)) as grid:
        task, global_test = server_task(cfg)
        session = Session(MeteredGrid(grid, record), cfg, record, task, global_test, Checkpoint.for_run(cfg, record),
                          silos={GOOD: "silo-0", BAD: "silo-1"})
        yield session


def metrics(**values) -> RecordDict:
    return p.metrics_reply({"silo-test.accuracy": 0.5, "silo-test.n": 4, **values})


def demonstrations(texts=("a good pill", "awful"), labels=(2, 0), **privacy) -> RecordDict:
    cost = {"mechanism": "dp-fewshot", "epsilon": 1.0, "epsilon-total": 1.0, "delta": 1e-5, "budget": 1.0,
            "noise-multiplier": 2.0, "steps": 12, "private": True, **privacy}
    return p.metrics_reply({"synth.examples": len(texts)}, privacy=ConfigRecord(cost),
                           examples=ConfigRecord({"texts": list(texts), "labels": list(labels)}))


def read_demonstrations(content: RecordDict):  # what FDKT's server reads from a query.synthesize reply
    return p.read_examples(content, p.EXAMPLES, 3), p.read_privacy(content), p.read_metrics(content)


HOSTILE = {  # name -> (parse, the hostile reply, what the failure reason says)
    "no metrics": (p.read_reply, RecordDict({p.CONFIG: ConfigRecord({"x": 1})}), "no 'metrics' record"),
    "NaN score": (p.read_reply, metrics(**{"silo-test.accuracy": math.nan}), "must be finite"),
    "score above 1": (p.read_reply, metrics(**{"silo-test.accuracy": 7.0}), "outside [0, 1]"),
    "negative count": (p.read_reply, metrics(**{"num-train": -5}), "outside [0, inf]"),
    "infinite loss": (p.read_reply, metrics(**{"train.loss": math.inf}), "must be finite"),
    "label outside the label set": (read_demonstrations, demonstrations(labels=(2, 3)), "labels ints in 0..2"),
    "unequal texts and labels": (read_demonstrations, demonstrations(labels=(2,)), "lists of equal length"),
    "text too long": (read_demonstrations, demonstrations(texts=("x" * (p.MAX_TEXT_CHARS + 1), "ok")), "characters"),
    "missing privacy": (read_demonstrations,
                        p.metrics_reply({}, examples=ConfigRecord({"texts": ["a"], "labels": [0]})),
                        "no 'privacy' record"),
    "NaN epsilon": (read_demonstrations, demonstrations(epsilon=math.nan), "must be finite"),
    "spent over budget": (read_demonstrations, demonstrations(**{"epsilon-total": 3.0}), "inconsistent"),
    "non-private claimed private": (read_demonstrations, demonstrations(epsilon=math.inf, **{"epsilon-total": math.inf,
                                                                                          "budget": math.inf}),
                                    "'private' must be true exactly when"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_reply_is_a_recorded_failure_and_the_others_pass(tmp_path, caplog, name):
    parse, hostile, reason = HOSTILE[name]
    good = demonstrations() if parse is read_demonstrations else metrics()
    with bare_session(tmp_path, {GOOD: good, BAD: hostile}) as session:
        replies = session.exchange(SYNTHESIZE, {GOOD: p.request(), BAD: p.request()}, round_=1, parse=parse)
    assert set(replies) == {"silo-0"}
    assert replies["silo-0"] == parse(good)  # the honest silo's reply arrives whole
    assert reason in only_reason(session.record)
    assert session.record.failures[0]["message_type"] == SYNTHESIZE and session.record.failures[0]["round"] == 1
    assert any("silo-1 failed query.synthesize" in r.getMessage() and reason in r.getMessage() for r in caplog.records)
    assert [e["event"] for e in session.record.timelines["silo-1"]] == ["sent", "failed"]


def test_an_oversized_reply_is_refused_with_its_size(tmp_path):
    big = metrics(**{"values": [0.5] * 5000})
    with bare_session(tmp_path, {GOOD: metrics(), BAD: big}) as session:
        replies = session.exchange(p.INFO, {GOOD: p.request(), BAD: p.request()}, max_bytes=10_000)
    assert set(replies) == {"silo-0"}
    reason = only_reason(session.record)
    assert f"{p.payload_bytes(big):,} bytes, over the 10,000 bytes limit" in reason


def test_every_request_carries_the_experiment_id(tmp_path):
    with bare_session(tmp_path, {GOOD: metrics(), BAD: metrics()}) as session:
        session.exchange(p.INFO, {GOOD: p.request(), BAD: p.request()})
        sent = session.grid.inner.sent
    assert len(sent) == 2 and session.checkpoint.experiment
    assert all(p.read_experiment(m.content[p.CONFIG]) == session.checkpoint.experiment for m in sent)


# ------------------------------------------------------------------ whole runs: no crash, no poisoning


@pytest.fixture(scope="module")
def clean_local(tmp_path_factory) -> RunRecord:
    cfg = prepare(tiny_config(tmp_path_factory.mktemp("clean"), method="local", run_name="clean"))
    with federation(cfg) as grid:
        return run_experiment(grid, cfg)


def test_a_nan_score_from_one_silo_leaves_the_others_and_the_means_untouched(tmp_path, clean_local):
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="nan-score"))
    with federation(cfg, tampered(p.TRAIN_LOCAL, with_metric(**{"global-test.accuracy": math.nan}))) as grid:
        record = run_experiment(grid, cfg)
    assert record.status == "ok"
    assert "metric 'global-test.accuracy' must be finite" in only_reason(record)
    assert without_timings(record.silo_metrics["silo-0"]) == without_timings(clean_local.silo_metrics["silo-0"])
    assert "global-test.accuracy" not in record.silo_metrics["silo-1"]
    assert record.global_metrics["accuracy"] == clean_local.silo_metrics["silo-0"]["global-test.accuracy"]
    assert all(math.isfinite(v) for v in record.global_metrics.values())


def test_two_nodes_claiming_one_partition_keep_the_first(tmp_path):
    cfg = prepare(tiny_config(tmp_path, method="local", run_name="twins"))
    with federation(cfg, tampered(p.INFO, with_metric(**{"partition-id": 0}))) as grid:
        record = run_experiment(grid, cfg)
    assert record.status == "ok" and list(record.silo_metrics) == ["silo-0"]
    assert record.failures[0]["silo"] == "node-1001"
    assert "partition-id 0 is another node's" in record.failures[0]["reason"]
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == p.TRAIN_LOCAL} == {GOOD}


def nan_weights(content: RecordDict) -> RecordDict:
    arrays = content[p.ARRAYS]
    name = next(iter(arrays))
    values = arrays[name].numpy().copy()
    values.flat[0] = np.nan
    arrays[name] = Array(values)
    return content


def wrong_shape(content: RecordDict) -> RecordDict:
    arrays = content[p.ARRAYS]
    name = next(iter(arrays))
    arrays[name] = Array(np.zeros((3, 1), dtype=np.float32))
    return content


def extra_metric(content: RecordDict) -> RecordDict:  # Flower's own FedAvg would abort the round on this
    content[p.METRICS]["surprise"] = 1.0
    return content


def no_examples(content: RecordDict) -> RecordDict:
    content[p.METRICS]["num-examples"] = 0
    return content


def second_record(content: RecordDict) -> RecordDict:
    content["more-arrays"] = ArrayRecord({"x": Array(np.ones(2, dtype=np.float32))})
    content["more-metrics"] = MetricRecord({"x": 1.0})
    return content


def crash(content: RecordDict) -> RecordDict:
    raise RuntimeError("silo down")


@pytest.fixture(scope="module")
def fedavg_without_silo_1(tmp_path_factory) -> RunRecord:
    """FedAvg where silo 1's train reply is an error: what a rejected reply must amount to."""
    cfg = prepare(tiny_config(tmp_path_factory.mktemp("crash"), method="fedavg", run_name="crash"))
    with federation(cfg, tampered(TRAIN_FEDAVG, crash)) as grid:
        return run_experiment(grid, cfg)


@pytest.mark.parametrize("tamper, reason", [
    (nan_weights, "holds NaN or infinite values"),
    (wrong_shape, "the model's is float32"),
    (extra_metric, None),
    (no_examples, "'num-examples' = 0 is outside [1, inf]"),
    (second_record, None),
])
def test_fedavg_averages_only_valid_weights(tmp_path, fedavg_without_silo_1, tamper, reason):
    cfg = prepare(tiny_config(tmp_path, method="fedavg", run_name=tamper.__name__))
    with federation(cfg, tampered(TRAIN_FEDAVG, tamper)) as grid:
        record = run_experiment(grid, cfg)
    assert record.status == "ok"
    if reason is None:  # harmless extras are dropped before averaging, which then includes this silo
        assert record.failures == [] and record.server_metrics["round-1.silos"] == 2
        return
    assert reason in only_reason(record)
    assert record.server_metrics["round-1.silos"] == fedavg_without_silo_1.server_metrics["round-1.silos"] == 1
    assert record.global_metrics == fedavg_without_silo_1.global_metrics  # rejected == absent: nothing leaked in
    assert {s: without_timings(m) for s, m in record.silo_metrics.items()} == {
        s: without_timings(m) for s, m in fedavg_without_silo_1.silo_metrics.items()}


def test_fdkt_trains_the_honest_silo_when_the_other_sends_labels_outside_the_label_set(tmp_path):
    fast = {"fdkt.generator": "tiny-llama", "fdkt.num-per-label": 2, "fdkt.max-tokens": 6,
            "fdkt.augment-per-label": 2, "fdkt.min-words": 1, "fdkt.max-new-tokens": 12,
            "fdkt.llm-filter": False, "fdkt.vote-threshold": 0.0}  # tiny silos: keep every voted example

    def bad_labels(content: RecordDict) -> RecordDict:
        content[p.EXAMPLES]["labels"] = [7] * len(content[p.EXAMPLES]["labels"])
        return content

    cfg = prepare(tiny_config(tmp_path, method="fdkt", run_name="fdkt-bad-labels", **fast))
    with federation(cfg, tampered(SYNTHESIZE, bad_labels), tmp_path=tmp_path / "silos") as grid:
        record = run_experiment(grid, cfg)
    assert record.status == "ok"
    assert "labels ints in 0..2" in only_reason(record)
    assert record.silo_metrics["silo-0"]["train.synthetic"] > 0
    assert record.privacy["silo-1"]["mechanism"] == "dp-nn-votes"  # its demonstrations were rejected; it still voted
    assert {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == p.TRAIN_AUGMENTED} == {GOOD}
    assert math.isfinite(record.global_metrics["accuracy"])


# ------------------------------------------------------------------ the silo side: a bad request, a clear error


def ask(grid: InProcessGrid, message_type: str, content: RecordDict) -> Message:
    msg = Message(content, dst_node_id=GOOD, message_type=message_type, group_id="1", ttl=60)
    (reply,) = grid.send_and_receive([msg], timeout=60)
    return reply


def tiny_arrays(nan: bool = False) -> ArrayRecord:
    values = np.ones((2, 2), dtype=np.float32)
    values[0, 0] = np.nan if nan else 1.0
    return ArrayRecord({"w": Array(values)})


BAD_REQUESTS = {  # name -> (message type, content, what the error reply says)
    "no config": (p.INFO, RecordDict({p.METRICS: MetricRecord({"x": 1.0})}), "no 'config' record"),
    "train without weights": (TRAIN_FEDAVG, p.request({"epochs": 1}), "no 'arrays' ArrayRecord"),
    "train with NaN weights": (TRAIN_FEDAVG, p.request({"epochs": 1}, arrays=tiny_arrays(nan=True)), "NaN"),
    "train with text epochs": (TRAIN_FEDAVG, p.request({"epochs": "many"}, arrays=tiny_arrays()),
                               "'epochs' must be a number"),
    "train with negative epochs": (TRAIN_FEDAVG, p.request({"epochs": -1}, arrays=tiny_arrays()),
                                   "outside [0, 1000]"),
    "train with foreign weights": (TRAIN_FEDAVG, p.request({"epochs": 1}, arrays=tiny_arrays()), "state_dict"),
    "evaluate with a broken global test": (
        p.EVALUATE,
        p.request(arrays=tiny_arrays(), **{p.GLOBAL_TEST: ConfigRecord({"texts": ["a", "b"], "labels": [0]})}),
        "lists of equal length"),
    "augmented with an unknown label": (
        p.TRAIN_AUGMENTED, p.request(examples=ConfigRecord({"texts": ["x"], "labels": [9]})), "labels ints in 0..2"),
    "augmented with a NaN weight": (
        p.TRAIN_AUGMENTED,
        p.request({"synthetic-weight": math.nan}, examples=ConfigRecord({"texts": ["x"], "labels": [1]})),
        "'synthetic-weight' must be finite"),
    "synthesize for a path-like experiment": (SYNTHESIZE, p.request({p.EXPERIMENT: "../../etc"}), "experiment"),
}


@pytest.fixture(scope="module")
def silo_grid(tmp_path_factory) -> Iterator[InProcessGrid]:
    tmp = tmp_path_factory.mktemp("silo")
    with federation(tiny_config(tmp, method="fdkt"), tmp_path=tmp / "state") as grid:
        yield grid


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_a_malformed_request_gets_a_clear_error_reply(silo_grid, name):
    message_type, content, says = BAD_REQUESTS[name]
    reply = ask(silo_grid, message_type, content)
    assert reply.has_error()
    assert says in reply.error.reason
    expected = "RuntimeError" if name == "train with foreign weights" else "ProtocolError"
    assert reply.error.reason.startswith(expected)
