"""DP votes and Private Evolution: the mechanism's sensitivity and ε against an independent computation, a strict
silo's ledger charged for every vote, labels from the votes (never the LLM's), in-process runs, and resume."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_config
from flwr.app import Message
from scipy.optimize import brentq
from scipy.stats import norm
from test_checkpoint import CrashingGrid, ServerKilled, is_

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.errors import PrivacyBudgetExceeded
from fedbridge.methods.votes import best_per_label, tally
from fedbridge.privacy import PrivacyLedger
from fedbridge.privacy.accounting import compute_epsilon
from fedbridge.privacy.dp_votes import SENSITIVITY, dp_vote, sigma_for_votes, vote_event, vote_histogram
from fedbridge.privacy.policy import SiloLedger
from fedbridge.server_app import run_experiment
from fedbridge.silo import Silo
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare

pytestmark = pytest.mark.usefixtures("one_thread")
NODES = (1000, 1001)
FAST = {"pe.iterations": 2, "pe.candidates-per-label": 3, "pe.num-per-label": 2, "pe.max-new-tokens": 10,
        "pe.min-words": 1, "pe.k": 2, "pe.epsilon": 2.0, "pe.threshold": 0.0}


# ------------------------------------------------------------------ the mechanism


def test_one_record_moves_the_histogram_by_at_most_its_sensitivity():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, c, labels, k = rng.integers(1, 30), rng.integers(1, 40), rng.integers(1, 5), rng.integers(1, 10)
        private, candidates = rng.normal(size=(n, 8)), rng.normal(size=(c, 8))
        y = rng.integers(0, labels, size=n)
        full = vote_histogram(private, y, candidates, labels, k)
        drop = rng.integers(n)  # add/remove adjacency: the record's whole vector, L2 norm exactly 1
        without = vote_histogram(np.delete(private, drop, 0), np.delete(y, drop), candidates, labels, k)
        assert np.linalg.norm(full - without) == pytest.approx(SENSITIVITY)
        # replace adjacency: at most sqrt(2)
        changed, y2 = private.copy(), y.copy()
        changed[drop], y2[drop] = rng.normal(size=8), rng.integers(0, labels)
        assert np.linalg.norm(full - vote_histogram(changed, y2, candidates, labels, k)) <= math.sqrt(2) + 1e-9
        assert full.sum() == pytest.approx(n * math.sqrt(min(k, c)))  # every record spends its whole vote


def test_each_record_votes_for_its_nearest_candidates_in_the_row_of_its_own_label():
    candidates = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    private = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 0.8]])
    hist = vote_histogram(private, [2, 0, 0], candidates, 3, 1)
    assert hist.tolist() == [[0, 0, 1], [2, 0, 0], [0, 0, 0]]


def exact_gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """ε of ``releases`` Gaussian mechanisms of sensitivity 1 and noise σ, composed exactly: μ-GDP with μ = √T/σ
    (Dong, Roth, Su 2019), whose δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) is inverted numerically."""
    mu = math.sqrt(releases) / sigma

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(delta_at, 0.0, 100.0)


@pytest.mark.parametrize("epsilon,releases", [(1.0, 1), (4.0, 3), (8.0, 10)])
def test_the_charged_epsilon_matches_the_exact_gaussian_composition(epsilon, releases):
    sigma = sigma_for_votes(epsilon, 1e-5, releases)
    charged = compute_epsilon([vote_event(sigma, releases)], 1e-5)
    exact = exact_gaussian_epsilon(sigma, releases, 1e-5)
    assert charged <= epsilon  # calibrated to what the run asked
    assert exact <= charged <= exact + 0.05  # an upper bound, and a tight one


def test_a_release_charges_before_it_reads_and_a_refused_one_releases_nothing():
    ledger = PrivacyLedger(1.0, 1e-5)
    private = np.ones((4, 3))
    out = dp_vote(private, [0, 1, 0, 1], np.eye(3), 2, 2, 1.0, 1, ledger, noise_seed=0)
    assert out.histogram.shape == (3, 2) and out.noise_multiplier > 0 and ledger.spent() == pytest.approx(out.epsilon)
    with pytest.raises(PrivacyBudgetExceeded):
        dp_vote(private, [0, 1, 0, 1], np.eye(3), 2, 2, 1.0, 1, ledger, noise_seed=0)
    assert len(ledger.events) == 1  # the refused release charged nothing


# ------------------------------------------------------------------ server post-processing


def test_the_label_is_the_votes_not_the_one_the_llm_was_asked_for():
    histogram = np.array([[0.5, 6.0], [5.0, 0.2], [0.1, 0.3]])  # candidate 2: too few votes
    result = tally(histogram, noise_std=1.0, balance=False, threshold=1.0)
    assert result.labels.tolist() == [1, 0, 1] and result.kept.tolist() == [True, True, False]
    # balanced: label 1 holds far more votes overall, so a candidate must stand out within it
    skewed = np.array([[1.0, 10.0], [0.5, 30.0], [0.0, 30.0]])
    assert tally(skewed, 0.0, balance=True, threshold=0.0).labels.tolist() == [0, 1, 1]
    assert best_per_label(np.array([0, 0, 1, 0]), np.array([1.0, 3.0, 2.0, 2.0]), np.ones(4, bool), 2, 2) == [1, 3, 2]


# ------------------------------------------------------------------ silos and runs


def silo_nodes(tmp_path: Path, **node) -> list[dict]:
    return [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / "silos"), "noise-seed": 0, **node}
            for i in range(2)]


def vote_request(experiment: str, epsilon: float = 2.0, releases: int = 2, round_: int = 1) -> Message:
    texts = ["a short candidate", "another candidate text", f"a third one, round {round_}"]
    return Message(p.request({"epsilon": epsilon, "releases": releases, "k": 2, p.EXPERIMENT: experiment},
                             examples=p.examples_record(SimpleNamespace(texts=texts, labels=[0, 1, 2]))),
                   dst_node_id=NODES[0], message_type=p.DP_VOTE, group_id="1")


def test_a_strict_silo_charges_its_lifetime_ledger_for_every_vote_and_refuses_votes_without_dp(tmp_path):
    cfg = tiny_config(tmp_path, method="pe")
    nodes = silo_nodes(tmp_path, privacy="strict", **{"epsilon-budget": 3.0})
    del nodes[0]["noise-seed"], nodes[1]["noise-seed"]
    grid = InProcessGrid(client_app, cfg.to_run_config(), nodes)
    try:
        silo = Silo.from_context(grid.contexts[NODES[0]])
        ledger = SiloLedger(silo.state_dir / "privacy" / f"{silo.data_id}.json", silo.policy)
        replies = [grid.send_and_receive([vote_request("votes", round_=r)], timeout=60)[0] for r in (1, 2)]
        assert not any(r.has_error() for r in replies)
        privacy = [p.read_privacy(r.content) for r in replies]
        histogram = p.read_histogram(replies[0].content, 3, 3)
        assert histogram.shape == (3, 3) and privacy[0]["private"] and privacy[0]["mechanism"] == "dp-nn-votes"
        assert privacy[1]["epsilon-total"] == pytest.approx(ledger.spent()) and 1.9 < ledger.spent() <= 2.0
        # a third release is past what the run asked for; ε = inf is refused by the strict policy
        for refused, why in ((vote_request("votes", round_=3), "PrivacyBudgetExceeded"),
                             (vote_request("other", epsilon=math.inf), "PolicyRefusal")):
            [reply] = grid.send_and_receive([refused], timeout=60)
            assert reply.has_error() and why in reply.error.reason
        assert ledger.spent() == pytest.approx(privacy[1]["epsilon-total"])
    finally:
        grid.close()


def start_pe(tmp_path: Path, name: str, grid_cls=InProcessGrid, resume: bool = False, **grid_kwargs):
    cfg = prepare(tiny_config(tmp_path, method="pe", run_name=name, resume=resume, **FAST))
    grid = grid_cls(client_app, cfg.to_run_config(), silo_nodes(tmp_path), **grid_kwargs)
    try:
        return run_experiment(grid, cfg), grid
    except ServerKilled:
        return None, grid
    finally:
        grid.close()


def test_a_run_votes_each_iteration_trains_every_silo_on_the_voted_set_and_records_epsilon(tmp_path):
    record, grid = start_pe(tmp_path, "pe-run")
    assert record.status == "ok" and record.failures == []
    votes = [m for m in grid.sent if m.metadata.message_type == p.DP_VOTE]
    assert sorted(m.metadata.group_id for m in votes) == ["1", "1", "2", "2"]
    for silo in ("silo-0", "silo-1"):
        privacy = record.privacy[silo]
        assert privacy["mechanism"] == "dp-nn-votes" and privacy["private"] is True
        assert 1.9 < privacy["epsilon"] == privacy["epsilon-total"] <= privacy["budget"] == 2.0  # both releases
        assert record.silo_metrics[silo]["train.synthetic"] > 0 and "global-test.macro_f1" in record.silo_metrics[silo]
    # what was sent carries the federation's labels: recompute them from the silos' released histograms
    sent = {m.metadata.dst_node_id: m for m in grid.sent if m.metadata.message_type == p.TRAIN_AUGMENTED}
    synthetic = p.read_examples(sent[NODES[0]].content, p.EXAMPLES, 3)
    assert synthetic == p.read_examples(sent[NODES[1]].content, p.EXAMPLES, 3)
    voted = {}
    for group in ("1", "2"):
        asked = next(m for m in votes if m.metadata.group_id == group)
        candidates = p.read_examples(asked.content, p.EXAMPLES, 3)
        replies = [rep for _, req, rep in grid.replied
                   if req.metadata.message_type == p.DP_VOTE and req.metadata.group_id == group]
        total = sum(p.read_histogram(r.content, len(candidates), 3) for r in replies)
        labels = tally(total, 0.0, True, 0.0).labels
        voted |= dict(zip(candidates.texts, labels.tolist()))
    assert all(voted[t] == y for t, y in zip(synthetic.texts, synthetic.labels))
    assert record.tokens["generated"] > 0 and record.server_metrics["pe.candidates-voted"] > 0


def test_a_resumed_run_never_asks_for_the_same_iterations_votes_twice(tmp_path):
    first, grid = start_pe(tmp_path, "pe-resume", CrashingGrid, die_on_push=is_(p.DP_VOTE, round_="2"))
    assert first is None
    asked_before = sorted(m.metadata.group_id for m in grid.sent if m.metadata.message_type == p.DP_VOTE)
    assert asked_before == ["1", "1"]
    record, grid = start_pe(tmp_path, "pe-resume", CrashingGrid, resume=True)
    assert record.status == "ok" and record.failures == []
    assert sorted(m.metadata.group_id for m in grid.sent if m.metadata.message_type == p.DP_VOTE) == ["2", "2"]
    for silo in ("silo-0", "silo-1"):  # both attempts' releases, and no more, on the silo's ledger
        assert record.privacy[silo]["epsilon-total"] <= 2.0


@pytest.mark.slow
def test_pe_on_the_simulation_engine(tmp_path):
    """Through ``flwr run`` (Ray, a local SuperLink): every pe.* key travels as run config, each silo votes in each
    iteration and trains on the voted set, and the record carries ε per silo."""
    from conftest import simulate

    on_disk = simulate(tmp_path, "pe", dict(FAST),
                       **{"task.max-examples": 200, "partition.num-silos": 2, "partition.kind": "iid"})
    assert on_disk.config["pe.k"] == 2 and on_disk.config["pe.iterations"] == 2
    assert set(on_disk.privacy) == {"silo-0", "silo-1"}
    for silo, privacy in on_disk.privacy.items():
        assert privacy["mechanism"] == "dp-nn-votes" and privacy["private"] is True
        assert 1.9 < privacy["epsilon"] <= privacy["budget"] == 2.0
        assert on_disk.silo_metrics[silo]["train.synthetic"] > 0
    by_type = on_disk.communication["by_message_type"]
    assert by_type[p.DP_VOTE]["received"] > 0 and by_type[p.TRAIN_AUGMENTED]["sent"] > 0
