"""FDKT on Flower's simulation engine through ``flwr run`` (Ray, a local SuperLink), with tiny models.

The fdkt options travel as run config: every ``fdkt.*`` key must be declared in pyproject.toml, or Flower
refuses the override. The silos' privacy ledgers live in their nodes' context state, as in a deployment.
"""

from __future__ import annotations

import pytest
from conftest import simulate

from fedbridge import protocol as p
from fedbridge.methods.fdkt.messages import SYNTHESIZE

pytestmark = pytest.mark.slow

OPTIONS = {"fdkt.mechanism": "dp-fewshot", "fdkt.epsilon": 2.0, "fdkt.generator": "tiny-llama",
           "fdkt.num-per-label": 2, "fdkt.max-tokens": 6, "fdkt.augment-per-label": 2, "fdkt.min-words": 1,
           "fdkt.max-new-tokens": 12, "fdkt.vote-epsilon": 1.0,
           "fdkt.vote-threshold": 0.0}  # tiny silos: at 1 std of noise no vote would be clear enough to keep


def test_fdkt_on_the_simulation_engine(tmp_path):
    on_disk = simulate(tmp_path, "fdkt", OPTIONS,
                       **{"task.max-examples": 200, "partition.num-silos": 2, "partition.kind": "iid"})
    assert on_disk.config["fdkt.max-tokens"] == 6 and on_disk.config["fdkt.generator"] == "tiny-llama"
    assert set(on_disk.privacy) == {"silo-0", "silo-1"}
    for silo, privacy in on_disk.privacy.items():
        demos = privacy["other"]  # the DP demonstrations, composed with the DP votes that labelled the augmented set
        assert privacy["mechanism"] == "dp-fewshot + dp-nn-votes (basic composition)" and privacy["private"] is True
        assert demos["mechanism"] == "dp-fewshot" and 0 < demos["epsilon"] <= demos["budget"] == 2.0
        assert demos["steps"] == 3 * 2 * 6  # labels x num-per-label x max-tokens noisy queries
        assert 0 < privacy["epsilon-total"] <= privacy["budget"] == 1.0 and privacy["steps"] == 1  # one vote
        assert privacy["epsilon"] == pytest.approx(demos["epsilon"] + privacy["epsilon-total"])
        metrics = on_disk.silo_metrics[silo]
        assert metrics["train.synthetic"] > 0 and 0.0 <= metrics["global-test.accuracy"] <= 1.0
    assert on_disk.tokens["silo-generated"] > 0
    by_type = on_disk.communication["by_message_type"]
    assert by_type[SYNTHESIZE]["received"] > 0 and by_type[p.TRAIN_AUGMENTED]["sent"] > 0
