"""``fdkt.*``: what an FDKT run asks of each silo and how the server augments."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedbridge.errors import ConfigError
from fedbridge.protocol import MAX_VOTE_K

MECHANISMS = ("dp-fewshot", "dp-sgd")
LABELS = ("dp-votes", "llm")


@dataclass(frozen=True)
class FDKTConfig:
    mechanism: str = field(default="dp-fewshot", metadata={
        "help": "how each silo writes its DP demonstrations: dp-fewshot (training-free DP few-shot generation, Tang "
                "et al.) | dp-sgd (LoRA fine-tuning of the generator with Opacus, then sampling)"})
    epsilon: float = field(default=4.0, metadata={
        "help": "the ε asked of each silo for the run (at the silo's own δ); inf = non-private, labelled so"})
    generator: str = field(default="embedded", metadata={
        "help": "the silo's causal LM that writes DP demonstrations (embedded, tiny-llama, an HF id or a directory)"})
    num_per_label: int = field(default=4, metadata={"help": "DP demonstrations per label per silo"})
    noise_seed: int = field(default=-1, metadata={
        "help": "-1 = the silo's own (secret OS entropy, or its node-config noise-seed; the guarantee needs it); "
                ">= 0 = a server-chosen seed, for reproducible tests only: refused by a silo that does not allow "
                "non-private releases, else the release is labelled non-private"})
    # dp-fewshot (Tang et al.): M groups of N private examples per token, T_max tokens per demonstration
    groups: int = field(default=4, metadata={
        "help": "dp-fewshot: M, the groups of private examples whose next-token distributions are averaged per token"})
    shots_per_group: int = field(default=1, metadata={
        "help": "dp-fewshot: N, private examples in each group's prompt"})
    max_tokens: int = field(default=48, metadata={
        "help": "dp-fewshot: T_max, tokens per demonstration (every one is charged up front)"})
    public_top_k: int = field(default=100, metadata={
        "help": "dp-fewshot: the noisy argmax is taken over the top-k tokens of the data-free prompt; 0 = the whole "
                "vocabulary"})
    max_text_chars: int = field(default=500, metadata={
        "help": "dp-fewshot: each private example is cut to this many characters in the prompts (its prefill is the "
                "cost), >= 1"})
    # dp-sgd: LoRA fine-tuning of the generator with Opacus
    sgd_epochs: int = field(default=2, metadata={"help": "dp-sgd: epochs of DP-SGD training of the generator"})
    sgd_batch_size: int = field(default=8, metadata={"help": "dp-sgd: expected Poisson batch size"})
    sgd_lr: float = field(default=5e-4, metadata={"help": "dp-sgd: learning rate of the generator's LoRA adapters"})
    clip: float = field(default=1.0, metadata={"help": "dp-sgd: per-example gradient norm bound"})
    sgd_max_length: int = field(default=64, metadata={
        "help": "dp-sgd: tokens per training text of the DP-SGD generator"})
    # server-side augmentation
    augment_per_label: int = field(default=12, metadata={
        "help": "new examples the LLM writes per label (per silo, or once when pooled)"})
    demos_per_prompt: int = field(default=2, metadata={
        "help": "DP demonstrations shown in each of the LLM's augmentation prompts"})
    llm_filter: bool = field(default=True, metadata={
        "help": "the LLM reviews the demonstrations (in clusters of about 4 similar ones) and keeps those it finds "
                "fit; false = keep every demonstration"})
    label_filter: bool = field(default=True, metadata={
        "help": "drop generations whose intended label the LLM finds least likely"})
    min_words: int = field(default=5, metadata={"help": "generations with fewer words are dropped"})
    near_duplicate: float = field(default=0.8, metadata={
        "help": "character 5-gram Jaccard at or above which two texts are duplicates"})
    temperature: float = field(default=0.8, metadata={"help": "the LLM's sampling temperature for augmentation"})
    top_p: float = field(default=0.9, metadata={"help": "the LLM's nucleus-sampling mass for augmentation"})
    max_new_tokens: int = field(default=80, metadata={"help": "tokens per augmented example"})
    pooled: bool = field(default=False, metadata={
        "help": "one augmented set from every silo's demonstrations, sent to all silos"})
    synthetic_weight: float = field(default=1.0, metadata={
        "help": "loss weight of augmented examples in the silo's SLM training"})
    # who labels the augmented set: the silos' DP nearest-neighbour votes (one release per silo over every set
    # together, so the sets go out once all demonstrations are in) or the label the LLM was asked to write (as the paper)
    labels: str = field(default="dp-votes", metadata={
        "help": "who labels the augmented set: dp-votes (the silos' DP nearest-neighbour votes, one release per silo "
                "over every set together, so the sets go out once all demonstrations are in) | llm (the label the "
                "LLM was asked to write, as the paper)"})
    vote_epsilon: float = field(default=4.0, metadata={
        "help": "labels=dp-votes: ε of the vote on each silo, on top of fdkt.epsilon (basic composition); inf = no "
                "noise"})
    vote_k: int = field(default=48, metadata={
        "help": "labels=dp-votes: nearest examples each private record votes for (weight 1/sqrt(k) each: "
                "sensitivity 1)"})
    vote_threshold: float = field(default=1.0, metadata={
        "help": "labels=dp-votes: keep an example only if its voted label leads by this many std of the vote noise, "
                ">= 0"})

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"Unknown fdkt.mechanism '{self.mechanism}'. Use one of: {', '.join(MECHANISMS)}.")
        if not self.epsilon > 0:
            raise ConfigError("fdkt.epsilon must be > 0 (inf = non-private).")
        if self.labels not in LABELS:
            raise ConfigError(f"Unknown fdkt.labels '{self.labels}'. Use one of: {', '.join(LABELS)}.")
        if not self.vote_epsilon > 0:
            raise ConfigError(f"fdkt.vote-epsilon must be > 0 (inf = no noise), got {self.vote_epsilon:g}.")
        if not 1 <= self.vote_k <= MAX_VOTE_K:
            raise ConfigError(f"fdkt.vote-k must be in 1..{MAX_VOTE_K}, got {self.vote_k}.")
        if self.vote_threshold < 0:
            raise ConfigError(f"fdkt.vote-threshold must be >= 0, got {self.vote_threshold:g}.")
        if self.max_text_chars < 1:
            raise ConfigError(f"fdkt.max-text-chars must be >= 1, got {self.max_text_chars}.")
