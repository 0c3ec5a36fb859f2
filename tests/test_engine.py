"""fedbridge's decoder against HF ``generate``: the same greedy tokens, whatever the batching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tqdm.auto import tqdm

from fedbridge.models.engine import Decoder, SlotCache, supports_engine
from fedbridge.models.generation import (
    SamplingConfig,
    _hf_generate,
    continuation_logprobs,
    generate,
    next_token_logprobs,
    prompt_ids,
)
from fedbridge.models.loading import tiny_llm

PROMPTS = ["Label: positive\nText:", "a", "The quick brown fox jumps over the lazy dog, and then", "x y z " * 12,
           "Once upon a time", "1 2 3 4", "hello world", "Label: negative\nText: I did not like", "?", "end"]


@pytest.fixture(scope="module")
def llm():
    model, tok = tiny_llm(seed=3)
    with torch.no_grad():  # sharper logits than a random init's near-ties, so argmax is decided well above float noise
        model.lm_head.weight.mul_(20)
    return model, tok


def _both(llm, **sampling):
    model, tok = llm
    cfg = SamplingConfig(temperature=0, **sampling)
    ours, our_stats = generate(model, tok, PROMPTS, cfg)
    theirs, their_stats = generate(model, tok, PROMPTS, dataclasses.replace(cfg, engine="hf"))
    return ours, theirs, our_stats, their_stats


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_tokens_equal_hf_generate_at_any_batch_size(llm, batch_size):
    """3 slots for 10 prompts: rows finish at different steps and are refilled (continuous batching); 16 slots:
    every prompt at once and the batch shrinks as rows end."""
    ours, theirs, our_stats, their_stats = _both(llm, max_new_tokens=24, batch_size=batch_size)
    assert ours == theirs
    assert our_stats.prompt_tokens == their_stats.prompt_tokens and our_stats.generated_tokens > 0


def test_a_shared_prompt_prefix_runs_once_and_gives_the_same_tokens(llm):
    """Prompts that start alike (a chat template, an instruction): the shared tokens run once, batch 1, and are
    copied into every row; the greedy tokens still equal HF's."""
    model, tok = llm
    prompts = [[{"role": "user", "content": f"Write a review like this one, please.\nReview: {p}"}] for p in PROMPTS]
    fed = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: fed.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    cfg = SamplingConfig(temperature=0, max_new_tokens=12, batch_size=4)
    try:
        ours, _ = generate(model, tok, prompts, cfg)
    finally:
        hook.remove()
    assert fed[0][0] == 1 and fed[0][1] > 40  # the template and the instruction, once
    longest = max(len(prompt_ids(tok, p)) for p in prompts)
    assert all(width <= longest - fed[0][1] for _, width in fed[1:])  # then only what follows it, and steps
    assert ours == generate(model, tok, prompts, dataclasses.replace(cfg, engine="hf"))[0]


def test_greedy_tokens_equal_hf_generate_with_stop_strings_and_eos(llm):
    model, tok = llm
    ours, theirs, _, _ = _both(llm, max_new_tokens=40, batch_size=4, stop=("e",))
    assert ours == theirs and any(ours) and all("e" not in text for text in ours)
    eos_bias = model.lm_head.weight.new_zeros(model.lm_head.weight.shape[0])
    eos_bias[tok.eos_token_id] = 4.0  # some rows now end at EOS, at different steps
    model.lm_head.bias = torch.nn.Parameter(eos_bias)
    try:
        ours, theirs, ours_stats, theirs_stats = _both(llm, max_new_tokens=40, batch_size=4)
        assert ours == theirs and ours_stats.generated_tokens == theirs_stats.generated_tokens
    finally:
        model.lm_head.bias = None


def test_the_cache_is_compacted_when_its_columns_run_out(llm):
    """Many more prompts than slots: the shared write column reaches the end of the cache several times; rows keep
    their own columns through every compaction, so the tokens still equal HF's."""
    model, tok = llm
    prompts = [f"{i} " * (1 + i % 7) for i in range(40)]
    cfg = SamplingConfig(temperature=0, max_new_tokens=12, batch_size=4)
    ids = [tok(p)["input_ids"] for p in prompts]
    decoder = Decoder(model, 4, 12, {tok.eos_token_id}, tok.pad_token_id, lambda logits: logits.argmax(-1))
    rows = decoder.run(ids)
    assert decoder.steps > 2 * decoder.capacity  # the columns ran out more than twice
    ours = [tok.decode(r, skip_special_tokens=True).strip() for r in rows]
    assert ours == generate(model, tok, prompts, dataclasses.replace(cfg, engine="hf"))[0]


def test_rows_ended_by_a_done_check_at_different_steps_give_hfs_tokens(llm):
    """``done`` (a stop string's check, on the host) ends rows at different steps; the slots refill and the batch
    shrinks: every row is a prefix of HF's tokens, ended where ``done`` first holds."""
    model, tok = llm
    prompts = [f"{i} " * (1 + i % 7) for i in range(12)]
    ids = [tok(p)["input_ids"] for p in prompts]
    ends = lambda tokens: len(tokens) >= 3 and tokens[-1] % 3 == 0  # noqa: E731
    decoder = Decoder(model, 4, 20, {tok.eos_token_id}, tok.pad_token_id, lambda logits: logits.argmax(-1),
                      done=ends)
    rows = decoder.run(ids)
    cfg = SamplingConfig(temperature=0, max_new_tokens=20, batch_size=4)
    theirs = _hf_generate(model, tok, ids, cfg, torch.Generator(), tqdm(disable=True))
    for r, t in zip(rows, theirs):
        n = next((j + 1 for j in range(len(t)) if t[j] == tok.eos_token_id or ends(t[:j + 1])), len(t))
        assert r == t[:n]
    assert len({len(r) for r in rows}) > 1


def test_the_decoder_runs_in_inference_mode_and_draws_like_multinomial(llm):
    """The sampler's exponential race draws exactly what ``torch.multinomial`` draws from the same generator (the
    seeded outputs of the code before it are kept), and the decoder's forwards run under ``inference_mode``."""
    from fedbridge.models.generation import draw

    for seed in range(20):
        torch.manual_seed(seed)
        probs = torch.rand(16, 1024) ** 8 * (torch.rand(16, 1024) < 0.3)
        probs[:, 0] += 1e-3
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(3):
            assert torch.equal(draw(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
    model, tok = llm
    modes = []
    hook = model.register_forward_pre_hook(lambda *_: modes.append(torch.is_inference_mode_enabled()))
    try:
        Decoder(model, 2, 3, {tok.eos_token_id}, tok.pad_token_id, lambda logits: logits.argmax(-1)).run([[1, 2], [3]])
    finally:
        hook.remove()
    assert modes and all(modes)


# sha256 of the JSON of the texts, recorded with the decoder before its step was vectorised (per-row Python,
# ``torch.multinomial``): the seeded samples FDKT, CrossLM and PE's records were made with
PINNED = {"b3": "2396435c63ea3d3c", "b16_p": "4e2347c4fc6f7429", "b4_stop": "53d41697af90e1ac"}


def test_seeded_samples_are_the_ones_recorded_before(llm):
    import hashlib
    import json

    model, tok = llm
    configs = {"b3": SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=16, batch_size=3),
               "b16_p": SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=20, batch_size=16),
               "b4_stop": SamplingConfig(temperature=1.2, top_p=0.95, max_new_tokens=20, batch_size=4, stop=("e",))}
    for name, cfg in configs.items():
        texts = generate(model, tok, PROMPTS, cfg, seed=5)[0]
        assert hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16] == PINNED[name], name


def test_sampled_generation_is_seeded(llm):
    model, tok = llm
    cfg = SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=16, batch_size=3)
    first = generate(model, tok, PROMPTS, cfg, seed=5)[0]
    assert first == generate(model, tok, PROMPTS, cfg, seed=5)[0]
    assert first != generate(model, tok, PROMPTS, cfg, seed=6)[0]


def test_slot_cache_writes_prefill_to_its_slots_only():
    cache = SlotCache(slots=3, capacity=8)
    cache.column = torch.tensor([0])
    cache.update(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4), 0)  # allocates
    cache.fill = (torch.tensor([1]), slice(4, 6))
    keys, _ = cache.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), 0)
    assert keys.shape == (1, 2, 2, 4)  # a prefill attends to its own tokens only
    assert cache.keys[0][1, :, 4:6].eq(1).all() and cache.keys[0].sum() == 16
    cache.shift_left(4)  # columns 4.. move to 0..; what stays behind at the end is masked out by the decoder
    assert cache.keys[0][1, :, 0:2].eq(1).all() and cache.keys[0][:, :, :4].sum() == 16


def test_unsupported_models_and_unknown_engines(llm):
    model, tok = llm
    assert supports_engine(model)
    model.config.sliding_window = 4
    try:
        assert not supports_engine(model)
        ours = generate(model, tok, PROMPTS[:3], SamplingConfig(temperature=0, max_new_tokens=4))[0]
        assert ours == generate(model, tok, PROMPTS[:3], SamplingConfig(temperature=0, max_new_tokens=4,
                                                                         engine="hf"))[0]
    finally:
        model.config.sliding_window = None
    with pytest.raises(ValueError, match="Unknown generation engine 'vllm'"):
        generate(model, tok, PROMPTS, SamplingConfig(engine="vllm"))


def test_batched_scorers_equal_one_unpadded_forward_per_pair(llm):
    """Sorted by length, left-padded, projected on the vocabulary only where a continuation token is scored: the
    same log-probabilities as scoring each pair alone."""
    model, tok = llm
    prompts, continuations = PROMPTS, [" yes", " no way", "!", " a much longer continuation here", " ok"] * 2
    scored = continuation_logprobs(model, tok, prompts, continuations, batch_size=3)
    nexts = next_token_logprobs(model, tok, prompts, [5, 17, 40], batch_size=4)
    for (total, n), prompt, cont, row in zip(scored, prompts, continuations, nexts):
        p_ids, c_ids = prompt_ids(tok, prompt), tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].float(), -1)
        alone = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids))
        assert n == len(c_ids) and total == pytest.approx(alone, abs=1e-3)
        assert row == pytest.approx(logp[len(p_ids) - 1, [5, 17, 40]].numpy(), abs=1e-3)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.8, 0, 0.9), (1.0, 20, 0.95), (1.3, 50, 1.0), (0.7, 0, 1.0),
                                                      (2.0, 0, 0.999)])
def test_sampling_candidates_are_hfs_warped_distribution(temperature, top_k, top_p):
    """The sampler's support and probabilities equal HF's temperature / top-k / top-p warpers' (a flat temperature-2
    row puts its 0.999 nucleus far beyond the first 1,024 candidates: the whole-vocabulary path)."""
    from fedbridge.models.generation import SeededSampler, candidates

    torch.manual_seed(0)
    logits = torch.randn(6, 5000) * torch.tensor([[0.5], [1], [2], [4], [8], [16]])
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    theirs = torch.softmax(SeededSampler(cfg, torch.Generator()).warpers(None, logits.clone()), dim=-1)
    ids, probs = candidates(logits, cfg)
    ours = torch.zeros_like(logits).scatter_(1, ids, probs)
    ours /= ours.sum(-1, keepdim=True)
    boundary = (ours > 0) != (theirs > 0)  # HF sums the nucleus from its tail, we from its head: float rounding
    assert boundary.sum(-1).max() <= 1 and float(torch.maximum(ours, theirs)[boundary].sum()) < 1e-3
    same = ~boundary.any(-1)  # may move one token across the cut of a 0.999 nucleus of ~5,000; no more
    assert same.sum() >= 5 and torch.allclose(ours[same], theirs[same], atol=1e-6)
    assert torch.allclose(ours, theirs, atol=1e-3)
