"""Flower's simulation engine through ``flwr run`` (Ray, a local SuperLink): one real run, one real failure.

``flwr run`` exits 0 even when the run fails; the runner decides by the record the ServerApp writes.
"""

from __future__ import annotations

import pytest
from conftest import tiny_config

from fedbridge.results import RunRecord
from fedbridge.simulations.runner import FLWR_ENV, RunFailed, run_simulation

pytestmark = pytest.mark.slow


def test_runner_disables_runtime_dependency_installation():
    # without it a local SuperLink would `uv sync` a fresh env (a multi-GB CUDA torch) for every run
    assert FLWR_ENV["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_fedavg_on_the_simulation_engine(tmp_path):
    cfg = tiny_config(tmp_path, method="fedavg", run_name="sim-fedavg",
                      **{"task.max-examples": 200, "partition.num-silos": 2, "partition.kind": "iid",
                         "slm.mode": "full"})
    record = run_simulation(cfg, quiet=True)
    path = tmp_path / "sim-fedavg.json"
    assert path.is_file()
    on_disk = RunRecord.read(path)
    assert on_disk.status == "ok" and record.status == "ok"
    assert on_disk.method == "fedavg" and on_disk.failures == []
    assert 0.0 <= on_disk.global_metrics["accuracy"] <= 1.0
    assert on_disk.global_metrics["n"] == 40  # 20% of 200
    assert {"silo-0", "silo-1"} <= set(on_disk.silo_metrics)
    assert on_disk.communication["bytes_sent"] > 1_000_000  # the tiny BERT's weights went out twice (train, evaluate)


def test_a_server_side_failure_raises_run_failed(tmp_path):
    # the file exists when the config is built; the label set makes loading fail inside the ServerApp
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"example {i},{'ab'[i % 2]}\n" for i in range(40)))
    cfg = tiny_config(tmp_path, method="local", run_name="sim-fails",
                      **{"task.name": str(data), "task.labels": "a,c", "task.max-examples": 0})
    with pytest.raises(RunFailed) as info:
        run_simulation(cfg, quiet=True)
    assert "sim-fails" in str(info.value)
    assert "unknown label 'b'" in str(info.value)
    record = RunRecord.read(tmp_path / "sim-fails.json")
    assert record.status == "failed" and record.error.startswith("DataError")


def test_a_run_spreads_its_silos_over_the_nodes_of_a_ray_cluster(tmp_path):
    """Two Ray nodes of one CPU each on this machine (Ray's own multi-node test cluster); with device.ray-address the
    run goes through a simulation SuperLink of its own that joins the cluster, and the silos' actors run on both
    nodes (one CPU each, so the second actor cannot fit on the head)."""
    import ray
    from ray._private.state import actors
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = tiny_config(tmp_path, method="local", run_name="ray-cluster",
                          **{"task.max-examples": 200, "partition.num-silos": 4, "partition.kind": "iid",
                             "device.ray-address": cluster.address})
        record = run_simulation(cfg, quiet=True)
        assert record.status == "ok" and set(record.silo_metrics) == {f"silo-{i}" for i in range(4)}
        ray.init(address=cluster.address)
        silos = [a for a in actors().values() if a["ActorClassName"].endswith("ClientAppActor")]
        assert len({a["Address"]["NodeID"] for a in silos}) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
