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
That bound holds for any M probability vectors, whatever the model computes, as long as one example moves one of
them only: each group's distribution must depend on its own prompt alone (and the public top-k set below on public
tokens alone). In exact arithmetic they do. In floating point a batched forward (left-padded rows, or the packed
KV-cached one of ``PackedPrompts``) rounds a row in a way that can depend on the other rows and on which tokens a
prompt's cache held, so one example also moves the other rows by rounding error. Neither path is exactly batch
invariant, and they are not bit-identical to each other, in float32 either: they agree to float32 rounding (~1e-7
relative, ~1e-9 on the test model's distributions) and release the same texts. That residue is the usual
floating-point caveat of DP implementations (the float64 Gaussian sampler is another). In bfloat16 or float16 it is
~1e-3 to 1e-2 relative, not negligible next to √2/M, so a lower-precision model is run as a float32 copy here.
Random group assignment matters: splitting the sample in order would let one example shift every group.
With ``count_bound`` (a silo's public lower bound on examples per label), q = M·N / bound for every label, so
neither q nor the calibrated σ depends on the private counts.

The vocabulary may be restricted to the top-k tokens of the data-free prompt (the template with no
demonstrations plus the tokens written so far): public, so free. Without a count bound, like Tang et al., |D_y|
is treated as public when setting q (a silo's policy decides whether it may be); labels are composed sequentially
(not in parallel), which over-counts.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.errors import ConfigError, DataError
from fedbridge.models.engine import PastCache, additive_mask, cache_argument, left_padded, supports_engine
from fedbridge.privacy.accounting import PrivacyEvent, PrivacyLedger, calibrate_noise, compute_epsilon
from fedbridge.privacy.synthesis import SynthesisResult, privacy_generator

DEFAULT_PROMPT_TEMPLATE = "Label: {label}\nText: {text}\n\n"


DEFAULT_CACHED_PROMPTS = 512


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
    # KV caches held at once (least recently asked dropped first; never fewer than one token's prompts, M + 1 per
    # label); 0 = 512 (~2.3 GB for SmolLM2-135M at ~100 tokens a prompt in float32; a silo with fewer private examples
    # never evicts). Memory is bounded by this, not by private examples; a dropped prompt is read again in full when
    # asked (more tokens, the same releases)
    kv_cache_prompts: int = 0

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.shots_per_group < 1 or self.max_tokens < 1 or self.public_top_k < 0:
            raise ConfigError("dp-fewshot needs num_groups, shots_per_group, max_tokens >= 1 and public_top_k >= 0")
        if self.kv_cache_prompts < 0:
            raise ConfigError(f"dp-fewshot kv_cache_prompts must be >= 0 (0 = default), got {self.kv_cache_prompts}")
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
    ids, real = left_padded(prompts, pad_id, model.device)
    mask = real.long()
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


class PackedPrompts:
    """Next-token distributions of many prompts ``prefixes[key] + out`` at once, one forward per call.

    Each prompt keeps the KV cache of the tokens it has been fed: its prefix (BOS, one private demonstration, the
    query head) once, then only the tokens written since it was last asked. A call packs every asked prompt's
    missing tokens into one sequence after all their caches; a block mask lets each token see its own prompt's
    cache and its own earlier new tokens only, and its position counts its own prompt's tokens. So the M + 1
    prompts of every label being written cost one forward per token, and each distribution is what a full forward
    pass of its whole prompt gives: exactly in exact arithmetic, and up to rounding in floating point (in float32,
    the CPU default, ~1e-9 on the test model; a packed row's rounding depends on the pack and on what its cache
    held, so neither float32 nor lower precision is bit-identical to the unpacked forward; see the module
    docstring for what the DP claim needs of it).

    At most ``max_cached`` prompts keep a cache (None: no bound): after every call the least recently asked are
    dropped, never one asked by the call, so at least the prompts in flight stay. Every private example is one
    prompt and the groups are drawn afresh at every token, so any prompt may be asked again; a dropped one is fed
    its whole prompt when it is, which costs tokens, not output. ``peak_cached`` is the most prompts held at once.

    ``donors`` maps a key to another key whose prompt starts like it (a public template: ``BOS Label: y\nText:``):
    a prompt with no cache of those tokens starts from the donor's cache of them, if held, and reads only the rest.
    """

    def __init__(self, model: PreTrainedModel, prefixes: dict[Hashable, list[int]],
                 max_cached: int | None = None, donors: dict[Hashable, Hashable] | None = None) -> None:
        self.model, self.prefixes, self.max_cached, self.donors = model, prefixes, max_cached, donors or {}
        self.cache_arg = cache_argument(model)
        # key -> tokens, keys, values; least recently asked first
        self._fed: dict[Hashable, tuple[list[int], torch.Tensor, torch.Tensor]] = {}
        self.tokens_read = 0
        self.peak_cached = 0

    @property
    def cached(self) -> int:
        """Prompts holding a KV cache now."""
        return len(self._fed)

    def _evict(self, keep: set[Hashable], incoming: int) -> None:
        """Drop the least recently asked caches not in ``keep`` until ``incoming`` new ones fit in ``max_cached``."""
        if self.max_cached is None:
            return
        excess = len(self._fed) + incoming - self.max_cached
        for key in [k for k in self._fed if k not in keep][:max(excess, 0)]:
            del self._fed[key]

    @torch.no_grad()
    def probs(self, asks: Sequence[tuple[Hashable, Sequence[int]]]) -> torch.Tensor:
        """(len(asks), vocab) float64 distributions on the CPU, one per (key, tokens written) pair."""
        unique = list(dict.fromkeys((key, tuple(out)) for key, out in asks))
        if len({key for key, _ in unique}) < len(unique):
            raise ValueError("one call may ask each prompt for one continuation only (its cache follows one)")
        rows = []  # (key, tokens, tokens held in its cache, their keys and values)
        for key, out in unique:
            tokens = self.prefixes[key] + list(out)
            fed, keys, values = self._fed.get(key, ([], None, None))
            held = min(common_prefix(fed, tokens), len(tokens) - 1)  # at least one token runs: its logits answer
            donor = self._fed.get(self.donors.get(key), ([], None, None))
            if (lent := min(common_prefix(donor[0], tokens), len(tokens) - 1)) > held:
                held, keys, values = lent, donor[1], donor[2]
            rows.append((key, tokens, held, keys[:, :, :held] if held else None,
                         values[:, :, :held] if held else None))
        asked = {key for key, _ in unique}
        self._evict(asked, sum(key not in self._fed for key in asked))  # before the forward: peak stays bounded
        past_k = [keys for *_, held, keys, _ in rows if held]
        past_v = [values for *_, held, _, values in rows if held]
        feeds = [tokens[held:] for _, tokens, held, *_ in rows]
        width_past, width_new = sum(held for _, _, held, *_ in rows), sum(map(len, feeds))
        device, dtype = self.model.device, self.model.dtype
        visible = torch.zeros(width_new, width_past + width_new, dtype=torch.bool, device=device)
        positions, last, at_past, at_new = [], [], 0, 0
        for (_, _, held, *_), feed in zip(rows, feeds):
            n = len(feed)
            visible[at_new:at_new + n, at_past:at_past + held] = True
            visible[at_new:at_new + n, width_past + at_new:width_past + at_new + n] = torch.ones(
                n, n, dtype=torch.bool, device=device).tril()
            positions += range(held, held + n)
            last.append(at_new + n - 1)
            at_past, at_new = at_past + held, at_new + n
        cache = PastCache(torch.cat(past_k, 2) if past_k else None, torch.cat(past_v, 2) if past_v else None)
        mask = additive_mask(visible, dtype)
        logits = self.model(input_ids=torch.tensor([[t for f in feeds for t in f]], device=device),
                            attention_mask=mask[None, None], position_ids=torch.tensor([positions], device=device),
                            logits_to_keep=torch.tensor(last, device=device), use_cache=True,
                            **{self.cache_arg: cache}).logits[0]
        new_k, new_v = torch.stack(cache.new_keys, 0)[:, 0], torch.stack(cache.new_values, 0)[:, 0]
        at_new = 0
        for (key, tokens, held, keys, values), feed in zip(rows, feeds):
            self._fed.pop(key, None)  # re-inserted last: the most recently asked
            span = slice(at_new, at_new + len(feed))
            # copies, not views: a view of new_k would keep the whole call's keys alive
            keys = new_k[:, :, span].clone() if not held else torch.cat([keys, new_k[:, :, span]], 2)
            values = new_v[:, :, span].clone() if not held else torch.cat([values, new_v[:, :, span]], 2)
            self._fed[key] = (tokens, keys, values)
            at_new += len(feed)
        self.peak_cached = max(self.peak_cached, len(self._fed))
        self.tokens_read += width_new
        probs = logits.double().softmax(-1).cpu()
        return probs[[unique.index((key, tuple(out))) for key, out in asks]]

    def reset(self) -> None:
        """Back to the prefixes alone (the next demonstration's tokens differ): each cache keeps its prefix only."""
        for key, (tokens, keys, values) in self._fed.items():
            keep = min(len(self.prefixes[key]), len(tokens))
            if keep < len(tokens):  # copies, so that the written tokens' keys and values are freed
                self._fed[key] = (tokens[:keep], keys[:, :, :keep].clone(), values[:, :, :keep].clone())


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class _Writer:
    """One demonstration being written for one label, one noisy token at a time."""

    label: int
    demos: list[list[int]]  # the label's private examples, tokenised as demonstrations
    query: list[int]
    sample_rate: float
    out: list[int] = field(default_factory=list)
    text: str = ""
    queries: int = 0  # noisy queries run (a function of the released text)
    done: bool = False

    def take(self, token: int, tok: PreTrainedTokenizerBase, cfg: DPFewShotConfig, stop_ids: set[int]) -> None:
        if token in stop_ids:
            self.text, self.queries, self.done = self.text.strip(), len(self.out) + 1, True
            return
        self.out.append(token)
        self.text = tok.decode(self.out, skip_special_tokens=True)
        if cfg.stop and cfg.stop in self.text:
            self.text, self.done = self.text[:self.text.index(cfg.stop)].strip(), True
        elif len(self.out) >= cfg.max_tokens:
            self.text, self.done = self.text.strip(), True
        self.queries = len(self.out)


def _write_together(writers: list[_Writer], model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                    cfg: DPFewShotConfig, rng: torch.Generator, prompts: PackedPrompts | None,
                    on_done: Callable[[], None] = lambda: None) -> int:
    """Write one demonstration per writer (one per label), all in step: per token, every unfinished writer draws its
    groups, one forward answers the M + 1 prompts of all of them, then each adds noise to its own and takes a token.
    Each demonstration is one run of the mechanism, with fresh draws, exactly as if written alone. Returns the
    private prompt tokens read.

    With ``prompts`` (one shot per group: every group's prompt is one demonstration's prefix + the tokens written)
    the distributions come from their KV caches; otherwise every token reads the M + 1 whole prompts again."""
    bos = tok("")["input_ids"]  # the special tokens the tokenizer puts before any text
    stop_ids = {tok.eos_token_id, tok.pad_token_id} - {None}
    read, width = 0, cfg.num_groups + 1
    while active := [w for w in writers if not w.done]:
        groups = [_draw_groups(len(w.demos), w.sample_rate, cfg.num_groups, cfg.shots_per_group, rng) for w in active]
        if prompts is not None:  # key (label, -1): the data-free prompt; an empty group's prompt is that one too
            before = prompts.tokens_read
            probs = prompts.probs([((w.label, key), w.out) for w, g in zip(active, groups)
                                   for key in [-1, *(m[0] if m else -1 for m in g)]])
            read += prompts.tokens_read - before
        else:  # row 0 of each writer: the data-free prompt, for the public top-k
            rows = []
            for w, g in zip(active, groups):
                rows += [bos + w.query + w.out, *(bos + [t for i in m for t in w.demos[i]] + w.query + w.out for m in g)]
            probs = _next_token_probs(model, rows, tok.pad_token_id)
            read += sum(map(len, rows))
        for n, writer in enumerate(active):
            writer.take(_noisy_token(probs[n * width:(n + 1) * width], cfg, rng), tok, cfg, stop_ids)
            if writer.done:
                on_done()
    return read


def _noisy_token(probs: torch.Tensor, cfg: DPFewShotConfig, rng: torch.Generator) -> int:
    """Row 0: the data-free prompt's distribution (public: it picks the top-k vocabulary); rows 1..M: the groups'."""
    private = probs[1:]
    if not cfg.public_top_k:
        return noisy_argmax(private, cfg.sigma, rng)
    allowed = probs[0].topk(min(cfg.public_top_k, probs.shape[1])).indices
    # renormalised: still probability vectors, so the sensitivity stays √2/M
    private = private[:, allowed] / private[:, allowed].sum(1, keepdim=True)
    return int(allowed[noisy_argmax(private, cfg.sigma, rng)])


def _float32(model: PreTrainedModel) -> PreTrainedModel:
    """``model``, or a float32 copy of it when its weights are lower precision (bfloat16 on a GPU): the sensitivity
    argument needs each group's distribution to depend on its own prompt only, which a batched bfloat16 forward
    misses by up to ~1e-2 relative (float32: by its rounding). The shared model is not touched; the copy (twice the
    bfloat16 weights' memory) lives for the synthesis only."""
    if getattr(model, "dtype", torch.float32) in (torch.float32, torch.float64):
        return model
    return copy.deepcopy(model).float()


def dp_fewshot_synthesize(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                          label_ids: Sequence[int], label_names: Sequence[str], cfg: DPFewShotConfig,
                          ledger: PrivacyLedger,
                          prompt_template: str = DEFAULT_PROMPT_TEMPLATE) -> SynthesisResult:
    """Write ``cfg.num_per_label`` DP demonstrations for every label; return them with their cost.

    The ledger is charged before any generation, per label, the worst case of (σ, q_y, num_per_label·T_max):
    stopping early is post-processing of the full T_max-token mechanism, so this is exactly what the output
    costs, whereas charging the data-dependent number of tokens actually written would not be a valid bound.
    Every label of the public label set is prompted (also one the silo lacks, whose prompts then hold no
    private data), so the output does not reveal which labels the silo holds. A lower-precision model runs as a
    float32 copy (``_float32``); with one shot per group, at most ``cfg.kv_cache_prompts`` prompts keep a KV cache.
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
    bos = tok("")["input_ids"]
    demos = [[tok(prompt_template.format(label=name, text=" ".join(t.split())[:cfg.max_text_chars]),
                  add_special_tokens=False)["input_ids"] for t in private] for name, private in zip(label_names, by_label)]
    queries = [tok(head.format(label=name), add_special_tokens=False)["input_ids"] for name in label_names]
    model = _float32(model)
    prompts = None
    if cfg.shots_per_group == 1 and cfg.kv_cache and supports_engine(model):  # packing needs the 4-D block mask
        in_flight = len(label_names) * (cfg.num_groups + 1)  # the prompts one token asks
        prompts = PackedPrompts(model, {(y, i): bos + d + queries[y] for y in range(len(label_names))
                                        for i, d in [(-1, []), *enumerate(demos[y])]},
                                max_cached=max(cfg.kv_cache_prompts or DEFAULT_CACHED_PROMPTS, in_flight),
                                # the data-free prompt (asked at every token) lends its template's keys and values
                                donors={(y, i): (y, -1) for y in range(len(label_names)) for i in range(len(demos[y]))})
    written: list[_Writer] = []
    prompt_tokens = 0
    t0 = time.perf_counter()
    with tqdm(total=len(label_names) * cfg.num_per_label, desc="DP few-shot", unit="demo") as bar:
        for _ in range(cfg.num_per_label):  # one demonstration of every label at a time, written together
            writers = [_Writer(y, demos[y], queries[y], event.sample_rate) for y, event in enumerate(events)]
            prompt_tokens += _write_together(writers, model, tok, cfg, rng, prompts, on_done=bar.update)
            if prompts is not None:
                prompts.reset()
            written += writers
    written.sort(key=lambda w: w.label)  # label by label, as the server reads them
    examples = [(w.text, w.label) for w in written if len(w.text.split()) >= max(cfg.min_words, 1)]
    generated = sum(w.queries for w in written)
    return SynthesisResult(
        examples=examples, mechanism=cfg.mechanism, epsilon=compute_epsilon(events, ledger.delta),
        epsilon_total=ledger.spent(), delta=ledger.delta, steps=sum(e.steps for e in events),
        noise_multiplier=cfg.sigma, events=events, seconds={"generate": time.perf_counter() - t0},
        tokens={"generated": generated}, local={"private-prompt-tokens": prompt_tokens})
