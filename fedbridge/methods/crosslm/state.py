"""What a CrossLM server knows besides its LLM's weights, as plain data: the batches the LLM wrote with every score
received, each silo's progress, and the run's counters. Its checkpoint is ``to_json`` / ``from_json``."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from fedbridge.models.generation import GenerationStats, Prompt
from fedbridge.models.reward import aggregate, rewards_from_probabilities


@dataclass(frozen=True)
class Generated:
    prompt: Prompt
    text: str
    label: int


@dataclass
class Batch:
    """Examples the LLM wrote at one version, and each silo's class probabilities of them as they arrive."""

    index: int
    version: int  # LLM updates done before it was written
    examples: list[Generated]
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # silo name -> (n, num_labels)
    learned: bool = False  # sync: the LLM has been updated on it
    embeddings: np.ndarray | None = None

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.examples]

    @property
    def labels(self) -> list[int]:
        return [g.label for g in self.examples]

    def rewards(self, rule: str, trim: float) -> np.ndarray:
        """Combined reward per example over the silos that have scored the batch so far."""
        if not self.examples:
            return np.zeros(0)
        return aggregate([rewards_from_probabilities(s, self.labels) for s in self.scores.values()], rule, trim)

    def to_json(self) -> dict:
        return {"version": self.version, "learned": self.learned,
                "examples": [[g.prompt, g.text, g.label] for g in self.examples],
                "scores": {silo: probs.tolist() for silo, probs in self.scores.items()}}

    @classmethod
    def from_json(cls, index: int, data: dict) -> Batch:
        return cls(index, data["version"], [Generated(prompt, text, label) for prompt, text, label in data["examples"]],
                   {silo: np.array(probs, dtype=np.float64) for silo, probs in data["scores"].items()},
                   data["learned"])


@dataclass
class Progress:
    """How far one silo has got: the last batch it scored and the last round it was enhanced in (a silo without a
    ``Progress`` has not trained its SLM yet)."""

    scored: int = 0
    enhanced: int = 0


@dataclass
class CrossLMState:
    version: int = 0  # LLM updates so far
    batches: list[Batch] = field(default_factory=list)
    progress: dict[str, Progress] = field(default_factory=dict)  # silo name -> progress; absent = not trained yet
    before: dict[str, float] = field(default_factory=dict)  # the LLM's metrics before any update
    counts: Counter = field(default_factory=Counter)
    selected: dict[str, int] = field(default_factory=dict)  # "silo/round" -> examples sent for that enhancement
    slm_specs: dict[str, str] = field(default_factory=dict)  # score-on=server: silo -> the spec of its upload
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def history(self) -> list[str]:
        """Every text the LLM wrote so far: what a new batch is deduplicated against."""
        return [text for batch in self.batches for text in batch.texts]

    def to_json(self) -> dict:
        return {"version": self.version, "before": self.before, "counts": dict(self.counts),
                "stats": dataclasses.asdict(self.stats), "selected": self.selected, "slm_specs": self.slm_specs,
                "progress": {silo: dataclasses.asdict(prog) for silo, prog in self.progress.items()},
                "batches": [batch.to_json() for batch in self.batches]}

    @classmethod
    def from_json(cls, data: dict) -> CrossLMState:
        return cls(data["version"], [Batch.from_json(i + 1, b) for i, b in enumerate(data["batches"])],
                   {silo: Progress(**prog) for silo, prog in data["progress"].items()}, data["before"],
                   Counter(data["counts"]), data["selected"], data["slm_specs"], GenerationStats(**data["stats"]))
