"""fedbridge's decoder: continuous batching over one preallocated KV cache, the step captured in a CUDA graph on GPU.

HF ``generate`` grows its cache by concatenation at every step, keeps decoding a finished row as padding until the
whole batch ends, and on a GPU spends its ~30 ms a step launching kernels. Here:
- every layer's keys and values live in one (slots, heads, capacity, head_dim) tensor, written in place;
- a slot whose row has finished takes the next prompt at once: the new prompts' prefill runs on their slots alone
  and they join the decoding batch at the next step;
- the tokens every prompt starts with (a chat template's system prompt, a shared instruction) run once, and their
  keys and values are copied into each row;
- every row writes the step's token into one shared cache column ``t``; a row's own columns are the ones since it
  joined, picked by a mask, and its position ids count its own tokens only, so the model computes exactly what it
  would for that prompt alone (the equality with HF ``generate`` is tested);
- when ``t`` reaches the end of the cache, the columns no row needs any more are dropped (one copy);
- on CUDA the decoding step, whose shapes never change, is captured once as a CUDA graph and replayed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import Cache, PreTrainedModel

log = logging.getLogger(__name__)
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
    tokens: list[int] = field(default_factory=list)  # generated so far


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the additive one HF models take (0 where visible, the dtype's minimum elsewhere:
    a row that sees nothing then averages, rather than giving NaN)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


class Decoder:
    """Continuous-batching decoding of many prompts with one model (see the module docstring).

    ``choose`` maps the (rows, vocab) next-token logits to one token per row (argmax, or a seeded sample);
    ``done(tokens)`` says whether a row's generated tokens end it (EOS and ``max_new_tokens`` are checked here).
    """

    def __init__(self, model: PreTrainedModel, slots: int, max_new_tokens: int, eos: set[int], pad: int,
                 choose: Callable[[torch.Tensor], torch.Tensor], done: Callable[[list[int]], bool] = lambda _: False,
                 cuda_graph: bool | None = None) -> None:
        self.model, self.slots, self.max_new, self.eos, self.pad = model, slots, max_new_tokens, eos, pad
        self.choose, self.done = choose, done
        self.device, self.dtype = model.device, model.dtype
        self.cache_arg = cache_argument(model)
        self.use_graph = (self.device.type == "cuda") if cuda_graph is None else cuda_graph
        self.steps = 0  # decoding forwards run

    def run(self, prompts: Sequence[Sequence[int]], on_finish: Callable[[int], None] = lambda _: None
            ) -> list[list[int]]:
        """The generated tokens of every prompt (up to and including its EOS), in the prompts' order."""
        if not prompts:
            return []
        if min(map(len, prompts)) < 1:
            raise ValueError("every prompt needs at least one token")
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
        self.rows: list[_Row | None] = [None] * slots
        self.t = self.longest  # the column the next decoding step writes; a new prompt fills the columns before it
        self.graph = None
        self.results: list[list[int] | None] = [None] * len(prompts)
        self.prompts, self.queue, self.on_finish = prompts, iter(range(len(prompts))), on_finish
        self._admit()
        while any(self.rows):
            self._step()
            self._admit()
        return self.results  # type: ignore[return-value]

    # ------------------------------------------------------------ rows in, rows out

    def _accept(self, slot: int, token: int) -> None:
        row = self.rows[slot]
        row.tokens.append(token)
        if token in self.eos or len(row.tokens) >= self.max_new or self.done(row.tokens):
            self.results[row.prompt] = row.tokens
            self.rows[slot] = None
            self.on_finish(row.prompt)
        else:
            self.next_tokens[slot] = token

    def _admit(self) -> None:
        """Prefill waiting prompts into the free slots, together, until no slot is free or no prompt waits."""
        while free := [s for s, row in enumerate(self.rows) if row is None]:
            taken = [i for _, i in zip(free, self.queue)]
            if not taken:
                self._shrink()
                return
            slots = free[:len(taken)]
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
            for slot, i in zip(slots, taken):
                self.rows[slot] = _Row(i, start)
            for slot, token in zip(slots, self.choose(logits).tolist()):
                self._accept(slot, token)

    def _shrink(self) -> None:
        """No prompt waits: once half the slots are idle, decode only the busy ones."""
        busy = [s for s, row in enumerate(self.rows) if row is not None]
        if not busy or len(busy) > len(self.rows) // 2:
            return
        index = torch.tensor(busy, device=self.device)
        self.cache.keep_slots(index)
        self.visible, self.positions = self.visible[index], self.positions[index]
        self.next_tokens = self.next_tokens[index]
        self.rows = [self.rows[s] for s in busy]
        self.graph = None  # captured for the old batch size

    # ------------------------------------------------------------ one decoding step

    def _step(self) -> None:
        if self.t == self.capacity:
            self._compact()
        self.visible[:, self.t] = True
        if self.use_graph:
            logits = self._replay()
        else:
            logits = self._forward(self.next_tokens[:, None], self.positions[:, None],
                                   additive_mask(self.visible[:, None, None], self.dtype),
                                   torch.tensor([self.t], device=self.device))
        self.positions += 1
        self.t += 1
        self.steps += 1
        tokens = self.choose(logits).tolist()
        for slot, row in enumerate(self.rows):
            if row is not None:
                self._accept(slot, tokens[slot])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 column: torch.Tensor) -> torch.Tensor:
        self.cache.column = column
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{self.cache_arg: self.cache}).logits[:, -1]

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

    def _replay(self) -> torch.Tensor:
        """The decoding step through fixed buffers, replayed as a CUDA graph (``CapturedStep``): its inputs are
        copied in, then the graph runs. Captured at the first step (and again after the batch shrinks); a model whose
        forward cannot be captured falls back to eager steps, with a warning."""
        if self.graph is None:
            slots = len(self.rows)
            self.static = {"ids": torch.zeros(slots, 1, dtype=torch.long, device=self.device),
                           "positions": torch.zeros(slots, 1, dtype=torch.long, device=self.device),
                           "mask": torch.zeros(slots, 1, 1, self.capacity, dtype=self.dtype, device=self.device),
                           "column": torch.zeros(1, dtype=torch.long, device=self.device)}
        buffers = self.static
        buffers["ids"].copy_(self.next_tokens[:, None])
        buffers["positions"].copy_(self.positions[:, None])
        buffers["mask"].copy_(additive_mask(self.visible[:, None, None], self.dtype))
        buffers["column"].fill_(self.t)
        if self.graph is None:
            try:
                self.graph = CapturedStep(lambda: self._forward(buffers["ids"], buffers["positions"], buffers["mask"],
                                                                buffers["column"]))
            except RuntimeError as error:
                log.warning("CUDA graph capture failed (%s); decoding without it", str(error).splitlines()[0])
                self.use_graph, self.graph = False, None
                return self._forward(buffers["ids"], buffers["positions"], buffers["mask"], buffers["column"])
        return self.graph()


class CapturedStep:
    """A function of fixed-address tensors captured once as a CUDA graph; each call replays it and returns its
    output tensor, refreshed. The two warm-up runs write the same cache column the graph will: harmless."""

    def __init__(self, step: Callable[[], torch.Tensor]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = step()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.output
