"""``fdkt.*``: what an FDKT run asks of each silo and how the server augments."""

from __future__ import annotations

from dataclasses import dataclass

from fedbridge.errors import ConfigError

MECHANISMS = ("dp-fewshot", "dp-sgd")


@dataclass(frozen=True)
class FDKTConfig:
    mechanism: str = "dp-fewshot"  # dp-fewshot | dp-sgd
    epsilon: float = 4.0  # the ε asked of each silo for the run (at the silo's own δ); inf = non-private, labelled so
    generator: str = "embedded"  # the silo's causal LM that writes DP demonstrations
    num_per_label: int = 4  # DP demonstrations per label per silo
    noise_seed: int = -1  # -1 = secret OS entropy (the guarantee needs it); >= 0 only for reproducible tests
    # dp-fewshot (Tang et al.): M groups of N private examples per token, T_max tokens per demonstration
    groups: int = 4
    shots_per_group: int = 1
    max_tokens: int = 48
    public_top_k: int = 100
    max_text_chars: int = 500  # each private example is cut to this in the prompts (its prefill is the cost)
    # dp-sgd: LoRA fine-tuning of the generator with Opacus
    sgd_epochs: int = 2
    sgd_batch_size: int = 8
    sgd_lr: float = 5e-4
    clip: float = 1.0
    sgd_max_length: int = 64  # tokens per training text of the DP-SGD generator
    # server-side augmentation
    augment_per_label: int = 12  # new examples the LLM writes per label (per silo, or once when pooled)
    demos_per_prompt: int = 2
    llm_filter: bool = True
    label_filter: bool = True  # drop generations whose intended label the LLM finds least likely
    min_words: int = 5
    near_duplicate: float = 0.8  # character 5-gram Jaccard at or above which two texts are duplicates
    temperature: float = 0.8
    top_p: float = 0.9
    max_new_tokens: int = 80
    pooled: bool = False  # one augmented set from every silo's demonstrations, sent to all silos
    synthetic_weight: float = 1.0  # loss weight of augmented examples in the silo's SLM training

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"Unknown fdkt.mechanism '{self.mechanism}'. Use one of: {', '.join(MECHANISMS)}.")
        if not self.epsilon > 0:
            raise ConfigError("fdkt.epsilon must be > 0 (inf = non-private).")
        if self.max_text_chars < 1:
            raise ConfigError(f"fdkt.max-text-chars must be >= 1, got {self.max_text_chars}.")
