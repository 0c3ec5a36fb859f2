"""Training-free DP few-shot generation (Tang et al. 2023, arXiv 2309.11765): private demonstrations token by token.

To write one synthetic demonstration for label y, every token is one noisy query:
  1. Poisson-subsample the label's private examples D_y at rate q = M·N / |D_y|;
  2. put each sampled example in one of M groups by an independent uniform draw, keep up to N per group;
  3. prompt the LM with each group as few-shot demonstrations (plus the tokens written so far) and
     average the M next-token distributions;
  4. add Gaussian noise of std σ·√2/M and emit the argmax.
Adding or removing one private example changes one group only, so one distribution of the average:
L2 sensitivity √2/M (two probability vectors differ by at most √2). The noise is thus σ times the
sensitivity, and each token is one step of the Poisson-subsampled Gaussian mechanism with noise multiplier σ.
Random group assignment matters: splitting the sample in order would let one example shift every group.
With ``count_bound`` (a silo's public lower bound on examples per label), q = M·N / bound for every label, so
neither q nor the calibrated σ depends on the private counts.

The vocabulary may be restricted to the top-k tokens of the data-free prompt (the template with no
demonstrations plus the tokens written so far): public, so free. Without a count bound, like Tang et al., |D_y|
is treated as public when setting q (a silo's policy decides whether it may be); labels are composed sequentially
(not in parallel), which over-counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.errors import ConfigError, DataError
from fedbridge.privacy.accounting import PrivacyEvent, PrivacyLedger, calibrate_noise, compute_epsilon
from fedbridge.privacy.synthesis import SynthesisResult, privacy_generator

DEFAULT_PROMPT_TEMPLATE = "Label: {label}\nText: {text}\n\n"


@dataclass(frozen=True)
class DPFewShotConfig:
    """Defaults: Tang et al.'s AG News setting (ε≈4: σ=0.39, M=10, M·N=20, T_max=100, public top-100)."""

    num_groups: int = 10  # M: teacher prompts averaged per token
    shots_per_group: int = 2  # N: demonstrations per prompt (expected, at most)
    sigma: float = 0.39  # noise multiplier; noise std on the averaged distribution is σ·√2/M; 0 = non-private
    max_tokens: int = 100  # T_max per demonstration; every demonstration is charged T_max queries
    public_top_k: int = 100  # argmax over the top-k tokens of the data-free prompt; 0 = whole vocabulary
    num_per_label: int = 4
    stop: str = "\n"  # a demonstration ends at this string (or EOS)
    min_words: int = 1  # shorter demonstrations are dropped (after being charged)
    max_text_chars: int = 500  # private texts are cut to this in prompts
    noise_seed: int | None = None  # None = secret OS entropy for subsampling, grouping and noise
    kv_cache: bool = True  # one shot per group: each prefix runs once, then only the new tokens (same output)
    count_bound: int = 0  # a public lower bound on examples per label: q = M·N / bound; 0 = the exact counts

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.shots_per_group < 1 or self.max_tokens < 1 or self.public_top_k < 0:
            raise ConfigError("dp-fewshot needs num_groups, shots_per_group, max_tokens >= 1 and public_top_k >= 0")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ConfigError(f"dp-fewshot sigma must be finite and >= 0 (0 = non-private), got {self.sigma}")

    @property
    def mechanism(self) -> str:
        return "dp-fewshot" if self.sigma > 0 else "fewshot (non-private)"


def aggregate_noise_std(sigma: float, num_groups: int) -> float:
    """Std of the Gaussian noise on the average of ``num_groups`` distributions: σ times its sensitivity √2/M."""
    return sigma * math.sqrt(2) / num_groups


def noisy_average(prob_matrix: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Mean of the (M, V) per-group distributions plus N(0, (σ·√2/M)²) noise on every coordinate."""
    mean = prob_matrix.double().mean(0)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float64, device=mean.device)
    return mean + noise * aggregate_noise_std(sigma, prob_matrix.shape[0])


def noisy_argmax(prob_matrix: torch.Tensor, sigma: float, generator: torch.Generator) -> int:
    """One DP token: the argmax of the noisy average of the groups' next-token distributions."""
    return int(noisy_average(prob_matrix, sigma, generator).argmax())


@torch.no_grad()
def _next_token_probs(model: PreTrainedModel, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token distributions of token-id prompts, left padded, as float64 on CPU (where the noise RNG is)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # models with absolute positions must not see the padding
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    return logits.double().softmax(-1).cpu()


def fewshot_events(label_counts: Sequence[int], cfg: DPFewShotConfig) -> tuple[PrivacyEvent, ...]:
    """What ``dp_fewshot_synthesize`` charges: per label, (σ, q_y = min(1, M·N/n_y), num_per_label·T_max), with
    n_y the label's count, or the public ``count_bound`` when set (then σ and q reveal nothing about the counts:
    each example is still sampled at exactly q, a smaller label only fills fewer groups)."""
    counts = [cfg.count_bound] * len(label_counts) if cfg.count_bound else label_counts
    return tuple(PrivacyEvent(cfg.sigma, min(1.0, cfg.num_groups * cfg.shots_per_group / max(n, 1)),
                              cfg.num_per_label * cfg.max_tokens, cfg.mechanism) for n in counts)


def sigma_for_epsilon(target_epsilon: float, delta: float, label_ids: Sequence[int], num_labels: int,
                      cfg: DPFewShotConfig) -> float:
    """The σ at which ``dp_fewshot_synthesize`` with ``cfg`` on these labels costs ``target_epsilon`` (all labels
    composed); ``inf`` gives 0, non-private."""
    counts = [sum(1 for y in label_ids if y == label) for label in range(num_labels)]
    return calibrate_noise(target_epsilon, delta, lambda sigma: fewshot_events(counts, replace(cfg, sigma=sigma)))


def _draw_groups(num_examples: int, sample_rate: float, num_groups: int, per_group: int,
                 rng: torch.Generator) -> list[list[int]]:
    """Poisson-subsample example indices, send each to a uniformly random group, keep up to ``per_group``.

    Each example's membership depends on its own draws only, so adding or removing it changes one group.
    """
    sampled = (torch.rand(num_examples, generator=rng) < sample_rate).nonzero().flatten()
    sampled = sampled[torch.randperm(len(sampled), generator=rng)]  # random order: who is cut is random
    groups: list[list[int]] = [[] for _ in range(num_groups)]
    for i, g in zip(sampled.tolist(), torch.randint(num_groups, (len(sampled),), generator=rng).tolist()):
        if len(groups[g]) < per_group:
            groups[g].append(i)
    return groups


def _query_head(template: str) -> str:
    """The template up to ``{text}``, trailing spaces cut (BPE models write the space with the next word)."""
    if template.count("{text}") != 1 or "{label}" not in template.split("{text}")[0]:
        raise ConfigError(f"prompt template {template!r} needs '{{label}}' before exactly one '{{text}}'")
    return template.split("{text}")[0].rstrip(" ")


class GrowingPrompts:
    """Next-token distributions of prompts that all end in the tokens written so far: ``prefixes[key] + out``.

    Each fixed prefix (BOS, one private demonstration, the query head) runs through the model once; after that,
    only the tokens its KV cache does not hold yet. ``reset`` crops every cache back to its prefix for the next
    demonstration. The distributions are those of the whole prompt (the same causal attention, computed in
    pieces), so the mechanism's output is exactly the one the accountant charges.
    """

    def __init__(self, model: PreTrainedModel, prefixes: dict[int, list[int]]) -> None:
        self.model, self.prefixes = model, prefixes
        self._caches: dict[int, tuple[object, int, torch.Tensor | None]] = {}  # key -> (KV cache, tokens held, probs)
        self.tokens_read = 0

    @torch.no_grad()
    def probs(self, key: int, out: list[int]) -> torch.Tensor:
        cache, held, last = self._caches.get(key, (None, 0, None))
        feed = (self.prefixes[key] + out)[held:]
        if feed:
            result = self.model(input_ids=torch.tensor([feed], device=self.model.device), past_key_values=cache,
                                use_cache=True)
            cache, last = result.past_key_values, result.logits[0, -1].double().softmax(-1).cpu()
            self.tokens_read += len(feed)
        self._caches[key] = (cache, len(self.prefixes[key]) + len(out), last)
        return last

    def reset(self) -> None:
        """Back to the prefixes alone: each cache keeps all but the prefix's last token, which the next call feeds
        again with the new tokens (so it has that position's distribution without a stored copy)."""
        for key, (cache, _, _) in list(self._caches.items()):
            keep = len(self.prefixes[key]) - 1
            if hasattr(cache, "crop") and keep > 0:
                cache.crop(keep - cache.get_seq_length())  # transformers 5: a negative count of tokens to drop
                self._caches[key] = (cache, keep, None)
            else:
                del self._caches[key]


def _write_demonstration(model: PreTrainedModel, tok: PreTrainedTokenizerBase, demos: list[list[int]],
                         query: list[int], sample_rate: float, cfg: DPFewShotConfig,
                         rng: torch.Generator, prompts_cache: GrowingPrompts | None = None) -> tuple[str, int, int]:
    """One demonstration, one noisy query per token; returns its text, the queries run and the prompt tokens read.

    With ``prompts_cache`` (one shot per group: every group's prompt is one demonstration's prefix + the tokens
    written), the M + 1 distributions come from its KV caches; otherwise each token re-reads the M + 1 prompts."""
    bos = tok("")["input_ids"]  # the special tokens the tokenizer puts before any text
    stop_ids = {tok.eos_token_id, tok.pad_token_id} - {None}
    out: list[int] = []
    text, prompt_tokens = "", 0
    while len(out) < cfg.max_tokens:
        groups = _draw_groups(len(demos), sample_rate, cfg.num_groups, cfg.shots_per_group, rng)
        if prompts_cache is not None:  # key -1: the data-free prompt; an empty group's prompt is that one too
            before = prompts_cache.tokens_read
            probs = torch.stack([prompts_cache.probs(key, out) for key in [-1, *(g[0] if g else -1 for g in groups)]])
            prompt_tokens += prompts_cache.tokens_read - before
        else:
            prompts = [bos + query + out]  # row 0: the data-free prompt, for the public top-k
            prompts += [bos + [t for i in g for t in demos[i]] + query + out for g in groups]
            probs = _next_token_probs(model, prompts, tok.pad_token_id)
            prompt_tokens += sum(len(p) for p in prompts)
        private = probs[1:]
        if cfg.public_top_k:  # renormalised: still probability vectors, so the sensitivity stays √2/M
            allowed = probs[0].topk(min(cfg.public_top_k, probs.shape[1])).indices
            private = private[:, allowed] / private[:, allowed].sum(1, keepdim=True)
        pick = noisy_argmax(private, cfg.sigma, rng)
        token = int(allowed[pick]) if cfg.public_top_k else pick
        if token in stop_ids:
            return text.strip(), len(out) + 1, prompt_tokens
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if cfg.stop and cfg.stop in text:
            return text[:text.index(cfg.stop)].strip(), len(out), prompt_tokens
    return text.strip(), len(out), prompt_tokens


def dp_fewshot_synthesize(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                          label_ids: Sequence[int], label_names: Sequence[str], cfg: DPFewShotConfig,
                          ledger: PrivacyLedger,
                          prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> SynthesisResult:
    """Write ``cfg.num_per_label`` DP demonstrations for every label; return them with their cost.

    The ledger is charged before any generation, per label, the worst case of (σ, q_y, num_per_label·T_max):
    stopping early is post-processing of the full T_max-token mechanism, so this is exactly what the output
    costs, whereas charging the data-dependent number of tokens actually written would not be a valid bound.
    Every label of the public label set is prompted (also one the silo lacks, whose prompts then hold no
    private data), so the output does not reveal which labels the silo holds.
    """
    if len(texts) != len(label_ids):
        raise DataError(f"dp-fewshot needs one label per text, got {len(texts)} texts and {len(label_ids)} labels")
    if bad := sorted({y for y in label_ids if not 0 <= y < len(label_names)}):
        raise DataError(f"label ids {bad} are outside 0..{len(label_names) - 1}")
    head = _query_head(prompt_template)
    by_label = [[t for t, y in zip(texts, label_ids) if y == label] for label in range(len(label_names))]
    events = fewshot_events([len(d) for d in by_label], cfg)
    ledger.charge(events)

    rng = privacy_generator(cfg.noise_seed)
    examples: list[tuple[str, int]] = []
    generated = prompt_tokens = 0  # generated: noisy queries run, a function of the released text
    t0 = time.perf_counter()
    with tqdm(total=len(label_names) * cfg.num_per_label, desc="DP few-shot", unit="demo") as bar:
        for label, (name_y, private, event) in enumerate(zip(label_names, by_label, events)):
            demos = [tok(prompt_template.format(label=name_y, text=" ".join(t.split())[:cfg.max_text_chars]),
                         add_special_tokens=False)["input_ids"] for t in private]
            query = tok(head.format(label=name_y), add_special_tokens=False)["input_ids"]
            cache = None
            if cfg.shots_per_group == 1 and cfg.kv_cache:
                bos = tok("")["input_ids"]
                cache = GrowingPrompts(model, {-1: bos + query, **{i: bos + d + query for i, d in enumerate(demos)}})
            for _ in range(cfg.num_per_label):
                text, queries, read = _write_demonstration(model, tok, demos, query, event.sample_rate, cfg, rng,
                                                           cache)
                if cache is not None:
                    cache.reset()
                generated += queries
                prompt_tokens += read
                if len(text.split()) >= max(cfg.min_words, 1):
                    examples.append((text, label))
                bar.update()
    return SynthesisResult(
        examples=examples, mechanism=cfg.mechanism, epsilon=compute_epsilon(events, ledger.delta),
        epsilon_total=ledger.spent(), delta=ledger.delta, steps=sum(e.steps for e in events),
        noise_multiplier=cfg.sigma, events=events, seconds={"generate": time.perf_counter() - t0},
        tokens={"generated": generated}, local={"private-prompt-tokens": prompt_tokens})
