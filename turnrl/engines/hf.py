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
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from turnrl.engines.base import Completion, SamplingParams


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs > top_p  # keep the token that crosses top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class _Cached:
    """One episode's cached tokens and their per-layer keys/values, each (heads, len, head_dim)."""

    __slots__ = ("tokens", "keys", "values")

    def __init__(self, tokens: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.tokens, self.keys, self.values = tokens, keys, values

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


class HFEngine:
    """Samples from a Hugging Face causal LM (the policy's `lm`) in batches of left-padded prompts."""

    def __init__(self, lm, *, eos_token_id: int, pad_token_id: int, batch_size: int = 64,
                 generator: torch.Generator | None = None):
        self.lm = lm
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._cache: dict[Hashable, _Cached] = {}
        self.stats = {"prefill_tokens": 0, "reused_tokens": 0, "generated_tokens": 0}

    def release(self, keys) -> None:
        """Frees the cached state of finished episodes."""
        for key in keys:
            self._cache.pop(key, None)

    def clear(self) -> None:
        self._cache.clear()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 keys: list[Hashable] | None = None) -> list[Completion]:
        if not prompts:
            return []
        if keys is not None and len(keys) != len(prompts):
            raise ValueError("keys must have one entry per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        # Sort by the number of tokens to prefill so each batch wastes little padding.
        def new_tokens(i: int) -> int:
            cached = self._cache.get(keys[i]) if keys is not None else None
            return len(prompts[i]) - (cached.prefix_of(prompts[i]) if cached else 0)
        order = sorted(range(len(prompts)), key=new_tokens)
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch_keys = [keys[i] for i in idx] if keys is not None else None
            for i, completion in zip(idx, self._generate_batch([prompts[i] for i in idx], params, batch_keys)):
                results[i] = completion
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams,
                        keys: list[Hashable] | None) -> list[Completion]:
        was_training = self.lm.training
        self.lm.eval()
        device = next(self.lm.parameters()).device
        batch = len(prompts)
        cached = [self._cache.get(k) if keys is not None else None for k in (keys or [None] * batch)]
        reuse = [c.prefix_of(p) if c is not None else 0 for c, p in zip(cached, prompts)]
        width_c = max(reuse)
        suffixes = [p[r:] for p, r in zip(prompts, reuse)]
        width_s = max(len(s) for s in suffixes)
        self.stats["reused_tokens"] += sum(reuse)
        self.stats["prefill_tokens"] += sum(len(s) for s in suffixes)

        # Layout: [pad | cached prefix (reuse_i) | pad | suffix_i]; `real` marks tokens of the sequence.
        input_ids = torch.full((batch, width_s), self.pad, dtype=torch.long, device=device)
        positions = torch.zeros((batch, width_s), dtype=torch.long, device=device)
        real = torch.zeros((batch, width_c + width_s), dtype=torch.bool, device=device)
        for row, (suffix, r) in enumerate(zip(suffixes, reuse)):
            input_ids[row, width_s - len(suffix):] = torch.tensor(suffix, dtype=torch.long)
            positions[row, width_s - len(suffix):] = torch.arange(r, r + len(suffix))
            real[row, width_c - r:width_c] = True
            real[row, width_c + width_s - len(suffix):] = True
        past = None
        if width_c > 0:
            from transformers import DynamicCache

            past = DynamicCache()
            for layer in range(len(next(c for c in cached if c is not None).keys)):
                ref = next(c for c in cached if c is not None).keys[layer]
                k = torch.zeros((batch, ref.shape[0], width_c, ref.shape[2]), dtype=ref.dtype, device=device)
                v = torch.zeros_like(k)
                for row, (c, r) in enumerate(zip(cached, reuse)):
                    if r:
                        k[row, :, width_c - r:] = c.keys[layer][:, :r]
                        v[row, :, width_c - r:] = c.values[layer][:, :r]
                past.update(k, v, layer)

        out = self.lm(input_ids=input_ids, attention_mask=real.long(), position_ids=positions,
                      past_key_values=past, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1, :].float()
        next_pos = positions[:, -1] + 1
        tokens, logps = [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(params.max_new_tokens):
            if params.greedy:
                logp_all = torch.log_softmax(logits, dim=-1)
                choice = logp_all.argmax(-1)
            else:
                scaled = logits / params.temperature
                logp_all = torch.log_softmax(scaled, dim=-1)
                sample_from = scaled if params.top_p >= 1.0 else _top_p_filter(scaled, params.top_p)
                choice = torch.multinomial(torch.softmax(sample_from, dim=-1), 1, generator=self.generator).squeeze(-1)
            was_finished = finished.clone()
            choice = torch.where(was_finished, torch.full_like(choice, self.pad), choice)
            tokens.append(choice)
            logps.append(logp_all.gather(-1, choice[:, None]).squeeze(-1))
            finished |= choice == self.eos
            if bool(finished.all()) or step == params.max_new_tokens - 1:
                break
            # Feed the sampled token; rows that had already finished feed a masked pad.
            real = torch.cat([real, (~was_finished)[:, None]], dim=1)
            out = self.lm(input_ids=choice[:, None], attention_mask=real.long(), position_ids=next_pos[:, None],
                          past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        if was_training:
            self.lm.train()

        tokens_t, logps_t = torch.stack(tokens, 1), torch.stack(logps, 1)
        completions = []
        for row in range(batch):
            ids = tokens_t[row].tolist()
            cut = ids.index(self.eos) + 1 if self.eos in ids else len(ids)
            reason = "stop" if self.eos in ids else "length"
            completions.append(Completion(tuple(ids[:cut]), tuple(logps_t[row, :cut].tolist()), reason))
        self.stats["generated_tokens"] += sum(len(c.ids) for c in completions)

        if keys is not None:  # keep each episode's keys/values for its next turn
            n_cached = real.shape[1]
            for row, key in enumerate(keys):
                sel = real[row, :n_cached]
                fed = int(sel.sum().item())
                seq = prompts[row] + list(completions[row].ids)
                self._cache[key] = _Cached(
                    seq[:fed],
                    [layer.keys[row][:, sel].clone() for layer in cache.layers],
                    [layer.values[row][:, sel].clone() for layer in cache.layers])
        return completions
