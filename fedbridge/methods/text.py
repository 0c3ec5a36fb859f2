"""Text stages several methods share: near-duplicate tests (character 5-gram Jaccard, FDKT's and CrossLM's
deduplication, Social Learning's balanced aggregator) and the parsing of one LLM-written example."""

from __future__ import annotations

import re

from datasketch import MinHash, MinHashLSH


def shingles(text: str, n: int = 5) -> set[str]:
    """The character n-grams of ``text``, lowercased with its white space folded: what near-duplicate tests compare."""
    t = " ".join(text.lower().split())
    return {t[i:i + n] for i in range(max(1, len(t) - n + 1))}


def deduplicate(candidates: list[str], against: list[str], threshold: float) -> list[int]:
    """Indices of candidates that are neither exact nor near copies (5-gram Jaccard >= threshold) of a text in
    ``against`` or of an earlier kept candidate."""
    index = NearDuplicates(threshold)
    for text in against:
        index.add(text)
    return [i for i, text in enumerate(candidates) if index.add(text, unless_near=True)]


class NearDuplicates:
    """Texts seen so far, and whether a new one has 5-gram Jaccard >= ``threshold`` with any of them.

    Comparing every pair grows quadratically (hundreds of silos' demonstrations, every batch a CrossLM server ever
    wrote), so a MinHash LSH index (datasketch) proposes the candidates and the exact Jaccard decides. The bands
    are chosen so that a pair at the threshold escapes the index with probability at most ``MISS``; where no band
    shape reaches that (thresholds below about 0.2), every pair is compared.
    """

    NUM_PERM, MISS = 128, 1e-9

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.grams: list[set[str]] = []
        rows = [r for r in range(1, 9) if 0 < threshold and (1 - min(threshold, 1.0) ** r) ** (self.NUM_PERM // r)
                <= self.MISS]  # the most rows per band (fewest false candidates) that still meet MISS
        self.lsh = MinHashLSH(num_perm=self.NUM_PERM, params=(self.NUM_PERM // rows[-1], rows[-1])) if rows else None

    def add(self, text: str, *, unless_near: bool = False) -> bool:
        """Index ``text``; with ``unless_near``, only if no text seen so far is a near copy. True if it was added."""
        grams = shingles(text)
        minhash = None
        if self.lsh is not None:
            minhash = MinHash(num_perm=self.NUM_PERM)
            minhash.update_batch([g.encode("utf-8") for g in grams])
        if unless_near:
            candidates = range(len(self.grams)) if minhash is None else self.lsh.query(minhash)
            if any(jaccard(grams, self.grams[k]) >= self.threshold for k in candidates):
                return False
        if minhash is not None:
            self.lsh.insert(len(self.grams), minhash)
        self.grams.append(grams)
        return True


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


_LEADS = re.compile(r"^\s*(?:here(?:'s| is)[^:\n]*:|(?:new\s+)?(?:review|example|text|tweet|sms)\s*\d*\s*:)\s*", re.I)


def parse_generation(text: str) -> str:
    """The example itself: first paragraph, without a lead-in like 'Review:' and without wrapping quotes."""
    text = _LEADS.sub("", text.strip())
    text = text.split("\n\n")[0].strip()
    return text.strip('"“”').strip()
