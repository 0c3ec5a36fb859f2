"""The LLM interface (``models/llm.py``): ``llm.engine`` resolution on the server and on silos, the fedbridge backend
giving exactly what the functions it wraps give, its exact path, and the interface over a trained model (CrossLM).
The vLLM backend's own tests need vLLM: ``tests/vllm_backend`` (``make test-vllm``). That no method reaches a model
except through the interface: ``tests/test_llm_routing.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedbridge.models.llm as llm_module
from fedbridge.config import LLMConfig
from fedbridge.errors import ConfigError
from fedbridge.models.generation import (
    SamplingConfig,
    continuation_logprobs,
    continuation_logprobs_shared,
    generate,
    next_token_logprobs,
)
from fedbridge.models.llm import (
    NEEDS_VLLM,
    VLLM,
    FedbridgeLLM,
    TrainedLLM,
    load_llm_interface,
    load_server_llm,
    load_silo_llm,
    resolve_engine,
    silo_engine,
)
from fedbridge.models.llm_classifier import label_probabilities, label_probabilities_by_likelihood
from fedbridge.models.loading import load_llm

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PROMPTS = ["hello there", [{"role": "user", "content": "write one review"}], "a"]


def test_auto_is_fedbridge_without_vllm_and_vllm_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(llm_module, "vllm_device_type", lambda: None)
    assert resolve_engine("auto", "embedded", CPU) == "fedbridge"
    with pytest.raises(ConfigError) as err:
        resolve_engine("vllm", "embedded", CPU)
    assert str(err.value) == NEEDS_VLLM + "."
    assert isinstance(load_server_llm(LLMConfig(model="tiny-llama"), CPU), FedbridgeLLM)


def test_auto_takes_vllm_only_for_its_device_and_a_model_with_files(monkeypatch):
    monkeypatch.setattr(llm_module, "vllm_device_type", lambda: "cpu")
    assert resolve_engine("auto", "embedded", CPU) == "vllm"
    assert resolve_engine("auto", "embedded", CUDA) == "fedbridge"
    assert resolve_engine("auto", "tiny-llama", CPU) == "fedbridge"
    assert resolve_engine("fedbridge", "embedded", CPU) == "fedbridge"
    with pytest.raises(ConfigError, match="runs on cpu"):
        resolve_engine("vllm", "embedded", CUDA)
    with pytest.raises(ConfigError, match="tiny-llama"):
        resolve_engine("vllm", "tiny-llama", CPU)
    made = []
    monkeypatch.setattr(llm_module, "VLLM", lambda *args, **kwargs: made.append((args, kwargs)) or "engine")
    assert load_server_llm(LLMConfig(engine="vllm", gpu_memory_fraction=0.3), CPU) == "engine"
    assert load_server_llm(LLMConfig(engine="vllm"), CPU, max_lora_rank=4) == "engine"
    assert made == [(("embedded", CPU, 0.3), {}), (("embedded", CPU, 0.5), {"max_lora_rank": 4})]


def test_a_silo_stays_on_the_exact_path_unless_llm_engine_says_vllm(monkeypatch):
    monkeypatch.setattr(llm_module, "vllm_device_type", lambda: "cpu")
    assert [silo_engine(e) for e in ("auto", "fedbridge", "vllm")] == ["fedbridge", "fedbridge", "vllm"]
    made = []
    monkeypatch.setattr(llm_module, "VLLM", lambda *args, **kwargs: made.append(args) or "engine")
    assert isinstance(load_silo_llm(LLMConfig(), "embedded", CPU), FedbridgeLLM)  # auto: vLLM installed, not used
    assert load_silo_llm(LLMConfig(engine="vllm", gpu_memory_fraction=0.2), "embedded", CPU) == "engine"
    assert made == [("embedded", CPU, 0.2)]
    assert isinstance(load_llm_interface("tiny-llama", CPU), FedbridgeLLM)  # a loader's default: fedbridge's


def test_the_config_refuses_an_unknown_engine_and_a_memory_share_outside_0_1():
    with pytest.raises(ConfigError, match="llm.engine='hf'"):
        LLMConfig(engine="hf")
    for share in (0.0, 1.5):
        with pytest.raises(ConfigError, match="llm.gpu-memory-fraction"):
            LLMConfig(gpu_memory_fraction=share)


@pytest.fixture
def tiny() -> FedbridgeLLM:
    llm = load_server_llm(LLMConfig(model="tiny-llama"), CPU)
    assert (llm.model, llm.tokenizer) == load_llm("tiny-llama")  # the shared frozen model, not a copy
    return llm


def test_the_fedbridge_backend_generates_exactly_what_generate_does(tiny):
    for sampling in (SamplingConfig(max_new_tokens=12, temperature=0.0, stop=("x",)),
                     SamplingConfig(max_new_tokens=12, temperature=0.9, top_p=0.9)):
        got, stats = tiny.generate(PROMPTS, sampling, seed=5)
        want, want_stats = generate(tiny.model, tiny.tokenizer, PROMPTS, sampling, seed=5)
        assert got == want and stats.generated_tokens == want_stats.generated_tokens


def test_top_logprobs_are_the_best_of_the_full_next_token_distribution(tiny):
    full = next_token_logprobs(tiny.model, tiny.tokenizer, PROMPTS, range(len(tiny.tokenizer)))
    for row, top in zip(full, tiny.top_logprobs(PROMPTS, 5)):
        assert list(top) == list(np.argsort(-row, kind="stable")[:5])
        np.testing.assert_allclose(list(top.values()), np.sort(row)[::-1][:5], rtol=1e-6)


def test_label_scores_from_pairs_equal_the_model_paths(tiny):
    """The vLLM backend's label probabilities (one scored pair per text and label) against the fedbridge paths
    (one-token labels in one pass, multi-token labels, a shared context from a KV cache), calibrated or not."""
    texts = ["good stuff", "bad stuff", "meh"]
    score = tiny.continuation_logprobs
    for labels in (("a", "b", "c"), ("yes", "no")):
        for options in ({}, {"calibrate": True}, {"context": "Example: fine. Answer: a"}):
            want = label_probabilities(tiny.model, tiny.tokenizer, texts, labels, "Rate it.", **options)
            got = label_probabilities_by_likelihood(score, texts, labels, "Rate it.", **options)
            np.testing.assert_allclose(got, want, atol=1e-5)
            np.testing.assert_array_equal(tiny.label_probabilities(texts, labels, "Rate it.", **options), want)


def test_generation_under_an_adapter_is_peft_s_and_leaves_the_shared_model_bare(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(load_llm("tiny-llama", trainable=True)[0], LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.0)
    got, _ = tiny.generate(PROMPTS, sampling, adapter=tmp_path)
    assert got == generate(peft_model, tiny.tokenizer, PROMPTS, sampling)[0]
    assert got != tiny.generate(PROMPTS, sampling)[0]
    assert not any("lora" in name for name, _ in tiny.model.named_parameters())


def test_the_shared_prompt_scorer_is_the_function_it_wraps(tiny):
    conts = ["abc", " a longer one", "x"]
    got = tiny.continuation_logprobs_shared("some prompt ", conts, max_tokens=64)
    assert got == continuation_logprobs_shared(tiny.model, tiny.tokenizer, "some prompt ", conts, max_tokens=64)
    want = continuation_logprobs(tiny.model, tiny.tokenizer, ["some prompt "] * 3, conts)
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], atol=1e-4)


def test_the_exact_path_is_the_shared_model_or_a_private_float32_copy(tiny):
    model, tok = tiny.exact()
    assert (model, tok) == load_llm("tiny-llama")
    private, private_tok = tiny.exact(trainable=True)
    want, _ = load_llm("tiny-llama", trainable=True)
    assert private is not model and private_tok is not tok and private.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(private.state_dict().values(), want.state_dict().values()))


class _Serving:
    """Stands in for a vLLM engine started with LoRA: records the adapter directory of every generation."""

    engine = "vllm"

    def __init__(self) -> None:
        self.adapters: list = []

    def generate(self, prompts, sampling=SamplingConfig(), seed=None, progress=None, adapter=None):
        assert (adapter / "adapter_config.json").is_file()
        self.adapters.append(adapter)
        return ["x"] * len(prompts), None


def test_a_trained_llm_answers_from_its_current_weights(tiny):
    """CrossLM's interface: on the fedbridge backend the trained peft model generates and scores exactly as the
    functions do; with a vLLM engine, generation runs under the adapter saved once per version."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny.exact(trainable=True)[0], LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    trained = TrainedLLM(peft_model, tiny.tokenizer)
    assert trained.engine == "fedbridge" and trained.exact() == (peft_model, tiny.tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.9)
    assert trained.generate(PROMPTS, sampling, seed=3)[0] == generate(peft_model, tiny.tokenizer, PROMPTS, sampling,
                                                                      seed=3)[0]
    assert trained.continuation_logprobs(PROMPTS, ["ab"] * 3) == continuation_logprobs(
        peft_model, tiny.tokenizer, PROMPTS, ["ab"] * 3)
    np.testing.assert_array_equal(trained.label_probabilities(["good"], ["a", "b"], "Rate it."),
                                  label_probabilities(peft_model, tiny.tokenizer, ["good"], ["a", "b"], "Rate it."))
    serving = _Serving()
    served = TrainedLLM(peft_model, tiny.tokenizer, serving)
    assert served.engine == "vllm"
    served.generate(PROMPTS[:1])
    served.generate(PROMPTS[:1])
    served.changed()  # an update
    served.generate(PROMPTS[:1])
    first, again, second = serving.adapters
    assert first == again != second and not first.exists() and second.exists()  # one save per version, old removed
    assert served.continuation_logprobs(PROMPTS, ["ab"] * 3) == trained.continuation_logprobs(PROMPTS, ["ab"] * 3)
    with pytest.raises(ValueError, match="its own adapter"):
        served.generate(PROMPTS, adapter="elsewhere")


def test_a_vllm_engine_gets_a_lora_rank_it_supports(monkeypatch):
    started = []
    monkeypatch.setattr(llm_module, "vllm_model_dir", lambda spec: spec)
    monkeypatch.setattr(llm_module, "_tokenizer", lambda source: None)
    monkeypatch.setattr(llm_module, "_vllm_engine", lambda *args: started.append(args[-1]))
    for rank in (0, 4, 8, 12):
        VLLM("some-model", CPU, max_lora_rank=rank)
    assert started == [0, 8, 8, 16]
