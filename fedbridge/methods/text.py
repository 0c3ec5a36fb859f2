"""Text stages several methods share: near-duplicate tests (character 5-gram Jaccard, FDKT's and CrossLM's
deduplication, Social Learning's balanced aggregator) and the parsing of one LLM-written example."""

from __future__ import annotations

import re


def shingles(text: str, n: int = 5) -> set[str]:
    """The character n-grams of ``text``, lowercased with its white space folded: what near-duplicate tests compare."""
    t = " ".join(text.lower().split())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def deduplicate(candidates: list[str], against: list[str], threshold: float) -> list[int]:
    """Indices of candidates that are neither exact nor near copies (5-gram Jaccard >= threshold) of a text in
    ``against`` or of an earlier kept candidate."""
    seen = [shingles(t) for t in against]
    kept = []
    for i, text in enumerate(candidates):
        s = shingles(text)
        if all(jaccard(s, o) < threshold for o in seen):
            kept.append(i)
            seen.append(s)
    return kept


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


_LEADS = re.compile(r"^\s*(?:here(?:'s| is)[^:\n]*:|(?:new\s+)?(?:review|example|text|tweet|sms)\s*\d*\s*:)\s*", re.I)


def parse_generation(text: str) -> str:
    """The example itself: first paragraph, without a lead-in like 'Review:' and without wrapping quotes."""
    text = _LEADS.sub("", text.strip())
    text = text.split("\n\n")[0].strip()
    return text.strip('"“”').strip()
