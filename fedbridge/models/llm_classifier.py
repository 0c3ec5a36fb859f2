"""Classify with a causal LM by the likelihood of each label as the answer (a constrained answer)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.models.generation import (
    Prompt,
    common_prefix_length,
    continuation_logprobs,
    next_token_logprobs,
    prefix_cached_logprobs,
    prompt_ids,
)


def classification_prompt(instruction: str, text: str, labels: Sequence[str], max_chars: int = 1500,
                          context: str = "") -> Prompt:
    """The chat prompt whose answer is one label name. A ``context`` (in-context examples or instructions) goes
    between the instruction and the text, so that everything before the text is the same for every prompt."""
    body = text if len(text) <= max_chars else text[:max_chars] + " ..."
    middle = f"{context}\n\nText: {body}" if context else body
    return [{"role": "user", "content": f"{instruction}\n\n{middle}\n\nAnswer with one word: {', '.join(labels)}."}]


# Zhao et al. (2021), "Calibrate before use": inputs that carry no content, whose label probabilities are the
# prompt's own bias.
CONTENT_FREE = ("N/A", "", "[MASK]")


def label_probabilities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                        labels: Sequence[str], instruction: str, batch_size: int = 8, max_tokens: int = 512,
                        progress: str | None = None, context: str = "", calibrate: bool = False) -> np.ndarray:
    """p(label | prompt) renormalised over the label set, shape (len(texts), len(labels)).

    When every label is one distinct token, one forward pass per text scores them all; otherwise each label
    continuation is scored on its own. With a ``context`` (few-shot examples or instructions in every prompt),
    the prompts' common beginning runs once and its KV cache is reused (``prefix_cached_logprobs``).
    ``calibrate`` applies contextual calibration: each row is divided by the mean probabilities of the
    ``CONTENT_FREE`` inputs under the same instruction and context, then renormalised, so a small LM's preference
    for one label word stops deciding the answer.
    """
    probs = _label_probabilities(model, tokenizer, texts, labels, instruction, batch_size, max_tokens, progress,
                                 context)
    if not calibrate or not len(texts):
        return probs
    prior = _label_probabilities(model, tokenizer, CONTENT_FREE, labels, instruction, batch_size, max_tokens, None,
                                 context).mean(axis=0)
    return _calibrated(probs, prior)


def label_probabilities_by_likelihood(score: Callable[[list[Prompt], list[str]], list[tuple[float, int]]],
                                      texts: Sequence[str], labels: Sequence[str], instruction: str, context: str = "",
                                      calibrate: bool = False) -> np.ndarray:
    """``label_probabilities`` for a backend that scores (prompt, continuation) pairs (``score``: summed
    log-probability and token count per pair, like ``continuation_logprobs``), one pair per text and label: the same
    numbers as the model paths above, which share the prompt's forward pass between labels instead."""
    def probs(batch: Sequence[str]) -> np.ndarray:
        prompts = [classification_prompt(instruction, t, labels, context=context) for t in batch for _ in labels]
        logp = score(prompts, [label for _ in batch for label in labels])
        return _softmax(np.array([lp for lp, _ in logp]).reshape(len(batch), len(labels)))

    if not len(texts):
        return np.zeros((0, len(labels)))
    return _calibrated(probs(texts), probs(CONTENT_FREE).mean(axis=0)) if calibrate else probs(texts)


def _calibrated(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Contextual calibration: each row divided by the content-free inputs' mean probabilities, renormalised."""
    calibrated = probs / prior
    return calibrated / calibrated.sum(axis=1, keepdims=True)


def _label_probabilities(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                         labels: Sequence[str], instruction: str, batch_size: int, max_tokens: int,
                         progress: str | None, context: str) -> np.ndarray:
    ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    if context and texts:
        return _softmax(_scores_in_context(model, tokenizer, texts, labels, ids, instruction, context, batch_size,
                                           max_tokens, progress))
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


def _scores_in_context(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                       labels: Sequence[str], label_ids: list[list[int]], instruction: str, context: str,
                       batch_size: int, max_tokens: int, progress: str | None) -> np.ndarray:
    """Label log-likelihoods for prompts that share ``context``: per chunk of texts, the chunk's common token prefix
    runs once and each text (plus each label, for multi-token labels) is scored against its KV cache."""
    singles = [j for j, i in enumerate(label_ids) if len(i) == 1]
    multis = [j for j, i in enumerate(label_ids) if len(i) > 1]
    room = max(len(i) for i in label_ids)

    def score(prefix: list[int], suffixes: list[list[int]]) -> np.ndarray:
        """One row per text and multi-token label (one per text if none): one-token labels are read where the text
        ends, multi-token ones are the row's own last tokens."""
        per = max(1, len(multis))
        rows = [s + (label_ids[j] if j is not None else []) for s in suffixes for j in (multis or [None])]
        own, nxt = prefix_cached_logprobs(model, prefix, rows, [label_ids[j][0] for j in singles],
                                          next_after=[len(s) for s in suffixes for _ in range(per)])
        out = np.zeros((len(suffixes), len(labels)))
        for t, s in enumerate(suffixes):
            out[t, singles] = nxt[t * per]
            for r, j in enumerate(multis):
                out[t, j] = own[t * per + r][len(s):].sum()
        return out

    scores = np.zeros((len(texts), len(labels)))
    chunk = 8 * batch_size  # the prefix runs once per chunk: negligible against the chunk, and the bar moves
    for start in tqdm(range(0, len(texts), chunk), desc=progress, disable=progress is None, unit="chunk"):
        prompts = [classification_prompt(instruction, t, labels, context=context) for t in texts[start:start + chunk]]
        rows = [prompt_ids(tokenizer, prompt)[-(max_tokens - room):] for prompt in prompts]
        if k := common_prefix_length(rows):
            scores[start:start + len(rows)] = score(rows[0][:k], [r[k:] for r in rows])
        else:  # nothing shared (left truncation moved the rows' starts): each row is its own prefix
            scores[start:start + len(rows)] = np.concatenate([score(r[:-1], [r[-1:]]) for r in rows])
    return scores


def _softmax(scores: np.ndarray) -> np.ndarray:
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)
