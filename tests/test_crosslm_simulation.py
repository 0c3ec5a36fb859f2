"""CrossLM on Flower's simulation engine through ``flwr run`` (Ray, a local SuperLink), with tiny models.

The crosslm options travel as run config (every ``crosslm.*`` key is declared in pyproject.toml); each silo's SLM
lives in its node's context state between messages, as in a deployment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import simulate
from test_crosslm import FAST

from fedbridge.methods.crosslm.messages import ENHANCE, SCORE, TRAIN_PRIVATE, UPLOAD
from fedbridge.methods.fdkt.messages import SYNTHESIZE

pytestmark = pytest.mark.slow

def test_crosslm_on_the_simulation_engine(tmp_path):
    on_disk = simulate(tmp_path, "crosslm", FAST)
    assert on_disk.config["crosslm.per-label"] == 3
    for silo in ("silo-0", "silo-1"):
        metrics = on_disk.silo_metrics[silo]
        # round 2 scored with the SLM the silo kept in its node state since train.private (and enhanced in round 1)
        for key in ("before.global-test.accuracy", "round-1.global-test.accuracy", "round-2.global-test.accuracy"):
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["train.synthetic"] > 0
        events = [(e["event"], e["message_type"], e["round"]) for e in on_disk.timelines[silo]]
        assert ("processed", SCORE, 2) in events and ("processed", ENHANCE, 2) in events
    server = on_disk.server_metrics
    assert server["crosslm.llm-updates"] == 2 and server["crosslm.step-last.kl"] > 0
    assert 0.0 <= server["crosslm.llm-after.accuracy"] <= 1.0 and server["crosslm.llm-after.perplexity"] > 1
    steps = Path(on_disk.artifacts["crosslm-steps"]).read_text().splitlines()
    assert len(steps) == server["crosslm.llm-steps"] and "quality" in json.loads(steps[0])
    by_type = on_disk.communication["by_message_type"]
    assert by_type[SCORE]["received"] > 0 and by_type[ENHANCE]["sent"] > 0 and UPLOAD not in by_type


def test_the_pipeline_on_the_simulation_engine(tmp_path):
    """DP demonstrations, seeded batches, scores and enhancements across Ray actors: the silos' demonstrations
    arrive before their private training, and each silo ends enhanced twice."""
    from test_fdkt import FAST as FAST_FDKT

    on_disk = simulate(tmp_path, "pipeline", {**FAST_FDKT, **FAST})
    assert on_disk.server_metrics["crosslm.seeded-batches"] == on_disk.server_metrics["crosslm.batches"] == 2
    for silo in ("silo-0", "silo-1"):
        processed = [e["message_type"] for e in on_disk.timelines[silo] if e["event"] == "processed"]
        assert processed[:2] == [SYNTHESIZE, TRAIN_PRIVATE] and processed.count(ENHANCE) == 2
        privacy = on_disk.privacy[silo]  # demonstrations + DP-vote scores, each within its ε
        assert privacy["private"] is True and 0 < privacy["other"]["epsilon"] <= 4.0 < privacy["epsilon"] <= 8.0
