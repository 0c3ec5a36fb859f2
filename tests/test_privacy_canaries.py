import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedbridge.errors import ConfigError
from fedbridge.models.llm import FedbridgeLLM
from fedbridge.models.loading import tiny_llm
from fedbridge.privacy import (
    canary_rank,
    candidate_secrets,
    exposure,
    levenshtein,
    make_canary,
    min_normalized_levenshtein,
    normalized_levenshtein,
    verbatim_copy_rate,
)
from fedbridge.privacy.canaries import FIRST_NAMES, LAST_NAMES

PROMPT = "Notes kept by the silo:\n"


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3),
                                   ("", "", 0), ("same", "same", 0), ("ab", "ba", 2), ("a" * 70, "b" * 70, 70)])
def test_levenshtein_known_pairs(a, b, d):
    assert levenshtein(a, b) == levenshtein(b, a) == d


@given(st.text(alphabet="abcé\n ", max_size=80), st.text(alphabet="abdé\n ", max_size=80))
def test_levenshtein_matches_the_textbook_dp(a, b):
    assert levenshtein(a, b) == reference_levenshtein(a, b)


def test_normalized_and_nearest_private_distance():
    assert normalized_levenshtein("kitten", "sitting") == pytest.approx(3 / 7)
    assert normalized_levenshtein("", "") == 0.0 and normalized_levenshtein("abc", "xyz") == 1.0
    assert min_normalized_levenshtein(["abcd", "wxyz", "zzzz"], ["abce", "zzzz", "a"]) == [0.25, 0.75, 0.0]
    assert min_normalized_levenshtein(["anything"], []) == [1.0]


@given(st.lists(st.text(alphabet="abc ", max_size=12), max_size=5), st.lists(st.text(alphabet="abd ", max_size=12), max_size=5))
def test_nearest_private_distance_matches_the_textbook_dp_over_every_pair(shared, private):
    """The library's batch search (rapidfuzz) against every pair by the textbook DP, over the longer length."""
    expected = [min((reference_levenshtein(s, p) / max(len(s), len(p), 1) for p in private), default=1.0)
                for s in shared]
    assert min_normalized_levenshtein(shared, private) == pytest.approx(expected)


def test_verbatim_copy_rate_counts_whole_private_texts_inside_shared_ones():
    private = ["Hello world!", "the PIN is 4821"]
    shared = ["hello   WORLD!", "new text", "as noted, The PIN is 4821 here", "the PIN is 48"]
    assert verbatim_copy_rate(shared, private) == 0.5
    assert verbatim_copy_rate([], private) == 0.0


def test_verbatim_copy_needs_the_private_text_on_word_boundaries():
    """A short private text inside a longer word is not a copy (the SMS "Ok" in "took"); as a word, it is."""
    assert verbatim_copy_rate(["it took you long", "bookkeeping"], ["Ok"]) == 0.0
    assert verbatim_copy_rate(["well, ok then", "OK", "it took you long"], ["Ok"]) == 2 / 3
    assert verbatim_copy_rate(["call 0800-123 (free)"], ["0800-123 (free)"]) == 1.0


def test_exposure_uses_zero_based_ranks():
    assert exposure(0, 1000) == pytest.approx(math.log2(1000))  # memorised: the maximum
    assert exposure(999, 1000) == pytest.approx(0.0)
    assert exposure(499, 1000) == pytest.approx(1.0)  # median rank: one bit
    with pytest.raises(ValueError):
        exposure(1000, 1000)


def test_canaries_and_candidates_come_from_the_same_space():
    digits = make_canary("digits", seed=3)
    assert digits == make_canary("digits", seed=3) and digits.secret.isdigit() and len(digits.secret) == 4
    assert digits.text == f"My PIN code is {digits.secret}." and digits.space_size == 10_000
    candidates = candidate_secrets(digits, 999, seed=1)
    assert len(set(candidates)) == 999 and digits.secret not in candidates
    assert all(c.isdigit() and len(c) == 4 for c in candidates)
    name = make_canary("name", seed=3)
    first, last = name.secret.split()
    assert first in FIRST_NAMES and last in LAST_NAMES and name.space_size == 1024
    assert len(candidate_secrets(name, 1023)) == 1023
    with pytest.raises(ConfigError):
        candidate_secrets(name, 1024)
    with pytest.raises(ConfigError):
        make_canary("email")


def memorise(text: str, steps: int = 80) -> torch.nn.Module:
    """A tiny Llama trained on one sentence until it has it by heart."""
    model, tok = tiny_llm(seed=0)
    ids = torch.tensor([tok(text)["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    return model.eval()


def test_memorised_canary_ranks_first_and_a_fresh_model_does_not():
    canary = make_canary("digits", seed=7)
    candidates = candidate_secrets(canary, 999, seed=0)
    _, tok = tiny_llm()
    rank = canary_rank(FedbridgeLLM(memorise(PROMPT + canary.text), tok), PROMPT, canary, candidates, batch_size=100)
    assert rank == 0
    assert exposure(rank, len(candidates) + 1) == pytest.approx(math.log2(1000))
    fresh, _ = tiny_llm(seed=0)
    assert canary_rank(FedbridgeLLM(fresh, tok), PROMPT, canary, candidates, batch_size=100) > 10
