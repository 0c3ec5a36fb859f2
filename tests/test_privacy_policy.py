"""The silo owns its privacy: its node config's policy, its lifetime ledger (per data identity, across runs, restarts,
threads and processes), and what its replies may carry."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import threading
from pathlib import Path

import pytest
from conftest import tiny_config

from fedbridge.errors import ConfigError, PrivacyBudgetExceeded
from fedbridge.methods.fdkt import silo as fdkt_silo
from fedbridge.methods.social import silo as social_silo
from fedbridge.privacy import PrivacyEvent
from fedbridge.privacy.policy import SiloLedger, SiloPolicy
from fedbridge.silo import Silo
from fedbridge.tasks import load_federation

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = ("negative", "neutral", "positive")
FAST = {"fdkt.generator": "tiny-llama", "fdkt.num-per-label": 1, "fdkt.max-tokens": 4, "fdkt.min-words": 1,
        "fdkt.groups": 2}
STRICT = {"data-path": "silo.csv"}  # what makes a node config a deployed silo's: strict by default


def silo(tmp_path: Path, node: dict | None = None, **options) -> Silo:
    """Silo 0 of the tiny federation, its state on tmp_path, with the policy of ``node`` (its node config)."""
    cfg = tiny_config(tmp_path, method="fdkt", **{"task.max-examples": 120, **FAST, **options})
    data = load_federation(cfg.task, cfg.partition, cfg.seed).silos[0]
    return Silo(0, cfg, LABELS, data, tmp_path / "state", SiloPolicy.from_node_config(node or {}))


def ledger_text(s: Silo) -> str:
    path = s.state_dir / "privacy" / f"{s.data_id}.json"
    return path.read_text() if path.exists() else ""


# ------------------------------------------------------------------ the policy, from the node config


def test_a_deployed_silo_is_strict_and_a_simulated_one_permissive():
    strict, permissive = SiloPolicy.from_node_config(STRICT), SiloPolicy.from_node_config({"partition-id": 0})
    assert (strict.name, strict.epsilon_budget, strict.allow_non_private, strict.verbatim(False)) == (
        "strict", 8.0, False, True)
    assert (permissive.name, permissive.epsilon_budget, permissive.allow_non_private) == ("permissive", math.inf, True)
    assert permissive.verbatim(False) is False  # unset: the run's request


@pytest.mark.parametrize("node, key", [({"privacy": "lax"}, "privacy='lax'"),
                                       ({"epsilon-budget": 0}, "epsilon-budget must be > 0"),
                                       ({"allow-non-private": "maybe"}, "allow-non-private='maybe'"),
                                       ({**STRICT, "verbatim-filter": False}, "verbatim-filter=false needs")])
def test_a_bad_node_config_is_named(node, key):
    with pytest.raises(ConfigError, match=key):
        SiloPolicy.from_node_config(node)


# ------------------------------------------------------------------ refusals by the silo, nothing released


@pytest.mark.parametrize("options, key", [
    ({"fdkt.epsilon": math.inf}, "allow-non-private=false"),  # a release without DP
    ({"fdkt.noise-seed": 3}, "allow-non-private=false"),  # a noise seed the server could replay
    ({"fdkt.epsilon": 10.0}, "epsilon-budget 8"),  # more than the silo's lifetime budget
])
def test_a_strict_silo_refuses_what_its_node_config_forbids(tmp_path, options, key):
    s = silo(tmp_path, STRICT, **options)
    with pytest.raises(PrivacyBudgetExceeded, match=key):
        fdkt_silo.synthesize(s, "run-1")
    assert "allow-non-private" in key or "epsilon-budget" in key  # the message names the node-config key
    assert ledger_text(s) == ""  # nothing charged, nothing released


def test_a_strict_silo_refuses_raw_examples_weights_and_scores(tmp_path):
    s = silo(tmp_path, STRICT, **{"social.baselines": "original"})
    with pytest.raises(PrivacyBudgetExceeded, match="refuses raw examples.*allow-non-private=false"):
        social_silo.share_raw(s, 4, "run-1")
    for what in ("SLM weights", "SLM scores"):
        with pytest.raises(PrivacyBudgetExceeded, match=f"refuses {what}"):
            s.non_private_release(what, "run-1")
    assert ledger_text(s) == ""


def test_a_server_seed_makes_a_permissive_release_non_private(tmp_path):
    _, privacy, _ = fdkt_silo.synthesize(silo(tmp_path, {}, **{"fdkt.noise-seed": 3, "fdkt.epsilon": 2.0}), "run-1")
    assert privacy["private"] is False and math.isinf(privacy["epsilon"]) and "server-chosen" in privacy["mechanism"]
    _, privacy, _ = fdkt_silo.synthesize(silo(tmp_path, {"noise-seed": 3}, **{"fdkt.epsilon": 2.0}), "run-2")  # the silo's own
    assert privacy["private"] is True and 0 < privacy["epsilon"] <= 2.0


def test_a_strict_silo_withholds_counts_and_timings(tmp_path):
    s = silo(tmp_path, STRICT)
    assert s.info() == {"partition-id": 0, "num-train": 0, "num-test": 0}
    kept = s.releasable({"silo-test.accuracy": 0.5, "silo-test.n": 12, "train.seconds": 3.0, "synth.tokens-x": 9,
                         "train.examples": 40, "num-train": 0})
    assert kept == {"silo-test.accuracy": 0.5, "num-train": 0}
    assert silo(tmp_path, {}).info()["num-train"] == len(s.data.train)  # permissive: exact


# ------------------------------------------------------------------ the lifetime budget, across runs and restarts


def test_two_runs_exhaust_the_lifetime_budget_also_after_a_restart(tmp_path):
    node = {**STRICT, "epsilon-budget": 1.3}
    first = silo(tmp_path, node, **{"fdkt.epsilon": 1.0})
    _, privacy, _ = fdkt_silo.synthesize(first, "experiment-a")
    assert privacy["private"] is True and 0.9 < privacy["epsilon"] <= 1.0
    on_disk = ledger_text(first)
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon-budget 1.3"):  # a fresh experiment id: same data
        fdkt_silo.synthesize(first, "experiment-b")
    assert ledger_text(first) == on_disk
    restarted = dataclasses.replace(first)  # a new silo process: nothing in memory, the same disk
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon-budget 1.3"):
        fdkt_silo.synthesize(restarted, "experiment-c")
    assert ledger_text(restarted) == on_disk
    assert SiloLedger(restarted.state_dir / "privacy" / f"{restarted.data_id}.json", first.policy).spent() == \
        pytest.approx(privacy["epsilon"])


def test_a_second_run_within_the_lifetime_budget_is_composed(tmp_path):
    s = silo(tmp_path, {**STRICT, "epsilon-budget": 3.0}, **{"fdkt.epsilon": 1.0})
    epsilons = [fdkt_silo.synthesize(s, run)[1]["epsilon"] for run in ("experiment-a", "experiment-b")]
    lifetime = SiloLedger(s.state_dir / "privacy" / f"{s.data_id}.json", s.policy).spent()
    assert max(epsilons) < lifetime < sum(epsilons) + 1e-9  # composed, not reset per run, and not merely summed


# ------------------------------------------------------------------ concurrent charges lose none

EVENT = PrivacyEvent(noise_multiplier=5.0, sample_rate=0.01, steps=1, mechanism="dp-fewshot")


def _charge_many(path: str, run: str, n: int) -> None:
    ledger = SiloLedger(Path(path), SiloPolicy())
    for _ in range(n):
        ledger.charge([EVENT], run, math.inf)


def charges(path: Path) -> list[str]:
    return [c["run"] for c in json.loads(path.read_text())["charges"]]


def test_concurrent_threads_lose_no_charge(tmp_path):
    path = tmp_path / "ledger.json"
    threads = [threading.Thread(target=_charge_many, args=(str(path), f"run-{i}", 10)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(charges(path)) == sorted(f"run-{i}" for i in range(6) for _ in range(10))


def test_two_processes_lose_no_charge(tmp_path):
    path = tmp_path / "ledger.json"
    context = multiprocessing.get_context("fork")  # other processes: the file lock, not the thread lock, decides
    procs = [context.Process(target=_charge_many, args=(str(path), f"proc-{i}", 15)) for i in range(2)]
    for proc in procs:
        proc.start()
    _charge_many(str(path), "parent", 15)
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert sorted(charges(path)) == sorted([*["parent"] * 15, *["proc-0"] * 15, *["proc-1"] * 15])
