"""CrossLM's LLM on the vLLM backend (``models/llm.py:TrainedLLM``): vLLM writes under the adapter saved from the
trained weights, once per version, and follows every update; scoring stays on the trained model
(``make test-vllm``; skipped where vLLM is not installed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from fedbridge.models.generation import SamplingConfig  # noqa: E402
from fedbridge.models.llm import VLLM, TrainedLLM, load_llm_interface  # noqa: E402
from fedbridge.models.reward import LLMUpdateConfig, attach_lora  # noqa: E402

pytestmark = pytest.mark.vllm
CPU = torch.device("cpu")
PROMPTS = [[{"role": "user", "content": "Write one short drug review with label 'positive'. Reply with the text only."}],
           "The three primary colours are"]


def test_vllm_writes_with_the_weights_the_trainer_has_now():
    serving = load_llm_interface("embedded", CPU, engine="vllm", max_lora_rank=4)  # rounded up to 8 for vLLM
    assert isinstance(serving, VLLM)
    model, tok = serving.exact(trainable=True)
    peft_model = attach_lora(model, LLMUpdateConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")), seed=0)
    served, exact = TrainedLLM(peft_model, tok, serving), TrainedLLM(peft_model, tok)
    sampling = SamplingConfig(max_new_tokens=16, temperature=0.0)
    assert served.generate(PROMPTS, sampling)[0] == exact.generate(PROMPTS, sampling)[0]  # B = 0: the base model
    torch.manual_seed(0)
    with torch.no_grad():  # an "update": every LoRA B moves
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    stale = served.generate(PROMPTS, sampling)[0]
    served.changed()
    fresh = served.generate(PROMPTS, sampling)[0]
    assert fresh == exact.generate(PROMPTS, sampling)[0] != stale
    assert served.continuation_logprobs(PROMPTS, [" red"] * 2) == exact.continuation_logprobs(PROMPTS, [" red"] * 2)
