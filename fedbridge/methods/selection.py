"""Label-balanced, diverse selection: the one rule behind CrossLM's enhancement examples and Social Learning's
``balanced`` aggregator.

Labels take turns (the least-served label that still has candidates first, ties to the lowest label), since an SLM
or an in-context student copies the label distribution of what it is shown. Within the label's turn the pick
maximises relevance − ``diversity`` × (similarity to the picks so far), i.e. maximal marginal relevance (Carbonell
and Goldstein 1998): the most relevant first, but not the same thing twice. Ties go to the lowest index.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence

Similarity = Callable[[int, list[int]], float]  # (candidate, picks so far, never empty) -> its highest similarity


def select_balanced(labels: Sequence[int | None], relevance: Sequence[float], n: int, *,
                    eligible: Iterable[int] | None = None, similarity: Similarity | None = None,
                    diversity: float = 0.0) -> list[int]:
    """Up to ``n`` indices of ``eligible`` (default: every candidate), in the order they were picked.

    ``labels[i]`` may be None (candidates without a label, e.g. instructions: one shared turn). Without
    ``similarity`` or with ``diversity`` 0 the pick is by relevance alone.
    """
    left = sorted(range(len(labels)) if eligible is None else set(eligible))
    served: Counter = Counter()
    picked: list[int] = []

    def value(i: int) -> float:
        if similarity is None or not diversity or not picked:
            return float(relevance[i])
        return float(relevance[i]) - diversity * similarity(i, picked)

    while left and len(picked) < n:
        label = min({labels[i] for i in left}, key=lambda y: (served[y], -1 if y is None else y))
        best = max((i for i in left if labels[i] == label), key=value)  # first maximum: the lowest index
        picked.append(best)
        left.remove(best)
        served[label] += 1
    return picked
