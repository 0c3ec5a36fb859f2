"""Shared fixtures: offline environment, tiny data files, and tiny-model federation configs."""

from __future__ import annotations

import dataclasses
import os
import tempfile

# Silo state a test run leaves (privacy ledgers, CrossLM SLM snapshots of silos a test drops) goes to a temporary
# directory, never the user's cache; the simulation engine's processes inherit it.
os.environ["FEDBRIDGE_SILO_STATE_DIR"] = tempfile.mkdtemp(prefix="fedbridge-tests-silo-state-")
# Never reach a model hub from tests; keep Flower from building a runtime env or checking for updates.
for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                     "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_DISABLE_UPDATE_CHECK": "1",
                     "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

from fedbridge.config import ExperimentConfig  # noqa: E402
from fedbridge.results import RunRecord  # noqa: E402

# Property tests: a fixed example sequence by default, so a fresh clone's `make test` is reproducible;
# HYPOTHESIS_PROFILE=explore searches 20x further with fresh randomness (run it after changing a parser).
settings.register_profile("default", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
SMS_SPAM = REPO.parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection.tsv"

# Small, fast federation settings: tiny random models, 120 drug reviews, 2 iid silos, one round.
TINY = {
    "slm.model": "tiny-bert",
    "llm.model": "tiny-llama",
    "task.max-examples": 120,
    "slm.epochs": 1,
    "slm.max-length": 64,
    "llm.max-length": 64,
    "partition.num-silos": 2,
    "partition.kind": "iid",
    "rounds": 1,
    "timeout": 120.0,
}


def tiny_config(results_dir: Path | str, **overrides) -> ExperimentConfig:
    """An ExperimentConfig from the defaults + TINY + overrides (flat run-config keys, '_' allowed for '-')."""
    flat = {**ExperimentConfig().to_run_config(), **TINY, "results-dir": str(results_dir)}
    flat.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return ExperimentConfig.from_run_config(flat)


def simulate(tmp_path: Path, method: str, options: dict, **overrides) -> RunRecord:
    """One ``method`` run with tiny models and exactly these ``<method>.*`` options on Flower's simulation engine
    (``flwr run``); returns the record it wrote, checked: every option in the run config, ok on both sides, this
    method, no failures."""
    from fedbridge.simulations.runner import run_simulation

    cfg = dataclasses.replace(tiny_config(tmp_path, method=method, run_name=f"sim-{method}", **overrides),
                              method_options=dict(options))
    assert all(cfg.to_run_config()[k] == v for k, v in options.items())  # what the runner writes for flwr run
    record = run_simulation(cfg, quiet=True)
    on_disk = RunRecord.read(Path(tmp_path) / f"sim-{method}.json")
    assert record.status == on_disk.status == "ok" and on_disk.method == method and on_disk.failures == []
    return on_disk


def toy_frame(n: int = 120, labels: tuple[str, ...] = ("neg", "pos"), groups: int = 6) -> pd.DataFrame:
    """Unique texts (so splits can be checked for overlap), cycling labels, and a grouping column."""
    words = {lab: f"{lab}word" for lab in labels}
    rows = []
    for i in range(n):
        lab = labels[i % len(labels)]
        rows.append({"review": f"example {i} is {words[lab]} {words[lab]}", "sentiment": lab,
                     "site": f"site-{i % groups}", "extra": i})
    return pd.DataFrame(rows)


@pytest.fixture
def toy_csv(tmp_path: Path) -> Path:
    path = tmp_path / "toy.csv"
    toy_frame().to_csv(path, index=False)
    return path


def wire_strings(content) -> list[str]:
    """Every string a message's RecordDict carries: record keys, values, list items (to inspect the wire)."""
    out = []
    for key, record in content.items():
        out.append(key)
        for k, v in record.items():
            out.append(k)
            out += [v] if isinstance(v, str) else [x for x in v if isinstance(x, str)] if isinstance(v, list) else []
    return out


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads spin (20x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
