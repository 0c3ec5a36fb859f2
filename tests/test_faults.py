"""Fault injection (``faults.*``): which silos crash and where, that the old keys still mean what they meant, that a
run survives silos crashing at random points with every loss accounted for, and the benchmark's audit."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import REPO, tiny_config

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.errors import ConfigError
from fedbridge.faults import FaultConfig
from fedbridge.methods.fedavg.messages import TRAIN_FEDAVG
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def bench_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", REPO / "benchmarks" / "bench_faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crash_fraction_draws_that_many_silos_reproducibly():
    for fraction, n, expected in ((0.0, 4, 0), (0.25, 4, 1), (0.5, 4, 2), (0.5, 3, 2), (1.0, 5, 5), (0.1, 4, 0)):
        chosen = FaultConfig(crash_fraction=fraction, crash_seed=7).crashing_silos(n)
        assert len(chosen) == expected and chosen <= set(range(n))
        assert chosen == FaultConfig(crash_fraction=fraction, crash_seed=7).crashing_silos(n)
    draws = {frozenset(FaultConfig(crash_fraction=0.5, crash_seed=s).crashing_silos(6)) for s in range(20)}
    assert len(draws) > 5  # the seed picks different silos
    assert FaultConfig(crash_silos="3", crash_fraction=0.25, crash_seed=0).crashing_silos(4) >= {3}


def test_crash_probability_lands_at_random_points_and_the_silo_comes_back():
    cfg = FaultConfig(crash_silos="0", crash_probability=0.5, crash_seed=1)
    points = [cfg.crash_at(0, 2, TRAIN_FEDAVG, str(r)) for r in range(200)]
    crashed = sum(pt is not None for pt in points)
    assert 70 < crashed < 130 and set(points) == {"before", None}
    assert any(a is not None and b is None for a, b in zip(points, points[1:]))  # crashed, then served again
    assert points == [cfg.crash_at(0, 2, TRAIN_FEDAVG, str(r)) for r in range(200)]  # same draws in any process
    assert all(cfg.crash_at(1, 2, TRAIN_FEDAVG, str(r)) is None for r in range(50))  # silo 1 is not crashing
    both = FaultConfig(crash_silos="0", crash_point="random", crash_seed=1)
    assert {both.crash_at(0, 2, TRAIN_FEDAVG, str(r)) for r in range(50)} == {"before", "after"}


def test_the_original_keys_keep_their_meaning():
    cfg = FaultConfig(crash_silos="1, 2", crash_message_types=f"{p.TRAIN_LOCAL},{p.EVALUATE}")
    assert cfg.active and cfg.crash_at(1, 4, p.TRAIN_LOCAL, "1") == "before"
    assert cfg.crash_at(2, 4, p.EVALUATE, "9") == "before"
    assert cfg.crash_at(1, 4, p.INFO, "0") is None and cfg.crash_at(0, 4, p.TRAIN_LOCAL, "1") is None
    assert not FaultConfig().active and FaultConfig(crash_fraction=0.5).active
    assert "silos 1, 2 crash on" in cfg.describe()
    described = FaultConfig(crash_fraction=0.5, crash_probability=0.3, crash_point="random", crash_seed=4).describe()
    assert "0.5 of the silos (seed 4)" in described and "probability 0.3" in described and "random" in described


@pytest.mark.parametrize("bad", [{"crash_fraction": 1.5}, {"crash_probability": -0.1}, {"crash_point": "during"}])
def test_bad_fault_settings_are_config_errors(bad):
    with pytest.raises(ConfigError, match="faults"):
        FaultConfig(**bad)


def run(tmp_path, name: str, method: str, **options) -> tuple[RunRecord, InProcessGrid]:
    cfg = prepare(tiny_config(tmp_path, method=method, run_name=name, **options))
    n = cfg.partition.num_silos
    grid = InProcessGrid(client_app, cfg.to_run_config(), [{"partition-id": i, "num-partitions": n} for i in range(n)])
    try:
        return run_experiment(grid, cfg), grid
    finally:
        grid.close()


def test_fedavg_averages_whoever_answered_each_round(tmp_path):
    faults = {"faults.crash-silos": "1", "faults.crash-message-types": TRAIN_FEDAVG,
              "faults.crash-probability": 0.5, "faults.crash-seed": 3}
    record, _ = run(tmp_path, "fedavg-flaky", "fedavg", rounds=4, **{"task.max-examples": 60, **faults})
    cfg = FaultConfig(crash_silos="1", crash_message_types=TRAIN_FEDAVG, crash_probability=0.5, crash_seed=3)
    crashed = [r for r in range(1, 5) if cfg.crash_at(1, 2, TRAIN_FEDAVG, str(r))]
    assert 0 < len(crashed) < 4, "seed 3 should crash some rounds, not all"  # else pick another seed
    assert record.status == "ok"
    assert [(f["silo"], f["round"]) for f in record.failures] == [("silo-1", r) for r in crashed]
    assert all("injected crash on train" in f["reason"] for f in record.failures)
    assert {r: record.server_metrics[f"round-{r}.silos"] for r in range(1, 5)} == {
        r: 1 if r in crashed else 2 for r in range(1, 5)}
    assert "silo-test.accuracy" in record.silo_metrics["silo-1"]  # evaluated at the end: it came back
    assert any("faults injected" in n and "probability 0.5" in n for n in record.notes)


def test_a_crash_after_the_handler_loses_the_reply_not_the_run(tmp_path):
    record, grid = run(tmp_path, "lost-reply", "local", **{"faults.crash-silos": "0", "faults.crash-point": "after",
                                                           "faults.crash-message-types": p.TRAIN_LOCAL})
    assert record.status == "ok"
    [failure] = record.failures
    assert failure["silo"] == "silo-0" and "after handling train.local" in failure["reason"]
    assert "its reply is lost" in failure["reason"]
    assert "silo-test.accuracy" in record.silo_metrics["silo-1"] and "silo-test.accuracy" not in record.silo_metrics[
        "silo-0"]
    assert [e["event"] for e in record.timelines["silo-0"]] == ["sent", "received", "sent", "failed"]


def test_the_benchmark_accounts_for_every_request(tmp_path, monkeypatch):
    bench = bench_faults()
    monkeypatch.setattr(sys, "argv", ["bench_faults.py", "--tiny", "--methods", "local,fedavg", "--fractions", "0.5",
                                      "--seeds", "2", "--silos", "2", "--rounds", "2", "--out", str(tmp_path)])
    bench.main()
    result = json.loads((tmp_path / "faults.json").read_text())
    assert result["lost_total"] == 0 and len(result["runs"]) == 2
    for row in result["runs"]:
        assert row["crashing"] == sorted(FaultConfig(crash_fraction=0.5, crash_seed=2).crashing_silos(2))
        assert len(row["crashing"]) == 1 and row["lost"] == []
        survivor = f"silo-{1 - row['crashing'][0]}"
        assert row["silos"][survivor]["result"] and row["silos"][survivor]["received"] == row["silos"][survivor]["sent"]
        assert sum(s["failed"] for s in row["silos"].values()) == row["injected_crashes"]
    table = (tmp_path / "faults.md").read_text()
    assert table.count("\n") == 2 + 2 and "| fedavg |" in table


def test_the_audit_finds_what_a_record_lost(tmp_path):
    bench = bench_faults()
    cfg = tiny_config(tmp_path, method="local", **{"faults.crash-silos": "1"})
    record = RunRecord(run_name="x", method="local", seed=0, config={}, status="ok")
    record.timelines = {"silo-0": [{"event": "sent", "message_type": p.TRAIN_LOCAL, "round": 1, "t": 0.1}],
                        "silo-1": [{"event": "sent", "message_type": p.TRAIN_LOCAL, "round": 1, "t": 0.1},
                                   {"event": "failed", "message_type": p.TRAIN_LOCAL, "round": 1, "t": 0.2}]}
    record.failures = [{"silo": "silo-1", "message_type": p.TRAIN_LOCAL, "round": 1, "reason": "disk on fire"}]
    lost = bench.audit(record, cfg)["lost"]
    assert any("silo-0: train.local (round 1) has no outcome" in x for x in lost)
    assert any("silo-0: did not crash, but has no result" in x for x in lost)
    assert any("not injected: disk on fire" in x for x in lost) and len(lost) == 3


def test_an_adversarial_silo_scales_its_weights_and_inverts_its_scores():
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, RecordDict

    from fedbridge import protocol as p
    from fedbridge.faults import poison

    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]])
    reply = Message(RecordDict({p.ARRAYS: ArrayRecord({"w": Array(np.ones(3, np.float32))}),
                                p.SCORES: p.probabilities_record(probs)}), dst_node_id=1, message_type="train")
    poison(reply, -10.0)
    assert reply.content[p.ARRAYS]["w"].numpy().tolist() == [-10.0] * 3
    inverted = np.array(reply.content[p.SCORES]["probs"]).reshape(2, 3)
    assert np.allclose(inverted.sum(axis=1), 1) and inverted[0].argmax() == 2 and inverted[1].argmax() == 2


def test_a_median_holds_where_the_mean_follows_an_adversarial_silo(tmp_path):
    import numpy as np
    from conftest import tiny_config

    from fedbridge import protocol as p
    from fedbridge.client_app import app as client_app
    from fedbridge.server_app import run_experiment
    from fedbridge.simulations.inprocess import InProcessGrid
    from fedbridge.simulations.runner import prepare

    options = {"partition.num-silos": 3, "rounds": 1, "fedavg.local-epochs": 1, "faults.adversarial-silos": "0"}
    for strategy in ("FedAvg", "FedMedian"):
        cfg = prepare(tiny_config(tmp_path / strategy, method="fedavg", **options, **{"fedavg.strategy": strategy}))
        grid = InProcessGrid(client_app, cfg.to_run_config(), [{"partition-id": i, "num-partitions": 3}
                                                               for i in range(3)])
        try:
            record = run_experiment(grid, cfg)
        finally:
            grid.close()
        assert record.status == "ok" and any("adversarial" in n for n in record.notes)
        sent = {m.metadata.dst_node_id: m for m in grid.sent if m.metadata.message_type == TRAIN_FEDAVG}
        start = next(iter(sent.values())).content[p.ARRAYS]["head.weight"].numpy()
        trained = {req.metadata.dst_node_id: rep.content[p.ARRAYS]["head.weight"].numpy()
                   for _, req, rep in grid.replied if req.metadata.message_type == TRAIN_FEDAVG}
        [final] = [m.content[p.ARRAYS]["head.weight"].numpy() for m in grid.sent
                   if m.metadata.message_type == p.EVALUATE][:1]
        assert not np.allclose(trained[1000], start)
        stacked = np.stack([trained[n] for n in sorted(trained)])
        if strategy == "FedMedian":  # the element-wise median: never the adversary's extreme values
            assert np.allclose(final, np.median(stacked, axis=0), atol=1e-6)
            assert np.abs(final).max() <= np.abs(stacked[1:]).max() + 1e-6
        else:  # the mean follows the x -10 head: far outside every honest silo's weights
            assert np.abs(final).max() > 2 * np.abs(stacked[1:]).max()
