"""``crosslm.*``: the CrossLM loop, the LLM's update and the silos' enhancement."""

from __future__ import annotations

from dataclasses import dataclass

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
    mode: str = "async"  # async | sync (every step waits for every silo; for comparison)
    score_on: str = "silo"  # silo: only probabilities leave silos | server: silos upload SLM weights (weaker privacy)
    rounds: int = 2  # score -> enhance rounds per silo
    ttl: float = 0.0  # seconds one message may take to come back; 0 = the run's `timeout`
    # generation
    per_label: int = 8  # examples the LLM writes per label for each batch
    temperature: float = 0.9
    top_p: float = 0.95
    max_new_tokens: int = 48
    min_words: int = 5
    near_duplicate: float = 0.8  # character 5-gram Jaccard at or above which a text is a duplicate
    # rewards
    scores: str = "dp-votes"  # dp-votes: each silo's DP nearest-neighbour votes (fedbridge.privacy.dp_votes) give S(y|x),
    # with a finite ε | slm: its SLM's class probabilities, released without DP (ε = inf), as the paper
    epsilon: float = 4.0  # scores=dp-votes: ε per silo for all its score releases (one per round) together
    vote_k: int = 4  # scores=dp-votes: nearest candidates each private record votes for
    aggregate: str = "median"  # mean | median | trimmed-mean, over the silos that scored a batch
    trim: float = 0.25  # trimmed-mean: floor(trim * silos) values cut from each end, at least 1 from 3 silos on
    min_scorers: int = 3  # a batch updates the LLM only once this many silos (or all live ones, if fewer) scored it
    max_staleness: int = 4  # rewards on a batch written more than this many LLM updates ago do not update the LLM
    # LLM update: LoRA with quality + task + KL loss (fedbridge.models.reward)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"  # comma list of module names, or all-linear
    lora_lr: float = 5e-4
    lora_steps: int = 2  # optimizer steps per LLM update (sync: x the updates async would make, in one)
    lora_batch_size: int = 4
    lora_max_length: int = 160
    quality_weight: float = 1.0  # γ_quality: reward-weighted likelihood (r > 0) / unlikelihood (r < 0)
    task_weight: float = 1.0  # γ_task: the label of approved (r > 0) examples under the classification prompt
    kl_weight: float = 1.0  # γ_kl: KL(LLM ‖ original) on the same tokens; 0 = no leash (ablation)
    # SLM enhancement
    select_max: int = 24  # examples sent to a silo per round
    min_reward: float = 0.0  # only examples whose combined reward is above this
    diversity: float = 0.5  # MMR weight on MiniLM cosine similarity to examples already chosen; 0 = by reward only
    targets: str = "hard"  # hard: the LLM's intended labels | soft: the silos' combined probabilities (distillation)
    enhance_epochs: int = 0  # 0 = the silo's SLM recipe (epoch chosen on its private validation split); server: 2
    synthetic_weight: float = 1.0
    with_private: bool = True  # score-on=silo: fine-tune on private + selected examples; false = the paper's step 5
    # (selected examples only), which erased what a silo had learned in every measurement (README "CrossLM")
    # evaluation
    llm_eval_examples: int = 100  # global-test examples for the LLM's label-scoring accuracy (0 = all)
    ppl_passages: int = 0  # general-text passages for perplexity (0 = all)
    ppl_max_tokens: int = 128
    general_text: str = ""  # text file of passages separated by blank lines; "" = text bundled in scikit-learn

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
