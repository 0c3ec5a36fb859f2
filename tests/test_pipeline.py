"""The pipeline method: DP demonstrations seed the server LLM's writing, silo SLMs score it, enhanced SLMs return
asynchronously; it resumes like CrossLM and never asks a silo for its demonstrations twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config
from test_checkpoint import NODES, assert_same_results, attempt, checkpoint_state, is_, sent
from test_crosslm import FAST as FAST_CROSSLM
from test_fdkt import FAST as FAST_FDKT

import fedbridge.methods.crosslm.llm as server_llm
from fedbridge.client_app import app as client_app
from fedbridge.errors import ConfigError
from fedbridge.methods.crosslm.messages import ENHANCE, TRAIN_PRIVATE
from fedbridge.methods.fdkt.messages import SYNTHESIZE
from fedbridge.methods.registry import get_method, option_applies
from fedbridge.server_app import run_experiment
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare

OPTIONS = {**FAST_FDKT, **FAST_CROSSLM, "fdkt.epsilon": 2.0}


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """One in-process run, with every prompt the server LLM wrote a batch from."""
    tmp = tmp_path_factory.mktemp("pipeline")
    prompts = []
    real = server_llm.write_labelled

    def spy(llm, batch_prompts, *args, **kwargs):
        prompts.extend(batch_prompts)
        return real(llm, batch_prompts, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(server_llm, "write_labelled", spy)  # what the pipeline's LLM writes every batch with
    cfg = prepare(tiny_config(tmp, method="pipeline", run_name="pipeline", **OPTIONS))
    silos = [{"partition-id": i, "num-partitions": 2, "noise-seed": 0} for i in range(2)]
    grid = InProcessGrid(client_app, cfg.to_run_config(), silos, workers=2)
    try:
        record = run_experiment(grid, cfg)
    finally:
        grid.close()
        mp.undo()
    return record, grid, prompts


def test_every_batch_is_seeded_by_the_silos_dp_demonstrations(seeded_run):
    record, grid, prompts = seeded_run
    assert record.status == "ok" and record.failures == []
    lines = [json.loads(line) for line in Path(record.artifacts["contributions"]).read_text().splitlines()]
    demos = [t for line in lines if line["kind"] == "dp-demonstrations" for t in line["texts"]]
    assert demos and prompts
    shown = [prompt[0]["content"] for prompt in prompts]
    assert all("Example: " in text for text in shown)  # FDKT's augmentation prompt, not CrossLM's own
    assert all(any(d[:200] in text for d in demos) for text in shown)  # each shows a received demonstration
    assert record.server_metrics["crosslm.seeded-batches"] == record.server_metrics["crosslm.batches"] == 2


def test_each_silo_synthesizes_once_then_trains_scores_and_is_enhanced(seeded_run):
    record, grid, _ = seeded_run
    assert sorted(m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == SYNTHESIZE) == list(NODES)
    for silo in ("silo-0", "silo-1"):
        processed = [e["message_type"] for e in record.timelines[silo] if e["event"] == "processed"]
        assert processed[:2] == [SYNTHESIZE, TRAIN_PRIVATE]
        assert processed.count(ENHANCE) == 2
        assert 0 <= record.silo_metrics[silo]["round-2.global-test.accuracy"] <= 1
        assert record.silo_metrics[silo]["synth.examples"] > 0


def test_the_record_has_the_demonstrations_epsilon_plus_the_dp_scores_epsilon(seeded_run):
    record, _, _ = seeded_run
    for silo in ("silo-0", "silo-1"):
        privacy = record.privacy[silo]
        assert 1.9 < privacy["other"]["epsilon"] <= 2.0  # the demonstrations, within the asked ε
        assert privacy["other"]["mechanism"] == "dp-fewshot" and "dp-nn-votes" in privacy["mechanism"]
        votes = privacy["epsilon-total"]  # both score rounds, within crosslm.epsilon
        assert 3.9 < votes <= 4.0 and privacy["epsilon"] == pytest.approx(privacy["other"]["epsilon"] + votes)
        assert privacy["private"] is True and "non-private" not in privacy
    assert record.tokens["silo-generated"] > 0 and record.tokens["generated"] > 0


def test_the_pipeline_reads_fdkt_and_crosslm_options_and_refuses_a_dp_slm(tmp_path):
    assert option_applies("fdkt.epsilon", "pipeline") and option_applies("crosslm.rounds", "pipeline")
    assert not option_applies("social.mode", "pipeline") and not option_applies("fdkt.epsilon", "crosslm")
    with pytest.raises(ConfigError, match="fdkt.mechanism"):
        get_method("pipeline")(tiny_config(tmp_path, method="pipeline", **{"fdkt.mechanism": "nope"}))
    with pytest.raises(ConfigError, match="slm.dp-epsilon"):
        get_method("pipeline")(tiny_config(tmp_path, method="pipeline", **{"slm.dp-epsilon": 4.0}))


def test_a_restarted_server_resumes_without_asking_for_demonstrations_again(tmp_path, tmp_path_factory):
    reference, _ = attempt(tmp_path_factory.mktemp("reference"), "pipeline-r", crosslm_options={})
    assert reference.status == "ok" and reference.failures == []
    first, _ = attempt(tmp_path, "pipeline-r", crosslm_options={}, die_on_reply=is_(ENHANCE, NODES[1], "1"))
    assert first is None
    assert set(checkpoint_state(tmp_path, "pipeline-r")["steps"]) >= {"demonstrations/silo-0", "demonstrations/silo-1"}
    resumed, grid = attempt(tmp_path, "pipeline-r", resume=True, crosslm_options={})
    assert resumed.status == "ok" and resumed.failures == []
    assert sent(grid, SYNTHESIZE) == [] and sent(grid, TRAIN_PRIVATE) == []  # nothing private asked again
    assert resumed.privacy["silo-1"]["epsilon"] == reference.privacy["silo-1"]["epsilon"]  # nothing charged twice
    assert_same_results(resumed, reference)
