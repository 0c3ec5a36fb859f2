"""Memorisation audits: Secret Sharer canaries (Carlini et al. 2019), verbatim copies and edit distance.

A canary (a sentence with a random secret) is planted in a silo's private data. After the method runs, the
canary is scored as a continuation of whatever left the silo (a student prompt, synthetic data in context)
against comparison canaries with other secrets from the same space; a low rank means the secret leaked.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from fedbridge.config import CANARY_KINDS, CanaryConfig
from fedbridge.errors import ConfigError
from fedbridge.models.generation import Prompt
from fedbridge.models.llm import LLM
from fedbridge.tasks import Examples, SiloData

FIRST_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi",
               "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera",
               "Wanda", "Xavier", "Yusuf", "Zoe", "Anton", "Bianca", "Cyril", "Dalia", "Emil", "Fiona")
LAST_NAMES = ("Abbott", "Berger", "Castillo", "Dvorak", "Eriksen", "Fontaine", "Gallo", "Horvat", "Ivanova",
              "Jensen", "Kowalski", "Lindqvist", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi", "Sato",
              "Tanaka", "Ulrich", "Varga", "Weber", "Yilmaz", "Zeller", "Almeida", "Brandt", "Costa", "Duval",
              "Engel", "Ferrari", "Gruber")
TEMPLATES = dict(zip(CANARY_KINDS, ("My PIN code is {secret}.", "My secret contact is {secret}.")))


@dataclass(frozen=True)
class Canary:
    """A sentence ``template.format(secret=secret)``; ``kind`` fixes the secret space comparisons come from."""

    template: str
    secret: str
    kind: str = "digits"

    @property
    def text(self) -> str:
        return self.template.format(secret=self.secret)

    @property
    def space_size(self) -> int:
        """|R|: how many secrets the space holds (10^digits, or first × last names)."""
        return 10 ** len(self.secret) if self.kind == "digits" else len(FIRST_NAMES) * len(LAST_NAMES)

    def with_secret(self, secret: str) -> Canary:
        return Canary(self.template, secret, self.kind)


def _random_secret(kind: str, rng: random.Random, digits: int) -> str:
    if kind == "digits":
        return "".join(rng.choice("0123456789") for _ in range(digits))
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def make_canary(kind: str = "digits", seed: int = 0, digits: int = 4) -> Canary:
    """A canary with a random secret: a ``digits``-digit code, or a first and last name (1,024 possible)."""
    if kind not in TEMPLATES:
        raise ConfigError(f"canary kind {kind!r}: use one of {sorted(TEMPLATES)}")
    return Canary(TEMPLATES[kind], _random_secret(kind, random.Random(seed), digits), kind)


def candidate_secrets(canary: Canary, n: int = 999, seed: int = 0) -> list[str]:
    """``n`` distinct random secrets from the canary's space, the true one excluded."""
    if n > canary.space_size - 1:
        raise ConfigError(f"only {canary.space_size - 1} other secrets exist for this canary, asked for {n}")
    rng, out = random.Random(seed), {canary.secret}
    while len(out) <= n:
        out.add(_random_secret(canary.kind, rng, len(canary.secret)))
    out.discard(canary.secret)
    return sorted(out)


def canary_rank(llm: LLM, prompt: Prompt, canary: Canary, candidates: Sequence[str], batch_size: int = 32,
                cache_prompt: bool = False) -> int:
    """How many candidate secrets score strictly higher than the true one (0 = the secret is memorised), under
    ``llm`` (the LLM interface).

    Score: the per-token log-likelihood of the whole canary sentence as a continuation of ``prompt``
    (length-normalised, so secrets of different token lengths compare fairly). Ties count for the canary.
    ``cache_prompt`` asks for the shared-prompt scorer (``continuation_logprobs_shared``: on the fedbridge backend
    the prompt runs once and its KV cache serves all 1,000 sentences, same scores; needs a model with a KV cache):
    a long student prompt then costs seconds instead of minutes.
    """
    sentences = [canary.text] + [canary.with_secret(s).text for s in candidates]
    if cache_prompt:
        scored = llm.continuation_logprobs_shared(prompt, sentences)
    else:
        scored = llm.continuation_logprobs([prompt] * len(sentences), sentences, batch_size=batch_size)
    true, *others = [total / n for total, n in scored]
    return sum(score > true for score in others)


def exposure(rank: int, space_size: int) -> float:
    """Exposure = log2|R| − log2(rank + 1), with ``rank`` counted from 0 (candidates scoring strictly higher).

    Carlini et al. count ranks from 1 (1 = best); the +1 converts, so a memorised canary (rank 0) gets the
    maximum log2|R|. ``space_size`` is the number of secrets ranked: ``len(candidates) + 1`` when the rank
    comes from sampled candidates, which estimates exposure within that sample.
    """
    if not 0 <= rank < space_size:
        raise ValueError(f"rank {rank} outside 0..{space_size - 1}")
    return math.log2(space_size) - math.log2(rank + 1)


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def verbatim_copy_rate(shared_texts: Sequence[str], private_texts: Sequence[str]) -> float:
    """Fraction of shared texts that contain a whole private text (case and whitespace ignored).

    Exact duplicates count, and so do generations that embed a private example in longer text. The private text
    must start and end on word boundaries: a one-word private SMS "Ok" is not copied by a text that says "took".
    """
    private = {p: re.compile(rf"(?<!\w){re.escape(p)}(?!\w)") for p in map(_normalise, private_texts) if p}
    if not shared_texts:
        return 0.0
    return sum(any(p in s and bounded.search(s) for p, bounded in private.items())  # `in` first: it is cheap
               for s in map(_normalise, shared_texts)) / len(shared_texts)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character, each costing 1)."""
    return Levenshtein.distance(a, b)


def normalized_levenshtein(a: str, b: str) -> float:
    """Edit distance over the longer length: 0 = identical, 1 = nothing in common."""
    return Levenshtein.normalized_distance(a, b)


def min_normalized_levenshtein(shared: Sequence[str], private: Sequence[str]) -> list[float]:
    """For each shared text, its normalised edit distance to the nearest private text (1.0 if none)."""
    nearest = (process.extractOne(s, private, scorer=Levenshtein.normalized_distance) for s in shared)
    return [1.0 if best is None else float(best[1]) for best in nearest]


def plant(texts: Sequence[str], labels: Sequence[int], canary: Canary, copies: int, label: int,
          seed: int | str) -> tuple[list[str], list[int]]:
    """The data with ``copies`` copies of the canary sentence (labelled ``label``) inserted at seeded positions."""
    rng, texts, labels = random.Random(seed), list(texts), list(labels)
    for _ in range(copies):
        at = rng.randrange(len(texts) + 1)
        texts.insert(at, canary.text)
        labels.insert(at, label)
    return texts, labels


def _words(text: str) -> tuple[str, ...]:
    return tuple(re.findall(r"\w+", text.lower()))


class CopyDetector:
    """Flags text that copies private text: a run of ``ngram`` consecutive words of a private text, or the whole of
    a shorter one (3+ words; a text of one or two words only when equal). Case and punctuation are ignored.

    The silo's verbatim filter (drop a generation before it leaves) and the audit's n-gram copy rate.
    """

    def __init__(self, private_texts: Sequence[str], ngram: int = 8) -> None:
        if ngram < 2:
            raise ConfigError(f"a copy needs at least 2 words in a row, got ngram={ngram}")
        self.ngram = ngram
        self.grams: dict[int, set[tuple[str, ...]]] = {}  # run length -> private runs of that length
        self.exact: set[tuple[str, ...]] = set()
        for text in private_texts:
            words = _words(text)
            if len(words) >= ngram:
                self.grams.setdefault(ngram, set()).update(words[i:i + ngram] for i in range(len(words) - ngram + 1))
            elif len(words) >= 3:
                self.grams.setdefault(len(words), set()).add(words)
            elif words:
                self.exact.add(words)

    def copies(self, text: str) -> bool:
        words = _words(text)
        if words in self.exact:
            return True
        return any(words[i:i + n] in runs for n, runs in self.grams.items() for i in range(len(words) - n + 1))

    def copy_rate(self, texts: Sequence[str]) -> float:
        return sum(map(self.copies, texts)) / len(texts) if texts else 0.0


def run_canary(setup: CanaryConfig, seed: int) -> tuple[Canary, list[str]]:
    """The run's canary and its comparison secrets: silos, the server and auditors rebuild them alike from the seed."""
    canary = make_canary(setup.kind, seed=seed)
    return canary, candidate_secrets(canary, setup.candidates, seed=seed + 1)


def plant_canaries(data: SiloData, setup: CanaryConfig, seed: int, index: int) -> SiloData:
    """Silo ``index``'s data with the run's canary planted into its training split (labelled with the silo's most
    common label); unchanged unless ``canaries.enabled``. Silos and auditors call this, so both see the same data."""
    if not setup.enabled or not len(data.train):
        return data
    label = Counter(data.train.labels).most_common(1)[0][0]
    texts, labels = plant(data.train.texts, data.train.labels, run_canary(setup, seed)[0], setup.copies, label,
                          seed=f"plant-canary/{seed}/{index}")
    return replace(data, train=Examples.of(texts, labels))
