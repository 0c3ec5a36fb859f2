"""The one batched generation engine every method calls, and the one likelihood scorer.

``generate`` runs fedbridge's decoder (``engine.py``: continuous batching over a preallocated KV cache, eager PyTorch,
measured on CPUs only) and keeps HF ``generate`` as the reference. On a GPU the server LLM's engine is vLLM
(``models/llm.py``, ``llm.engine=auto``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fedbridge.models.engine import (  # noqa: F401 (common_prefix_length: re-exported)
    Decoder,
    additive_mask,
    cache_argument,
    common_prefix_length,
    left_padded,
    supports_engine,
)

ENGINES = ("fedbridge", "hf")
Prompt = str | list[dict[str, str]]  # plain text, or chat messages [{"role": ..., "content": ...}]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = 16  # rows decoded together
    max_prompt_tokens: int = 1024  # longer prompts are cut from the left
    engine: str = "fedbridge"  # fedbridge (engine.Decoder) | hf (transformers' generate, the reference)


@dataclass
class GenerationStats:
    """Token and time accounting; stats from several calls add up with ``+=``."""

    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def __iadd__(self, other: GenerationStats) -> GenerationStats:
        self.prompts += other.prompts
        self.prompt_tokens += other.prompt_tokens
        self.generated_tokens += other.generated_tokens
        self.seconds += other.seconds
        return self

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"prompts": self.prompts, "prompt_tokens": self.prompt_tokens,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 3)}


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """Chat messages go through the model's chat template; a model without one gets the contents joined."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in prompt) + "\n"


def _left_padded(ids: list[list[int]], pad: int, device: torch.device) -> dict[str, torch.Tensor]:
    input_ids, real = left_padded(ids, pad, device)
    return {"input_ids": input_ids, "attention_mask": real.long()}


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class SeededSampler(LogitsProcessor):
    """Temperature, top-k and top-p sampling of the next token from a private ``torch.Generator``; returns scores
    that are -inf except at the sampled token, so greedy decoding takes it."""

    def __init__(self, sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.generator = generator
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
        if sampling.top_k:
            self.warpers.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(self.warpers(input_ids, scores).float(), dim=-1)
        choice = draw(probs, self.generator)
        return torch.full_like(scores, -math.inf).scatter_(1, choice[:, None], 0.0)


def draw(probs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """One index per row of (rows, n) unnormalised probabilities: the exponential race ``argmax(p / E)``, E ~ Exp(1)
    drawn from ``rng``. Exactly what ``torch.multinomial(probs, 1, generator=rng)`` computes and draws (its one-sample
    path; tested equal), without its host-side validity checks, which wait for the device at every call."""
    return (probs / torch.empty_like(probs).exponential_(1, generator=rng)).argmax(-1)


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
             sampling: SamplingConfig = SamplingConfig(), seed: int | None = None,
             progress: str | None = None) -> tuple[list[str], GenerationStats]:
    """Generate one continuation per prompt, ``sampling.batch_size`` rows at a time.

    Returns the texts (cut at the first stop string, special tokens removed) and the token/time counts.
    ``generated_tokens`` counts tokens up to and including the end-of-sequence or stop point of each row.
    fedbridge's decoder (``engine.Decoder``: continuous batching over a preallocated KV cache) runs every model it
    supports; ``sampling.engine="hf"``, or a model it does not support, uses HF ``generate`` (same greedy tokens).
    """
    if sampling.engine not in ENGINES:
        raise ValueError(f"Unknown generation engine '{sampling.engine}': use one of {', '.join(ENGINES)}.")
    rng = torch.Generator(device=model.device)
    rng.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    ids = [prompt_ids(tokenizer, p)[-sampling.max_prompt_tokens:] for p in prompts]
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc=progress, disable=progress is None, unit="prompt") as bar:
        if sampling.engine == "fedbridge" and supports_engine(model):
            rows = _decode(model, tokenizer, ids, sampling, rng, bar)
        else:
            rows = _hf_generate(model, tokenizer, ids, sampling, rng, bar)
    outputs, generated = finish_rows(tokenizer, rows, sampling.stop)
    return outputs, GenerationStats(prompts=len(ids), prompt_tokens=sum(map(len, ids)), generated_tokens=generated,
                                    seconds=time.perf_counter() - t0)


def finish_rows(tokenizer: PreTrainedTokenizerBase, rows: Sequence[Sequence[int]],
                stop: Sequence[str]) -> tuple[list[str], int]:
    """Generated token rows as texts (up to the first end-of-sequence token, cut at the first stop string, special
    tokens removed, stripped), and the tokens they count up to and including each row's end: every backend's output
    goes through here."""
    eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    outputs, generated = [], 0
    for row in rows:
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        text, _ = _cut_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True), stop)
        outputs.append(text.strip())
        generated += n
    return outputs, generated


def _chooser(sampling: SamplingConfig, rng: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next tokens from (rows, vocab) logits: the argmax, or a sample drawn with ``rng`` from ``candidates``."""
    if sampling.temperature <= 0:
        return lambda logits: logits.argmax(-1)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        ids, probs = candidates(logits, sampling)
        return ids.gather(-1, draw(probs, rng)[:, None])[:, 0]
    return sample


NUCLEUS_CANDIDATES = 1024  # top-p looks at this many best tokens first; rows whose nucleus is wider sort everything


def candidates(logits: torch.Tensor, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens a sample may take and their (unnormalised) probabilities, per row: HF's temperature, top-k and
    top-p warpers' distribution (tested equal), without sorting the whole vocabulary at every step, which on a CPU
    cost more than the 135M model's forward pass (~180 ms a step at batch 16)."""
    scores = logits.float() / sampling.temperature
    vocab = scores.shape[-1]
    if not sampling.top_k and sampling.top_p >= 1.0:
        return torch.arange(vocab, device=scores.device).expand_as(scores), scores.softmax(-1)
    k = min(sampling.top_k or NUCLEUS_CANDIDATES, vocab)
    top, ids = scores.topk(k, dim=-1)  # sorted, best first
    norm = (top if sampling.top_k else scores).logsumexp(-1, keepdim=True)  # top-k renormalises before top-p
    probs = (top - norm).exp()
    if sampling.top_p < 1.0:
        if not sampling.top_k and k < vocab and bool((probs.sum(-1) < sampling.top_p).any()):
            return candidates(logits, replace(sampling, top_k=vocab))  # a nucleus wider than k: sort it all
        probs = probs * ((probs.cumsum(-1) - probs) < sampling.top_p)  # keep while the mass above is < top_p
    return ids, probs


def _decode(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[list[int]],
            sampling: SamplingConfig, rng: torch.Generator, bar: tqdm) -> list[list[int]]:
    tail = max(map(len, sampling.stop), default=0) + 1  # tokens whose text can hold a stop string just completed
    done = (lambda tokens: any(s in tokenizer.decode(tokens[-tail:]) for s in sampling.stop)) if sampling.stop \
        else None
    decoder = Decoder(model, sampling.batch_size, sampling.max_new_tokens, {tokenizer.eos_token_id},
                      tokenizer.pad_token_id, _chooser(sampling, rng), done)
    return decoder.run(ids, on_finish=lambda _: bar.update())


def _hf_generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[list[int]],
                 sampling: SamplingConfig, rng: torch.Generator, bar: tqdm) -> list[list[int]]:
    """HF ``generate`` over left-padded batches: the reference the decoder is tested against."""
    rows = []
    # sampling is done by SeededSampler and handed to greedy decoding: transformers would draw from torch's
    # global RNG, which other threads (silos training in process) draw from too, and a seed would mean nothing
    kwargs = dict(do_sample=False, max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
    if sampling.temperature > 0:
        kwargs["logits_processor"] = LogitsProcessorList([SeededSampler(sampling, rng)])
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    for start in range(0, len(ids), sampling.batch_size):
        batch = _left_padded(ids[start:start + sampling.batch_size], tokenizer.pad_token_id, model.device)
        rows += model.generate(**batch, **kwargs)[:, batch["input_ids"].shape[1]:].tolist()
        bar.update(len(batch["input_ids"]))
    return rows


@torch.no_grad()
def continuation_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                          continuations: Sequence[str], batch_size: int = 8,
                          max_tokens: int = 1024) -> list[tuple[float, int]]:
    """Sum of log p(continuation | prompt) and its token count, for each pair.

    The shared primitive of label scoring, perplexity, canary ranking and voting. Prompts longer than
    ``max_tokens`` lose tokens from the left; the continuation is always scored whole. Pairs are batched by length
    (least padding), left-padded so every continuation ends at the last column, and the vocabulary projection runs
    only on the columns that score a continuation token.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    rows = []
    for prompt, cont in zip(prompts, continuations):
        c_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
        if not c_ids:
            raise ValueError(f"continuation {cont!r} has no tokens")
        p_ids = prompt_ids(tokenizer, prompt)[-max(1, max_tokens - len(c_ids)):] or [tokenizer.bos_token_id
                                                                                      or tokenizer.pad_token_id]
        rows.append((p_ids, c_ids))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = _left_padded([rows[i][0] + rows[i][1] for i in chunk], tokenizer.pad_token_id, model.device)
        keep = max(len(rows[i][1]) for i in chunk) + 1  # the columns predicting the longest continuation
        logits = model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=keep).logits.float()
        for n, i in enumerate(chunk):
            c_ids = rows[i][1]
            scored = logits[n, -1 - len(c_ids):-1]  # from the end: the last columns predict the continuation
            logprobs = scored.gather(-1, torch.tensor(c_ids, device=model.device)[:, None])[:, 0] \
                - torch.logsumexp(scored, dim=-1)
            results[i] = (float(logprobs.sum()), len(c_ids))
    return results


@torch.no_grad()
def next_token_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt],
                        token_ids: Sequence[int], batch_size: int = 8, max_tokens: int = 1024) -> np.ndarray:
    """log p(token | prompt) for each prompt and each of ``token_ids``: one forward pass per prompt, projected on
    the vocabulary at its last column only.

    The same numbers as ``continuation_logprobs`` for one-token continuations, at a fraction of the cost.
    """
    rows = [prompt_ids(tokenizer, prompt)[-max(1, max_tokens - 1):] for prompt in prompts]
    out = np.zeros((len(rows), len(token_ids)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = _left_padded([rows[i] for i in chunk], tokenizer.pad_token_id, model.device)
        last = model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0),
                     logits_to_keep=1).logits[:, -1].float()
        out[chunk] = torch.log_softmax(last, dim=-1)[:, list(token_ids)].cpu().numpy()
    return out


# ---------------------------------------------------------------- one long prompt, many continuations


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of a prompt as the scorers above read it (the BOS token added unless the template wrote it)."""
    text = render_prompt(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=not text.startswith(tokenizer.bos_token or "\0"))["input_ids"]


@torch.no_grad()
def prefix_cached_logprobs(model: PreTrainedModel, prefix: Sequence[int], rows: Sequence[Sequence[int]],
                           next_ids: Sequence[int] = (), next_after: Sequence[int] | None = None,
                           pack_tokens: int = 512) -> tuple[list[np.ndarray], np.ndarray]:
    """Score token rows that all follow one prefix: the prefix runs once, and its KV cache serves every row.

    Returns, per row, log p(row[j] | prefix + row[:j]) for each of its tokens, and a (len(rows), len(next_ids))
    array of log p(t | prefix + row[:m]) for t in ``next_ids``, with m = ``next_after[i]`` (default: the whole
    row). Exactly what a full forward pass of prefix + row gives, at the cost of the rows alone (a few-shot
    context of ~1,000 tokens and rows of ~50: ~20x less).

    Rows are packed, up to ``pack_tokens`` tokens per pass, into one sequence after the cached prefix, with a
    block-diagonal causal mask (each row sees the prefix and its own earlier tokens) and positions restarting at
    the prefix's end: the cache is never copied per row, which for long prefixes costs more than the rows.
    """
    if not prefix:
        raise ValueError("prefix_cached_logprobs needs a non-empty prefix")
    device = model.device
    out = model(input_ids=torch.tensor([list(prefix)], device=device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    after = [len(r) for r in rows] if next_after is None else list(next_after)
    own: list[np.ndarray] = [np.zeros(0)] * len(rows)
    nxt = np.zeros((len(rows), len(next_ids)))
    chunks, chunk, size = [], [], 0
    for i, row in enumerate(rows):
        if chunk and size + len(row) > pack_tokens:
            chunks.append(chunk)
            chunk, size = [], 0
        if row:
            chunk.append(i)
            size += len(row)
        elif after[i] == 0:  # an empty row: the prefix's own last position answers
            nxt[i] = first[list(next_ids)].cpu().numpy()
    chunks += [chunk] if chunk else []
    for chunk in chunks:
        ids = [t for i in chunk for t in rows[i]]
        segment = torch.tensor([n for n, i in enumerate(chunk) for _ in rows[i]], device=device)
        offsets = np.cumsum([0] + [len(rows[i]) for i in chunk])
        step = torch.tensor([j for i in chunk for j in range(len(rows[i]))], device=device)
        same = (segment[:, None] == segment[None, :]) & (step[None, :] <= step[:, None])
        visible = torch.cat([torch.ones(len(ids), len(prefix), dtype=torch.bool, device=device), same], dim=1)
        mask = additive_mask(visible, model.dtype)
        logits = model(input_ids=torch.tensor([ids], device=device), attention_mask=mask[None, None],
                       position_ids=(len(prefix) + step)[None], **{cache_argument(model): copy.deepcopy(out.past_key_values)}
                       ).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for n, i in enumerate(chunk):
            row, at = rows[i], offsets[n]
            inner = logprobs[at + torch.arange(len(row) - 1, device=device),
                             torch.tensor(row[1:], dtype=torch.long, device=device)]
            own[i] = np.array([float(first[row[0]]), *inner.tolist()])
            m = after[i]
            nxt[i] = (logprobs[at + m - 1] if m else first)[list(next_ids)].cpu().numpy()
    return own, nxt


def continuation_logprobs_shared(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: Prompt,
                                 continuations: Sequence[str], max_tokens: int = 4096) -> list[tuple[float, int]]:
    """``continuation_logprobs`` for one prompt and many continuations (canary ranking, voting): the same
    numbers, with the prompt run once. A prompt longer than ``max_tokens`` minus the longest continuation loses
    tokens from the left."""
    cont_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    if empty := [c for c, ids in zip(continuations, cont_ids) if not ids]:
        raise ValueError(f"continuation {empty[0]!r} has no tokens")
    ids = prompt_ids(tokenizer, prompt)
    ids = ids[-max(1, max_tokens - max((len(c) for c in cont_ids), default=0)):] or [tokenizer.bos_token_id
                                                                                      or tokenizer.pad_token_id]
    # tokens every continuation starts with (a canary's template) are scored once and join the cached prefix
    shared = cont_ids[0][:common_prefix_length(cont_ids)] if len(cont_ids) > 1 else []
    head = prefix_cached_logprobs(model, ids, [shared])[0][0].sum() if shared else 0.0
    own, _ = prefix_cached_logprobs(model, ids + shared, [c[len(shared):] for c in cont_ids])
    return [(float(head + s.sum()), len(shared) + len(s)) for s in own]
