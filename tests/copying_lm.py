"""A stand-in causal LM that copies from its context, for tests whose answer must be known exactly.

At every position, if the last 4+ tokens occurred earlier in the context, it predicts (logit 50) the token that
followed the longest such match (an ideal induction head); otherwise a fixed, nearly flat random bigram
distribution, so candidates never tie. Unlike the copier in test_fdkt it speaks Hugging Face's KV-cache protocol
(the context ids ride in a ``DynamicCache``) and custom 4-D attention masks, so the prefix-cached scorers
(canary ranking, voting) can use it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache


class CopyingLM(torch.nn.Module):
    MIN_MATCH = 4

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.bigram = 0.1 * torch.randn(vocab_size, vocab_size, generator=torch.Generator().manual_seed(seed))

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, **_):
        batch, width = input_ids.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        ids = input_ids
        if past:
            ids = torch.cat([past_key_values.layers[0].keys[:, 0, :, 0].long(), input_ids], dim=1)
        logits = self.bigram[ids].clone()
        if attention_mask is not None and attention_mask.dim() == 4:  # a custom mask: each query sees its own context
            for row in range(batch):
                for q in range(width):
                    seen = (attention_mask[row, 0, q] == 0).nonzero().flatten().tolist()
                    target = self._copy_targets(ids[row, seen].tolist()).get(len(seen) - 1)
                    if target is not None:
                        logits[row, past + q, target] = 50.0
        else:
            mask = torch.ones_like(ids) if attention_mask is None else attention_mask
            if mask.shape[1] == width and past:  # a mask of the new tokens only: the cached ones are all real
                mask = torch.cat([torch.ones(batch, past, dtype=mask.dtype), mask], dim=1)
            for row in range(batch):
                where = mask[row].nonzero().flatten().tolist()
                for i, target in self._copy_targets(ids[row, where].tolist()).items():
                    logits[row, where[i], target] = 50.0
        cache = past_key_values
        if use_cache or cache is not None:
            cache = cache if cache is not None else DynamicCache()
            states = input_ids.float()[:, None, :, None]
            cache.update(states, states, 0)
        return SimpleNamespace(logits=logits[:, past:], past_key_values=cache)

    def _copy_targets(self, tokens: list[int]) -> dict[int, int]:
        """Position -> the token that followed the longest earlier match of the MIN_MATCH tokens ending there."""
        out, seen = {}, {}
        for i in range(self.MIN_MATCH - 1, len(tokens)):
            key, best = tuple(tokens[i - self.MIN_MATCH + 1:i + 1]), -1
            for j in seen.get(key, ()):  # earlier ends of the same 4-gram; extend the match backwards
                k = self.MIN_MATCH
                while k <= j and tokens[j - k] == tokens[i - k]:
                    k += 1
                if k >= best:
                    best, out[i] = k, tokens[j + 1]
            seen.setdefault(key, []).append(i)
        return out
