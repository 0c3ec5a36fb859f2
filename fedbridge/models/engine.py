"""fedbridge's decoder: continuous batching over one preallocated KV cache, in eager PyTorch.

HF ``generate`` grows its cache by concatenation at every step and keeps decoding a finished row as padding until the
whole batch ends. Here:
- every layer's keys and values live in one (slots, heads, capacity, head_dim) tensor, written in place;
- a slot whose row has finished takes the next prompt at once: the prompts admitted at one step are prefilled
  together, in one forward on their slots alone, and join the decoding batch at the next step;
- the tokens every prompt starts with (a chat template's system prompt, a shared instruction) run once, and their
  keys and values are copied into each row;
- every row writes the step's token into one shared cache column ``t``; a row's own columns are the ones since it
  joined, picked by a mask, and its position ids count its own tokens only, so the model computes exactly what it
  would for that prompt alone (the equality with HF ``generate`` is tested);
- when ``t`` reaches the end of the cache, the columns no row needs any more are dropped (one copy);
- a step samples every slot at once on the device and keeps the generated tokens, the rows' lengths and the EOS /
  length checks there: the host reads which rows ended (one small read a step, and one more at a step where rows
  end, for their tokens), and runs Python only for a row that ends or is admitted (and, with stop strings, for the
  text check of every row).

Measured on CPUs only (``benchmarks/results/generation.md``, 2 cores, SmolLM2-135M): 1.48x HF ``generate``'s
tokens/s at batch 16, 1.65x at batch 64, about the same at batch 1. It has no GPU-specific path (no CUDA graphs)
and has never been measured on a GPU; there, vLLM is the engine (``llm.engine=auto`` picks it where it is installed
for the device).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import Cache, PreTrainedModel

MIN_SHARED_PREFIX = 8  # tokens every prompt starts with, from which they are computed once and copied


def supports_engine(model: PreTrainedModel) -> bool:
    """Decoder-only models whose every layer attends to the full past (no sliding window): they accept a cache of
    fixed size and an explicit 4D mask, which is all this engine needs. Others use HF ``generate``."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    sliding = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    return (not cfg.is_encoder_decoder and layer_types == {"full_attention"} and not sliding
            and bool(getattr(model, "_can_compile_fullgraph", False) or getattr(model, "_supports_static_cache", False)))


def left_padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one (rows, longest) tensor padded on the left, and the boolean mask of the real tokens."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], dtype=torch.long, device=device)
    real = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
    return ids, real


def cache_argument(model: PreTrainedModel) -> str:
    """The name the model's forward takes its KV cache under (``cache`` from transformers 5.x, before that
    ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SlotCache(Cache):
    """Keys and values of ``slots`` rows in (slots, heads, capacity, head_dim) tensors, one pair per layer.

    Decoding: every row's new token goes to column ``column`` and attention reads the whole cache (the mask picks
    each row's columns). Prefill (``fill`` set): the new prompts go to their slots' columns ``fill[1]`` and attend to
    the shared prompt prefix (``prefix``, if any) and their own tokens only, so a slot's earlier occupant is never
    read."""

    def __init__(self, slots: int, capacity: int, prefix: PastCache | None = None) -> None:
        super().__init__(layers=[])
        self.slots, self.capacity, self.prefix = slots, capacity, prefix
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.column: torch.Tensor | None = None  # decoding: a (1,) long tensor, updated in place
        self.fill: tuple[torch.Tensor, slice] | None = None  # prefill: (slot indices, columns)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):  # allocated at the first forward, with the model's heads, dtype and device
            for store, states in ((self.keys, key_states), (self.values, value_states)):
                store.append(states.new_zeros(self.slots, states.shape[1], self.capacity, states.shape[3]))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.fill is not None:
            rows, columns = self.fill
            keys[rows, :, columns] = key_states
            values[rows, :, columns] = value_states
            if self.prefix is None:
                return key_states, value_states
            shared_k, shared_v = self.prefix.new_keys[layer_idx], self.prefix.new_values[layer_idx]
            n = key_states.shape[0]  # the shared prompt prefix's columns come first, then the new tokens
            return (torch.cat([shared_k.expand(n, -1, -1, -1), key_states], 2),
                    torch.cat([shared_v.expand(n, -1, -1, -1), value_states], 2))
        keys.index_copy_(2, self.column, key_states)
        values.index_copy_(2, self.column, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity

    def shift_left(self, columns: int) -> None:
        """Drop the first ``columns`` columns of every row; the rest move to the front."""
        for tensor in (*self.keys, *self.values):
            tensor[:, :, :self.capacity - columns] = tensor[:, :, columns:].clone()

    def write_prefix(self, rows: torch.Tensor, columns: slice) -> None:
        """Copy the shared prompt prefix's keys and values into ``rows`` at ``columns``."""
        for keys, values, shared_k, shared_v in zip(self.keys, self.values, self.prefix.new_keys,
                                                    self.prefix.new_values):
            keys[rows, :, columns] = shared_k
            values[rows, :, columns] = shared_v

    def keep_slots(self, slots: torch.Tensor) -> None:
        self.keys = [k.index_select(0, slots) for k in self.keys]
        self.values = [v.index_select(0, slots) for v in self.values]
        self.slots = len(slots)


class PastCache(Cache):
    """The KV cache of one forward pass over new tokens that follow a given past (or none): every layer attends to
    the past, then the new tokens, and the new tokens' keys and values are kept (``new_keys``, ``new_values``)."""

    def __init__(self, past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None) -> None:
        super().__init__(layers=[])
        self.past_keys, self.past_values = past_keys, past_values  # (layers, heads, tokens, head_dim), batch 1
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.new_keys.append(key_states)
        self.new_values.append(value_states)
        if self.past_keys is None:
            return key_states, value_states
        return (torch.cat([self.past_keys[layer_idx][None], key_states], 2),
                torch.cat([self.past_values[layer_idx][None], value_states], 2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.past_keys is None else self.past_keys.shape[2]


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row shares, leaving each row at least one token of its own."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for i in range(max(n, 0)):
        if any(r[i] != first[i] for r in rows):
            return i
    return max(n, 0)


@dataclass
class _Row:
    prompt: int  # index of its prompt
    start: int  # the cache column of its first prompt token
    tokens: list[int] = field(default_factory=list)  # generated so far, kept on the host only for ``done``


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one HF models take (0 where visible, the dtype's minimum elsewhere:
    a row that sees nothing then averages, rather than giving NaN)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


class Decoder:
    """Continuous-batching decoding of many prompts with one model (see the module docstring).

    ``choose`` maps the (rows, vocab) next-token logits to one token per row (argmax, or a seeded sample), on the
    device, for every slot at once; ``done(tokens)``, if given, says whether a row's generated tokens end it (a stop
    string: the one check that needs the tokens on the host, row by row). EOS and ``max_new_tokens`` are checked on
    the device.
    """

    def __init__(self, model: PreTrainedModel, slots: int, max_new_tokens: int, eos: set[int], pad: int,
                 choose: Callable[[torch.Tensor], torch.Tensor],
                 done: Callable[[list[int]], bool] | None = None) -> None:
        self.model, self.slots, self.max_new, self.eos, self.pad = model, slots, max_new_tokens, eos, pad
        self.choose, self.done = choose, done
        self.device, self.dtype = model.device, model.dtype
        self.cache_arg = cache_argument(model)
        self.eos_ids = torch.tensor(sorted(eos - {None}) or [-1], dtype=torch.long, device=self.device)
        self.steps = 0  # decoding forwards run

    def run(self, prompts: Sequence[Sequence[int]], on_finish: Callable[[int], None] = lambda _: None
            ) -> list[list[int]]:
        """The generated tokens of every prompt (up to and including its EOS), in the prompts' order."""
        if not prompts:
            return []
        if min(map(len, prompts)) < 1:
            raise ValueError("every prompt needs at least one token")
        with torch.inference_mode():
            return self._run(prompts, on_finish)

    def _run(self, prompts: Sequence[Sequence[int]], on_finish: Callable[[int], None]) -> list[list[int]]:
        self.longest = max(map(len, prompts))
        slots = min(self.slots, len(prompts))
        slack = max(16, self.max_new)
        self.capacity = self.longest + self.max_new + slack
        self.shared = common_prefix_length(prompts) if len(prompts) > 1 else 0
        prefix = None
        if self.shared >= MIN_SHARED_PREFIX:  # a chat template's system prompt, an instruction: run once
            prefix = PastCache()
            self.model(input_ids=torch.tensor([list(prompts[0][:self.shared])], device=self.device), use_cache=True,
                       logits_to_keep=1, **{self.cache_arg: prefix})
        else:
            self.shared = 0
        self.cache = SlotCache(slots, self.capacity, prefix)
        self.visible = torch.zeros(slots, self.capacity, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.next_tokens = torch.full((slots,), self.pad, dtype=torch.long, device=self.device)
        self.generated = torch.zeros(slots, max(self.max_new, 1), dtype=torch.long, device=self.device)  # its tokens
        self.count = torch.zeros(slots, dtype=torch.long, device=self.device)  # how many of them are its row's
        self.busy = torch.zeros(slots, dtype=torch.bool, device=self.device)  # slots with a row
        self.rows: list[_Row | None] = [None] * slots
        self.free = list(range(slots))  # slots without a row, ascending
        self.t = self.longest  # the column the next decoding step writes; a new prompt fills the columns before it
        self.results: list[list[int] | None] = [None] * len(prompts)
        self.prompts, self.queue, self.on_finish = prompts, iter(range(len(prompts))), on_finish
        self._admit()
        while len(self.free) < len(self.rows):
            self._step()
            self._admit()
        return self.results  # type: ignore[return-value]

    # ------------------------------------------------------------ rows in, rows out

    def _take(self, tokens: torch.Tensor, taking: torch.Tensor, slots: list[int]) -> None:
        """Append ``tokens`` (one per slot) to the rows of the slots in ``taking`` (a mask; ``slots``: the same, on
        the host, ascending) and end the rows that are done. All on the device but one read of which rows ended
        (with ``done``: of the tokens and the ended mask together); Python runs per row only where a row ends."""
        self.generated.scatter_(1, self.count.clamp(max=self.generated.shape[1] - 1)[:, None], tokens[:, None])
        self.count += taking
        ended = taking & (torch.isin(tokens, self.eos_ids) | (self.count >= self.max_new))
        if self.done is None:
            ending = ended.nonzero()[:, 0].tolist()
        else:  # a stop string: the tokens go to the host, and every row's text is checked
            host_tokens, host_ended = torch.stack([tokens, ended.long()]).tolist()
            ending = []
            for slot in slots:
                row = self.rows[slot]
                row.tokens.append(host_tokens[slot])
                if host_ended[slot] or self.done(row.tokens):
                    ending.append(slot)
            ended = torch.zeros_like(ended)
            ended[ending] = True
        self.next_tokens = torch.where(taking & ~ended, tokens, self.next_tokens)
        self.busy = self.busy & ~ended
        if not ending:
            return
        if self.done is None:
            index = torch.tensor(ending, device=self.device)
            rows = [r[:n] for r, n in zip(self.generated[index].tolist(), self.count[index].tolist())]
        else:
            rows = [self.rows[slot].tokens for slot in ending]
        for slot, tokens_of_row in zip(ending, rows):
            prompt = self.rows[slot].prompt
            self.results[prompt] = tokens_of_row
            self.rows[slot] = None
            self.free.append(slot)
            self.on_finish(prompt)
        self.free.sort()

    def _admit(self) -> None:
        """Prefill waiting prompts into the free slots, all in one forward, until no slot is free or no prompt waits
        (a row that ends at its first token frees its slot at once)."""
        while self.free:
            taken = [i for _, i in zip(self.free, self.queue)]
            if not taken:
                self._shrink()
                return
            slots, self.free = self.free[:len(taken)], self.free[len(taken):]
            shared = self.shared
            ids, real = left_padded([self.prompts[i][shared:] for i in taken], self.pad, self.device)
            width = ids.shape[1]
            causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
            visible = causal[None] & real[:, None, :]
            visible |= torch.eye(width, dtype=torch.bool, device=self.device)  # padding rows see themselves
            if shared:  # every new token also sees the shared prefix, whose columns come first
                visible = torch.cat([visible.new_ones(len(taken), width, shared), visible], dim=2)
            index = torch.tensor(slots, device=self.device)
            self.cache.fill = (index, slice(self.t - width, self.t))
            try:
                logits = self.model(input_ids=ids, attention_mask=additive_mask(visible[:, None], self.dtype),
                                    position_ids=shared + (real.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                                    logits_to_keep=1, **{self.cache_arg: self.cache}).logits[:, -1]
            finally:
                self.cache.fill = None
            start = self.t - width - shared
            if shared:
                self.cache.write_prefix(index, slice(start, self.t - width))
            self.visible[index] = False
            self.visible[index, start:self.t - width] = True
            self.visible[index, self.t - width:self.t] = real
            self.positions[index] = shared + real.sum(-1)
            self.count[index] = 0
            self.busy[index] = True
            for slot, i in zip(slots, taken):
                self.rows[slot] = _Row(i, start)
            tokens = self.next_tokens.clone()
            tokens[index] = self.choose(logits)
            taking = torch.zeros(len(self.rows), dtype=torch.bool, device=self.device)
            taking[index] = True
            self._take(tokens, taking, slots)

    def _shrink(self) -> None:
        """No prompt waits: once half the slots are idle, decode only the busy ones."""
        if len(self.free) < len(self.rows) - len(self.rows) // 2 or len(self.free) == len(self.rows):
            return
        busy = [s for s, row in enumerate(self.rows) if row is not None]
        index = torch.tensor(busy, device=self.device)
        self.cache.keep_slots(index)
        self.visible, self.positions = self.visible[index], self.positions[index]
        self.next_tokens, self.generated, self.count = self.next_tokens[index], self.generated[index], self.count[index]
        self.busy = self.busy[index]
        self.rows = [self.rows[s] for s in busy]
        self.free = []

    # ------------------------------------------------------------ one decoding step

    def _step(self) -> None:
        if self.t == self.capacity:
            self._compact()
        self.visible[:, self.t] = True
        self.cache.column = torch.tensor([self.t], device=self.device)
        logits = self.model(input_ids=self.next_tokens[:, None], position_ids=self.positions[:, None],
                            attention_mask=additive_mask(self.visible[:, None, None], self.dtype), use_cache=True,
                            logits_to_keep=1, **{self.cache_arg: self.cache}).logits[:, -1]
        self.positions += 1
        self.t += 1
        self.steps += 1
        # every slot's token is drawn, idle ones too: a seeded sampler's stream is the same whatever rows are busy
        self._take(self.choose(logits), self.busy, [s for s, row in enumerate(self.rows) if row is not None]
                   if self.done is not None else [])

    def _compact(self) -> None:
        """Drop the columns before every busy row's first one (keeping ``t`` at least the longest prompt, where a
        new prompt must fit before it). At least ``slack`` columns go: a row holds at most longest + max_new."""
        shift = min(min(row.start for row in self.rows if row is not None), self.t - self.longest)
        self.cache.shift_left(shift)
        self.visible[:, :self.capacity - shift] = self.visible[:, shift:].clone()
        self.visible[:, self.capacity - shift:] = False
        for row in self.rows:
            if row is not None:
                row.start -= shift
        self.t -= shift
