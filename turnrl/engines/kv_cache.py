"""The HF engine's KV storage: one episode's kept keys/values between turns (`_Cached`, with the head it shares with
other episodes stored once) and the per-call buffers the model writes into (`_BufferLayer`, `_BufferCache`).
Split from turnrl.engines.hf, which owns the decode loop that uses them."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _Cached:
    """One episode's cached tokens and their per-layer keys/values, each (heads, len, head_dim). With a `head` (the
    shared head of the call that cached it, itself a `_Cached`), the keys/values hold only the positions after
    the head's: the head's are stored once for all the episodes that share it."""

    __slots__ = ("tokens", "keys", "values", "head")

    def __init__(self, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
                 head: _Cached | None = None):
        self.tokens, self.keys, self.values, self.head = tokens, keys, values, head

    def span(self, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions start..stop - 1 at `layer`."""
        skip = len(self.head.tokens) if self.head is not None else 0
        if start >= skip:
            return self.keys[layer][:, start - skip:stop - skip], self.values[layer][:, start - skip:stop - skip]
        head_keys, head_values = self.head.span(layer, start, min(stop, skip))
        if stop <= skip:
            return head_keys, head_values
        return (torch.cat([head_keys, self.keys[layer][:, :stop - skip]], 1),
                torch.cat([head_values, self.values[layer][:, :stop - skip]], 1))

    def prefix_of(self, prompt: list[int]) -> int:
        """How many leading prompt tokens can be served from this cache (at most len(prompt) - 1): the
        longest common prefix. A prompt that extends the cached tokens (full history) reuses all of them; one
        that does not (window and summary context policies) reuses the shared head, e.g. the system prompt,
        and prefills the rest."""
        n = min(len(self.tokens), len(prompt) - 1)
        if self.tokens[:n] == prompt[:n]:
            return n
        lo, hi = 0, n  # tokens[:lo] == prompt[:lo] holds, tokens[:hi] == prompt[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.tokens[:mid] == prompt[:mid]:
                lo = mid
            else:
                hi = mid
        return lo


def _stored(states: torch.Tensor) -> torch.dtype:
    """The dtype keys/values are kept in: the one attention reads them in. Under bf16 autocast (the engine's bf16
    mode) that is bf16, although rotary embeddings hand over fp32 keys: SDPA would round them to bf16 at every
    call, so storing them rounded once computes the same and reads half the key bytes at each step."""
    device = states.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else states.dtype


class _BufferLayer(DynamicLayer):
    """One layer's keys/values in a buffer preallocated for the whole call, (rows, heads, capacity, head_dim).

    `update` writes the new positions in place and returns views of the filled part, so a decode step
    copies one position per row instead of the whole cache (which `torch.cat` in DynamicLayer does). While
    `scatter` holds (rows, positions, end), `update` takes a packed (1, heads, n, head_dim) sequence instead and
    writes its token i at `positions[i]` of row `rows[i]` (the engine's packed prefill)."""

    def __init__(self, capacity: int, kbuf: torch.Tensor | None = None, vbuf: torch.Tensor | None = None,
                 length: int = 0):
        super().__init__()
        self.capacity, self.kbuf, self.vbuf, self.length = capacity, kbuf, vbuf, length
        self.scatter: tuple[torch.Tensor, torch.Tensor, int] | None = None
        if kbuf is not None:
            self.device, self.is_initialized = kbuf.device, True
            self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device, self.is_initialized = key_states.device, True
        self.kbuf = torch.empty((b, h, self.capacity, d), dtype=_stored(key_states), device=self.device)
        self.vbuf = torch.empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]),
                                dtype=_stored(value_states), device=self.device)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.scatter is not None:
            rows, positions, end = self.scatter
            self.kbuf[rows, :, positions] = key_states[0].transpose(0, 1).to(self.kbuf.dtype)
            self.vbuf[rows, :, positions] = value_states[0].transpose(0, 1).to(self.vbuf.dtype)
            self.length = end
            self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
            return self.keys, self.values
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer overflow ({end} > {self.capacity} positions)")
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.kbuf[:, :, :end], self.vbuf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keeps only `rows` (batch indices, possibly repeated), copying just the filled positions. Dropping rows
        (increasing indices) moves the kept rows up within the same buffer: only rows below a dropped one are
        copied, and no new memory is touched."""
        order = rows.tolist()
        if all(a < b for a, b in zip(order, order[1:])):
            for i, r in enumerate(order):
                if r != i:  # r > i: row r is read before anything overwrites it
                    self.kbuf[i, :, :self.length] = self.kbuf[r, :, :self.length]
                    self.vbuf[i, :, :self.length] = self.vbuf[r, :, :self.length]
            self.kbuf, self.vbuf = self.kbuf[:len(order)], self.vbuf[:len(order)]
            self.keys, self.values = self.kbuf[:, :, :self.length], self.vbuf[:, :, :self.length]
            return
        kbuf = self.kbuf.new_empty((len(rows),) + self.kbuf.shape[1:])
        vbuf = self.vbuf.new_empty((len(rows),) + self.vbuf.shape[1:])
        kbuf[:, :, :self.length] = self.kbuf[rows, :, :self.length]
        vbuf[:, :, :self.length] = self.vbuf[rows, :, :self.length]
        self.kbuf, self.vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[:, :, :self.length], vbuf[:, :, :self.length]


class _BufferCache(Cache):
    def __init__(self, layers: list[_BufferLayer]):
        super().__init__(layers=layers)

    def select_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(rows)
