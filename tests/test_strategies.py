"""fedbridge's methods as Flower strategies: a strategy built in Python runs the record its flat run config runs, bad
options fail in one line, the typed options round-trip through the flat config, the silos' settings stay the run
config's, the silo side registers on any ClientApp, and a ServerApp of one's own runs two strategies (``flwr run``)."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
from conftest import REPO, tiny_config
from flwr.app import ArrayRecord, ConfigRecord
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy
from test_layout import PACKAGE, import_graph

from fedbridge import protocol as p
from fedbridge.client_app import HANDLERS, SERVED, register
from fedbridge.client_app import app as client_app
from fedbridge.config import ExperimentConfig, LLMConfig, PartitionConfig, SLMConfig, TaskConfig, from_flat, to_flat
from fedbridge.errors import ConfigError, DataError
from fedbridge.faults import FaultConfig
from fedbridge.methods.fdkt.config import FDKTConfig
from fedbridge.methods.fedavg.config import FedAvgConfig
from fedbridge.methods.pe.config import PEConfig
from fedbridge.methods.registry import METHODS, option_class
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.strategies import (
    STRATEGIES,
    Local,
    MethodStrategy,
    Pipeline,
    PrivateEvolution,
    WeightSharing,
    strategy_for,
)
from fedbridge.strategies.base import SILO_SECTIONS

pytestmark = pytest.mark.usefixtures("one_thread")
# conftest's TINY, typed
TINY = dict(task=TaskConfig(max_examples=120), partition=PartitionConfig(kind="iid", num_silos=2),
            slm=SLMConfig(model="tiny-bert", epochs=1, max_length=64), llm=LLMConfig(model="tiny-llama", max_length=64),
            rounds=1, timeout=120.0)
# test_pe's FAST, both ways
PE_FAST = {"pe.iterations": 2, "pe.candidates-per-label": 3, "pe.num-per-label": 2, "pe.max-new-tokens": 10,
           "pe.min-words": 1, "pe.k": 2, "pe.epsilon": 2.0, "pe.threshold": 0.0}
EXAMPLE = REPO / "examples" / "custom-serverapp"


def nodes(state: Path, n: int = 2) -> list[dict]:
    """Simulated silos with their own state dir and a fixed noise seed (the silos' own: reproducible votes)."""
    return [{"partition-id": i, "num-partitions": n, "state-dir": str(state), "noise-seed": 0} for i in range(n)]


def start_inprocess(strategy: MethodStrategy, state: Path):
    grid = InProcessGrid(client_app, strategy.run_config(), nodes(state))
    try:
        return strategy.start(grid=grid)
    finally:
        grid.close()


def run_flat(cfg: ExperimentConfig, state: Path) -> RunRecord:
    grid = InProcessGrid(client_app, cfg.to_run_config(), nodes(state))
    try:
        return run_experiment(grid, cfg)
    finally:
        grid.close()


# ------------------------------------------------------------------ the same run, typed or flat


@pytest.mark.parametrize("method, typed, flat", [
    ("local", {}, {}),
    ("pe", {"config": PEConfig(iterations=2, candidates_per_label=3, num_per_label=2, max_new_tokens=10, min_words=1,
                               k=2, epsilon=2.0, threshold=0.0)}, PE_FAST),
])
def test_a_strategy_built_in_python_runs_the_record_of_its_flat_run_config(tmp_path, method, typed, flat):
    expected = run_flat(tiny_config(tmp_path / "flat", method=method, run_name="flat", **flat), tmp_path / "flat-silos")
    strategy = strategy_for(method)(**TINY, **typed, results_dir=tmp_path / "typed", run_name="typed")
    result = start_inprocess(strategy, tmp_path / "typed-silos")

    record = strategy.record
    assert record.status == expected.status == "ok" and record.failures == []
    assert record.method == method and record.run_name == "typed"
    assert record.global_metrics == expected.global_metrics and record.privacy == expected.privacy
    assert (record.privacy is not None) == (method == "pe")  # the privacy compared is there to compare
    assert record.silo_metrics.keys() == expected.silo_metrics.keys()
    same = set(record.config) & set(expected.config) - {"run-name", "results-dir"}
    assert {k: record.config[k] for k in same} == {k: expected.config[k] for k in same}
    assert RunRecord.read(tmp_path / "typed" / "typed.json").global_metrics == record.global_metrics
    # Flower's shape: the server's global test set at the run's last round, the silo-test means on the client side
    [(last, server)] = result.evaluate_metrics_serverapp.items()
    assert last == max(int(r) for r in record.communication["by_round"])
    assert dict(server) == {k: v for k, v in record.global_metrics.items() if not k.startswith("silo_test_")}
    assert result.evaluate_metrics_clientapp[last]["macro_f1"] == record.global_metrics["silo_test_macro_f1"]


def test_a_failed_start_raises_and_keeps_the_failed_record(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"example {i},{'ab'[i % 2]}\n" for i in range(40)))
    strategy = Local(TaskConfig(name=str(data), labels=("a", "c")), results_dir=tmp_path)
    with pytest.raises(DataError, match="unknown label 'b'"):
        start_inprocess(strategy, tmp_path / "silos")
    assert strategy.record.status == "failed" and strategy.record.error.startswith("DataError")
    assert (tmp_path / f"{strategy.record.run_name}.json").is_file()


def test_fedbridges_serverapp_runs_the_strategy_of_the_run_configs_method():
    cfg = tiny_config("results", method="pe", **PE_FAST)
    strategy = strategy_for(cfg.method)(experiment=cfg)
    assert type(strategy) is PrivateEvolution and strategy.run_config() == cfg.to_run_config()


# ------------------------------------------------------------------ the classes


def test_every_method_is_a_flower_strategy_named_as_its_method_class():
    assert STRATEGIES.keys() == METHODS.keys()
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.method == name
        assert cls.__name__ == ("WeightSharing" if name == "fedavg" else METHODS[name].__name__)
        assert cls.__module__ == "fedbridge.strategies" or cls is WeightSharing
    with pytest.raises(ConfigError, match="Unknown method 'fedavgg'"):
        strategy_for("fedavgg")


def test_the_round_hooks_refuse_to_be_driven_by_flowers_loop():
    strategy = Local()
    with pytest.raises(NotImplementedError, match=r"call start\(grid=...\)"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), None)
    with pytest.raises(NotImplementedError, match="nor wrapped by another strategy"):
        strategy.aggregate_evaluate(1, [])


@pytest.mark.parametrize("build, message", [
    (lambda: PrivateEvolution(config=FDKTConfig()), r"PrivateEvolution\(config=...\) takes PEConfig, got FDKTConfig"),
    (lambda: PrivateEvolution(config={"epsilon": 4}), r"takes PEConfig, got dict"),
    (lambda: Local(config=PEConfig()), "Local takes no config: the 'local' method has no options of its own"),
    (lambda: Local(sed=1), "Local got an unknown option 'sed'. Did you mean 'seed'?"),
    (lambda: Local(seed="1"), r"Local\(seed=...\) takes int, got str '1'"),
    (lambda: Local(slm={"model": "tiny-bert"}), r"Local\(slm=...\) takes SLMConfig, got dict"),
    (lambda: Pipeline(fdkt=PEConfig()), r"Pipeline\(fdkt=...\) takes FDKTConfig, got PEConfig"),
    (lambda: PrivateEvolution(slm=SLMConfig(dp_epsilon=4.0)), "slm.dp-epsilon=4 applies to methods that share"),
    (lambda: PrivateEvolution(config=PEConfig(epsilon=-1.0)), "pe.epsilon must be > 0"),
    (lambda: WeightSharing(strategy=type("Mine", (FedAvg,), {})()), "takes one of Flower's weight strategies"),
    (lambda: WeightSharing(strategy=FedAvg(fraction_train=0.5)), "sets FedAvg's fraction_train itself"),
    (lambda: WeightSharing(strategy=FedProx(proximal_mu=0.1), slm=SLMConfig(dp_epsilon=4.0)),
     "FedProx's proximal term is not clipped"),
])
def test_a_bad_option_fails_in_one_line_naming_it(build, message):
    with pytest.raises(ConfigError, match=message) as info:
        build()
    assert "\n" not in str(info.value)


def test_weight_sharing_runs_the_flower_strategy_it_is_given():
    def fedavg_options(strategy: MethodStrategy) -> FedAvgConfig:
        return from_flat(FedAvgConfig, strategy.experiment.method_options, "fedavg")

    adam = fedavg_options(WeightSharing(strategy=FedAdam(eta=0.01, beta_1=0.8), config=FedAvgConfig(local_epochs=2)))
    assert (adam.strategy, adam.local_epochs, adam.options()) == ("FedAdam", 2, {"eta": 0.01, "beta_1": 0.8})
    assert fedavg_options(WeightSharing(strategy=FedAvg())) == FedAvgConfig()
    run_config = tiny_config("results", **{"fedavg.local-epochs": 2})  # the rest of fedavg.* stays the run config's
    prox = fedavg_options(WeightSharing(strategy=FedProx(proximal_mu=0.1), experiment=run_config))
    assert (prox.strategy, prox.strategy_options, prox.local_epochs) == ("FedProx", "proximal_mu=0.1", 2)
    with pytest.raises(ConfigError, match="WeightSharing got a strategy twice"):
        WeightSharing(strategy=FedAvg(), config=FedAvgConfig(strategy="Krum"))


# ------------------------------------------------------------------ typed options <-> flat run config


def varied(value):
    """Another value of the same type (None where there is no obvious one)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return 0.5 if math.isinf(value) or value == 0 else value / 2
    if isinstance(value, tuple):
        return (*value, "x")
    return value + "x" if isinstance(value, str) else None


@pytest.mark.parametrize("section, cls", sorted({s: c for strategy in STRATEGIES.values()
                                                 for s, c in strategy.sections().items()}.items()))
def test_every_methods_options_round_trip_through_the_flat_run_config(section, cls):
    assert from_flat(cls, to_flat(cls(), section), section) == cls()
    tried = 0
    for field in dataclasses.fields(cls):
        try:
            obj = dataclasses.replace(cls(), **{field.name: varied(getattr(cls(), field.name))})
        except ConfigError:  # a value the option rejects (a mechanism's name plus "x")
            continue
        tried += 1
        assert from_flat(cls, to_flat(obj, section), section) == obj, field.name
    assert tried, "no option could be varied"


def test_each_option_section_is_the_one_dataclass_of_its_methods_config_module():
    assert option_class("pe") is PEConfig and option_class("faults") is FaultConfig
    assert option_class("local") is None and Pipeline.sections().keys() == {"fdkt", "crosslm", "faults"}


# ------------------------------------------------------------------ what the silos read


def test_on_a_run_config_python_options_may_change_only_what_the_server_alone_reads(tmp_path):
    run_config = tiny_config(tmp_path, method="pe", **{"fdkt.epsilon": 2.0})
    strategy = PrivateEvolution(experiment=run_config, config=PEConfig(epsilon=1.0), results_dir="elsewhere",
                                timeout=30.0)
    assert strategy.experiment.method_options["pe.epsilon"] == 1.0 and strategy.experiment.results_dir == "elsewhere"
    for changed, key in ((dict(seed=1), "seed"), (dict(task="tweets"), "task.name"),
                         (dict(slm=dataclasses.replace(run_config.slm, model="embedded")), "slm.model"),
                         (dict(faults=FaultConfig(slow_silos="0")), "faults.slow-silos")):
        with pytest.raises(ConfigError, match=f"the silos read '{key}' from the run config"):
            PrivateEvolution(experiment=run_config, **changed)
    with pytest.raises(ConfigError, match="the silos read 'fdkt.epsilon' from the run config, where it is 2.0"):
        strategy_for("fdkt")(experiment=run_config, config=FDKTConfig())


def test_silo_sections_cover_every_option_section_the_silo_side_parses():
    silo_side = nx.descendants(import_graph(packages=True), "fedbridge.client_app") | {"fedbridge.client_app"}
    parsed = set()
    for module in silo_side:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if path.is_file():
            parsed |= set(re.findall(r'from_flat\(\s*\w+\s*,[^,()]+,\s*"([\w-]+)"\s*\)', path.read_text()))
    assert {"fdkt", "social", "faults"} <= parsed <= set(SILO_SECTIONS)


# ------------------------------------------------------------------ the silo side on any ClientApp


def test_register_puts_the_handlers_of_the_named_methods_on_any_clientapp():
    app = register(ClientApp(), ["local", "pe"])
    assert set(app._registered_funcs) == {"query.info", "train.local", "train.augmented", "query.dp_vote"}
    every = register(ClientApp())
    assert set(every._registered_funcs) == {t if "." in t else f"{t}.default" for t in HANDLERS}
    assert set(client_app._registered_funcs) == set(every._registered_funcs)
    assert set(SERVED) == set(METHODS)  # every method has its silo side here, and no other
    with pytest.raises(ConfigError, match="register: unknown method 'fedavgg'"):
        register(ClientApp(), ["fedavgg"])
    assert {p.INFO, p.DP_VOTE} <= HANDLERS.keys()


# ------------------------------------------------------------------ a ServerApp of one's own


@pytest.mark.slow
def test_the_example_serverapp_runs_two_strategies_with_flwr_run(tmp_path):
    """examples/custom-serverapp through ``flwr run`` on the simulation engine, tiny models from the run config: Local,
    then Private Evolution, each with its record, status ok."""
    from fedbridge.simulations.runner import flwr_env

    overrides = tmp_path / "overrides.toml"
    overrides.write_text(f'results-dir = "{tmp_path / "results"}"\nslm.model = "tiny-bert"\nllm.model = "tiny-llama"\n'
                         'task.max-examples = 120\nslm.epochs = 1\nslm.max-length = 64\nllm.max-length = 64\n'
                         'partition.kind = "iid"\ntimeout = 300.0\n')
    cmd = [str(Path(sys.executable).with_name("flwr")), "run", str(EXAMPLE), "local", "--stream", "--run-config",
           str(overrides), "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    done = subprocess.run(cmd, env=flwr_env(), capture_output=True, text=True, timeout=900)
    records = sorted((RunRecord.read(path) for path in (tmp_path / "results").glob("*.json")), key=lambda r: r.method)
    assert [r.method for r in records] == ["local", "pe"], done.stdout[-3000:]
    for record in records:
        assert record.status == "ok" and record.failures == [] and set(record.silo_metrics) == {"silo-0", "silo-1"}
    assert records[1].config["pe.iterations"] == 1 and records[1].privacy["silo-0"]["private"] is True
