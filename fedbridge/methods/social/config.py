"""``social.*``: teachers, aggregators, student and baselines of a Social Learning run (its canaries: ``canaries.*``)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    mode: str = field(default="examples", metadata={
        "help": "what teachers share: examples (synthetic examples) | instructions (a task description)"})
    num_examples: int = field(default=16, metadata={
        "help": "n: synthetic examples in the student's prompt (and original examples for the bound)"})
    num_instructions: int = field(default=1, metadata={
        "help": "instructions in the student's prompt (instructions mode)"})
    aggregators: str = field(default="balanced,voting,random", metadata={
        "help": "comma list of balanced, voting, random: each is evaluated on the same candidates; the first is the "
                "headline"})
    baselines: str = field(default="zero-shot", metadata={
        "help": "comma list of zero-shot, raw (each teacher alone), original (NON-PRIVATE bound: raw data crosses)"})
    teacher: str = field(default="embedded", metadata={
        "help": "the teachers' causal LM (embedded, tiny-llama in tests, any HF id or directory)"})
    # examples mode (teacher side)
    shots: int = field(default=8, metadata={"help": "n_gen: private examples in each generation prompt"})
    samples: int = field(default=8, metadata={
        "help": "generations per teacher, each from a fresh draw of n_gen examples"})
    top_k: int = field(default=4, metadata={
        "help": "kept per teacher: the lowest perplexity under the teacher's own model"})
    conditioning: str = field(default="label", metadata={
        "help": "label: the prompt ends with 'Label: y' (labels cycled), the teacher writes the text | none: the "
                "paper's free continuation, (text, label) parsed from it, unparseable ones dropped"})
    temperature: float = field(default=0.8, metadata={
        "help": "the teachers' sampling temperature (also for instructions)"})
    top_p: float = field(default=1.0, metadata={"help": "the teachers' nucleus-sampling mass (also for instructions)"})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens per generated example (and per DP example)"})
    max_example_chars: int = field(default=300, metadata={
        "help": "every example (private, synthetic, held-out) is cut to this in prompts"})
    verbatim_filter: bool = field(default=True, metadata={
        "help": "drop generations that copy private text (a whole example or a long n-gram); a silo's node config "
                "may override it"})
    verbatim_ngram: int = field(default=8, metadata={"help": "words in a row that count as a copy, >= 2"})
    # instructions mode (teacher side)
    instruction_shots: int = field(default=8, metadata={
        "help": "instructions mode: private examples shown to a teacher writing its instruction"})
    instruction_tokens: int = field(default=160, metadata={"help": "instructions mode: tokens per instruction"})
    # voting (teacher side) and the balanced aggregator (server side)
    vote_examples: int = field(default=8, metadata={
        "help": "held-out examples (the silo's test split) each teacher scores candidates against"})
    diversity: float = field(default=1.0, metadata={
        "help": "balanced: weight of the similarity penalty (0 = consensus and label balance only)"})
    # optional DP examples (teacher side): Tang et al.'s DP few-shot generation, charged to the silo's ledger
    dp: str = field(default="none", metadata={
        "help": "none | dp-fewshot (examples mode: Tang et al.'s DP few-shot generation, charged to the silo's "
                "ledger)"})
    epsilon: float = field(default=4.0, metadata={
        "help": "dp-fewshot: the ε asked of each teacher (at the silo's own δ, node config); inf = non-private"})
    dp_groups: int = field(default=4, metadata={
        "help": "dp-fewshot: M, the groups of private examples whose next-token distributions are averaged"})
    dp_shots_per_group: int = field(default=1, metadata={
        "help": "dp-fewshot: N, private examples in each group's prompt"})
    dp_public_top_k: int = field(default=100, metadata={
        "help": "dp-fewshot: the noisy argmax is taken over the top-k tokens of the data-free prompt; 0 = the whole "
                "vocabulary"})
    noise_seed: int = field(default=-1, metadata={
        "help": "-1 = the silo's own (secret OS entropy, or its node-config noise-seed; the guarantee needs it); "
                ">= 0 = a server-chosen seed, for reproducible tests only: refused by a silo that does not allow "
                "non-private releases, else the release is labelled non-private"})
    # student (server side)
    max_test: int = field(default=150, metadata={
        "help": "global test examples the student answers per variant (0 = all)"})
    max_prompt_tokens: int = field(default=2048, metadata={
        "help": "student prompt tokens kept (cut from the left), >= 64"})

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
