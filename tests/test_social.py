"""Social Learning with tiny models: the teacher's parsing and perplexity top-k, the aggregators (voting picks what
every teacher prefers), what crosses the wire (no private example with the verbatim filter on), in-process runs of
each mode (and DP examples), the non-private bound's consent guard, config and protocol checks, and compare's rows."""

from __future__ import annotations

import json
import math
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_config, wire_strings
from copying_lm import CopyingLM
from flwr.app import ConfigRecord, Message, RecordDict

import fedbridge.models.llm as llm_module  # the teacher's generation (the interface's fedbridge backend) is patched there
from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.errors import ConfigError
from fedbridge.methods.social.aggregators import BalancedAggregator, Candidate, RandomAggregator, VotingAggregator
from fedbridge.methods.social.config import SocialConfig
from fedbridge.methods.social.messages import SHARE_RAW, TEACH, VOTE
from fedbridge.methods.social.teaching import (
    examples_context,
    parse_free_generation,
    top_k_by_perplexity,
    vote_scores,
    write_examples,
)
from fedbridge.models.generation import GenerationStats, continuation_logprobs
from fedbridge.models.llm import FedbridgeLLM
from fedbridge.models.loading import byte_tokenizer
from fedbridge.privacy import CopyDetector, verbatim_copy_rate
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.silo import Silo
from fedbridge.simulations.compare import group, to_markdown
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare
from fedbridge.tasks import Examples

pytestmark = pytest.mark.usefixtures("one_thread")

NODES = (1000, 1001)
LABELS = ("negative", "neutral", "positive")
# small and fast, but every stage runs: teach, vote, three aggregators, student, canary ranking
FAST = {"social.teacher": "tiny-llama", "social.shots": 3, "social.samples": 6, "social.top-k": 3,
        "social.max-new-tokens": 12, "social.max-example-chars": 80, "social.num-examples": 4,
        "social.vote-examples": 2, "social.instruction-shots": 2, "social.instruction-tokens": 16,
        "social.max-test": 12, "social.max-prompt-tokens": 1000, "canaries.candidates": 99}


def run_social(tmp_path, name: str, **options) -> tuple[RunRecord, InProcessGrid]:
    """One in-process Social Learning run with tiny models; the caller closes the grid."""
    cfg = prepare(tiny_config(tmp_path, method="social", run_name=name, **{**FAST, **options}))
    nodes = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / "silo-state"), "noise-seed": 0}
             for i in range(2)]
    grid = InProcessGrid(client_app, cfg.to_run_config(), nodes)
    try:
        return run_experiment(grid, cfg), grid
    except BaseException:
        grid.close()
        raise


def _shot_texts(prompt) -> list[str]:
    """The private example texts shown in a teacher prompt (examples mode: a string; instructions: chat)."""
    text = prompt if isinstance(prompt, str) else prompt[0]["content"]
    return [t.strip() for t in re.findall(r"Text: (.+)", text) if t.strip()]


class CopyingTeacher:
    """Stands in for ``generate`` in a teacher that copies: per prompt, in turn, a private example verbatim, a long
    run of one inside new words, and a fresh text; for an instruction, a line that quotes an example and a line of
    its own. Keeps the prompts it was given."""

    def __init__(self) -> None:
        self.prompts: list = []

    def __call__(self, model, tok, prompts, sampling, seed=None, progress=None):
        self.prompts += prompts
        outputs = []
        for i, prompt in enumerate(prompts):
            shots = _shot_texts(prompt)
            if not isinstance(prompt, str):
                outputs.append(f"Quote: {shots[0]}\nDecide by the tone of the text.")
            elif i % 3 == 0:
                outputs.append(shots[0])
            elif i % 3 == 1:
                outputs.append("I would say " + " ".join((shots[0] + " filler" * 12).split()[:12]) + " honestly")
            else:
                outputs.append(f"fresh words number {i} nothing copied here")
        return outputs, GenerationStats(prompts=len(prompts), generated_tokens=8 * len(prompts))


def private_texts(grid: InProcessGrid, node: int) -> list[str]:
    data = Silo.from_context(grid.contexts[node]).data
    return [*data.train.texts, *data.test.texts]


# ------------------------------------------------------------------ formats, parsing, perplexity top-k


def test_parse_free_generation():
    assert parse_free_generation(" Great stuff\nLabel: Positive.", LABELS) == ("Great stuff", 2)
    assert parse_free_generation("Meh.\n  Label:neutral extra words", LABELS) == ("Meh.", 1)
    assert parse_free_generation("two\nlines\nLabel: negative", LABELS) == ("two\nlines", 0)
    assert parse_free_generation("No label line at all", LABELS) is None
    assert parse_free_generation("Text\nLabel: spam", LABELS) is None  # not a label of this task
    assert parse_free_generation("\nLabel: positive", LABELS) is None  # no text
    assert parse_free_generation("", LABELS) is None


def test_student_context_holds_every_example_cut_to_length():
    context = examples_context(["first one", "x" * 500], [0, 2], LABELS, max_chars=20)
    assert context == ("Labelled examples:\n\nText: first one\nLabel: negative\n\nText: " + "x" * 20
                       + "\nLabel: positive")
    assert examples_context([], [], LABELS, 20) == ""


def test_top_k_by_perplexity_keeps_the_lowest_first():
    assert top_k_by_perplexity([5.0, 1.5, 9.0, 1.5, 3.0], 3) == [1, 3, 4]
    assert top_k_by_perplexity([2.0], 4) == [0]
    assert top_k_by_perplexity([], 2) == []


def test_the_teacher_keeps_its_lowest_perplexity_generations(monkeypatch):
    """With a teacher LM that copies its context, the generation that copies a prompt example has by far the lowest
    perplexity: without the filter it is kept first; with it, it is dropped and the top-k of the rest equals the
    perplexities recomputed independently."""
    tok = byte_tokenizer()
    model = CopyingLM(len(tok))
    private = Examples.of([f"review {i}: the pills made me feel {w} for days" for i, w in enumerate("abcdefgh")],
                          [i % 3 for i in range(8)])
    teacher = CopyingTeacher()
    monkeypatch.setattr(llm_module, "generate", teacher)
    cfg = SocialConfig(shots=2, samples=6, top_k=2, max_example_chars=80)
    lesson = write_examples(FedbridgeLLM(model, tok), LABELS, private, cfg, seed=0, detector=None)
    assert lesson.metrics["teach.parsed"] == 6 and lesson.metrics["teach.copies-dropped"] == 0
    assert lesson.texts[0] in private.texts  # a verbatim copy has the lowest perplexity
    assert lesson.provenance["perplexities"] == sorted(lesson.provenance["perplexities"])

    teacher.prompts.clear()
    filtered = write_examples(FedbridgeLLM(model, tok), LABELS, private, cfg, seed=0,
                              detector=CopyDetector(private.texts))
    assert filtered.metrics["teach.copies-dropped"] == 4 and filtered.metrics["teach.kept"] == 2
    assert not set(filtered.texts) & set(private.texts)
    # recompute: the two fresh generations, scored whole against the prompts that produced them
    prompts = teacher.prompts
    fresh = [(pr, f" fresh words number {i} nothing copied here") for i, pr in enumerate(prompts) if i % 3 == 2]
    scored = continuation_logprobs(model, tok, [pr for pr, _ in fresh], [c for _, c in fresh])
    ppl = [math.exp(-s / n) for s, n in scored]
    assert filtered.texts == [fresh[i][1].strip() for i in np.argsort(ppl)]
    np.testing.assert_allclose(filtered.provenance["perplexities"], sorted(ppl), rtol=1e-5)


# ------------------------------------------------------------------ aggregators


def candidates(labels: list[int | None], texts: list[str] | None = None) -> list[Candidate]:
    texts = texts or [f"candidate text number {i} with its own words {'xyz' * i}" for i in range(len(labels))]
    return [Candidate(t, y, f"silo-{i % 2}") for i, (t, y) in enumerate(zip(texts, labels))]


def test_voting_picks_the_candidate_every_teacher_prefers():
    scores = np.array([[-3.0, -2.5, -0.5, -4.0],   # teacher 0: candidate 2 best
                       [-1.0, -2.0, -0.9, -3.0],   # teacher 1: candidate 2 best
                       [-2.0, -2.2, -1.1, -1.9]])  # teacher 2: candidate 2 best
    assert VotingAggregator().select(candidates([0, 1, 2, 0]), scores, 1, random.Random(0)) == [2]


def test_voting_counts_votes_first_and_breaks_ties_by_mean_score():
    # each teacher approves its 2 best: votes 0:1, 1:2, 2:3, 3:0 -> order 2, 1, then 0
    scores = np.array([[-1.0, -2.0, -1.5, -9.0], [-5.0, -1.0, -1.2, -9.0], [-4.0, -0.5, -0.1, -9.0]])
    assert VotingAggregator().select(candidates([0, 0, 0, 0]), scores, 3, random.Random(0)) == [2, 1, 0]
    tie = np.array([[0.0, -1.0, -5.0], [-1.0, 0.0, -5.0]])  # one vote each for 0 and 1 (n=1); mean breaks no tie
    assert VotingAggregator().select(candidates([0, 0, 0]), tie, 1, random.Random(0)) == [0]
    with pytest.raises(ValueError, match="score matrix"):
        VotingAggregator().select(candidates([0, 0]), None, 1, random.Random(0))


def test_balanced_alternates_labels_and_skips_near_duplicates():
    texts = ["the drug worked wonders for my migraine", "the drug worked wonders for my migraine!",
             "terrible nausea all week long", "no change at all, neutral feelings", "it helped my sleep a lot"]
    labels = [2, 2, 0, 1, 2]
    scores = np.array([[5.0, 4.9, 1.0, 0.5, 4.7], [5.0, 4.9, 0.0, 1.0, 4.7]])  # both like the two near-twins most
    picked = BalancedAggregator(diversity=1.0).select(candidates(labels, texts), scores, 4, random.Random(0))
    assert [labels[i] for i in picked[:3]] == [0, 1, 2]  # one per label first (least-served label first)
    assert picked[2] == 0 and picked[3] == 4  # the twin of the pick loses to a different text of its label
    consensus_only = BalancedAggregator(diversity=0.0).select(candidates(labels, texts), scores, 4, random.Random(0))
    assert consensus_only[3] == 1  # without the diversity term the twin wins on score


def test_balanced_standardises_each_teacher_so_none_dominates():
    scores = np.array([[-100.0, 0.0, -50.0], [-0.01, -0.03, -0.02]])  # teacher 0's scale is 5,000x larger
    # z-scores: teacher 0 -> [-1.22, 1.22, 0], teacher 1 -> [1.22, -1.22, 0]: candidates 0 and 1 tie, 2 is the
    # consensus middle; on raw means candidate 1 would win outright
    picked = BalancedAggregator(diversity=0.0).select(candidates([None, None, None]), scores, 1, random.Random(0))
    assert picked == [0]  # the tie goes to the lower index, not to the loud teacher's favourite
    instructions = BalancedAggregator().select(candidates([None] * 3), np.array([[0.0, 1.0, 2.0]]), 2,
                                               random.Random(0))
    assert instructions == [2, 1]


def test_random_picks_distinct_candidates_reproducibly():
    pool = candidates([0, 1, 2, 0, 1, 2, 0])
    a = RandomAggregator().select(pool, None, 4, random.Random(3))
    assert len(set(a)) == 4 and a == RandomAggregator().select(pool, None, 4, random.Random(3))
    assert sorted(RandomAggregator().select(pool, None, 10, random.Random(0))) == list(range(7))


def test_a_teacher_scores_what_resembles_its_held_out_data_highest():
    tok = byte_tokenizer()
    model = CopyingLM(len(tok))
    held = Examples.of(["the tablets gave me awful headaches every morning", "it works and I sleep well now"],
                       [0, 2])
    texts = ["completely unrelated words about the weather", "the tablets gave me awful headaches every morning",
             "another fresh sentence of new content"]
    scores = vote_scores(FedbridgeLLM(model, tok), LABELS, held, "examples", texts, [1, 0, 2], max_chars=80)
    assert int(np.argmax(scores)) == 1 and len(scores) == 3
    instructions = ["Label by tone.", "Label by tone. Text: the tablets gave me awful headaches every morning\n"
                    "Label: negative", "Read it carefully."]
    scores = vote_scores(FedbridgeLLM(model, tok), LABELS, held, "instructions", instructions, None, max_chars=80)
    assert int(np.argmax(scores)) == 1


# ------------------------------------------------------------------ what crosses the wire

WHOLE_COPIES = {"social.top-k": 6, "social.max-example-chars": 2000}  # every generation kept; prompts show whole texts


def test_no_private_example_crosses_the_wire_with_the_verbatim_filter(tmp_path, monkeypatch):
    """Teachers that try to copy (verbatim, and long runs inside new text): with the filter on, nothing any silo
    sends, nothing the server forwards, and no student prompt holds a private example or a long run of one."""
    monkeypatch.setattr(llm_module, "generate", CopyingTeacher())
    record, grid = run_social(tmp_path, "filtered", **WHOLE_COPIES, **{"social.baselines": "zero-shot,raw"})
    grid.close()
    assert record.status == "ok" and record.failures == []
    private = {node: private_texts(grid, node) for node in NODES}
    everyone = [t for texts in private.values() for t in texts]
    detector = CopyDetector(everyone)
    teach = grid.replies_of(TEACH)
    assert set(teach) == set(NODES)
    for node, reply in teach.items():
        assert not reply.has_error()
        assert set(reply.content.keys()) == {p.METRICS, p.EXAMPLES, p.PROVENANCE, p.PRIVACY}
        shared = reply.content[p.EXAMPLES]["texts"]
        assert shared and record.silo_metrics[f"silo-{node - 1000}"]["teach.copies-dropped"] == 4
        strings = wire_strings(reply.content)
        assert verbatim_copy_rate(strings, everyone) == 0.0 and detector.copy_rate(shared) == 0.0
    for msg in grid.sent:  # the vote requests carry the candidates on to every silo
        assert verbatim_copy_rate(wire_strings(msg.content), everyone) == 0.0
    for _, _, reply in grid.replied:
        assert verbatim_copy_rate(wire_strings(reply.content), everyone) == 0.0
    prompts = (tmp_path / "filtered.student-prompts.jsonl").read_text()
    assert detector.copy_rate([json.loads(line)["prompt"] for line in prompts.splitlines()]) == 0.0


def test_without_the_filter_copies_do_cross(tmp_path, monkeypatch):
    """The same copying teachers with the filter off: the check above would fail (so it can fail)."""
    monkeypatch.setattr(llm_module, "generate", CopyingTeacher())
    record, grid = run_social(tmp_path, "unfiltered", **WHOLE_COPIES, **{"social.verbatim-filter": False})
    grid.close()
    for node, reply in grid.replies_of(TEACH).items():
        shared, private = reply.content[p.EXAMPLES]["texts"], private_texts(grid, node)
        assert verbatim_copy_rate(shared, private) > 0 and CopyDetector(private).copy_rate(shared) > 0
        assert reply.content[p.PROVENANCE]["verbatim-filter"] is False


# ------------------------------------------------------------------ in-process runs


@pytest.fixture(scope="module")
def examples_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("examples")
    record, grid = run_social(tmp, "social-examples", **{"canaries.enabled": True,
                                                         "social.baselines": "zero-shot,raw,original"})
    yield SimpleNamespace(record=record, grid=grid, dir=tmp)
    grid.close()


def test_examples_mode_runs_every_aggregator_and_baseline(examples_run):
    record, grid = examples_run.record, examples_run.grid
    assert record.status == "ok" and record.failures == []
    names = ["0-shot", "examples:balanced", "examples:voting", "examples:random", "original(non-private)",
             "examples:raw"]
    for name in names:
        assert 0 <= record.server_metrics[f"variant.{name}.accuracy"] <= 1
        assert record.server_metrics[f"variant.{name}.n"] == 12  # social.max-test
    head = {k: record.server_metrics[f"variant.examples:balanced.{k}"] for k in ("accuracy", "macro_f1", "n")}
    assert record.global_metrics == head  # the first aggregator is the headline
    assert math.isnan(record.server_metrics["variant.0-shot.epsilon"])  # nothing shared
    assert math.isinf(record.server_metrics["variant.examples:voting.epsilon"])  # shared, not DP
    assert set(grid.replies_of(TEACH)) == set(NODES)
    for silo in ("silo-0", "silo-1"):
        assert record.privacy[silo]["private"] is False and math.isinf(record.privacy[silo]["epsilon"])
        assert record.silo_metrics[silo]["teach.kept"] == 3 and record.silo_metrics[silo]["teach.generated"] == 6
    assert record.server_metrics["social.voters"] == 2
    assert record.server_metrics["social.voting.picked"] == 4 == record.server_metrics["social.random.picked"]
    by_type = record.communication["by_message_type"]
    assert by_type[TEACH]["received"] > 0 and by_type[VOTE]["sent"] > 0 and by_type[SHARE_RAW]["received"] > 0
    assert {"teach", "vote", "share-raw", "student-eval", "canary"} <= set(record.seconds)
    assert record.tokens["silo-generated"] > 0 and record.tokens["prompt"] > 0
    assert any("NON-PRIVATE upper bound" in n for n in record.notes)
    assert any("not differentially private" in n for n in record.notes)


def test_examples_mode_records_canaries_prompts_and_contributions(examples_run):
    record, run_dir = examples_run.record, examples_run.dir
    for name in ("examples:balanced", "examples:voting", "examples:random", "original(non-private)"):
        rank = record.server_metrics[f"variant.{name}.canary-rank"]
        assert 0 <= rank <= 99
        assert record.server_metrics[f"variant.{name}.canary-exposure"] == pytest.approx(
            math.log2(100) - math.log2(rank + 1))
    assert "variant.0-shot.canary-rank" not in record.server_metrics  # an empty prompt holds nothing to rank
    assert record.server_metrics["canary-rank"] == record.server_metrics["variant.examples:balanced.canary-rank"]
    saved = (run_dir / "social-examples.student-prompts.jsonl").read_text()
    prompts = [json.loads(line) for line in saved.splitlines()]
    assert [x["variant"] for x in prompts] == ["examples:balanced", "examples:voting", "examples:random",
                                               "original(non-private)"]
    assert all(x["prompt"].startswith("Labelled examples:") for x in prompts)
    lines = [json.loads(x) for x in (run_dir / "social-examples.contributions.jsonl").read_text().splitlines()]
    assert {(x["silo"], x["kind"]) for x in lines} == {(s, k) for s in ("silo-0", "silo-1")
                                                       for k in ("social-examples", "raw-examples(non-private)")}
    teach = [x for x in lines if x["kind"] == "social-examples"]
    assert all(len(x["texts"]) == len(x["labels"]) == 3 and len(x["provenance"]["perplexities"]) == 3 for x in teach)
    assert record.artifacts["student-prompts"].endswith("social-examples.student-prompts.jsonl")


def test_compare_shows_one_row_per_variant_with_canary_columns(examples_run):
    rows = group([examples_run.record])
    assert [r.label for r in rows] == ["social 0-shot", "social examples:balanced", "social examples:voting",
                                       "social examples:random", "social original(non-private)", "social examples:raw"]
    table = to_markdown(rows)
    assert "| canary rank | rank 0 | exposure |" in table
    voting = next(line for line in table.splitlines() if line.startswith("| social examples:voting |"))
    rank = examples_run.record.server_metrics["variant.examples:voting.canary-rank"]
    assert f"| {rank:.0f} | {int(rank == 0)}/1 |" in voting and "| ∞ |" in voting
    zero = next(line for line in table.splitlines() if line.startswith("| social 0-shot |"))
    assert "| — | — | — | — |" in zero  # no canary, no ε: nothing was shared


def test_share_raw_is_refused_unless_the_run_asks_for_the_bound(examples_run, tmp_path):
    grid = examples_run.grid
    msg = Message(p.request({"n": 2}), dst_node_id=NODES[0], message_type=SHARE_RAW, group_id="9")
    [reply] = grid.send_and_receive([msg], timeout=60)
    assert not reply.has_error() and len(reply.content[p.EXAMPLES]["texts"]) == 2  # this run asked for it
    record, other = run_social(tmp_path, "no-bound", **{"social.aggregators": "random"})
    try:
        assert record.status == "ok" and SHARE_RAW not in record.communication["by_message_type"]
        [reply] = other.send_and_receive([Message(p.request({"n": 2}), dst_node_id=NODES[0],
                                                  message_type=SHARE_RAW, group_id="9")], timeout=60)
        assert reply.has_error() and "refuses to share raw examples" in reply.error.reason
        assert VOTE not in record.communication["by_message_type"]  # random needs no votes
    finally:
        other.close()


def test_instructions_mode_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(llm_module, "generate", CopyingTeacher())
    record, grid = run_social(tmp_path, "social-instructions", **{"social.mode": "instructions",
                                                                  "social.baselines": "zero-shot,raw"})
    grid.close()
    assert record.status == "ok" and record.failures == []
    teach = grid.replies_of(TEACH)
    assert set(teach) == set(NODES)
    for reply in teach.values():
        [instruction] = reply.content[p.INSTRUCTIONS]["texts"]
        assert instruction == "Decide by the tone of the text."  # the quoting line was filtered out
        assert reply.content[p.METRICS]["teach.lines-dropped"] == 1
    for name in ("instructions:balanced", "instructions:voting", "instructions:random", "instructions:raw"):
        assert 0 <= record.server_metrics[f"variant.{name}.accuracy"] <= 1
    assert record.server_metrics["social.candidates"] == 1  # both teachers wrote the same text: kept once
    assert record.server_metrics["social.voting.picked"] == 1
    lines = (tmp_path / "social-instructions.contributions.jsonl").read_text().splitlines()
    assert all(json.loads(x)["kind"] == "social-instructions" for x in lines)


def test_dp_examples_carry_their_epsilon(tmp_path):
    record, grid = run_social(tmp_path, "social-dp", **{"social.dp": "dp-fewshot", "social.epsilon": 2.0,
                                                        "social.samples": 3, "social.max-new-tokens": 4,
                                                        "social.dp-groups": 2})
    grid.close()
    assert len(list((tmp_path / "silo-state" / "privacy").glob("*.json"))) == 2  # each silo's ledger, on its disk
    assert record.status == "ok" and record.failures == []
    for silo in ("silo-0", "silo-1"):  # the examples are accounted; the votes beside them are not DP
        privacy = record.privacy[silo]
        assert privacy["private"] is False and math.isinf(privacy["epsilon"]) and privacy["non-private"] == "votes"
        assert privacy["mechanism"] == "dp-fewshot + votes (non-private)"
        assert 0 < privacy["epsilon-dp"] <= 2.0 and privacy["steps"] == 3 * 1 * 4
    assert record.server_metrics["variant.examples:random.epsilon"] == pytest.approx(
        max(record.privacy[s]["epsilon-dp"] for s in record.privacy))
    assert math.isinf(record.server_metrics["variant.examples:voting.epsilon"])  # chosen by votes: non-private
    assert any("voting reads the teachers' held-out data without DP" in n for n in record.notes)
    provenance = [json.loads(x)["provenance"] for x in
                  (tmp_path / "social-dp.contributions.jsonl").read_text().splitlines()]
    assert all(x["verbatim-filter"] is False and x["dp"] == "dp-fewshot" for x in provenance)


# ------------------------------------------------------------------ config and protocol


@pytest.mark.parametrize("options,message", [
    ({"social.mode": "both"}, "social.mode"),
    ({"social.aggregators": "random,best"}, "Unknown Social Learning aggregator 'best'"),
    ({"social.aggregators": ""}, "social.aggregators is empty"),
    ({"social.baselines": "zero-shot,oracle"}, "unknown 'oracle'"),
    ({"social.dp": "dp-fewshot", "social.mode": "instructions"}, "examples mode only"),
    ({"social.top-k": 0}, "must be >= 1"),
    ({"social.conditioning": "text"}, "social.conditioning"),
])
def test_bad_social_options_fail_before_any_work(tmp_path, options, message):
    from fedbridge.methods.social.server import SocialLearning

    with pytest.raises(ConfigError, match=re.escape(message)):
        SocialLearning(tiny_config(tmp_path, method="social", **options))


def test_protocol_readers_reject_malformed_social_records():
    assert p.read_texts(RecordDict({"x": p.texts_record(["a", "b"])}), "x") == ["a", "b"]
    with pytest.raises(p.ProtocolError, match="no 'x' record"):
        p.read_texts(RecordDict(), "x")
    with pytest.raises(p.ProtocolError, match="list of strings"):
        p.read_texts(RecordDict({"x": ConfigRecord({"texts": [1, 2]})}), "x")
    with pytest.raises(p.ProtocolError, match="too large"):
        p.read_texts(RecordDict({"x": p.texts_record(["a" * (p.MAX_TEXT_CHARS + 1)])}), "x")
    assert p.read_mode({"mode": "instructions"}) == "instructions"
    with pytest.raises(p.ProtocolError, match="'mode'"):
        p.read_mode({"mode": "gossip"})
    with pytest.raises(p.ProtocolError, match="provenance"):
        p.read_provenance(RecordDict({p.PROVENANCE: ConfigRecord({f"k{i}": 1 for i in range(65)})}))
    with pytest.raises(p.ProtocolError, match="too long"):
        p.read_provenance(RecordDict({p.PROVENANCE: ConfigRecord({"teacher": "x" * 1001})}))
