"""``crosslm.*``: the CrossLM loop, the LLM's update and the silos' enhancement."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedbridge.errors import ConfigError
from fedbridge.models.reward import (
    AGGREGATIONS,
    LLMUpdateConfig,
)
from fedbridge.protocol import MAX_VOTE_K

MODES, SCORE_ON, TARGETS, SCORES = ("async", "sync"), ("silo", "server"), ("hard", "soft"), ("dp-votes", "slm")
SERVER_ENHANCE_EPOCHS = 2  # score-on=server with enhance-epochs=0: the server has no validation split to stop on
CHECKPOINT_STEP = "crosslm"  # the one checkpoint step, rewritten after every silo's step


@dataclass(frozen=True)
class CrossLMConfig:
    mode: str = field(default="async", metadata={
        "help": "async (a push/pull loop per silo) | sync (every step waits for every silo; for comparison)"})
    score_on: str = field(default="silo", metadata={
        "help": "silo: only probabilities leave silos | server: silos upload SLM weights (weaker privacy; needs "
                "scores=slm)"})
    rounds: int = field(default=2, metadata={"help": "score -> enhance rounds per silo (one batch per round), >= 1"})
    ttl: float = field(default=0.0, metadata={
        "help": "seconds one message may take to come back; 0 = the run's timeout"})
    # generation
    per_label: int = field(default=8, metadata={"help": "examples the LLM writes per label for each batch"})
    temperature: float = field(default=0.9, metadata={"help": "the LLM's sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "the LLM's nucleus-sampling mass"})
    max_new_tokens: int = field(default=48, metadata={"help": "tokens per generated example"})
    min_words: int = field(default=5, metadata={"help": "generations with fewer words are dropped"})
    near_duplicate: float = field(default=0.8, metadata={
        "help": "character 5-gram Jaccard at or above which a text is a duplicate"})
    # rewards
    scores: str = field(default="dp-votes", metadata={
        "help": "dp-votes: each silo's DP nearest-neighbour votes (fedbridge.privacy.dp_votes) give S(y|x), with a "
                "finite ε | slm: its SLM's class probabilities, released without DP (ε = inf), as the paper"})
    epsilon: float = field(default=4.0, metadata={
        "help": "scores=dp-votes: ε per silo for all its score releases (one per round) together; inf = no noise"})
    vote_k: int = field(default=4, metadata={
        "help": "scores=dp-votes: nearest candidates each private record votes for (weight 1/sqrt(k): sensitivity 1)"})
    noise_seed: int = field(default=-1, metadata={
        "help": "scores=dp-votes: -1 = the silo's own (secret OS entropy, or its node-config noise-seed; the "
                "guarantee needs it); >= 0 = a server-chosen seed, for reproducible tests only: refused by a silo that "
                "does not allow non-private releases, else the release is labelled non-private"})
    aggregate: str = field(default="median", metadata={
        "help": "mean | median | trimmed-mean, over the silos that scored a batch"})
    trim: float = field(default=0.25, metadata={
        "help": "trimmed-mean: floor(trim * silos) values cut from each end, at least 1 from 3 silos on; in [0, 0.5)"})
    min_scorers: int = field(default=3, metadata={
        "help": "a batch updates the LLM only once this many silos (or all live ones, if fewer) scored it"})
    max_staleness: int = field(default=4, metadata={
        "help": "rewards on a batch written more than this many LLM updates ago do not update the LLM"})
    # LLM update: LoRA with quality + task + KL loss (fedbridge.models.reward)
    lora_rank: int = field(default=8, metadata={"help": "rank of the LLM's LoRA adapters"})
    lora_alpha: float = field(default=16.0, metadata={"help": "scale of the LLM's LoRA adapters"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout of the LLM's LoRA adapters"})
    lora_targets: str = field(default="q_proj,v_proj", metadata={
        "help": "the LLM modules that get adapters: a comma list of module names, or all-linear"})
    lora_lr: float = field(default=5e-4, metadata={"help": "AdamW learning rate of the adapters"})
    lora_steps: int = field(default=2, metadata={
        "help": "optimizer steps per LLM update (sync: x the updates async would make, in one)"})
    lora_batch_size: int = field(default=4, metadata={"help": "scored examples per optimizer step"})
    lora_max_length: int = field(default=160, metadata={
        "help": "tokens per training sequence (the prompt is cut from the left)"})
    quality_weight: float = field(default=1.0, metadata={
        "help": "γ_quality: reward-weighted likelihood (r > 0) / unlikelihood (r < 0), >= 0"})
    task_weight: float = field(default=1.0, metadata={
        "help": "γ_task: the label of approved (r > 0) examples under the classification prompt, >= 0"})
    kl_weight: float = field(default=1.0, metadata={
        "help": "γ_kl: KL(LLM ‖ original) on the same tokens; 0 = no leash (ablation)"})
    # SLM enhancement
    select_max: int = field(default=24, metadata={"help": "examples sent to a silo per round"})
    min_reward: float = field(default=0.0, metadata={
        "help": "only examples whose combined reward is above this (0 = the silos give the label > 50 %)"})
    diversity: float = field(default=0.5, metadata={
        "help": "MMR weight on MiniLM cosine similarity to examples already chosen; 0 = by reward only"})
    targets: str = field(default="hard", metadata={
        "help": "hard: the LLM's intended labels | soft: the silos' combined probabilities (distillation)"})
    enhance_epochs: int = field(default=0, metadata={
        "help": "SLM fine-tuning epochs per round; 0 = the silo's SLM recipe (epoch chosen on its private "
                "validation split); score-on=server: 0 means 2"})
    synthetic_weight: float = field(default=1.0, metadata={"help": "loss weight of the selected examples"})
    with_private: bool = field(default=True, metadata={
        "help": "score-on=silo: fine-tune on private + selected examples; false = the paper's step 5 (selected "
                "examples only), which erased what a silo had learned in every measurement"})
    # evaluation
    llm_eval_examples: int = field(default=100, metadata={
        "help": "global-test examples for the LLM's label-scoring accuracy (0 = all)"})
    ppl_passages: int = field(default=0, metadata={"help": "general-text passages for perplexity (0 = all)"})
    ppl_max_tokens: int = field(default=128, metadata={"help": "tokens per perplexity passage"})
    general_text: str = field(default="", metadata={
        "help": "text file of passages separated by blank lines, for perplexity; \"\" = text bundled in "
                "scikit-learn"})

    def __post_init__(self) -> None:
        for key, value, allowed in (("mode", self.mode, MODES), ("score-on", self.score_on, SCORE_ON),
                                    ("scores", self.scores, SCORES),
                                    ("aggregate", self.aggregate, AGGREGATIONS), ("targets", self.targets, TARGETS)):
            if value not in allowed:
                raise ConfigError(f"Unknown crosslm.{key} '{value}'. Use one of: {', '.join(allowed)}.")
        if self.rounds < 1 or self.per_label < 1 or self.min_scorers < 1 or self.max_staleness < 0:
            raise ConfigError("crosslm.rounds, per-label and min-scorers must be >= 1, max-staleness >= 0.")
        if not self.epsilon > 0 or not 1 <= self.vote_k <= MAX_VOTE_K:
            raise ConfigError(f"crosslm.epsilon must be > 0 (inf = no noise) and crosslm.vote-k in 1..{MAX_VOTE_K}.")
        if self.noise_seed < -1:
            raise ConfigError(f"crosslm.noise-seed must be -1 (the silo's own) or >= 0, got {self.noise_seed}.")
        if self.scores == "dp-votes" and self.score_on == "server":
            raise ConfigError("crosslm.score-on=server scores with uploaded SLMs, not DP votes: set crosslm.scores=slm.")
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError(f"crosslm.trim must be in [0, 0.5), got {self.trim}.")
        if min(self.quality_weight, self.task_weight, self.kl_weight) < 0:
            raise ConfigError("crosslm loss weights (quality-weight, task-weight, kl-weight) must be >= 0.")

    def update_config(self) -> LLMUpdateConfig:
        return LLMUpdateConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                               targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()),
                               lr=self.lora_lr, batch_size=self.lora_batch_size, max_length=self.lora_max_length,
                               quality_weight=self.quality_weight, task_weight=self.task_weight,
                               kl_weight=self.kl_weight)
