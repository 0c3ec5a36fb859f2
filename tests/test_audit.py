"""The privacy audit: canary rank and exposure on constructed cases with known answers, canary planting that silos
and auditors rebuild alike, copy detection, the prefix-cached scorers it runs on, and `fedbridge audit` on a run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_config
from copying_lm import CopyingLM
from typer.testing import CliRunner

from fedbridge.errors import ConfigError
from fedbridge.models.generation import (
    common_prefix_length,
    continuation_logprobs,
    continuation_logprobs_shared,
    prefix_cached_logprobs,
    prompt_ids,
)
from fedbridge.models.llm import FedbridgeLLM
from fedbridge.models.llm_classifier import classification_prompt, label_probabilities
from fedbridge.models.loading import byte_tokenizer, tiny_llm
from fedbridge.privacy import CopyDetector, canary_rank, candidate_secrets, exposure, make_canary, plant
from fedbridge.privacy.audit import audit_texts, canary_report, plant_canaries, private_data
from fedbridge.privacy.canaries import run_canary
from fedbridge.silo import Silo
from fedbridge.simulations.cli import cli
from fedbridge.tasks import load_federation

pytestmark = pytest.mark.usefixtures("one_thread")

NOTES = "Notes kept by the silo: the meeting moved to Thursday.\n"


@pytest.fixture(scope="module")
def copier():
    tok = byte_tokenizer()
    return CopyingLM(len(tok)), tok


# ------------------------------------------------------------------ canary rank and exposure


def test_a_prompt_that_contains_the_canary_gives_rank_zero_and_maximal_exposure(copier):
    canary = make_canary("digits", seed=5)
    candidates = candidate_secrets(canary, 999, seed=1)
    leaked = canary_report(FedbridgeLLM(*copier), NOTES + canary.text + "\n" + NOTES, canary, candidates)
    assert leaked == {"canary-rank": 0, "canary-exposure": pytest.approx(math.log2(1000))}
    clean = canary_report(FedbridgeLLM(*copier), NOTES * 2, canary, candidates)
    assert clean["canary-rank"] > 50 and clean["canary-exposure"] < 5  # the scorer alone does not favour the secret


def test_a_name_canary_leaks_the_same_way(copier):
    canary = make_canary("name", seed=2)
    candidates = candidate_secrets(canary, 999, seed=3)
    assert canary_report(FedbridgeLLM(*copier), f"Team list.\n{canary.text}\nEnd.", canary, candidates)["canary-rank"] == 0


def test_the_cached_rank_equals_the_uncached_one(copier):
    """The KV-cached scorer (one prompt run, 1,000 continuations) gives the same ranks as scoring each whole."""
    model, tok = tiny_llm(seed=3)
    canary = make_canary("digits", seed=9)
    candidates = candidate_secrets(canary, 199, seed=0)
    for m in (model, copier[0]):
        for prompt in (NOTES, NOTES + canary.text.replace(canary.secret, "0000")):
            llm = FedbridgeLLM(m, tok)
            assert canary_rank(llm, prompt, canary, candidates, cache_prompt=True) == \
                canary_rank(llm, prompt, canary, candidates)


def test_exposure_matches_the_rank_definition():
    # |R| = 1000 ranked secrets: rank 0 -> log2(1000); median rank 499 -> 1 bit; last -> 0
    assert exposure(0, 1000) == pytest.approx(9.9658, abs=1e-4)
    assert exposure(499, 1000) == pytest.approx(1.0)
    assert exposure(999, 1000) == pytest.approx(0.0)


# ------------------------------------------------------------------ prefix-cached scoring (what the audit runs on)


def test_prefix_cached_logprobs_equal_a_full_forward_pass():
    model, tok = tiny_llm(seed=1)
    prompt = "A shared context that every continuation follows. " * 3
    continuations = ["x", "hello there", "My PIN code is 1234.", "ab"]
    full = continuation_logprobs(model, tok, [prompt] * len(continuations), continuations)
    cached = continuation_logprobs_shared(model, tok, prompt, continuations)
    assert [n for _, n in cached] == [n for _, n in full]
    np.testing.assert_allclose([s for s, _ in cached], [s for s, _ in full], rtol=1e-4)
    # continuations with a common beginning (a canary's template): that part is scored once, same numbers
    templated = [f"My PIN code is {code}." for code in ("1234", "1299", "7000")]
    full = continuation_logprobs(model, tok, [prompt] * 3, templated)
    cached = continuation_logprobs_shared(model, tok, prompt, templated)
    assert [n for _, n in cached] == [n for _, n in full]
    np.testing.assert_allclose([s for s, _ in cached], [s for s, _ in full], rtol=1e-4)
    # next-token log-probs after each row, including an empty row (the prefix's own last position)
    prefix = prompt_ids(tok, prompt)
    rows = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations] + [[]]
    _, nxt = prefix_cached_logprobs(model, prefix, rows, next_ids=[5, 6], pack_tokens=8)
    with torch.no_grad():
        for row, got in zip(rows, nxt):
            logits = model(input_ids=torch.tensor([prefix + row])).logits[0, -1]
            np.testing.assert_allclose(got, torch.log_softmax(logits, -1)[[5, 6]].numpy(), rtol=1e-4, atol=1e-5)


def test_common_prefix_length_leaves_every_row_a_token():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 3, 4, 6]]) == 3
    assert common_prefix_length([[1, 2], [1, 2]]) == 1
    assert common_prefix_length([[7, 1], [8, 1]]) == 0
    assert common_prefix_length([]) == 0


def test_label_probabilities_in_context_equal_the_uncached_scores():
    """The student's scorer with a few-shot context (prefix cached) against whole prompts scored one by one."""
    model, tok = tiny_llm(seed=2)
    texts = ["good value", "awful, never again", "it is fine I guess"]
    context = "Labelled examples:\n\nText: great\nLabel: pos\n\nText: bad\nLabel: neg"
    for labels in (("a", "b"), ("pos", "neg", "meh"), ("a", "pos", "b")):  # one-token, multi-token, mixed
        got = label_probabilities(model, tok, texts, labels, "Classify.", batch_size=2, max_tokens=1000,
                                  context=context)
        prompts = [classification_prompt("Classify.", t, labels, context=context) for t in texts for _ in labels]
        logp = continuation_logprobs(model, tok, prompts, [y for _ in texts for y in labels], max_tokens=1000)
        want = np.array([s for s, _ in logp]).reshape(len(texts), len(labels))
        want = np.exp(want - want.max(1, keepdims=True))
        np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), atol=1e-5)


# ------------------------------------------------------------------ planting and copy detection


def test_planting_is_deterministic_and_the_auditor_sees_what_the_silo_has(tmp_path):
    cfg = tiny_config(tmp_path, method="social", **{"canaries.enabled": True, "canaries.copies": 3})
    setup = cfg.canaries
    canary, candidates = run_canary(setup, cfg.seed)
    assert canary == make_canary("digits", seed=cfg.seed) and len(candidates) == 999 and canary.secret not in candidates
    data = load_federation(cfg.task, cfg.partition, cfg.seed).silos[1]
    planted = plant_canaries(data, setup, cfg.seed, 1)
    assert planted == plant_canaries(data, setup, cfg.seed, 1) and planted.test == data.test
    assert len(planted.train) == len(data.train) + 3 and planted.train.texts.count(canary.text) == 3
    majority = max(set(data.train.labels), key=data.train.labels.count)
    assert {y for t, y in zip(planted.train.texts, planted.train.labels) if t == canary.text} == {majority}
    silo = Silo.from_context(_context(cfg, 1))  # what the silo process builds for itself
    assert silo.data == planted
    assert private_data(cfg)["silo-1"] == [*planted.train.texts, *planted.test.texts]
    fdkt = tiny_config(tmp_path, method="fdkt", **{"canaries.enabled": True, "canaries.kind": "name"})
    assert Silo.from_context(_context(fdkt, 0)).data.train.texts.count(run_canary(fdkt.canaries, 0)[0].text) == 1
    off = tiny_config(tmp_path, method="social")
    assert not off.canaries.enabled and plant_canaries(data, off.canaries, 0, 1) == data
    with pytest.raises(ConfigError, match="canaries.kind"):
        tiny_config(tmp_path, **{"canaries.kind": "email"})


def _context(cfg, partition: int):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=1000 + partition, node_config={"partition-id": partition}, state=RecordDict(),
                   run_config=cfg.to_run_config())


def test_plant_inserts_copies_at_seeded_positions():
    canary = make_canary("digits", seed=0)
    texts, labels = plant(["a", "b", "c"], [0, 1, 0], canary, 2, 1, seed=4)
    assert texts.count(canary.text) == 2 and len(texts) == 5
    assert (texts, labels) == plant(["a", "b", "c"], [0, 1, 0], canary, 2, 1, seed=4)
    assert [t for t in texts if t != canary.text] == ["a", "b", "c"]


def test_copy_detector_flags_long_runs_and_whole_short_texts_only():
    private = ["The tablets gave me a headache every single morning for weeks.", "My PIN code is 4821.", "Ok lar",
               "Yes"]
    detector = CopyDetector(private, ngram=8)
    assert detector.copies("Honestly the TABLETS gave me a headache, every single morning for weeks!")  # 8+ words
    assert not detector.copies("the tablets gave me a headache every morning")  # 7 in a row at most
    assert detector.copies("Reminder: my pin code is 4821 ok")  # a whole short private text (5 words)
    assert not detector.copies("my pin code is 9999")
    assert detector.copies("ok lar") and not detector.copies("ok lar then")  # 1-2 word texts: only when equal
    assert not detector.copies("yes please")
    assert detector.copy_rate(["ok lar", "fresh text", "", "My PIN code is 4821."]) == 0.5
    with pytest.raises(ConfigError):
        CopyDetector(private, ngram=1)


def test_audit_texts_reports_copies_distance_and_secret_mentions():
    canary = make_canary("digits", seed=1)
    private = ["the pills worked well for my back pain after two weeks", canary.text]
    shared = ["the pills worked well for my back pain after two weeks", f"note: {canary.text}", "something else"]
    audit = audit_texts(shared, private, ngram=6, canary=canary)
    assert audit.shared == 3 and audit.verbatim_rate == pytest.approx(2 / 3)
    assert audit.ngram_copy_rate == pytest.approx(2 / 3) and audit.secret_mentions == 1
    assert 0 < audit.levenshtein < 1
    empty = audit_texts([], private)
    assert empty.shared == 0 and math.isnan(empty.levenshtein)


# ------------------------------------------------------------------ fedbridge audit on a run


def test_fedbridge_audit_finds_the_leak_of_a_copying_teacher(tmp_path, monkeypatch, copier):
    """Teachers that copy their prompt (verbatim filter off) leak the planted canary: the audit shows the copies,
    the secret in the shared text, and rank 0 for the canary against what was shared."""
    from test_social import WHOLE_COPIES, CopyingTeacher, run_social

    monkeypatch.setattr("fedbridge.models.llm.generate", CopyingTeacher())  # the teachers' fedbridge backend
    options = {**WHOLE_COPIES, "social.verbatim-filter": False, "canaries.enabled": True, "canaries.copies": 40}
    record, grid = run_social(tmp_path, "leaky", **options)
    grid.close()
    result = CliRunner().invoke(cli, ["audit", str(tmp_path / "leaky.json"), "--no-rank"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    [run] = report["runs"]
    assert run["overall"]["shared"] > 0 and run["overall"]["verbatim_rate"] > 0
    assert run["overall"]["secret_mentions"] > 0 and run["canaries"] == {}  # --no-rank
    assert "audit per run" in (tmp_path / "audit" / "audit.md").read_text()
    from fedbridge.privacy.audit import audit_run

    ranked = audit_run(tmp_path / "leaky.json", model=copier)
    assert ranked.canaries["all-shared"]["canary-rank"] == 0
    assert set(ranked.canaries) >= {"all-shared", "student:examples:random"}
    assert ranked.silos and all(s.shared > 0 for s in ranked.silos.values())
