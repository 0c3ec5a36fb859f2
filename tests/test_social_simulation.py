"""Social Learning on Flower's simulation engine through ``flwr run`` (Ray, a local SuperLink), with tiny models.

Every ``social.*`` option travels as run config, so each must be declared in pyproject.toml or Flower refuses it;
teachers answer ``query.teach``/``query.vote`` from their own SuperNodes, and plant the canary themselves.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import simulate

from fedbridge.methods.social.messages import SHARE_RAW, TEACH, VOTE

pytestmark = pytest.mark.slow

OPTIONS = {"social.teacher": "tiny-llama", "social.shots": 2, "social.samples": 4, "social.top-k": 2,
           "social.max-new-tokens": 8, "social.max-example-chars": 60, "social.num-examples": 3,
           "social.vote-examples": 2, "social.max-test": 10, "social.max-prompt-tokens": 1000,
           "social.baselines": "zero-shot,original", "canaries.enabled": True, "canaries.candidates": 99}


def test_social_on_the_simulation_engine(tmp_path):
    on_disk = simulate(tmp_path, "social", OPTIONS)
    assert on_disk.config["social.samples"] == 4 and on_disk.config["canaries.enabled"] is True
    for variant in ("0-shot", "examples:balanced", "examples:voting", "examples:random", "original(non-private)"):
        assert 0 <= on_disk.server_metrics[f"variant.{variant}.accuracy"] <= 1
    for silo in ("silo-0", "silo-1"):
        assert on_disk.silo_metrics[silo]["teach.kept"] == 2 and math.isinf(on_disk.privacy[silo]["epsilon"])
    assert 0 <= on_disk.server_metrics["canary-rank"] <= 99
    by_type = on_disk.communication["by_message_type"]
    assert by_type[TEACH]["received"] > 0 and by_type[VOTE]["received"] > 0 and by_type[SHARE_RAW]["sent"] > 0
    lines = [json.loads(x) for x in (tmp_path / "sim-social.contributions.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in lines} == {"social-examples", "raw-examples(non-private)"}
