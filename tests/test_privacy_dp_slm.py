"""A DP-trained SLM (slm.dp-epsilon): DP-SGD of the head, charged to the silo's lifetime ledger, its ε checked against
accountants written from the papers; FedAvg weights and CrossLM scores of a DP SLM are DP releases (a strict silo
sends them, the record carries a finite ε); what it cannot do is refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from test_privacy_accounting import composed_privacy_loss_epsilon, exact_gaussian_epsilon, independent_epsilon

import fedbridge.privacy.dp_slm as dp_slm
from fedbridge.client_app import app as client_app
from fedbridge.errors import ConfigError, PrivacyBudgetExceeded, SiloFailure
from fedbridge.models.loading import load_slm
from fedbridge.privacy import PrivacyEvent
from fedbridge.privacy.policy import SiloPolicy
from fedbridge.server_app import run_experiment
from fedbridge.silo import Silo
from fedbridge.simulations.compare import group
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare
from fedbridge.tasks import load_federation

pytestmark = pytest.mark.usefixtures("one_thread")
DELTA = 1e-5
DP = {"slm.dp-epsilon": 2.0, "slm.epochs": 2, "slm.dp-batch-size": 16}
LABELS = ("negative", "neutral", "positive")


def run(tmp_path: Path, method: str, nodes: list[dict] | None = None, **options):
    cfg = prepare(tiny_config(tmp_path, method=method, run_name=f"{method}-dp", **{**DP, **options}))
    nodes = nodes or [{"partition-id": i, "num-partitions": 2} for i in range(2)]
    nodes = [{"state-dir": str(tmp_path / "silos"), **node} for node in nodes]
    grid = InProcessGrid(client_app, cfg.to_run_config(), nodes)
    try:
        return run_experiment(grid, cfg)
    finally:
        grid.close()


def charges(tmp_path: Path) -> list[list[dict]]:
    """Every silo's lifetime ledger: the charged events, in order."""
    return [[c["event"] for c in json.loads(path.read_text())["charges"]]
            for path in sorted((tmp_path / "silos" / "privacy").glob("*.json"))]


def test_the_reported_epsilon_is_what_independent_accountants_compute_for_what_ran(tmp_path):
    record = run(tmp_path, "local")
    assert record.status == "ok" and set(record.privacy) == {"silo-0", "silo-1"}
    for ledger, silo in zip(charges(tmp_path), sorted(record.privacy)):
        [event] = ledger
        assert event["mechanism"] == dp_slm.MECHANISM
        sigma, q, steps = event["noise_multiplier"], event["sample_rate"], event["steps"]
        reported = record.privacy[silo]
        assert (reported["noise-multiplier"], reported["steps"], reported["private"]) == (sigma, steps, True)
        # 48 training examples, expected batch 16: q = 1/3, 3 Poisson batches an epoch, 2 epochs
        assert (q, steps) == (pytest.approx(1 / 3), 6)
        true_epsilon = composed_privacy_loss_epsilon(sigma, q, steps, DELTA)  # the privacy loss, by FFT
        assert true_epsilon - 0.02 <= reported["epsilon"] <= min(independent_epsilon(sigma, q, steps, DELTA), 2.0)
        assert reported["epsilon"] >= 2.0 - 0.02  # σ calibrated to spend what was asked, to 0.01


def test_without_subsampling_the_epsilon_is_the_exact_gaussian_one(tmp_path):
    record = run(tmp_path, "local", **{"slm.dp-batch-size": 64})  # 48 examples: one full batch an epoch, q = 1
    [[event], _] = charges(tmp_path)
    assert (event["sample_rate"], event["steps"]) == (1.0, 2)
    exact = exact_gaussian_epsilon(event["noise_multiplier"], 2, DELTA)
    assert exact <= record.privacy["silo-0"]["epsilon"] <= exact + 0.02


def test_fedavg_rounds_compose_to_the_asked_epsilon_and_a_strict_silo_sends_dp_weights(tmp_path):
    strict = [{"partition-id": i, "num-partitions": 2, "privacy": "strict", "count-bound": 10} for i in range(2)]
    record = run(tmp_path, "fedavg", strict, rounds=2)
    assert record.status == "ok" and record.failures == []
    for ledger in charges(tmp_path):
        assert len(ledger) == 2 and ledger[0] == ledger[1]  # one DP training per round, the same (σ, q, steps)
        assert ledger[0]["sample_rate"] == 1 / 2  # from the public bound (10 per label x 3), not the 48 examples
    epsilons = [entry["epsilon"] for entry in record.privacy.values()]
    assert all(1.98 <= e <= 2.0 for e in epsilons) and all(e["private"] for e in record.privacy.values())
    assert "non-private" not in json.dumps(record.privacy)
    [row] = group([record])
    assert row.epsilon == f"{np.mean(epsilons):.2f}"  # the table's ε column: finite, not ∞


def test_a_strict_silo_refuses_plain_fedavg_weights(tmp_path):
    strict = [{"partition-id": i, "num-partitions": 2, "privacy": "strict"} for i in range(2)]
    with pytest.raises(SiloFailure, match="No silo completed FedAvg round 1"):
        run(tmp_path, "fedavg", strict, **{"slm.dp-epsilon": math.inf})
    assert not (tmp_path / "silos" / "privacy").exists()  # refused before anything was charged or trained


def test_crosslm_scores_of_dp_slms_carry_their_epsilon(tmp_path):
    from test_crosslm import FAST

    record = run(tmp_path, "crosslm", **{**FAST, "crosslm.with-private": False, "crosslm.scores": "slm"})
    assert record.status == "ok", record.failures
    assert all(0 < entry["epsilon"] <= 2.0 for entry in record.privacy.values())
    assert not any("crosslm: silo scores" in note for note in record.notes)
    assert all(len(ledger) == 1 for ledger in charges(tmp_path))  # trained once; scoring is post-processing


def test_the_lifetime_budget_refuses_a_second_dp_slm(tmp_path):
    node = [{"partition-id": i, "num-partitions": 2, "epsilon-budget": 2.5} for i in range(2)]
    assert run(tmp_path, "local", node).status == "ok"
    with pytest.raises(SiloFailure, match="epsilon-budget 2.5"):  # a new experiment: two ε = 2 compose to > 2.5
        run(tmp_path, "local", node)
    assert all(len(ledger) == 1 for ledger in charges(tmp_path))


@pytest.mark.parametrize("options, message", [
    ({"slm.mode": "lora"}, "slm.mode=lora would train the encoder too"),
    ({"method": "fdkt"}, "'fdkt' releases other things"),
    ({"method": "crosslm", "crosslm.with-private": True}, "crosslm.with-private=false"),
    ({"slm.dp-clip": 0.0}, "slm.dp-clip"),
])
def test_what_a_dp_slm_cannot_do_is_refused_by_name(tmp_path, options, message):
    method = options.pop("method", "local")
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, method, **options)


def test_an_empty_first_poisson_batch_is_a_counted_noise_step(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, **DP)
    data = load_federation(cfg.task, cfg.partition, cfg.seed).silos[0]
    model = load_slm(cfg.slm.spec_for(0), 3, 0, None, cfg.slm)
    original = dp_slm.DPDataLoader

    class FirstBatchEmpty(original):  # the Poisson draw that selects no example, forced for the first step
        def __iter__(self):
            batches = super().__iter__()
            yield (torch.zeros(0, dtype=torch.long),)
            next(batches)
            yield from batches

    monkeypatch.setattr(dp_slm, "DPDataLoader", FirstBatchEmpty)
    before = model.head.weight.detach().clone()
    event = PrivacyEvent(1.0, 1 / 3, 6, dp_slm.MECHANISM)
    stats = dp_slm.dp_train_classifier(model, data.train.texts, data.train.labels, cfg.slm, event, noise_seed=0)
    assert stats.steps == 6 and not torch.equal(before, model.head.weight)
    assert not any(hasattr(p, "grad_sample") for p in model.head.parameters())  # Opacus's hooks are gone
    assert not model.head._forward_hooks and np.isfinite(model.head.weight.detach().numpy()).all()


def test_a_dp_slm_depends_on_no_private_choice(tmp_path):
    cfg = tiny_config(tmp_path, **{**DP, "slm.max-length": 0})
    data = load_federation(cfg.task, cfg.partition, cfg.seed).silos[0]
    silo = Silo(0, cfg, LABELS, data, tmp_path / "state", SiloPolicy())
    fit, validation = silo.private_split
    assert len(validation) == 0 and len(fit) == len(data.train)  # no epoch chosen on private data
    short = ["a short text"] * 8
    assert load_slm(cfg.slm.spec_for(0), 3, 0, None, cfg.slm).fit_max_length(short) == 256  # not fitted to texts
    plain = tiny_config(tmp_path, **{"slm.max-length": 0}).slm
    assert load_slm(plain.spec_for(0), 3, 0, None, plain).fit_max_length(short) == 16  # (without DP: fitted)
    model = silo.new_slm()
    stats = silo.train_slm(model, experiment="run-1")
    assert stats.epochs == 2 and stats.privacy["private"] and stats.privacy["mechanism"] == dp_slm.MECHANISM
    with pytest.raises(PrivacyBudgetExceeded, match="refuses SLM weights"):
        Silo(0, tiny_config(tmp_path), LABELS, data, tmp_path / "state",
             SiloPolicy.from_node_config({"data-path": "x"})).release_slm("SLM weights", "run-1")
    silo.release_slm("SLM weights", "run-1")  # a DP SLM's weights: post-processing, nothing charged
    assert len(silo.run_ledger(math.inf, "run-1/slm").events) == 1
