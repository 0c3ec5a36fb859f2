"""FDKT end to end with tiny models: the server's text utilities and LLM filter, in-process rounds for both DP
mechanisms, what crosses the wire, the silo's privacy ledger across messages, per-silo streaming, and a
Secret Sharer canary through the silo's release path (non-private vs small ε)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config, wire_strings
from flwr.app import ArrayRecord, Message

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.methods.fdkt import silo as fdkt_silo
from fedbridge.methods.fdkt.messages import SYNTHESIZE
from fedbridge.methods.seeding import llm_filter, parse_kept_indices
from fedbridge.methods.text import deduplicate, jaccard, parse_generation, shingles
from fedbridge.models.generation import GenerationStats
from fedbridge.models.llm import FedbridgeLLM
from fedbridge.models.loading import byte_tokenizer
from fedbridge.privacy import (
    canary_rank,
    candidate_secrets,
    exposure,
    make_canary,
    verbatim_copy_rate,
)
from fedbridge.privacy.policy import SiloPolicy
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.silo import Silo
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare
from fedbridge.tasks import Examples, load_federation

NODES = (1000, 1001)  # InProcessGrid's node ids for partition-id 0 and 1
# Small and fast, but every stage runs: DP demonstrations, LLM filter, augmentation, label filter, dedup, training.
FAST = {"fdkt.generator": "tiny-llama", "fdkt.num-per-label": 2, "fdkt.max-tokens": 6, "fdkt.augment-per-label": 2,
        "fdkt.min-words": 1, "fdkt.max-new-tokens": 12, "fdkt.sgd-epochs": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingGrid(InProcessGrid):
    """An InProcessGrid that also times pushes (perf_counter) and can act on each push."""

    def __init__(self, *args, on_push=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.on_push = on_push
        self.pushed: list[tuple[float, str, int]] = []  # (time, message type, destination node)

    def push_messages(self, messages):
        messages = list(messages)
        ids = super().push_messages(messages)
        for msg in messages:
            self.pushed.append((time.perf_counter(), msg.metadata.message_type, msg.metadata.dst_node_id))
            if self.on_push:
                self.on_push(msg)
        return ids


def start_fdkt(tmp_path, name: str, workers: int = 1, before_handle=None, on_push=None,
               **options) -> tuple[RunRecord, RecordingGrid]:
    """One in-process FDKT run with tiny models; the caller closes the grid (it still serves messages)."""
    cfg = prepare(tiny_config(tmp_path, method="fdkt", run_name=name, **{**FAST, **options}))
    nodes = [{"partition-id": i, "num-partitions": 2, "noise-seed": 0} for i in range(2)]  # the silos' own seed
    grid = RecordingGrid(client_app, cfg.to_run_config(), nodes,
                         workers=workers, before_handle=before_handle, on_push=on_push)
    try:
        return run_experiment(grid, cfg), grid
    except BaseException:
        grid.close()
        raise


def private_texts(grid: InProcessGrid, node: int) -> tuple[str, ...]:
    return Silo.from_context(grid.contexts[node]).data.train.texts


# ------------------------------------------------------------------ server text utilities


def test_parse_kept_indices_handles_garbage():
    assert parse_kept_indices("", 5) is None
    assert parse_kept_indices("none", 5) is None  # names no number: keep everything
    assert parse_kept_indices("keep all of them", 5) is None
    assert parse_kept_indices("1, 3 and 7", 5) == [0, 2]  # 7 is out of range
    assert parse_kept_indices("0, 6, 42", 5) is None  # nothing in 1..n
    assert parse_kept_indices("2, 2, 2 and 2.", 5) == [1]  # repeats count once
    assert parse_kept_indices("Numbers: 4,1\n3", 4) == [0, 2, 3]  # sorted, any separators
    assert parse_kept_indices("12", 15) == [11]  # multi-digit numbers are one number
    assert parse_kept_indices("1", 0) is None


def test_parse_generation_strips_lead_ins_quotes_and_trailing_paragraphs():
    body = "This drug cleared my skin in two weeks."
    assert parse_generation(f"Review: {body}") == body
    assert parse_generation(f"Here is a new review: {body}") == body
    assert parse_generation(f"Here's a new drug review with label 'positive':\n\n{body}") == body
    assert parse_generation(f"New review 2: {body}") == body
    assert parse_generation(f'"{body}"') == body
    assert parse_generation(f"“{body}”") == body
    assert parse_generation(f'Review: "{body}"\n\nI hope this helps! Let me know.') == body
    assert parse_generation(f"  {body}\n\nNote: it is fictional.\n\nMore.") == body
    assert parse_generation(f"{body}\nSecond line of the same paragraph.") == f"{body}\nSecond line of the same paragraph."
    assert parse_generation("") == ""


def test_deduplicate_drops_exact_and_near_copies_and_keeps_distinct_texts():
    demo = ("I took this medication for three months and the headaches almost disappeared, although I felt "
            "tired during the first week and had a dry mouth most mornings.")
    near_demo = demo.replace("three", "four")  # one word changed in a long text
    distinct_a = "Terrible side effects: dizziness, nausea and a rash that lasted for weeks after I stopped."
    near_a = distinct_a.replace("weeks", "days")
    distinct_b = "It works for my blood pressure and I have had no problems at all with it so far."
    candidates = [demo, distinct_a, near_demo, demo.upper(), distinct_b, near_a, distinct_a, f"  {distinct_b}  "]
    assert deduplicate(candidates, [demo], threshold=0.8) == [1, 4]
    assert deduplicate(candidates, [], threshold=0.8) == [0, 1, 4]
    assert deduplicate([distinct_a, distinct_b], [demo], threshold=0.8) == [0, 1]
    assert deduplicate([near_a], [distinct_a], threshold=1.0) == [0]  # only exact copies at threshold 1
    assert deduplicate([], [demo], 0.8) == []


def exact_deduplicate(candidates, against, threshold):
    """The definition, every pair compared: what the MinHash LSH index must reproduce."""
    seen, kept = [shingles(t) for t in against], []
    for i, text in enumerate(candidates):
        if all(jaccard(shingles(text), o) < threshold for o in seen):
            kept.append(i)
            seen.append(shingles(text))
    return kept


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.8, 0.9, 1.0])
def test_the_lsh_index_keeps_exactly_what_every_pair_compared_keeps(threshold):
    """600 texts from a small vocabulary, a third of them edited copies of earlier ones (Jaccard spread over 0-1)."""
    rng = random.Random(threshold)
    words = "pill pain sleep dose week doctor tired skin better worse side effect rash nausea works".split()
    texts = []
    for _ in range(600):
        if texts and rng.random() < 0.35:
            base = rng.choice(texts).split()
            for _ in range(rng.randint(0, 4)):
                base[rng.randrange(len(base))] = rng.choice(words)
            texts.append(" ".join(base))
        else:
            texts.append(" ".join(rng.choices(words, k=rng.randint(5, 25))))
    kept = deduplicate(texts[100:], texts[:100], threshold)
    assert kept == exact_deduplicate(texts[100:], texts[:100], threshold)
    if threshold == 0.8:  # the default: both outcomes occur
        assert 0 < len(kept) < 500


TEXTS = [  # 8 distinct texts: k = ceil(8/4) = 2 clusters, one LLM question each
    "This medicine stopped my migraines completely.", "Great pill, my migraines are gone.",
    "My acne cleared up within a month of using it.", "Skin is clearer than it has been in years.",
    "Awful nausea every single morning, I quit.", "It made me vomit and feel dizzy all day.",
    "No effect on my blood pressure whatsoever.", "Did nothing for my sleep, a waste of money.",
]


def fake_llm(answer_for):
    """A server LLM for the demonstration filter that answers ``answer_for(listed texts)``; returns it and the listings
    asked."""
    asked: list[list[str]] = []

    def generate(prompts, sampling, *args, **kwargs):
        answers = []
        for prompt in prompts:
            listing = [line.split(". ", 1)[1] for line in prompt[0]["content"].splitlines()
                       if line[:1].isdigit() and ". " in line]
            asked.append(listing)
            answers.append(answer_for(listing))
        return answers, GenerationStats(prompts=len(prompts))

    return SimpleNamespace(generate=generate, device=torch.device("cpu")), asked


def test_llm_filter_keeps_a_whole_cluster_when_the_answer_is_unparseable():
    llm, asked = fake_llm(lambda listing: "I think they all look fine!")
    counts = Counter()
    kept = llm_filter(llm, SimpleNamespace(description="drug review"), "positive", TEXTS, 0,
                      GenerationStats(), counts)
    assert kept == list(range(len(TEXTS)))
    assert len(asked) == 2 and sorted(t for listing in asked for t in listing) == sorted(TEXTS)  # every text asked once
    assert counts["filter-unparseable"] == 2


def test_llm_filter_keeps_only_the_named_texts():
    # cluster 1: "1 and 3" (out-of-range numbers ignored); any other cluster: garbage, so kept whole
    answers = iter(["1 and 3, not 9", "no idea"])
    llm, asked = fake_llm(lambda listing: next(answers))
    counts, stats = Counter(), GenerationStats()
    kept = llm_filter(llm, SimpleNamespace(description="drug review"), "positive", TEXTS, 0, stats, counts)
    first, second = asked
    expected = {TEXTS.index(first[0]), *([TEXTS.index(first[2])] if len(first) >= 3 else []),
                *(TEXTS.index(t) for t in second)}
    assert kept == sorted(expected) and len(kept) < len(TEXTS)
    assert counts["filter-unparseable"] == 1 and stats.prompts == 2


def test_llm_filter_needs_no_llm_for_fewer_than_two_texts():
    llm, asked = fake_llm(lambda listing: "1")
    assert llm_filter(llm, SimpleNamespace(description="x"), "y", ["only one"], 0, GenerationStats(),
                      Counter()) == [0]
    assert asked == []


def test_silos_that_arrive_together_are_augmented_in_one_llm_pass_each_from_its_own_demonstrations():
    import fedbridge.methods.fdkt.server as fdkt_server

    calls = []

    def generate(prompts, sampling, seed=None, progress=None):
        calls.append(len(prompts))  # each new text names the demonstration its prompt showed
        shown = [prompt[0]["content"].split("Example: ")[1].split("\n")[0] for prompt in prompts]
        return [f"a new review written from {s}" for s in shown], GenerationStats(prompts=len(prompts))

    task = SimpleNamespace(description="drug review", labels=("negative", "positive"), instruction="")
    sets = {"silo-0": Examples.of(["alpha one", "alpha two"], [0, 1]),
            "silo-1": Examples.of(["beta one", "beta two"], [0, 1])}
    cfg = dataclasses.replace(fdkt_server.FDKTConfig(), llm_filter=False, label_filter=False, augment_per_label=2,
                              demos_per_prompt=1, min_words=2)
    counts = Counter()
    out = fdkt_server.augment(SimpleNamespace(generate=generate), task, sets, cfg, 0, GenerationStats(), counts)
    assert calls == [8]  # 2 silos x 2 labels x 2 prompts, one pass
    for silo, word in (("silo-0", "alpha"), ("silo-1", "beta")):
        new = [(t, y) for t, y in zip(out[silo].texts, out[silo].labels) if t.startswith("a new review")]
        assert new and all(word in t for t, _ in new)  # only its own demonstrations seeded its set
        assert all(("one" in t) == (y == 0) for t, y in new)  # each with the label its prompt asked for
    assert {"alpha one", "alpha two"} <= set(out["silo-0"].texts)  # kept demonstrations stay in the set
    assert counts["generated"] == 8


def test_the_votes_not_the_llm_label_every_example_and_drop_the_unclear():
    import numpy as np

    from fedbridge.methods.fdkt.server import relabel, vote_candidates
    from fedbridge.methods.votes import tally

    sets = {"silo-0": Examples.of(["shared", "a", "b"], [0, 0, 1]), "silo-1": Examples.of(["shared", "c"], [0, 1])}
    candidates = vote_candidates(sets)
    assert candidates.texts == ("shared", "a", "b", "c") and candidates.labels == (0, 0, 1, 1)  # each text once
    histogram = np.array([[0.0, 9.0],  # shared: the silos say 1, the LLM wrote it for 0
                          [8.0, 1.0],  # a: 0, as written
                          [5.0, 4.6],  # b: too close to call at noise std 1 (a lead of 0.4 < sqrt 2)
                          [1.0, 7.0]])  # c: 1, as written
    out, counts = relabel(sets, candidates.texts, tally(histogram, 1.0, balance=False, threshold=1.0))
    assert out["silo-0"] == Examples.of(["shared", "a"], [1, 0]) and out["silo-1"] == Examples.of(["shared", "c"], [1, 1])
    assert counts == Counter({"vote-kept": 4, "vote-dropped": 1, "vote-relabelled": 2})  # 'shared' in both sets


# ------------------------------------------------------------------ in-process rounds


@pytest.fixture(scope="module", params=["dp-fewshot", "dp-sgd"])
def dp_run(request, tmp_path_factory):
    """One FDKT round per mechanism at a small budget (ε = 1); the grid stays open for follow-up messages."""
    mechanism = request.param
    record, grid = start_fdkt(tmp_path_factory.mktemp(mechanism), f"fdkt-{mechanism}",
                              **{"fdkt.mechanism": mechanism, "fdkt.epsilon": 1.0, "fdkt.vote-epsilon": 2.0,
                                 "fdkt.vote-threshold": 0.0})  # tiny silos: at 1 std nothing would clear the noise
    yield SimpleNamespace(mechanism=mechanism, record=record, grid=grid)
    grid.close()


def test_round_trains_every_silo_on_its_augmented_set_and_records_privacy(dp_run):
    record, grid = dp_run.record, dp_run.grid
    assert record.status == "ok" and record.failures == []
    assert set(record.privacy) == {"silo-0", "silo-1"}
    augmented = grid.sent_of(p.TRAIN_AUGMENTED)
    assert set(augmented) == set(NODES)
    lines = [json.loads(line) for line in open(record.artifacts["contributions"], encoding="utf-8")]
    voted = {text for line in lines if line["kind"] == "augmented" for text in line["texts"]}
    assert set(grid.sent_of(p.DP_VOTE)) == set(NODES)  # one vote per silo, over every augmented example together
    for msg in grid.sent_of(p.DP_VOTE).values():
        assert set(msg.content[p.EXAMPLES]["texts"]) == voted
    for node, silo in zip(NODES, ("silo-0", "silo-1")):
        privacy, metrics = record.privacy[silo], record.silo_metrics[silo]
        demos = privacy["other"]  # the demonstrations' release, composed with the vote's
        assert demos["mechanism"] == dp_run.mechanism and 0 < demos["epsilon"] <= 1.0 and demos["private"] is True
        assert privacy["mechanism"] == f"{dp_run.mechanism} + dp-nn-votes (basic composition)"
        assert privacy["private"] is True and privacy["epsilon"] == pytest.approx(
            demos["epsilon"] + privacy["epsilon-total"]) and 0 < privacy["epsilon-total"] <= privacy["budget"] == 2.0
        assert privacy["delta"] == 2e-5 and privacy["noise-multiplier"] > 0 and privacy["steps"] == 1
        sent = p.read_examples(augmented[node].content, p.EXAMPLES, 3)  # the examples record is there and valid
        assert len(sent) > 0 and set(sent.texts) <= voted  # only what the silos voted on
        # what the server sent, beside the record: the augmented set, relabelled (or thinned) by the votes
        made = [line for line in lines if line["kind"] == "augmented" and line["set"] == silo]
        assert len(made) == 1 and made[0]["silo"] == "server" and made[0]["sources"] == [silo]
        kept = [line for line in lines if line["kind"] == "synthetic" and line["set"] == silo]
        assert len(kept) == 1 and (tuple(kept[0]["texts"]), tuple(kept[0]["labels"])) == (sent.texts, sent.labels)
        assert set(sent.texts) <= set(made[0]["texts"])
        assert metrics["train.synthetic"] == len(sent) > 0  # the silo trained on exactly what it was sent
        # its private split less the validation part that chose the epoch, and what it was sent, every epoch
        held_out = metrics["train.validation"]
        assert held_out > 0 and metrics["train.examples"] == metrics["train.epochs"] * (
            metrics["num-train"] - held_out + len(sent))
        assert metrics["synth.examples"] > 0 and 0 <= metrics["global-test.accuracy"] <= 1
    assert record.tokens["silo-generated"] > 0 and record.tokens["prompt"] > 0 and record.tokens["generated"] > 0
    assert record.server_metrics["fdkt.generated"] > 0 and record.server_metrics["fdkt.demonstrations"] > 0
    assert record.communication["by_message_type"][SYNTHESIZE]["received"] > 0
    assert not any("NOT differentially private" in note for note in record.notes)


def test_synthesize_replies_carry_only_dp_examples_and_no_private_text(dp_run):
    grid = dp_run.grid
    replies = grid.replies_of(SYNTHESIZE)
    assert set(replies) == set(NODES)
    for node, reply in replies.items():
        assert not reply.has_error()
        content = reply.content
        assert set(content.keys()) == {p.METRICS, p.EXAMPLES, p.PRIVACY}
        assert not content.array_records and not any(isinstance(r, ArrayRecord) for r in content.values())
        assert all(k.startswith("synth.") for k in content[p.METRICS])  # no silo-local diagnostics
        assert not any(word in key for key in content[p.METRICS] for word in ("private", "loss", "train-tokens"))
        private = private_texts(grid, node)
        strings = wire_strings(content)
        assert verbatim_copy_rate(strings, private) == 0.0
        assert not set(map(str.strip, content[p.EXAMPLES]["texts"])) & set(map(str.strip, private))
        # and the server forwarded nothing private to any silo either
        for msg in grid.sent_of(p.TRAIN_AUGMENTED).values():
            assert verbatim_copy_rate(msg.content[p.EXAMPLES]["texts"], private) == 0.0


def test_a_spent_budget_refuses_the_next_synthesize_and_charges_nothing(dp_run):
    grid, node = dp_run.grid, NODES[0]
    silo = Silo.from_context(grid.contexts[node])
    path = silo.state_dir / "privacy" / f"{silo.data_id}.json"  # the silo's lifetime ledger, on its disk
    before = path.read_text()
    experiment = grid.sent_of(SYNTHESIZE)[node].content[p.CONFIG][p.EXPERIMENT]
    spent = silo.run_ledger(1.0, experiment).spent()
    assert 0 < spent <= 1.0
    assert spent == pytest.approx(dp_run.record.privacy["silo-0"]["other"]["epsilon"])
    # the same run asks again: its epsilon (1) is spent
    msg = Message(p.request({p.EXPERIMENT: experiment}), dst_node_id=node, message_type=SYNTHESIZE, group_id="2")
    [reply] = grid.send_and_receive([msg], timeout=60)
    assert reply.has_error()
    reason = reply.error.reason
    assert "PrivacyBudgetExceeded" in reason and "is spent" in reason
    assert f"{spent:.4g} of the 1 it asked for" in reason  # what was spent, of which budget
    assert path.read_text() == before  # nothing new charged


def test_epsilon_inf_works_and_is_labelled_non_private(tmp_path):
    record, grid = start_fdkt(tmp_path, "fdkt-inf", **{"fdkt.epsilon": "inf", "fdkt.llm-filter": False,
                                                       "fdkt.labels": "llm"})
    grid.close()
    assert record.status == "ok" and record.failures == []
    assert any("NOT differentially private" in note for note in record.notes)
    on_disk = RunRecord.read(tmp_path / "fdkt-inf.json")
    for rec in (record, on_disk):
        for silo in ("silo-0", "silo-1"):
            privacy = rec.privacy[silo]
            assert privacy["private"] is False and privacy["mechanism"] == "fewshot (non-private)"
            assert math.isinf(privacy["epsilon"]) and math.isinf(privacy["budget"])
            assert privacy["noise-multiplier"] == 0.0
            assert rec.silo_metrics[silo]["train.synthetic"] > 0


def test_pooled_sends_every_silo_the_same_augmented_set(tmp_path):
    record, grid = start_fdkt(tmp_path, "fdkt-pooled", **{"fdkt.pooled": True, "fdkt.llm-filter": False,
                                                          "fdkt.labels": "llm"})
    grid.close()
    assert record.status == "ok" and record.failures == []
    sets = {node: (tuple(m.content[p.EXAMPLES]["texts"]), tuple(m.content[p.EXAMPLES]["labels"]))
            for node, m in grid.sent_of(p.TRAIN_AUGMENTED).items()}
    assert set(sets) == set(NODES) and sets[NODES[0]] == sets[NODES[1]] and sets[NODES[0]][0]
    pooled = set(sets[NODES[0]][0])
    for node, reply in grid.replies_of(SYNTHESIZE).items():  # without the filter every demonstration is kept
        assert set(reply.content[p.EXAMPLES]["texts"]) <= pooled
    assert record.silo_metrics["silo-0"]["train.synthetic"] == record.silo_metrics["silo-1"]["train.synthetic"] > 0


def test_per_silo_sets_go_back_as_soon_as_they_are_ready(tmp_path):
    """Silo 0's synthesize is held until silo 1's train.augmented is pushed (or 30 s pass, if the server waits
    for every silo first). Per-silo mode must push silo 1's set while silo 0 is still writing."""
    released = threading.Event()

    def on_push(msg):
        if msg.metadata.message_type == p.TRAIN_AUGMENTED and msg.metadata.dst_node_id == NODES[1]:
            released.set()

    def before_handle(node, msg):
        if node == NODES[0] and msg.metadata.message_type == SYNTHESIZE:
            released.wait(timeout=30)

    record, grid = start_fdkt(tmp_path, "fdkt-stream", workers=2, before_handle=before_handle, on_push=on_push,
                              **{"fdkt.llm-filter": False, "fdkt.labels": "llm"})  # a vote waits for every silo
    grid.close()
    assert record.status == "ok" and record.failures == []
    assert released.is_set()
    pushed_at = {(kind, node): t for t, kind, node in grid.pushed}
    replied_at = {(req.metadata.message_type, req.metadata.dst_node_id): t for t, req, _ in grid.replied}
    assert pushed_at[(p.TRAIN_AUGMENTED, NODES[1])] < replied_at[(SYNTHESIZE, NODES[0])]
    order = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    assert order.index((p.TRAIN_AUGMENTED, NODES[1])) < order.index((p.TRAIN_AUGMENTED, NODES[0]))
    # per-silo: each set is built from that silo's own demonstrations only
    demos = {n: set(r.content[p.EXAMPLES]["texts"]) for n, r in grid.replies_of(SYNTHESIZE).items()}
    for node, msg in grid.sent_of(p.TRAIN_AUGMENTED).items():
        other = demos[NODES[1 - NODES.index(node)]] - demos[node]
        assert demos[node] <= set(msg.content[p.EXAMPLES]["texts"])
        assert not other & set(msg.content[p.EXAMPLES]["texts"])


# ------------------------------------------------------------------ canary through the silo's release path


class CopyingLM(torch.nn.Module):
    """A stand-in causal LM: at every position, if the last 4+ tokens occurred earlier in the context, it
    predicts (logit 50) the token that followed the longest such match (an ideal induction head); otherwise a
    fixed, nearly flat random bigram distribution, so candidates never tie when canaries are ranked."""

    MIN_MATCH = 4

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        self.device = torch.device("cpu")
        self.bigram = 0.1 * torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed))

    def forward(self, input_ids, attention_mask, **_):
        logits, k_min = self.bigram[input_ids].clone(), self.MIN_MATCH
        for row in range(input_ids.shape[0]):
            where = attention_mask[row].nonzero().flatten().tolist()  # left or right padding
            ids, seen = input_ids[row, where].tolist(), {}
            for i in range(k_min - 1, len(ids)):
                key, best, target = tuple(ids[i - k_min + 1:i + 1]), -1, None
                for j in seen.get(key, ()):  # earlier ends of the same 4-gram; extend the match backwards
                    k = k_min
                    while k <= j and ids[j - k] == ids[i - k]:
                        k += 1
                    if k >= best:
                        best, target = k, ids[j + 1]
                if target is not None:
                    logits[row, where[i], target] = 50.0
                seen.setdefault(key, []).append(i)
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def canary_silo():
    """Silo 0 of the tiny federation with half its 'negative' training texts replaced by a canary sentence,
    writing its demonstrations with the copying LM."""
    cfg = tiny_config("unused", method="fdkt", **{"task.max-examples": 200})
    data = load_federation(cfg.task, cfg.partition, cfg.seed).silos[0]
    canary = make_canary("digits", seed=0)
    texts, labels = list(data.train.texts), list(data.train.labels)
    negative = [i for i, y in enumerate(labels) if y == 0]
    assert len(negative) >= 10
    for i in negative[:len(negative) // 2]:
        texts[i] = canary.text
    tok = byte_tokenizer()
    return SimpleNamespace(cfg=cfg, data=dataclasses.replace(data, train=Examples.of(texts, labels)), canary=canary,
                           llm=FedbridgeLLM(CopyingLM(len(tok)), tok),
                           candidates=candidate_secrets(canary, 999, seed=1))


def release(canary_silo, monkeypatch, epsilon) -> tuple[list[str], dict]:
    """What silo 0 sends in reply to query.synthesize, at ``epsilon`` (dp-fewshot, fixed noise seed)."""
    monkeypatch.setattr(fdkt_silo, "load_llm_interface", lambda spec, device: canary_silo.llm)
    options = {"fdkt.mechanism": "dp-fewshot", "fdkt.epsilon": epsilon, "fdkt.groups": 8,
               "fdkt.shots-per-group": 2, "fdkt.max-tokens": 24, "fdkt.public-top-k": 0, "fdkt.num-per-label": 2,
               "fdkt.min-words": 1}
    cfg = dataclasses.replace(canary_silo.cfg, method_options=options)
    silo = Silo(0, cfg, ("negative", "neutral", "positive"), canary_silo.data, policy=SiloPolicy(noise_seed=0))
    examples, privacy, _ = fdkt_silo.synthesize(silo)
    return list(examples.texts), privacy


def rank(canary_silo, released: list[str]) -> int:
    return canary_rank(canary_silo.llm, "\n".join(released), canary_silo.canary,
                       canary_silo.candidates)


def test_canary_leaks_without_dp_when_the_lm_copies_its_context(canary_silo, monkeypatch):
    released, privacy = release(canary_silo, monkeypatch, math.inf)
    assert privacy["private"] is False and privacy["mechanism"] == "fewshot (non-private)"
    assert canary_silo.canary.text in released
    assert verbatim_copy_rate(released, [canary_silo.canary.text]) > 0
    leaked = rank(canary_silo, released)
    assert leaked == 0
    assert exposure(leaked, 1000) == pytest.approx(math.log2(1000))
    assert rank(canary_silo, []) > 50  # the scorer alone does not favour the secret: the release does


def test_canary_does_not_leak_at_small_epsilon(canary_silo, monkeypatch):
    released, privacy = release(canary_silo, monkeypatch, 0.5)
    assert privacy["private"] is True and privacy["mechanism"] == "dp-fewshot"
    assert privacy["epsilon"] <= 0.5 and privacy["noise-multiplier"] > 1
    assert verbatim_copy_rate(released, [canary_silo.canary.text]) == 0.0
    assert verbatim_copy_rate(released, canary_silo.data.train.texts) == 0.0
    assert not any(canary_silo.canary.secret in t for t in released)
    private_rank = rank(canary_silo, released)
    assert private_rank > 50 and exposure(private_rank, 1000) < 5
