"""``social.*``: teachers, aggregators, student and baselines of a Social Learning run (its canaries: ``canaries.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.methods.social.aggregators import AGGREGATORS, get_aggregator

MODES = p.SOCIAL_MODES
BASELINES = ("zero-shot", "raw", "original")
CONDITIONINGS = ("label", "none")
DP_MECHANISMS = ("none", "dp-fewshot")
ZERO_SHOT, ORIGINAL = "0-shot", "original(non-private)"


@dataclass(frozen=True)
class SocialConfig:
    mode: str = "examples"  # examples | instructions
    num_examples: int = 16  # n: synthetic examples in the student's prompt (and original examples for the bound)
    num_instructions: int = 1  # instructions in the student's prompt (instructions mode)
    aggregators: str = "balanced,voting,random"  # each is evaluated on the same candidates; the first is the headline
    baselines: str = "zero-shot"  # comma list of zero-shot, raw (each teacher alone), original (NON-PRIVATE bound)
    teacher: str = "embedded"  # the teachers' causal LM (any HF id or directory; tiny-llama in tests)
    # examples mode (teacher side)
    shots: int = 8  # n_gen: private examples in each generation prompt
    samples: int = 8  # generations per teacher, each from a fresh draw of n_gen examples
    top_k: int = 4  # kept per teacher: the lowest perplexity under the teacher's own model
    conditioning: str = "label"  # label: prompt ends with 'Label: y' (labels cycled), the teacher writes the text;
    # none: the paper's free continuation, (text, label) parsed from it, unparseable ones dropped
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_example_chars: int = 300  # every example (private, synthetic, held-out) is cut to this in prompts
    verbatim_filter: bool = True  # drop generations that copy private text (a whole example or a long n-gram)
    verbatim_ngram: int = 8  # words in a row that count as a copy
    # instructions mode (teacher side)
    instruction_shots: int = 8
    instruction_tokens: int = 160
    # voting (teacher side) and the balanced aggregator (server side)
    vote_examples: int = 8  # held-out examples (the silo's test split) each teacher scores candidates against
    diversity: float = 1.0  # balanced: weight of the similarity penalty (0 = consensus and label balance only)
    # optional DP examples (teacher side): Tang et al.'s DP few-shot generation, charged to the silo's ledger
    dp: str = "none"  # none | dp-fewshot
    epsilon: float = 4.0  # the ε asked of each teacher (at the silo's own δ, node config)
    dp_groups: int = 4
    dp_shots_per_group: int = 1
    dp_public_top_k: int = 100
    noise_seed: int = -1  # -1 = secret OS entropy; >= 0 only for reproducible tests
    # student (server side)
    max_test: int = 150  # global test examples the student answers per variant (0 = all)
    max_prompt_tokens: int = 2048  # student prompt tokens kept (cut from the left)

    def __post_init__(self) -> None:
        checks = (("mode", self.mode, MODES), ("conditioning", self.conditioning, CONDITIONINGS),
                  ("dp", self.dp, DP_MECHANISMS))
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"social.{key}='{value}' is not one of: {', '.join(allowed)}.")
        for name in self.aggregator_names:
            get_aggregator(name)
        if not self.aggregator_names:
            raise ConfigError(f"social.aggregators is empty. Use a comma list of: {', '.join(AGGREGATORS)}.")
        if unknown := [b for b in self.baseline_names if b not in BASELINES]:
            raise ConfigError(f"social.baselines: unknown '{unknown[0]}'. Use a comma list of: {', '.join(BASELINES)}.")
        if min(self.num_examples, self.num_instructions, self.shots, self.samples, self.top_k, self.max_new_tokens,
               self.instruction_shots, self.instruction_tokens, self.vote_examples, self.max_example_chars) < 1:
            raise ConfigError("social sizes (num-examples, num-instructions, shots, samples, top-k, max-new-tokens, "
                              "instruction-shots, instruction-tokens, vote-examples, max-example-chars) must be >= 1.")
        if self.verbatim_ngram < 2 or self.max_test < 0 or self.diversity < 0 or self.max_prompt_tokens < 64:
            raise ConfigError("social.verbatim-ngram must be >= 2, max-test >= 0, diversity >= 0 and "
                              "max-prompt-tokens >= 64.")
        if not self.epsilon > 0:
            raise ConfigError("social.epsilon must be > 0 (inf = non-private).")
        if self.dp != "none" and self.mode != "examples":
            raise ConfigError(f"social.dp={self.dp} applies to examples mode only; set social.mode=examples.")

    @property
    def aggregator_names(self) -> list[str]:
        return [a.strip() for a in self.aggregators.split(",") if a.strip()]

    @property
    def baseline_names(self) -> list[str]:
        return [b.strip() for b in self.baselines.split(",") if b.strip()]

    @property
    def keep(self) -> int:
        """How many candidates the student sees."""
        return self.num_examples if self.mode == "examples" else self.num_instructions


def social_options(cfg: ExperimentConfig) -> SocialConfig:
    return from_flat(SocialConfig, cfg.method_options, "social")
