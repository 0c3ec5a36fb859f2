"""The weight-sharing baseline takes any of Flower's weight strategies by name (fedavg.strategy), Flower's own classes
with their options from config (fedavg.strategy-options), hardened by fedbridge's round checks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedbridge.errors import ConfigError
from fedbridge.methods.fedavg.config import STRATEGIES, FedAvgConfig
from fedbridge.methods.fedavg.server import checked
from fedbridge.models.loading import load_slm
from fedbridge.silo import Silo
from fedbridge.simulations.runner import run_inprocess
from fedbridge.tasks import load_federation

pytestmark = pytest.mark.usefixtures("one_thread")
THREE = {"partition.num-silos": 3, "fedavg.local-epochs": 1, "rounds": 2}
OPTIONS = {"FedProx": "proximal_mu=0.1", "FedAvgM": "server_momentum=0.9", "FedAdam": "eta=0.01",
           "FedTrimmedAvg": "beta=0.2", "Krum": "num_malicious_nodes=0", "MultiKrum": "num_nodes_to_select=2"}


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_flower_strategy_runs_as_the_weight_sharing_baseline(tmp_path, name):
    record = run_inprocess(tiny_config(tmp_path, method="fedavg", **THREE, **{
        "fedavg.strategy": name, "fedavg.strategy-options": OPTIONS.get(name, "")}))
    assert record.status == "ok" and record.failures == []
    assert record.server_metrics["round-2.silos"] == 3 and 0 <= record.global_metrics["macro_f1"] <= 1
    assert record.config["fedavg.strategy"] == name


def test_the_strategy_is_flowers_own_class():
    import flwr.serverapp.strategy as flower

    for name in STRATEGIES:
        assert issubclass(checked(name), getattr(flower, name))


@pytest.mark.parametrize("options, message", [
    ({"fedavg.strategy": "FedAvgg"}, "Unknown fedavg.strategy 'FedAvgg'. Use one of Flower's: FedAvg, FedProx"),
    ({"fedavg.strategy": "FedProx", "fedavg.strategy-options": "mu=0.1"}, "FedProx takes proximal_mu=<float>"),
    ({"fedavg.strategy": "Krum", "fedavg.strategy-options": "num_malicious_nodes=x"},
     "num_malicious_nodes must be a int"),
    ({"fedavg.strategy": "FedProx", "fedavg.strategy-options": "proximal_mu=0.5", "slm.dp-epsilon": 4.0},
     "FedProx's proximal term is not clipped"),
])
def test_a_bad_strategy_or_option_is_named(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_inprocess(tiny_config(tmp_path, method="fedavg", **options))


def test_fedavg_config_parses_options_to_the_declared_types():
    assert FedAvgConfig(strategy="FedAdam", strategy_options="eta=0.05, beta-1=0.8").options() == {
        "eta": 0.05, "beta_1": 0.8}
    assert FedAvgConfig(strategy="Bulyan", strategy_options="num_malicious_nodes=1").options() == {
        "num_malicious_nodes": 1}


def test_fedprox_keeps_a_silos_weights_near_the_global_ones(tmp_path):
    cfg = tiny_config(tmp_path, **{"slm.epochs": 3})
    data = load_federation(cfg.task, cfg.partition, cfg.seed).silos[0]
    silo = Silo(0, cfg, ("negative", "neutral", "positive"), data, tmp_path / "state")
    start = load_slm(cfg.slm.spec_for(0), 3, 0, None, cfg.slm).trainable_state()

    def moved(mu: float) -> float:
        model = silo.new_slm(start)
        silo.train_slm(model, epochs=3, proximal_mu=mu)
        return float(sum(((v - start[k]) ** 2).sum() for k, v in model.trainable_state().items()) ** 0.5)

    assert moved(100.0) < 0.5 * moved(0.0)
    assert torch.equal(silo.new_slm(start).head.weight, start["head.weight"])  # the start itself is untouched
