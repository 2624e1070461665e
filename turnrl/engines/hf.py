"""A `transformers` generation engine: one batched, KV-cached decode loop for all active episodes.

We write the decode loop instead of calling `model.generate` because the trainer needs, for every
sampled token, its logprob under exactly the distribution the trainer will recompute
(log_softmax(logits / T)), sampling from our own `torch.Generator` (so a run's randomness is
checkpointable), and no re-tokenisation anywhere.

Multi-turn reuse: when `generate` is called with `keys` (one per episode), the engine keeps each
episode's KV cache after the call. On the next turn the cached keys/values of the longest common prefix
of the cached tokens and the new prompt are reused and only the rest is prefilled: under the full-history
context policy that is the new tokens (env reply and chat glue), never the history; under the window and
summary policies, whose prompts drop earlier turns, it is everything after the shared head (system prompt).
The cache is then replaced by the new prompt and reply.
Rows are laid out as [pad | cached prefix | pad | new tokens] with explicit position ids; the gaps
are masked, so every row computes exactly what an unpadded forward pass would.

Precision: "float32" (the default) computes exact fp32 logprobs. `dtype="bfloat16"` runs the policy under bf16
autocast with bf16 copies of its linear weights (`bf16_weights`): faster on CPUs with bf16 matmuls, but every
logprob is off by bf16 rounding, also against an update that runs under bf16 autocast itself (docs/engines.md).

Speed (issue 5): the keys/values of a call live in one preallocated buffer per layer (`_BufferCache`),
written in place at each decode step instead of concatenated; rows whose prompts are identical and
uncached (the members of a group on their first turn) are prefilled once and their keys/values copied
to every member, and the head that distinct uncached prompts share (system prompt, rules) is prefilled once
for all of them; only the last position's logits are computed during prefill; finished rows leave the
batch (their cache is kept for the next turn first) once they are a quarter of it, since every
compaction copies the live buffer. A grouped-query model (SmolLM2: 9 query heads, 3 key/value heads) prefills
with each key/value head's group of queries stacked (`gqa_sdpa_attention`) instead of transformers' `repeat_kv`
copy of the whole cache at every layer (`turnrl.attention`). With that attention, the head the rows share is kept
once (`shared_head`): the rows' buffers and kept caches hold only the positions after it, and attention reads it
once per call for all rows (on a CPU, decode is bound by memory traffic; docs/engines.md).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Hashable

import torch

from turnrl.attention import gqa_attention, pack_layout, packable, packed_rows, shared_head
from turnrl.engines.base import Completion, SamplingParams, check_prompts
from turnrl.engines.kv_cache import _BufferCache, _BufferLayer, _Cached
from turnrl.lora import merged_lora
from turnrl.shared_prefix import common_head


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None = None,
                generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row of `probs` (rows, vocab), drawn by inverse-CDF sampling: one uniform per row (from
    `generator`, or from the row's own entry of `generators`), located in
    the row's cumulative sum (float64, so a 49k-entry vocabulary keeps its small probabilities). Tokens of
    probability 0 are never drawn.

    Written by hand because `torch.multinomial` draws an exponential variate for every vocabulary entry of every
    row (the exponential-race method): 42 ms per decode step for 32 rows of SmolLM2's 49k vocabulary on 2 CPU
    cores, about a fifth of the step; this takes ~1 ms."""
    cdf = probs.double().cumsum(-1)
    # u in (0, 1], so the target u * total lies in (0, total]; the first entry whose cumulative sum reaches it is a
    # token of positive probability (a zero-probability token repeats its predecessor's sum).
    # `generators` (one per row) gives every row its own stream, so a row's draw does not depend on its neighbours.
    if generators is not None:
        u = 1.0 - torch.cat([torch.rand((1, 1), generator=g, dtype=torch.float64) for g in generators]).to(probs.device)
    else:
        # drawn on the host: the generator is a CPU one on every device (the same draws on a GPU as on the CPU)
        u = 1.0 - torch.rand((probs.shape[0], 1), generator=generator, dtype=torch.float64).to(probs.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)


def _cache_argument(lm) -> str:
    """Name of the forward argument taking the KV cache: `cache` in recent transformers, else `past_key_values`."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # a PEFT model forwards its kwargs
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


DTYPES = ("float32", "bfloat16")


@contextlib.contextmanager
def bf16_weights(lm: torch.nn.Module):
    """Runs `lm` under bf16 autocast with bf16 copies of its linear layers' weights in place of the fp32 ones
    (restored on exit, also on error).

    The copies hold the values autocast would compute from the fp32 weights (the same rounding). Autocast alone
    would cast every fp32 weight again at every forward (it caches casts only of weights that require grad, so
    never a LoRA policy's frozen base): a decode step would read the fp32 weights and write bf16 ones. With one
    copy per `generate`, each step reads half the bytes of fp32 and the matmuls run in bf16. The input embedding
    keeps its fp32 weight, also when the output layer is tied to it (as under autocast)."""
    swapped = []
    try:
        for module in lm.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
                weight = module._parameters["weight"]
                module._parameters["weight"] = torch.nn.Parameter(weight.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
                swapped.append((module, weight))
        with torch.autocast(next(lm.parameters()).device.type, dtype=torch.bfloat16):
            yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight


class HFEngine:
    """Samples from a Hugging Face causal LM (the policy's `lm`) in batches of left-padded prompts."""

    # Finished rows are dropped from the decode batch once they make up this fraction of it.
    compact_fraction = 0.25

    def __init__(self, lm, *, eos_token_id: int, pad_token_id: int, batch_size: int = 64,
                 generator: torch.Generator | None = None, dtype: str = "float32", merge_lora: bool = True):
        if dtype not in DTYPES:
            raise ValueError(f"HFEngine dtype must be one of {DTYPES}, got {dtype!r}")
        self.lm = lm
        self.dtype = dtype
        self.merge_lora = merge_lora  # a LoRA policy samples with merged weight copies (`merged_lora`)
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._cache: dict[Hashable, _Cached] = {}
        self._cache_arg = _cache_argument(lm)
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "shared_prefill_tokens": 0, "generated_tokens": 0,
                      "compactions": 0}

    def release(self, keys) -> None:
        """Frees the cached state of finished episodes."""
        for key in keys:
            self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 keys: list[Hashable] | None = None, seeds: list[int] | None = None) -> list[Completion]:
        if not prompts:
            return []
        check_prompts(prompts, keys, seeds)
        # Sort by the number of tokens to prefill so each batch wastes little padding (identical
        # prompts end up side by side, so a group's members share one batch and one prefill).
        def new_tokens(i: int) -> int:
            cached = self._cache.get(keys[i]) if keys is not None else None
            return len(prompts[i]) - (cached.prefix_of(prompts[i]) if cached else 0)
        order = sorted(range(len(prompts)), key=lambda i: (new_tokens(i), prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        was_training = self.lm.training
        self.lm.eval()
        precision = bf16_weights(self.lm) if self.dtype == "bfloat16" else contextlib.nullcontext()
        try:
            # LoRA adapters merged into fp32 copies of the base weights: one matmul per projection per decode step
            # instead of three and an addition. Not in bf16, where the merged weight would round small adapter
            # updates away (`merged_lora`).
            merged = (merged_lora(self.lm) if self.merge_lora and self.dtype == "float32"
                      else contextlib.nullcontext())
            with merged, precision, gqa_attention(self.lm):
                # The head the uncached prompts share is prefilled once for the whole call, so that all its batches'
                # rows share one copy, also when the next turn sorts them into other batches (`shared_head`).
                uncached = {tuple(p) for i, p in enumerate(prompts) if keys is None or keys[i] not in self._cache}
                head = self._head([list(p) for p in uncached], next(self.lm.parameters()).device)
                for start in range(0, len(order), self.batch_size):
                    idx = order[start:start + self.batch_size]
                    batch_keys = [keys[i] for i in idx] if keys is not None else None
                    streams = [torch.Generator().manual_seed(seeds[i]) for i in idx] if seeds is not None else None
                    for i, completion in zip(idx, self._generate_batch([prompts[i] for i in idx], params, batch_keys,
                                                                       streams, head)):
                        results[i] = completion
        finally:
            if was_training:
                self.lm.train()
        return results  # type: ignore[return-value]

    def _prefill(self, prompts: list[list[int]], cached: list, reuse: list[int], capacity: int, device,
                 head: _Cached | None = None):
        """One forward over the uncached tokens of every row. Returns (cache, last logits, real, positions). With a
        shared `head` (inside `shared_head`), the buffer holds the positions after it."""
        batch = len(prompts)
        skip = len(head.tokens) if head is not None else 0
        width_c = max(reuse) - skip
        suffixes = [p[r:] for p, r in zip(prompts, reuse)]
        width_s = max(len(s) for s in suffixes)
        # Layout: [pad | cached prefix (reuse_i) | pad | suffix_i]; `real` marks tokens of the sequence.
        input_ids = torch.full((batch, width_s), self.pad, dtype=torch.long, device=device)
        positions = torch.zeros((batch, width_s), dtype=torch.long, device=device)
        real = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        for row, (suffix, r) in enumerate(zip(suffixes, reuse)):
            input_ids[row, width_s - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            positions[row, width_s - len(suffix):] = torch.arange(r, r + len(suffix))
            real[row, width_c - (r - skip):width_c] = True
            real[row, width_c + width_s - len(suffix):width_c + width_s] = True
        if width_c > 0 or head is not None:
            ref = head if head is not None else next(c for c in cached if c is not None)
            layers = []
            for layer in range(len(ref.keys)):
                h, _, d = ref.keys[layer].shape
                # Positions past the prefix are written before they are read; the masked gaps must be finite.
                k = torch.empty((batch, h, capacity, d), dtype=ref.keys[layer].dtype, device=device)
                v = torch.empty((batch, ref.values[layer].shape[0], capacity, ref.values[layer].shape[2]),
                                dtype=ref.values[layer].dtype, device=device)
                for row, (c, r) in enumerate(zip(cached, reuse)):
                    r -= skip
                    if r < width_c:  # the gap before a shorter prefix (only it: zeroing all touched every page)
                        k[row, :, :width_c - r].zero_()
                        v[row, :, :width_c - r].zero_()
                    if r:
                        k[row, :, width_c - r:width_c], v[row, :, width_c - r:width_c] = c.span(layer, skip, skip + r)
                layers.append(_BufferLayer(capacity, k, v, width_c))
        else:
            layers = [_BufferLayer(capacity) for _ in range(self.lm.config.num_hidden_layers)]
        cache = _BufferCache(layers)
        if (width_c > 0 or head is not None) and batch > 1 and packable(self.lm):
            return self._packed_prefill(cache, suffixes, reuse, real, width_c, width_s)
        out = self.lm(input_ids=input_ids, attention_mask=real[:, :width_c + width_s].long(), position_ids=positions,
                      use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return cache, out.logits[:, -1, :].float(), real, positions[:, -1] + 1

    def _packed_prefill(self, cache: _BufferCache, suffixes: list[list[int]], reuse: list[int], real: torch.Tensor,
                        width_c: int, width_s: int):
        """The prefill forward on the rows' new tokens back to back, (1, n) with no padding (`packed_rows`); their
        keys/values land where the padded forward would write them, and the logits are those of each row's last
        token. The buffer positions left of a shorter suffix are zeroed (masked, but they must be finite)."""
        device = real.device
        counts = [len(x) for x in suffixes]
        lengths = torch.tensor(counts, device=device)
        rows, slots = pack_layout(counts, width_s, right_aligned=True, device=device)
        positions = torch.cat([torch.arange(r, r + len(x), device=device) for x, r in zip(suffixes, reuse)])
        end = width_c + width_s
        for layer in cache.layers:
            layer.scatter = (rows, width_c + slots, end)
            for row, x in enumerate(suffixes):
                if len(x) < width_s:
                    layer.kbuf[row, :, width_c:end - len(x)].zero_()
                    layer.vbuf[row, :, width_c:end - len(x)].zero_()
        causal = torch.arange(end, device=device)[None, :] <= width_c + torch.arange(width_s, device=device)[:, None]
        mask = real[:, None, None, :end] & causal
        ids = torch.tensor([[t for x in suffixes for t in x]], dtype=torch.long, device=device)
        try:
            with packed_rows(rows, slots, width_s, mask):
                out = self.lm(input_ids=ids, position_ids=positions[None], use_cache=True,
                              logits_to_keep=torch.cumsum(lengths, 0) - 1, **{self._cache_arg: cache})
        finally:
            for layer in cache.layers:
                layer.scatter = None
        return cache, out.logits[0].float(), real, torch.tensor(reuse, device=device) + lengths

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, keys: list[Hashable] | None,
                        streams: list[torch.Generator] | None = None, head: _Cached | None = None) -> list[Completion]:
        """Samples the replies to `prompts`; `head`: the head all the call's uncached prompts share (`_head`)."""
        device = next(self.lm.parameters()).device
        batch = len(prompts)
        cached = [self._cache.get(k) if keys is not None else None for k in (keys or [None] * batch)]
        reuse = [c.prefix_of(p) if c is not None else 0 for c, p in zip(cached, prompts)]
        width = max(reuse) + max(len(p) - r for p, r in zip(prompts, reuse))
        capacity = width + params.max_new_tokens - 1  # the last sampled token is never fed
        self.stats["reused_tokens"] += sum(reuse)
        self.stats["prefill_tokens"] += sum(len(p) - r for p, r in zip(prompts, reuse))

        if max(reuse) == 0:
            # Identical uncached prompts (a group's first turn) are prefilled once and copied to every member;
            # the head the distinct prompts share (system prompt, rules) is prefilled once and served to each
            # of them like a cached prefix.
            first: dict[tuple[int, ...], int] = {}
            inverse = [first.setdefault(tuple(p), len(first)) for p in prompts]
            unique = [list(p) for p in first]
            self.stats["shared_prefill_tokens"] += sum(len(p) for p in prompts) - sum(len(p) for p in unique)
            if head is not None and not all(len(p) > len(head.tokens) and p[:len(head.tokens)] == head.tokens
                                            for p in unique):
                head = None  # a keyed row whose cache shares nothing with its prompt is not among the call's uncached
            shared = head if head is not None and packable(self.lm) else None
            with self._attending(shared):
                cache, logits, real, next_pos = self._prefill(unique, [head] * len(unique),
                                                              [len(head.tokens) if head else 0] * len(unique),
                                                              capacity, device, shared)
            if len(unique) < batch:
                expand = torch.tensor(inverse, dtype=torch.long, device=device)
                cache.select_rows(expand)
                logits, real, next_pos = logits[expand], real[expand], next_pos[expand]
        else:
            shared = cached[0].head if cached[0] is not None and packable(self.lm) else None
            if shared is not None and not all(c is not None and c.head is shared and r >= len(shared.tokens)
                                              for c, r in zip(cached, reuse)):
                shared = None  # rows cached by different calls, or a prompt that left the head: copy it per row
            with self._attending(shared):
                cache, logits, real, next_pos = self._prefill(prompts, cached, reuse, capacity, device, shared)
        length = cache.layers[0].length
        with self._attending(shared):
            completions = self._decode(cache, logits, real, next_pos, length, prompts, params, keys, streams,
                                       shared)
        self.stats["generated_tokens"] += sum(len(c.ids) for c in completions)
        return completions

    @staticmethod
    def _attending(head: _Cached | None):
        """Within: the model attends to `head` ahead of every row's cache (`shared_head`), when there is one."""
        return shared_head(head.keys, head.values) if head is not None else contextlib.nullcontext()

    def _decode(self, cache: _BufferCache, logits: torch.Tensor, real: torch.Tensor, next_pos: torch.Tensor,
                length: int, prompts: list[list[int]], params: SamplingParams, keys: list[Hashable] | None,
                streams: list[torch.Generator] | None, head: _Cached | None) -> list[Completion]:
        """Samples every row's reply from the prefilled `cache` and the logits of its prompt's last token, and keeps
        each keyed row's keys/values (after the shared `head`, if any) for its next turn."""
        device, batch = logits.device, len(prompts)

        out_tokens = torch.full((batch, params.max_new_tokens), self.pad, dtype=torch.long, device=device)
        out_logps = torch.zeros((batch, params.max_new_tokens), dtype=torch.float32, device=device)
        n_out = torch.zeros(batch, dtype=torch.long, device=device)  # tokens sampled per original row
        rows = torch.arange(batch, device=device)  # original row of each batch row
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        kept: dict[int, tuple] = {}  # original row -> (fed mask, keys, values) saved before the row left
        for step in range(params.max_new_tokens):
            if params.greedy:
                logp_all = torch.log_softmax(logits, dim=-1)
                choice = logp_all.argmax(-1)
            else:
                scaled = logits / params.temperature
                logp_all = torch.log_softmax(scaled, dim=-1)
                sample_from = scaled if params.top_p >= 1.0 else _top_p_filter(scaled, params.top_p)
                choice = sample_rows(torch.softmax(sample_from, dim=-1), self.generator,
                                     None if streams is None else [streams[r] for r in rows.tolist()])
            live = ~finished
            choice = torch.where(live, choice, torch.full_like(choice, self.pad))
            out_tokens[rows, step] = choice
            out_logps[rows, step] = torch.where(live, logp_all.gather(-1, choice[:, None]).squeeze(-1),
                                                torch.zeros((), device=device))
            n_out[rows] += live.long()
            finished = finished | (choice == self.eos)
            n_done = int(finished.sum())
            if n_done == len(rows) or step == params.max_new_tokens - 1:
                break
            if n_done and n_done >= self.compact_fraction * len(rows):
                gone = finished.nonzero().squeeze(-1)
                if keys is not None:
                    for b in gone.tolist():
                        kept[int(rows[b])] = self._row_state(cache, real, b, length)
                stay = (~finished).nonzero().squeeze(-1)
                cache.select_rows(stay)
                self.stats["compactions"] += 1
                rows, real, next_pos, finished = rows[stay], real[stay], next_pos[stay], finished[stay]
                choice, live = choice[stay], live[stay]
            # Feed the sampled token; rows that had already finished feed a masked pad.
            real[:, length] = live
            length += 1
            out = self.lm(input_ids=choice[:, None], attention_mask=real[:, :length].long(),
                          position_ids=next_pos[:, None], use_cache=True, **{self._cache_arg: cache})
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1

        counts = n_out.tolist()
        tokens_l, logps_l = out_tokens.tolist(), out_logps.tolist()
        completions = []
        for row in range(batch):
            ids = tokens_l[row][:counts[row]]
            reason = "stop" if ids and ids[-1] == self.eos else "length"
            completions.append(Completion(tuple(ids), tuple(logps_l[row][:counts[row]]), reason))

        if keys is not None:  # keep each episode's keys/values for its next turn
            skip = len(head.tokens) if head is not None else 0
            for b, row in enumerate(rows.tolist()):
                kept[row] = self._row_state(cache, real, b, length)
            for row, key in enumerate(keys):
                sel, ks, vs = kept[row]
                seq = prompts[row] + list(completions[row].ids)
                self._cache[key] = _Cached(seq[:skip + sel], ks, vs, head)
        return completions

    @torch.inference_mode()
    def _head(self, prompts: list[list[int]], device) -> _Cached | None:
        """The keys/values of the longest head all `prompts` share (each keeps at least one token of its own),
        or None when there are fewer than two prompts or the head is shorter than shared_prefix.MIN_HEAD tokens."""
        if len(prompts) < 2:
            return None
        n = min(len(p) for p in prompts) - 1
        x = torch.tensor([p[:n] for p in prompts])
        size = common_head(x)
        if not size:
            return None
        cache = _BufferCache([_BufferLayer(size) for _ in range(self.lm.config.num_hidden_layers)])
        self.lm(input_ids=x[:1, :size].to(device), use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        self.stats["shared_prefill_tokens"] += (len(prompts) - 1) * size
        return _Cached(prompts[0][:size], [layer.kbuf[0] for layer in cache.layers],
                       [layer.vbuf[0] for layer in cache.layers])

    @staticmethod
    def _row_state(cache: _BufferCache, real: torch.Tensor, b: int, length: int):
        """(number of tokens fed, per-layer keys, per-layer values) of batch row `b`, copied out of the buffer (by
        the boolean indexing itself, which always copies: no `clone` after it, which wrote every byte a second time,
        ~1 s of a 5-turn SmolLM2 rollout)."""
        sel = real[b, :length]
        return (int(sel.sum()), [layer.kbuf[b, :, :length][:, sel] for layer in cache.layers],
                [layer.vbuf[b, :, :length][:, sel] for layer in cache.layers])
