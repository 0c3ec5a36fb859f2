"""Train and apply a silo's small sequence classifier: plain PyTorch, hard or soft targets, optional weights."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SLMTrainConfig:
    epochs: int = 3
    batch_size: int = 16
    lr: float = 5e-5
    max_length: int = 128
    weight_decay: float = 0.01
    class_balanced: bool = False  # weight each label's examples by n / (labels present x its count)


@dataclass
class TrainStats:
    examples: int
    steps: int
    seconds: float
    final_loss: float

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def class_balanced_weights(targets: np.ndarray, num_labels: int) -> np.ndarray:
    """Per-example weights n / (K * n_k), K the labels present, so every label carries the same total weight and the
    weights average 1: a silo with a few hundred examples of a 65 %-majority label otherwise learns to answer the
    majority label. Soft targets count fractionally."""
    targets = np.asarray(targets)
    counts = targets.sum(axis=0) if targets.ndim == 2 else np.bincount(targets, minlength=num_labels)
    per_class = len(targets) / (max(int((counts > 0).sum()), 1) * np.maximum(counts, 1e-8))
    return targets @ per_class if targets.ndim == 2 else per_class[targets]


def train_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                     targets: Sequence[int] | np.ndarray, cfg: SLMTrainConfig = SLMTrainConfig(),
                     sample_weights: Sequence[float] | None = None, seed: int = 0,
                     progress: str | None = None) -> TrainStats:
    """Fine-tune in place with AdamW.

    ``targets`` are label ids, or an (n, num_labels) array of soft labels for distillation.
    ``sample_weights`` scale each example's loss (e.g. to down-weight synthetic data); ``cfg.class_balanced``
    multiplies them by ``class_balanced_weights``.
    """
    if len(texts) == 0:
        raise ValueError("No training examples: the silo's training split is empty.")
    soft = np.asarray(targets).ndim == 2
    targets_t = torch.tensor(np.asarray(targets), dtype=torch.float32 if soft else torch.long)
    weights = np.ones(len(texts)) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    if cfg.class_balanced:
        weights = weights * class_balanced_weights(targets, model.config.num_labels)
    weights_t = torch.tensor(weights, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    steps, loss_value, t0 = 0, float("nan"), time.perf_counter()
    n_batches = -(-len(texts) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, desc=progress, disable=progress is None, unit="step")
    for _ in range(cfg.epochs):
        order = torch.randperm(len(texts), generator=generator)
        for start in range(0, len(texts), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = _encode(tokenizer, [texts[i] for i in idx], cfg.max_length, model.device)
            logits = model(**batch).logits
            y = targets_t[idx].to(model.device)
            per_example = (-(y * F.log_softmax(logits, -1)).sum(-1) if soft
                           else F.cross_entropy(logits, y, reduction="none"))
            w = weights_t[idx].to(model.device)
            loss = (per_example * w).sum() / w.sum().clamp_min(1e-8)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            steps, loss_value = steps + 1, loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
    bar.close()
    model.eval()
    return TrainStats(examples=cfg.epochs * len(texts), steps=steps, seconds=time.perf_counter() - t0,
                      final_loss=loss_value)


@torch.no_grad()
def predict_proba(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                  batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """Class probabilities, shape (len(texts), num_labels)."""
    model.eval()
    out = [torch.softmax(model(**_encode(tokenizer, texts[i:i + batch_size], max_length, model.device)).logits, -1)
           for i in range(0, len(texts), batch_size)]
    if not out:
        return np.zeros((0, model.config.num_labels), dtype=np.float32)
    return torch.cat(out).float().cpu().numpy()
