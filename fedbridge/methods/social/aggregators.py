"""Social Learning aggregators: which of the teachers' candidates (examples or instructions) the student sees.

One interface: ``select(candidates, scores, n, rng) -> indices``, where ``scores`` is the (teachers x candidates)
matrix of each teacher's length-normalised log-likelihood of each candidate (from ``query.vote``), or None
when the aggregator needs none. Add a class to ``AGGREGATORS`` to make it selectable in ``social.aggregators``.

  random    n candidates uniformly at random (the paper's baseline aggregator)
  voting    every teacher votes for its n best-scored candidates; the most-voted are kept until n (the paper's)
  balanced  this project's: consensus of per-teacher standardised scores, label-balanced, diversity-aware (MMR)
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedbridge.errors import ConfigError
from fedbridge.methods.selection import select_balanced
from fedbridge.methods.text import jaccard, shingles


@dataclass(frozen=True)
class Candidate:
    """One teacher contribution: a synthetic example (with its label) or an instruction (label None)."""

    text: str
    label: int | None
    teacher: str


class Aggregator(ABC):
    name: ClassVar[str]
    needs_votes: ClassVar[bool] = False

    @abstractmethod
    def select(self, candidates: Sequence[Candidate], scores: np.ndarray | None, n: int,
               rng: random.Random) -> list[int]:
        """Indices of at most ``n`` candidates, in the order the student sees them."""


class RandomAggregator(Aggregator):
    name = "random"

    def select(self, candidates, scores, n, rng):
        return rng.sample(range(len(candidates)), min(n, len(candidates)))


class VotingAggregator(Aggregator):
    """Approval voting: each teacher votes for its ``n`` highest-scored candidates; ties in votes are broken by the
    mean score over teachers."""

    name = "voting"
    needs_votes = True

    def select(self, candidates, scores, n, rng):
        scores = _check(scores, len(candidates))
        votes = np.zeros(len(candidates))
        for row in scores:
            votes[np.argsort(-row, kind="stable")[:n]] += 1
        order = sorted(range(len(candidates)), key=lambda i: (-votes[i], -scores[:, i].mean(), i))
        return order[:n]


class BalancedAggregator(Aggregator):
    """Label-balanced consensus with diversity, expected to beat both paper aggregators:

    - consensus: each teacher's scores are standardised (z-scores) before averaging, so every teacher weighs the
      same and the full ranking counts, not only a top-n cut (hard votes tie a lot with few teachers);
    - label balance: picks go round-robin over labels (the least-served label with candidates left first), since
      in-context learning copies the label distribution of its examples and perplexity favours the majority class;
    - diversity: each pick maximises consensus − ``diversity`` × (max 5-gram Jaccard similarity to the picks so
      far), i.e. maximal marginal relevance, against the near-duplicates a low-perplexity top-k produces.
    Instructions (no labels) get consensus + diversity only.
    """

    name = "balanced"
    needs_votes = True

    def __init__(self, diversity: float = 1.0) -> None:
        self.diversity = diversity

    def select(self, candidates, scores, n, rng):
        scores = _check(scores, len(candidates))
        std = scores.std(axis=1, keepdims=True)
        z = (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
        grams = [shingles(c.text) for c in candidates]
        return select_balanced([c.label for c in candidates], z.mean(axis=0), n, diversity=self.diversity,
                               similarity=lambda i, picked: max(jaccard(grams[i], grams[j]) for j in picked))


AGGREGATORS: dict[str, type[Aggregator]] = {a.name: a for a in (RandomAggregator, VotingAggregator,
                                                                 BalancedAggregator)}


def get_aggregator(name: str, diversity: float = 1.0) -> Aggregator:
    if name not in AGGREGATORS:
        raise ConfigError(f"Unknown Social Learning aggregator '{name}'. Available: {', '.join(AGGREGATORS)}.")
    return BalancedAggregator(diversity) if name == BalancedAggregator.name else AGGREGATORS[name]()


def _check(scores: np.ndarray | None, num_candidates: int) -> np.ndarray:
    if scores is None or scores.ndim != 2 or scores.shape[1] != num_candidates or not len(scores):
        raise ValueError(f"this aggregator needs a (teachers x {num_candidates}) score matrix from the vote round")
    return scores
