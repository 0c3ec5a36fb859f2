"""Classify with a causal LM by the likelihood of each label as the answer (a constrained answer)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.models.generation import Prompt, continuation_logprobs, next_token_logprobs


def classification_prompt(instruction: str, text: str, labels: Sequence[str], max_chars: int = 1500) -> Prompt:
    """The chat prompt whose answer is one label name."""
    body = text if len(text) <= max_chars else text[:max_chars] + " ..."
    return [{"role": "user", "content": f"{instruction}\n\n{body}\n\nAnswer with one word: {', '.join(labels)}."}]


def label_probabilities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                        labels: Sequence[str], instruction: str, batch_size: int = 8, max_tokens: int = 512,
                        progress: str | None = None) -> np.ndarray:
    """p(label | prompt) renormalised over the label set, shape (len(texts), len(labels)).

    When every label is one distinct token, one forward pass per text scores them all; otherwise each label
    continuation is scored on its own.
    """
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
        token_ids = [i[0] for i in ids]
        scores = [next_token_logprobs(model, tokenizer, [classification_prompt(instruction, t, labels)
                                                         for t in texts[i:i + batch_size]],
                                      token_ids, batch_size, max_tokens)
                  for i in tqdm(range(0, len(texts), batch_size), desc=progress, disable=progress is None, unit="batch")]
        return _softmax(np.concatenate(scores)) if scores else np.zeros((0, len(labels)))
    scores = np.zeros((len(texts), len(labels)))
    per_chunk = max(1, batch_size // len(labels))
    for start in tqdm(range(0, len(texts), per_chunk), desc=progress, disable=progress is None, unit="batch"):
        chunk = texts[start:start + per_chunk]
        prompts = [classification_prompt(instruction, t, labels) for t in chunk for _ in labels]
        conts = [label for _ in chunk for label in labels]
        logp = continuation_logprobs(model, tokenizer, prompts, conts, batch_size=batch_size, max_tokens=max_tokens)
        scores[start:start + len(chunk)] = np.array([lp for lp, _ in logp]).reshape(len(chunk), len(labels))
    return _softmax(scores)


def _softmax(scores: np.ndarray) -> np.ndarray:
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)
