"""``pe.*``: Private Evolution's population, its iterations, the silos' DP votes and what each silo receives."""

from __future__ import annotations

from dataclasses import dataclass

from fedbridge.errors import ConfigError
from fedbridge.protocol import MAX_VOTE_K


@dataclass(frozen=True)
class PEConfig:
    epsilon: float = 4.0  # ε asked of each silo for all its vote releases together (at the silo's δ); inf = no noise
    iterations: int = 2  # vote rounds (each one DP release per silo); variations are written between them
    candidates_per_label: int = 48  # population the LLM keeps per label in every iteration
    keep: float = 0.25  # fraction of each label's population kept as parents for the next iteration's variations
    k: int = 48  # nearest candidates each private record votes for (weight 1/sqrt(k) each: sensitivity 1)
    balance: bool = True  # label a candidate by votes relative to each label's total (class-balanced), not raw votes
    threshold: float = 1.0  # keep a candidate only if its label's lead reaches this many standard deviations of noise
    num_per_label: int = 32  # synthetic examples per (voted) label sent to every silo, the clearest of all iterations
    synthetic_weight: float = 1.0  # loss weight of the synthetic examples in the silo's SLM training
    noise_seed: int = -1  # -1 = secret OS entropy (the guarantee needs it); >= 0 only for reproducible tests
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 48
    min_words: int = 4
    near_duplicate: float = 0.8  # character 5-gram Jaccard at or above which a candidate repeats another

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ConfigError(f"pe.epsilon must be > 0 (inf = non-private), got {self.epsilon:g}.")
        if self.iterations < 1 or self.candidates_per_label < 1 or self.num_per_label < 0:
            raise ConfigError("pe.iterations and pe.candidates-per-label must be >= 1, pe.num-per-label >= 0.")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"pe.keep must be in (0, 1], got {self.keep:g}: the fraction of each label's population "
                              "kept as parents.")
        if not 1 <= self.k <= MAX_VOTE_K:
            raise ConfigError(f"pe.k must be in 1..{MAX_VOTE_K}, got {self.k}.")
        if self.threshold < 0 or self.synthetic_weight < 0:
            raise ConfigError("pe.threshold and pe.synthetic-weight must be >= 0.")
