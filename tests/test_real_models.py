"""Smoke tests of the embedded real models (from PyPI packages, no hub): the SmolLM2 LLM and the MiniLM SLM.

The first LLM load dequantises the GGUF into ~/.cache/fedbridge (about 40 s); later loads take seconds.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedbridge.config import TaskConfig
from fedbridge.models.generation import SamplingConfig, continuation_logprobs, generate
from fedbridge.models.llm_classifier import label_probabilities
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.slm import predict_proba
from fedbridge.tasks import load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return load_llm("embedded")


@pytest.fixture(scope="module")
def drug_reviews():
    return load_task(TaskConfig(name="drug-reviews"))


def test_embedded_llm_loads_the_real_weights(llm):
    model, tok = llm
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.chat_template and tok.pad_token is not None
    assert load_llm("embedded")[0] is model  # one frozen instance per process
    # a trained model finds plain English likely; random weights would give ~ln(49152) = 10.8 nats a token
    (lp, n), = continuation_logprobs(model, tok, ["The capital of France is"], [" Paris, and it is a beautiful city."])
    assert lp / n > -4.0


def test_embedded_llm_generates_from_a_chat_prompt(llm):
    model, tok = llm
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    outs, stats = generate(model, tok, [chat], SamplingConfig(max_new_tokens=8, temperature=0.0), seed=0)
    assert isinstance(outs[0], str) and outs[0].strip()
    assert "paris" in outs[0].lower()
    assert stats.prompts == 1 and 1 <= stats.generated_tokens <= 8 and stats.prompt_tokens > 10


def test_embedded_llm_scores_drug_review_labels(llm, drug_reviews):
    model, tok = llm
    texts = sorted(drug_reviews.data["text"], key=len)[:3]  # the shortest three keep this quick
    probs = label_probabilities(model, tok, texts, drug_reviews.labels, drug_reviews.instruction,
                                batch_size=9, max_tokens=256)
    assert probs.shape == (3, 3)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs > 0).all() and np.isfinite(probs).all()


def test_embedded_slm_classifies(drug_reviews):
    model = load_slm("embedded", len(drug_reviews.labels), seed=0)
    assert model.body.config.num_hidden_layers == 6 and model.body.config.hidden_size == 384
    assert model.head.out_features == 3 and model.head.in_features == 6 * 384  # the default: every layer's mean
    texts = list(drug_reviews.data["text"][:5])
    probs = predict_proba(model, texts)
    assert probs.shape == (5, 3)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the pretrained encoder tells texts apart (a collapsed or random encoder would give near-identical rows)
    assert np.ptp(probs[:, 0]) > 1e-4
