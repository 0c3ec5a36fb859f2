"""ExperimentConfig <-> Flower flat run config, validation messages, and pyproject.toml drift."""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
import tomllib
from dataclasses import dataclass

import pytest
from conftest import REPO

from fedbridge.config import (
    CanaryConfig,
    ExperimentConfig,
    LLMConfig,
    PartitionConfig,
    SLMConfig,
    TaskConfig,
    from_flat,
    to_flat,
)
from fedbridge.errors import ConfigError
from fedbridge.methods.fedavg.config import FedAvgConfig
from fedbridge.methods.registry import METHODS


def flatten(tree: dict, prefix: str = "") -> dict:
    """Flatten nested TOML tables with dots, as Flower does for [tool.flwr.app.config]."""
    out = {}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def pyproject_run_config() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return flatten(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


METHOD_PARSE = re.compile(r'from_flat\(\s*(\w+)\s*,\s*[\w.]*method_options\s*,\s*"([\w-]+)"\s*\)')


def method_option_sections() -> dict[str, type]:
    """``prefix -> dataclass`` for every ``from_flat(XConfig, ...method_options, "prefix")`` in fedbridge."""
    out = {}
    for path in sorted((REPO / "fedbridge").rglob("*.py")):
        source = path.read_text()
        found = METHOD_PARSE.findall(source)
        if not found:
            continue
        module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
        for class_name, prefix in found:
            cls = getattr(module, class_name)
            assert dataclasses.is_dataclass(cls), f"{path}: {class_name} is not a dataclass"
            assert out.setdefault(prefix, cls) is cls, f"two dataclasses parse '{prefix}.*'"
    return out


def method_option_defaults() -> dict:
    """``<method>.<option>`` -> default, for every method config dataclass."""
    out = {}
    for prefix, cls in method_option_sections().items():
        out.update(to_flat(cls(), prefix))
    return out


# ---------------------------------------------------------------- round trip


def test_defaults_round_trip():
    cfg = ExperimentConfig()
    flat = cfg.to_run_config()
    assert flat["task.name"] == "drug-reviews"
    assert flat["partition.num-silos"] == 4
    assert flat["slm.batch-size"] == 16
    assert flat["task.labels"] == ""  # tuples travel as comma strings
    assert all("_" not in key for key in flat), "run-config keys use dashes"
    assert ExperimentConfig.from_run_config(flat) == cfg


def test_non_default_round_trip_keeps_every_value():
    cfg = ExperimentConfig(
        method="fedavg", seed=7, rounds=2, timeout=12.5, results_dir="/tmp/x", run_name="r1",
        task=TaskConfig(name="data.csv", text_column="t", label_column="y", labels=("b", "a"), max_examples=50,
                        global_test_fraction=0.3, silo_test_fraction=0.25, encoding="latin-1",
                        description="note", instruction="Classify."),
        partition=PartitionConfig(kind="dirichlet", num_silos=3, column="site", alpha=0.1),
        slm=SLMConfig(model="tiny-bert,minilm-l2", epochs=2, batch_size=4, lr=1e-3, max_length=32),
        llm=LLMConfig(model="tiny-llama", batch_size=2, max_length=99),
        method_options={"fedavg.local-epochs": 3},
    )
    flat = cfg.to_run_config()
    assert flat["task.labels"] == "b,a"
    assert flat["fedavg.local-epochs"] == 3
    back = ExperimentConfig.from_run_config(flat)
    assert back == cfg
    assert back.task.labels == ("b", "a")  # order kept: it defines label ids
    assert back.method_options == {"fedavg.local-epochs": 3}  # not part of ==, so check it separately
    assert back.to_run_config() == flat


def test_partial_run_config_fills_defaults_and_coerces_strings():
    cfg = ExperimentConfig.from_run_config({"seed": "3", "slm.lr": "0.001", "task.labels": "x, y ,,z",
                                            "partition.num-silos": 2.0})
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.slm.lr == pytest.approx(0.001)
    assert cfg.task.labels == ("x", "y", "z")
    assert cfg.partition.num_silos == 2 and isinstance(cfg.partition.num_silos, int)
    assert cfg.rounds == ExperimentConfig().rounds


def test_slm_spec_for_assigns_round_robin():
    slm = SLMConfig(model="tiny-bert, minilm-l2")
    assert [slm.spec_for(i) for i in range(4)] == ["tiny-bert", "minilm-l2", "tiny-bert", "minilm-l2"]
    assert SLMConfig(model="embedded").spec_for(5) == "embedded"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("key, suggestion", [
    ("slm.epoch", "slm.epochs"),
    ("task.max-example", "task.max-examples"),
    ("sead", "seed"),
    ("partition.num_silos", "partition.num-silos"),
])
def test_unknown_key_suggests_the_close_one(key, suggestion):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_run_config({key: 1})
    assert f"Unknown config key '{key}'" in str(info.value)
    assert f"Did you mean '{suggestion}'?" in str(info.value)


def test_unknown_key_without_a_close_match_lists_known_keys():
    with pytest.raises(ConfigError, match=r"Unknown config key 'llm.qqqqqqqq'.*Known keys: .*llm.batch-size"):
        ExperimentConfig.from_run_config({"llm.qqqqqqqq": 1})


@pytest.mark.parametrize("key, value, kind", [
    ("seed", "abc", "int"),
    ("rounds", 2.5, "int"),
    ("slm.lr", "fast", "float"),
    ("timeout", "soon", "float"),
    ("partition.alpha", None, "float"),
])
def test_bad_types_name_key_value_and_type(key, value, kind):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_run_config({key: value})
    msg = str(info.value)
    assert f"'{key}'" in msg and repr(value) in msg and kind in msg


def test_bool_and_tuple_coercion_in_method_sections():
    @dataclass(frozen=True)
    class Opts:
        flag: bool = False
        names: tuple[str, ...] = ()
        count: int = 1

    parsed = from_flat(Opts, {"m.flag": "TRUE", "m.names": "a,b", "m.count": 4.0}, "m")
    assert parsed == Opts(flag=True, names=("a", "b"), count=4)
    assert from_flat(Opts, {"m.flag": "0"}, "m").flag is False
    with pytest.raises(ConfigError, match=r"'m.flag' = 'yes' is not a valid bool"):
        from_flat(Opts, {"m.flag": "yes"}, "m")
    with pytest.raises(ConfigError, match="Did you mean 'm.count'"):
        from_flat(Opts, {"m.cont": 2}, "m")
    # keys of other sections are not this section's business
    assert from_flat(Opts, {"other.x": 1}, "m") == Opts()


def test_method_options_are_kept_and_parsed_by_the_method():
    cfg = ExperimentConfig.from_run_config({"method": "fedavg", "fedavg.local-epochs": 2})
    assert cfg.method_options == {"fedavg.local-epochs": 2}
    assert from_flat(FedAvgConfig, cfg.method_options, "fedavg") == FedAvgConfig(local_epochs=2)
    with pytest.raises(ConfigError, match="Did you mean 'fedavg.local-epochs'"):
        from_flat(FedAvgConfig, {"fedavg.local-epoch": 2}, "fedavg")


# ---------------------------------------------------------------- pyproject.toml drift


def test_method_option_discovery_finds_fedavg():
    # guards the guard: if discovery found nothing, the drift test below would check less than it claims
    sections = method_option_sections()
    assert sections["fedavg"] is FedAvgConfig
    assert method_option_defaults()["fedavg.local-epochs"] == FedAvgConfig().local_epochs
    # every option section is named after a method, so `method=<name>` and `<name>.*` go together; the one
    # exception is fault injection, which applies to any method
    assert set(sections) <= set(METHODS) | {"faults"}, sorted(set(sections) - set(METHODS))


def test_pyproject_run_config_matches_dataclass_defaults():
    declared = pyproject_run_config()
    expected = {**ExperimentConfig().to_run_config(), **method_option_defaults()}
    missing, stale = sorted(set(expected) - set(declared)), sorted(set(declared) - set(expected))
    assert not missing, f"pyproject.toml [tool.flwr.app.config] lacks {missing}"
    assert not stale, f"pyproject.toml [tool.flwr.app.config] declares keys no config knows: {stale}"
    for key, default in expected.items():
        value = declared[key]
        if isinstance(default, float):
            assert isinstance(value, (int, float)) and not isinstance(value, bool), key
            assert math.isclose(value, default) or (math.isinf(value) and math.isinf(default)), (key, value, default)
        else:
            assert type(value) is type(default) and value == default, (key, value, default)


def test_every_run_config_key_is_documented_in_a_config_table():
    """Each key of the dataclasses (core sections and every method's) names a row of a config table: the first
    cell of a Markdown table row in README.md or docs/*.md holds it in backticks."""
    documented = set()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("|"):
                documented |= set(re.findall(r"`([a-z][\w.-]*)`", line.split("|")[1]))
    keys = {**ExperimentConfig().to_run_config(), **method_option_defaults()}
    assert not (undocumented := sorted(set(keys) - documented)), f"no config table row names {undocumented}"


def test_pyproject_run_config_parses_to_the_default_config():
    declared = pyproject_run_config()
    cfg = ExperimentConfig.from_run_config(declared)
    assert cfg == ExperimentConfig()
    assert set(cfg.method_options) == set(method_option_defaults())


def test_moved_keys_still_read_under_their_new_names():
    """Records and checkpoints written before canaries.* was its own section name the keys social.canary-*."""
    old = {"method": "fdkt", "social.canaries": True, "social.canary-kind": "name", "social.canary-copies": 2,
           "social.canary-candidates": 99}
    cfg = ExperimentConfig.from_run_config(old)
    assert cfg.canaries == CanaryConfig(enabled=True, kind="name", copies=2, candidates=99)
    assert not any(k.startswith("social.") for k in cfg.to_run_config())
