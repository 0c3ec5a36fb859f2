"""``pe.*``: Private Evolution's population, its iterations, the silos' DP votes and what each silo receives."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedbridge.errors import ConfigError
from fedbridge.protocol import MAX_VOTE_K


@dataclass(frozen=True)
class PEConfig:
    epsilon: float = field(default=4.0, metadata={
        "help": "ε asked of each silo for all its vote releases together (at the silo's δ); inf = no noise, labelled "
                "non-private"})
    iterations: int = field(default=2, metadata={
        "help": "vote rounds (each one DP release per silo); variations are written between them, >= 1"})
    candidates_per_label: int = field(default=48, metadata={
        "help": "population the LLM keeps per label in every iteration, >= 1"})
    keep: float = field(default=0.25, metadata={
        "help": "fraction of each label's population kept as parents for the next iteration's variations, in (0, 1]"})
    k: int = field(default=48, metadata={
        "help": "nearest candidates each private record votes for (weight 1/sqrt(k) each: sensitivity 1)"})
    balance: bool = field(default=True, metadata={
        "help": "label a candidate by votes relative to each label's total (class-balanced), not raw votes"})
    threshold: float = field(default=1.0, metadata={
        "help": "keep a candidate only if its label's lead reaches this many standard deviations of noise, >= 0"})
    num_per_label: int = field(default=32, metadata={
        "help": "synthetic examples per (voted) label sent to every silo, the clearest of all iterations"})
    synthetic_weight: float = field(default=1.0, metadata={
        "help": "loss weight of the synthetic examples in the silo's SLM training, >= 0"})
    noise_seed: int = field(default=-1, metadata={
        "help": "-1 = the silo's own (secret OS entropy, or its node-config noise-seed; the guarantee needs it); "
                ">= 0 = a server-chosen seed, for reproducible tests only: refused by a silo that does not allow "
                "non-private releases, else the release is labelled non-private"})
    temperature: float = field(default=0.9, metadata={"help": "the LLM's sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "the LLM's nucleus-sampling mass"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per candidate"})
    min_words: int = field(default=4, metadata={"help": "candidates with fewer words are dropped"})
    near_duplicate: float = field(default=0.8, metadata={
        "help": "character 5-gram Jaccard at or above which a candidate repeats another"})

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
