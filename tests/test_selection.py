"""The shared label-balanced, diverse selection (CrossLM's enhancement examples, Social Learning's balanced
aggregator) against a plain reference: round-robin passes over the labels, maximal marginal relevance within one."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fedbridge.methods.selection import select_balanced


def round_robin_reference(labels, relevance, n, eligible, vectors, diversity):
    """Passes over the labels in ascending order, one pick per label with candidates left per pass."""
    pools = {y: [i for i in sorted(eligible) if labels[i] == y] for y in sorted(set(labels))}
    chosen = []

    def value(i):
        if not diversity or not chosen:
            return float(relevance[i])
        return float(relevance[i]) - diversity * float(np.max(vectors[chosen] @ vectors[i]))

    while len(chosen) < n and any(pools.values()):
        for pool in pools.values():
            if pool and len(chosen) < n:
                best = max(pool, key=value)
                pool.remove(best)
                chosen.append(best)
    return chosen


@given(st.data())
def test_least_served_turns_equal_round_robin_passes(data):
    size = data.draw(st.integers(0, 14))
    labels = data.draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    # few distinct values, so ties in relevance happen and the tie rule (lowest index) is exercised
    relevance = np.array(data.draw(st.lists(st.sampled_from([-0.5, 0.0, 0.25, 0.5, 1.0]), min_size=size,
                                            max_size=size)))
    eligible = data.draw(st.sets(st.integers(0, max(size - 1, 0)), max_size=size)) if size else set()
    n = data.draw(st.integers(0, 16))
    diversity = data.draw(st.sampled_from([0.0, 0.5, 2.0]))
    vectors = np.random.default_rng(size).normal(size=(size, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    similarity = lambda i, picked: float(np.max(vectors[picked] @ vectors[i]))  # noqa: E731
    got = select_balanced(labels, relevance, n, eligible=eligible, similarity=similarity, diversity=diversity)
    assert got == round_robin_reference(labels, relevance, n, eligible, vectors, diversity)


def test_unlabelled_candidates_share_one_turn_and_diversity_moves_the_second_pick():
    relevance = [1.0, 0.9, 0.8]
    same = lambda i, picked: 1.0 if i == 1 else 0.0  # noqa: E731  candidate 1 repeats candidate 0
    assert select_balanced([None] * 3, relevance, 2) == [0, 1]
    assert select_balanced([None] * 3, relevance, 2, similarity=same, diversity=1.0) == [0, 2]
    assert select_balanced([0, 0, 1], relevance, 3) == [0, 2, 1]  # label 1 takes its turn before label 0's second
