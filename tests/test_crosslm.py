"""CrossLM with tiny models: rewards and their aggregation (a lying silo), the LoRA loss (sign, KL, adapters off =
original), selection, and in-process federations: heterogeneous SLMs, what crosses the wire, asynchronous
replies with a delayed silo, failing and silent silos, staleness, soft targets, and score-on=server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config
from flwr.app import ArrayRecord
from transformers import DistilBertConfig, DistilBertForSequenceClassification

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.errors import ConfigError, DataError
from fedbridge.methods.crosslm.config import CrossLMConfig
from fedbridge.methods.crosslm.messages import ENHANCE, SCORE, TRAIN_PRIVATE, UPLOAD
from fedbridge.methods.crosslm.server import CrossLM, select_examples
from fedbridge.methods.crosslm.silo import KEPT_SLM
from fedbridge.models.generation import continuation_logprobs
from fedbridge.models.llm import FedbridgeLLM
from fedbridge.models.loading import byte_tokenizer, load_llm, tiny_llm
from fedbridge.models.reward import (
    LLMUpdateConfig,
    RewardTrainer,
    ScoredExample,
    aggregate,
    aggregate_probabilities,
    general_text,
    perplexity,
    rewards_from_probabilities,
    trimmed_count,
)
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare

LABELS = ("negative", "neutral", "positive")
# Small and fast, but every stage runs: generation, scoring, LLM update with KL, selection, enhancement, evaluation.
FAST = {"crosslm.per-label": 3, "crosslm.max-new-tokens": 12, "crosslm.min-words": 1, "crosslm.min-reward": -1.0,
        "crosslm.llm-eval-examples": 8, "crosslm.ppl-passages": 2, "crosslm.ppl-max-tokens": 32,
        "crosslm.diversity": 0.0, "crosslm.lora-max-length": 96, "crosslm.select-max": 6, "crosslm.enhance-epochs": 1,
        "crosslm.with-private": False}  # the paper's step: selected examples only (what the counts below check)


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ rewards and aggregation


def test_reward_is_two_s_minus_one_of_the_intended_label():
    probs = np.array([[0.1, 0.9], [0.75, 0.25], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(rewards_from_probabilities(probs, [1, 1, 0, 0, 0]), [0.8, -0.5, 0.0, 1.0, -1.0])
    with pytest.raises(ValueError):
        rewards_from_probabilities(probs, [0, 1])


def test_aggregation_rules():
    values = np.array([[0.1, -1.0], [0.3, 0.0], [0.2, 0.5], [0.9, 0.7]])
    np.testing.assert_allclose(aggregate(values, "mean"), [0.375, 0.05])
    np.testing.assert_allclose(aggregate(values, "median"), [0.25, 0.25])
    np.testing.assert_allclose(aggregate(values, "trimmed-mean"), [0.25, 0.25])  # drops 1 of 4 from each end
    for rule in ("mean", "median", "trimmed-mean"):
        np.testing.assert_allclose(aggregate(values[:1], rule), values[0])  # one silo: its own values
        np.testing.assert_allclose(aggregate(values[:2], rule), values[:2].mean(0))  # two: the mean
    assert [trimmed_count(n, 0.25) for n in range(1, 13)] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert trimmed_count(5, 0.0) == 0
    np.testing.assert_allclose(aggregate(values, "trimmed-mean", trim=0.0), aggregate(values, "mean"))
    with pytest.raises(ConfigError, match="Unknown aggregation"):
        aggregate(values, "max")
    with pytest.raises(ValueError):
        aggregate(np.zeros((0, 3)), "mean")


@pytest.mark.parametrize("honest", [2, 3])
def test_one_lying_silo_does_not_dominate_median_or_trimmed_mean(honest):
    """Honest silos approve examples 0-2 and reject 3-5; one silo says the opposite, at full confidence."""
    rng = np.random.default_rng(0)
    truth = np.array([0.8, 0.7, 0.9, -0.6, -0.8, -0.7])
    scores = [np.clip(truth + rng.normal(0, 0.05, truth.size), -1, 1) for _ in range(honest)]
    liar = -np.sign(truth)
    combined = {rule: aggregate(np.stack(scores + [liar]), rule) for rule in ("mean", "median", "trimmed-mean")}
    low, high = np.min(scores, axis=0), np.max(scores, axis=0)
    for rule in ("median", "trimmed-mean"):  # inside the honest range: the lie is ignored
        assert np.all(combined[rule] >= low - 1e-9) and np.all(combined[rule] <= high + 1e-9), rule
        assert sorted(select_examples([0] * 6, combined[rule], 6, 0.0)) == [0, 1, 2]  # what honest silos approve
    assert np.max(np.abs(combined["mean"] - truth)) > 0.3  # the mean is pulled far by one silo


def test_soft_targets_are_probability_rows():
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    b = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    liar = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    soft = aggregate_probabilities([a, b, liar], "median")
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    assert soft[0].argmax() == 0 and soft[1].argmax() == 2  # the liar's labels do not win


def test_selection_is_label_balanced_above_min_reward_and_diverse():
    labels = [0, 0, 0, 1, 1, 2]
    rewards = np.array([0.9, 0.8, 0.1, 0.7, -0.2, 0.05])
    assert select_examples(labels, rewards, 10, 0.0) == [0, 3, 5, 1, 2]  # -0.2 is out; labels take turns
    assert select_examples(labels, rewards, 2, 0.0) == [0, 3]
    assert select_examples(labels, rewards, 10, 0.5) == [0, 3, 1]
    # 0 and 1 say the same thing: with diversity the second pick of label 0 is the different, lower-reward one
    emb = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [1, 0], [0, 1]], dtype=float)
    assert select_examples([0, 0, 0], rewards[:3], 2, 0.0, emb[:3], diversity=0.0) == [0, 1]
    assert select_examples([0, 0, 0], rewards[:3], 2, 0.0, emb[:3], diversity=1.0) == [0, 2]
    assert select_examples(labels, np.full(6, -0.5), 4, 0.0) == []


def test_config_is_validated():
    with pytest.raises(ConfigError, match="crosslm.mode"):
        CrossLMConfig(mode="sometimes")
    with pytest.raises(ConfigError, match="crosslm.aggregate"):
        CrossLMConfig(aggregate="max")
    with pytest.raises(ConfigError):
        CrossLMConfig(kl_weight=-1)
    with pytest.raises(ConfigError, match="Unknown config key 'crosslm.kl'"):
        CrossLM(tiny_config("unused", method="crosslm", **{"crosslm.kl": 0.1}))


# ------------------------------------------------------------------ the LoRA update


PROMPT = [{"role": "user", "content": "Write one drug review with label 'positive'."}]
TEXT = "it worked well for me"


def trainer(**overrides) -> RewardTrainer:
    model, tok = load_llm("tiny-llama", trainable=True)
    cfg = LLMUpdateConfig(**{"rank": 4, "alpha": 8.0, "lr": 1e-2, "batch_size": 2, "max_length": 96, **overrides})
    return RewardTrainer(model, tok, cfg, LABELS, "Is this review negative, neutral or positive?", seed=0)


def likelihood(t: RewardTrainer, prompt=PROMPT, text: str = TEXT) -> float:
    return continuation_logprobs(t.model, t.tok, [prompt], [text])[0][0]


@pytest.mark.parametrize("reward", [1.0, 0.6, -1.0, -0.6])
def test_one_step_raises_a_rewarded_example_and_lowers_a_penalised_one(reward):
    t = trainer(task_weight=0.0, kl_weight=0.0)
    before = likelihood(t)
    entry = t.step([ScoredExample(PROMPT, TEXT, 2, reward)])
    after = likelihood(t)
    assert entry["quality"] > 0 and entry["loss"] == pytest.approx(entry["quality"])
    assert (after > before) if reward > 0 else (after < before), (before, after)


def test_the_task_term_raises_the_label_of_an_approved_example():
    t = trainer(quality_weight=0.0, kl_weight=0.0)
    from fedbridge.models.llm_classifier import classification_prompt

    prompt = classification_prompt(t.instruction, TEXT, LABELS)
    before = likelihood(t, prompt, "positive")
    t.step([ScoredExample(PROMPT, TEXT, 2, 1.0)])
    assert likelihood(t, prompt, "positive") > before
    assert t.sequences([ScoredExample(PROMPT, TEXT, 2, -1.0)]) == []  # a rejected example teaches no label


def test_lora_initialisation_is_seeded_not_drawn_from_the_global_rng():
    def a_matrices(seed: int, global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        model, _ = tiny_llm()
        trainer = RewardTrainer(model, byte_tokenizer(), LLMUpdateConfig(), LABELS, "Classify.", seed=seed)
        return [p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n]

    same = a_matrices(seed=1, global_seed=10)
    assert same and all(torch.equal(x, y) for x, y in zip(same, a_matrices(seed=1, global_seed=20)))
    assert not all(torch.equal(x, y) for x, y in zip(same, a_matrices(seed=2, global_seed=10)))


def test_kl_is_zero_at_initialisation_and_grows_as_adapters_move():
    t = trainer(kl_weight=0.0)
    examples = [ScoredExample(PROMPT, TEXT, 2, 1.0), ScoredExample(PROMPT, "it made me feel sick", 2, -1.0)]
    assert t.kl_divergence(examples) == pytest.approx(0.0, abs=1e-7)
    t.update(examples, steps=1)
    first = t.kl_divergence(examples)
    t.update(examples, steps=6)
    assert 0 < first < t.kl_divergence(examples)
    # and the leash holds the adapted model closer to the original over the same steps
    leashed = trainer(kl_weight=50.0)
    leashed.update(examples, steps=7)
    assert leashed.kl_divergence(examples) < t.kl_divergence(examples)


def test_adapters_disabled_is_the_original_model():
    t = trainer()
    original, tok = tiny_llm()  # same seed, same weights as the cached tiny-llama
    examples = [ScoredExample(PROMPT, TEXT, 2, 1.0), ScoredExample(PROMPT, "awful", 2, -0.5)]
    t.update(examples, steps=3)
    ids = torch.tensor([tok("a short test sentence")["input_ids"]])
    with torch.no_grad():
        reference = original(input_ids=ids).logits
        with t.model.disable_adapter():
            disabled = t.model(input_ids=ids).logits
        adapted = t.model(input_ids=ids).logits
    torch.testing.assert_close(disabled, reference, rtol=0, atol=1e-6)
    assert (adapted - reference).abs().max() > 1e-4  # the adapters did move
    shared, _ = load_llm("tiny-llama")  # the process-wide frozen copy other methods use was not wrapped
    assert not any("lora" in name for name, _ in shared.named_modules())
    assert any("lora" in name for name, _ in t.model.named_modules())


def test_every_step_logs_its_loss_components():
    t = trainer()
    examples = [ScoredExample(PROMPT, TEXT, 2, 0.9), ScoredExample(PROMPT, "bad", 0, -0.4),
                ScoredExample(PROMPT, "so so", 1, 0.0)]
    entries = t.update(examples, steps=3, silo="silo-0", batch=1)
    assert len(entries) == 3 and t.log == entries and [e["step"] for e in entries] == [1, 2, 3]
    for e in entries:
        assert {"loss", "quality", "task", "kl", "seconds", "tokens", "sequences"} <= set(e)
        assert e["silo"] == "silo-0" and e["batch"] == 1
        assert e["loss"] == pytest.approx(e["quality"] + e["task"] + e["kl"], rel=1e-5)
    assert t.update([ScoredExample(PROMPT, TEXT, 2, 0.0)], steps=2) == []  # zero reward: no signal, no step


def test_perplexity_on_bundled_general_text():
    passages = general_text()
    assert len(passages) >= 20 and all(len(p.split()) >= 30 for p in passages)
    assert not any(">>>" in p or ":func:" in p for p in passages)
    model, tok = tiny_llm()
    ppl = perplexity(FedbridgeLLM(model, tok), passages[:2], max_tokens=16)
    scored = continuation_logprobs(model, tok, ["", ""], [tok.decode(tok(t)["input_ids"][:16]) for t in passages[:2]])
    assert ppl == pytest.approx(np.exp(-sum(s for s, _ in scored) / sum(n for _, n in scored)), rel=1e-5)
    assert 1 < ppl < 10 * len(tok)  # a random byte model: near the vocabulary size


def test_general_text_from_a_user_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("First passage here.\n\nSecond one,\nover two lines.\n\n\n", encoding="utf-8")
    assert general_text(str(path)) == ["First passage here.", "Second one, over two lines."]
    with pytest.raises(DataError, match="missing.txt"):
        general_text(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------ in-process federations


def start(tmp_path: Path, name: str, silos: int = 2, workers: int = 2, before_handle=None, before_close=None,
          **options) -> tuple[RunRecord, InProcessGrid]:
    cfg = prepare(tiny_config(tmp_path, method="crosslm", run_name=name,
                              **{"partition.num-silos": silos, **FAST, **options}))
    grid = InProcessGrid(client_app, cfg.to_run_config(),
                         [{"partition-id": i, "num-partitions": silos} for i in range(silos)],
                         workers=workers, before_handle=before_handle)
    try:
        return run_experiment(grid, cfg), grid
    finally:
        if before_close:
            before_close()
        grid.close()


def event_time(record: RunRecord, silo: str, event: str, message_type: str, round_: int) -> float:
    [t] = [e["t"] for e in record.timelines[silo]
           if (e["event"], e["message_type"], e["round"]) == (event, message_type, round_)]
    return t


@pytest.fixture(scope="module")
def tiny_distilbert(tmp_path_factory) -> str:
    """A second SLM architecture: a 1-layer DistilBERT saved as a local model directory."""
    path = tmp_path_factory.mktemp("tiny-distilbert")
    tok = byte_tokenizer(chat_template=False)
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=1, n_heads=2,
                           max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    DistilBertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_distilbert):
    """Async, score-on=silo, silo 0 a tiny BERT and silo 1 a tiny DistilBERT, fully fine-tuned (so the kept state
    names each architecture's own weights)."""
    tmp = tmp_path_factory.mktemp("crosslm")
    record, grid = start(tmp, "crosslm-mixed", **{"slm.model": f"tiny-bert,{tiny_distilbert}", "slm.mode": "full"})
    return SimpleNamespace(record=record, grid=grid, dir=tmp)


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_mixed_architectures_run_in_every_slm_mode(tmp_path, tiny_distilbert, mode):
    """The cheaper modes keep what they train per architecture: a head over each encoder's own pooled width (tiny
    BERT: 2 layers x 64, DistilBERT: 1 x 32), plus, with LoRA, adapters on that encoder's own layers (BERT: peft's
    default, query and value; DistilBERT, which peft has no default for: every linear layer)."""
    record, grid = start(tmp_path, f"crosslm-mixed-{mode}", **{"slm.model": f"tiny-bert,{tiny_distilbert}",
                                                               "slm.mode": mode})
    assert record.status == "ok" and record.failures == []
    for node, width, layers in ((1000, 128, ".encoder.layer."), (1001, 32, ".transformer.layer.")):
        kept = grid.contexts[node].state[KEPT_SLM].to_torch_state_dict()
        assert kept["head.weight"].shape[1] == width
        adapters = {k for k in kept if not k.startswith("head.")}
        assert (mode == "head") == (not adapters)
        assert all("lora_" in k and layers in k for k in adapters)
        if node == 1000 and mode == "lora":
            assert {k.split(".")[-4] for k in adapters} == {"query", "value"}


def test_a_round_enhances_heterogeneous_slms_and_records_before_and_after(mixed_run):
    record, grid = mixed_run.record, mixed_run.grid
    assert record.status == "ok" and record.failures == []
    kinds = {}
    for node, silo in ((1000, "silo-0"), (1001, "silo-1")):
        kept = grid.contexts[node].state[KEPT_SLM]
        kinds[silo] = "distilbert" if any(".transformer.layer." in k for k in kept) else "bert"  # DistilBERT's names
        metrics = record.silo_metrics[silo]
        for split in ("silo-test", "global-test"):
            for r in ("before.", "round-1.", "round-2.", ""):
                assert 0 <= metrics[f"{r}{split}.accuracy"] <= 1
        assert metrics["train.synthetic"] > 0 and metrics["train.examples"] == metrics["train.synthetic"]
    assert kinds == {"silo-0": "bert", "silo-1": "distilbert"}
    for key in ("before_accuracy", "accuracy", "before_silo_test_accuracy", "silo_test_accuracy"):
        assert 0 <= record.global_metrics[key] <= 1
    server = record.server_metrics
    for key in ("accuracy", "macro_f1", "perplexity"):
        assert np.isfinite(server[f"crosslm.llm-before.{key}"]) and np.isfinite(server[f"crosslm.llm-after.{key}"])
    assert server["crosslm.llm-before.n"] == 8
    assert server["crosslm.batches"] == 2 and server["crosslm.generated"] == 2 * 3 * 3
    assert server["crosslm.llm-updates"] == server["crosslm.llm-version"] == 2  # both silos scored both batches
    assert server["crosslm.waiting-for-scorers"] == 2  # min-scorers 3, capped at 2 live silos
    assert server["crosslm.step-first.kl"] == pytest.approx(0.0, abs=1e-7) and server["crosslm.step-last.kl"] > 0
    assert record.tokens["generated"] > 0 and record.seconds["server-llm-update"] > 0


def test_loss_components_per_step_go_to_a_jsonl_artifact(mixed_run):
    record = mixed_run.record
    lines = [json.loads(line) for line in Path(record.artifacts["crosslm-steps"]).read_text().splitlines()]
    assert len(lines) == record.server_metrics["crosslm.llm-steps"] == 2 * 2  # 2 updates x lora-steps 2
    assert [e["step"] for e in lines] == [1, 2, 3, 4]
    assert {e["batch"] for e in lines} == {1, 2} and all(0 <= e["staleness"] <= 4 for e in lines)
    assert all({"loss", "quality", "task", "kl", "seconds"} <= set(e) for e in lines)
    lines = [json.loads(line) for line in Path(record.artifacts["contributions"]).read_text().splitlines()]
    contributions = [c for c in lines if c["silo"] != "server"]  # what the silos sent
    sent = [c for c in lines if c["silo"] == "server"]  # what the server sent back: each silo's selected examples
    assert sorted((c["to"], c["round"]) for c in sent) == [("silo-0", 1), ("silo-0", 2), ("silo-1", 1), ("silo-1", 2)]
    assert all(c["kind"] == "selected" and len(c["texts"]) == len(c["labels"]) for c in sent)
    assert sorted((c["silo"], c["round"]) for c in contributions) == [("silo-0", 1), ("silo-0", 2), ("silo-1", 1),
                                                                     ("silo-1", 2)]
    assert all(c["kind"] == "scores" and len(c["probs"]) == len(c["texts"]) for c in contributions)


def test_score_on_silo_never_sends_weights(mixed_run):
    grid = mixed_run.grid
    types = {m.metadata.message_type for m in grid.sent}
    assert {TRAIN_PRIVATE, SCORE, ENHANCE} <= types and UPLOAD not in types
    for _, request, reply in grid.replied:
        for msg in (request, reply):
            assert not msg.has_error()
            assert not msg.content.array_records
            assert not any(isinstance(r, ArrayRecord) for r in msg.content.values())
        if request.metadata.message_type == SCORE:  # DP votes (the default scores): their cost beside them
            assert set(reply.content.keys()) == {p.METRICS, p.SCORES, p.PRIVACY}
            assert p.read_privacy(reply.content)["mechanism"] == "dp-nn-votes"
            assert set(reply.content[p.METRICS]) == {"score.examples", "score.seconds", "score.agreement"}
            n = len(request.content[p.EXAMPLES]["texts"])
            assert len(reply.content[p.SCORES]["probs"]) == n * 3
    # the bytes meter agrees: nothing weight-sized moved
    assert max(v["received"] + v["sent"] for v in mixed_run.record.communication["by_message_type"].values()) < 2e5


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_delayed_silo_does_not_hold_back_the_others_in_async_mode(tmp_path, mode):
    """Silo 0 answers its first scoring request 2 s late. Async: silo 1 gets its enhancement (and its next batch)
    before silo 0's scores arrive. Sync: nobody gets anything before the slowest silo answered."""
    def before_handle(node, msg):
        if node == 1000 and msg.metadata.message_type == SCORE and msg.metadata.group_id == "1":
            time.sleep(2.0)

    record, _ = start(tmp_path, f"crosslm-{mode}", before_handle=before_handle, **{"crosslm.mode": mode})
    assert record.status == "ok" and record.failures == []
    slow_scores = event_time(record, "silo-0", "received", SCORE, 1)
    fast_enhance = event_time(record, "silo-1", "sent", ENHANCE, 1)
    if mode == "async":
        assert fast_enhance < slow_scores
        assert event_time(record, "silo-1", "sent", SCORE, 2) < slow_scores
    else:
        assert fast_enhance > slow_scores
    for silo in ("silo-0", "silo-1"):
        events = [e["event"] for e in record.timelines[silo]]
        assert events.count("processed") == 1 + 2 * 2  # train.private, then score + enhance per round


def test_a_failing_and_a_silent_silo_are_dropped_and_the_run_goes_on(tmp_path):
    """Silo 1 crashes on scoring (an error reply); silo 2 never answers its first enhancement within the TTL."""
    release = threading.Event()

    def before_handle(node, msg):
        if node == 1002 and msg.metadata.message_type == ENHANCE:
            release.wait(timeout=60)  # silent until the run is over

    t0 = time.monotonic()
    record, grid = start(tmp_path, "crosslm-faults", silos=3, workers=3, before_handle=before_handle,
                         before_close=release.set, **{"faults.crash-silos": "1", "faults.crash-message-types": SCORE,
                                                      "crosslm.ttl": 8.0, "task.max-examples": 150})
    assert record.status == "ok"
    assert time.monotonic() - t0 < 60
    failed = {(f["silo"], f["message_type"], f["round"]): f["reason"] for f in record.failures}
    assert set(failed) == {("silo-1", SCORE, 1), ("silo-2", ENHANCE, 1)}
    assert "injected crash" in failed[("silo-1", SCORE, 1)] and "TTL" in failed[("silo-2", ENHANCE, 1)]
    assert "round-2.global-test.accuracy" in record.silo_metrics["silo-0"]  # the healthy silo finished
    assert "before.global-test.accuracy" in record.silo_metrics["silo-1"]
    assert "global-test.accuracy" not in record.silo_metrics["silo-1"]
    assert record.server_metrics["crosslm.llm-updates"] >= 1  # the LLM kept learning from who was left
    assert event_time(record, "silo-1", "failed", SCORE, 1) > 0


def test_stale_rewards_do_not_update_the_llm(tmp_path):
    def before_handle(node, msg):
        if node == 1001 and msg.metadata.message_type == SCORE:
            time.sleep(1.5)

    record, _ = start(tmp_path, "crosslm-stale", before_handle=before_handle,
                      **{"crosslm.min-scorers": 1, "crosslm.max-staleness": 0})
    assert record.status == "ok" and record.failures == []
    server = record.server_metrics
    assert server["crosslm.stale-contributions"] >= 1
    assert server["crosslm.llm-updates"] == 4 - server["crosslm.stale-contributions"]
    steps = [json.loads(line) for line in Path(record.artifacts["crosslm-steps"]).read_text().splitlines()]
    assert steps and all(e["staleness"] == 0 for e in steps)


def test_soft_targets_distil_the_silos_combined_probabilities(tmp_path):
    record, grid = start(tmp_path, "crosslm-soft", **{"crosslm.targets": "soft", "crosslm.mode": "sync",
                                                      "crosslm.with-private": True, "crosslm.rounds": 1})
    assert record.status == "ok" and record.failures == []
    enhancements = [m for m in grid.sent if m.metadata.message_type == ENHANCE]
    assert len(enhancements) == 2
    for msg in enhancements:
        n = len(msg.content[p.EXAMPLES]["texts"])
        probs = p.read_probabilities(msg.content, p.TARGETS, n, 3)
        assert n > 0 and np.allclose(probs.sum(1), 1.0)
        assert msg.content[p.CONFIG]["with-private"] is True
    for silo in ("silo-0", "silo-1"):
        metrics = record.silo_metrics[silo]
        assert metrics["train.examples"] == metrics["num-train"] + metrics["train.synthetic"]  # 1 epoch


def test_score_on_server_uploads_once_and_returns_enhanced_weights(tmp_path, tiny_distilbert):
    record, grid = start(tmp_path, "crosslm-server", **{"crosslm.score-on": "server", "crosslm.scores": "slm",
                                                        "slm.model": f"{tiny_distilbert},tiny-bert"})
    assert record.status == "ok" and record.failures == []
    assert any("score-on=server" in note and "weaker privacy" in note for note in record.notes)
    sent = [m.metadata.message_type for m in grid.sent]
    assert SCORE not in sent and sent.count(UPLOAD) == 2 and sent.count(ENHANCE) == 4
    uploads = grid.replies_of(UPLOAD)
    assert uploads[1000].content[p.SLM]["spec"] == tiny_distilbert and uploads[1001].content[p.SLM]["spec"] == "tiny-bert"
    last = {}
    for msg in grid.sent:
        if msg.metadata.message_type == ENHANCE:
            assert p.EXAMPLES not in msg.content
            last[msg.metadata.dst_node_id] = msg.content[p.ARRAYS]
    for node, arrays in last.items():  # the silo keeps exactly what the server sent back
        kept = grid.contexts[node].state[KEPT_SLM]
        assert set(kept) == set(arrays)
        assert all(np.array_equal(kept[k].numpy(), arrays[k].numpy()) for k in arrays)
        assert not all(np.array_equal(uploads[node].content[p.ARRAYS][k].numpy(), arrays[k].numpy()) for k in arrays)
    assert record.server_metrics["crosslm.llm-updates"] == 2


def test_a_silo_reads_texts_at_one_length_in_every_slm_it_builds(tmp_path):
    """slm.max-length=0 fits the token length to the silo's own training texts, once: the SLM it keeps, reloads
    for scoring and enhances reads every text the same way, whatever texts the server sends."""
    from fedbridge.models.slm import FIT_MULTIPLE
    from fedbridge.silo import Silo

    cfg = tiny_config(tmp_path, method="crosslm", **{"slm.max-length": 0})
    silo = Silo.from_context(SimpleNamespace(run_config=cfg.to_run_config(), node_config={"partition-id": 0}))
    fresh = silo.new_slm()
    assert fresh.max_length % FIT_MULTIPLE == 0 and fresh.max_length > FIT_MULTIPLE  # reviews: longer than 16 bytes
    reloaded = silo.new_slm(fresh.trainable_state())
    assert reloaded.max_length == fresh.max_length
    assert reloaded.fit_max_length(["x"]) == fresh.max_length  # a short server batch does not refit it
