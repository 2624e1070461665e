"""Grouped-query attention without `repeat_kv`, for transformers models that use SDPA.

transformers' SDPA attention copies a grouped-query model's keys and values once per query head before every
attention call with more than one query (SmolLM2: 9 query heads over 3 key/value heads, so 3 copies of the
whole cache or sequence, at every layer), and sums the copies' gradients back in the backward pass.
`gqa_attention(lm)` switches a model to `gqa_sdpa_attention`, which stacks each key/value head's query heads along
the query axis instead: the same products (SDPA's outputs are equal), no copies. Used by the HF engine's
`generate` and around the update, SFT and the diagnostics' forwards; the model's own setting is restored after.
`packed_rows` runs the new tokens of many rows as one unpadded sequence: the HF engine's prefill of later turns and
the update's continuations after their shared prompts use it (see there).
Written here because transformers stacks the group only for a single query (decode), and SDPA's own `enable_gqa`
(`TRANSFORMERS_SDPA_FORCE_GQA=1`) gave no measurable gain with a mask on CPU (docs/performance.md).
"""

from __future__ import annotations

import contextlib

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

GQA_ATTENTION = "turnrl_gqa_sdpa"
_folded_mask: list = [None]  # (mask, groups, folded) of the last forward's mask
_bias: list = [None]  # (mask, dtype, additive) of the last forward's mask
_packed: list = [None]  # (flat index rows * width + slots, width, mask) while `packed_rows` is active
_shared: list = [None]  # (per-layer keys, per-layer values) of the head all rows share, while `shared_head` is active


def _fold_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, 1, q, kv) mask -> (b, 1, groups * q, kv), whose row j * q + p is row p. Every layer of a forward gets
    the same mask tensor, so the last result is reused while the tensor is the same."""
    last = _folded_mask[0]
    if last is not None and last[0] is mask and last[1] == groups:
        return last[2]
    b, heads, q, kv = mask.shape
    folded = mask[:, :, None].expand(b, heads, groups, q, kv).reshape(b, heads, groups * q, kv)
    _folded_mask[0] = (mask, groups, folded)
    return folded


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kw):
    """transformers' SDPA attention, except that a grouped-query prefill with a mask attends each key/value head
    with its group's queries stacked along the query axis, (b, kv_heads, groups * q, d), instead of copying the
    keys and values once per query head (`repeat_kv`): the same products and outputs, without
    writing (groups - 1) copies of the whole KV cache at every layer of every prefill. On 2 CPU cores that copy
    took a third as long as the attention itself in a SmolLM2 turn's prefill (446 cached positions, 32 rows); in
    the update (autograd through the same ops) it also saves summing the copies' gradients back. Decode steps
    (q = 1) already stack the group in transformers; everything else is delegated unchanged. Under bf16 autocast,
    attention calls over short sequences run in fp32 (`_fp32_attention`)."""
    if _packed[0] is not None or _shared[0] is not None:
        if any(kw.get(name) is not None for name in ("sliding_window", "softcap", "position_bias")):
            raise RuntimeError("packed_rows and shared_head support plain causal attention only (see packable())")
        if _packed[0] is not None:
            return _packed_attention(module, query, key, value, dropout, scaling)
        return _with_head(module, query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    if (groups == 1 or q == 1 or attention_mask is None or attention_mask.shape[1] != 1 or kw.get("position_bias")
            is not None or kw.get("softcap") is not None or kw.get("output_attentions")):
        def attend(query, key, value, mask):
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kw)
        if not _fp32_attention(query, q, key.shape[-2]):
            return attend(query, key, value, attention_mask)
        out, weights = _in_fp32(attend, query, key, value, attention_mask)
        return out.to(torch.get_autocast_dtype(query.device.type)), weights
    return _stacked(query, key, value, attention_mask, groups, dropout, scaling).transpose(1, 2).contiguous(), None


# Attention calls with fewer queries and a smaller keys x head width than these run in fp32 under bf16 autocast
# (`_fp32_attention`).
FP32_MAX_QUERIES = 768
FP32_MAX_KEY_WIDTH = 12288


def _fp32_attention(query: torch.Tensor, queries: int, keys: int) -> bool:
    """Whether an attention call of `queries` queries over `keys` keys (as SDPA receives them) should run in fp32
    although bf16 autocast is on: a CPU call with fewer than FP32_MAX_QUERIES queries and keys x head width at most
    FP32_MAX_KEY_WIDTH. There torch's CPU flash kernel took up to 4.8x as long for forward + backward in bf16 as in fp32
    (about as long at the bounds): its bf16 backward is slow on short query blocks whatever the head width, while fp32's
    cost grows with the keys and the width. Past these bounds bf16 was about as fast or up to 2x faster
    (docs/performance.md, scripts/attention_precision.py; torch 2.13, 2 cores, AMX). It covers the tiny model's SFT and
    SmolLM2's updates on short episodes (the bandit), not SmolLM2's multi-turn update (over 768 stacked queries). fp32
    is also the more exact of the two. The decision depends only on shapes, so a forward with or without gradient (the
    KL reference's, a checkpointed layer's replay) computes the same. Not in inference mode (the engines' sampling under
    `engine.hf_dtype=bfloat16`): there is no backward there, and the forward alone is as fast or faster in bf16."""
    device = query.device.type
    return (device == "cpu" and torch.is_autocast_enabled(device) and not torch.is_inference_mode_enabled()
            and torch.get_autocast_dtype(device) == torch.bfloat16
            and queries < FP32_MAX_QUERIES and keys * query.shape[-1] <= FP32_MAX_KEY_WIDTH)


def _in_fp32(attend, query, key, value, mask):
    """attend(query, key, value, mask) on fp32 copies of the inputs with autocast off (`_fp32_attention`)."""
    mask = mask.float() if mask is not None and mask.is_floating_point() else mask
    with torch.autocast(query.device.type, enabled=False):
        return attend(query.float(), key.float(), value.float(), mask)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive mask SDPA would make of it (0 where True, -inf where False) in the dtype SDPA
    computes in (an additive mask is cast to it). SDPA converts a boolean mask at every call, i.e. at every layer
    (in the SmolLM2 update: 60 passes over an (8, 1, 879, 549) mask, ~2% of its time); the last result is reused
    while the tensor is the same."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    last = _bias[0]
    if last is not None and last[0] is mask and last[1] == dtype:
        return last[2]
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    _bias[0] = (mask, dtype, additive)
    return additive


def _stacked(query, key, value, mask, groups, dropout, scaling):
    """SDPA of (b, heads, q, d) queries over (b, heads // groups, kv, d) keys/values, each key/value head's query
    heads stacked along the query axis; returns (b, heads, q, d)."""
    b, heads, q, d = query.shape
    device = query.device.type

    def attend(query, key, value, mask):
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
        return torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, heads // groups, groups * q, d), key, value, attn_mask=_additive(mask, dtype),
            dropout_p=dropout, scale=scaling)
    mask = _fold_mask(mask, groups) if groups > 1 else mask
    if _fp32_attention(query, groups * q, key.shape[-2]):
        out = _in_fp32(attend, query, key, value, mask).to(torch.get_autocast_dtype(device))
    else:
        out = attend(query, key, value, mask)
    return out.reshape(b, heads, q, value.shape[-1])


def _packed_attention(module, query, key, value, dropout, scaling):
    """Attention of a packed forward: `query` (1, heads, n, d) holds the n new tokens of all rows back to back;
    `key`/`value` (rows, kv_heads, length, d) are the rows' caches, the new tokens already written in. The
    queries are laid out per row (at their slots in a window of `width` positions), attended with
    the mask `packed_rows` was given, and packed again."""
    at, width, mask = _packed[0]  # flat (row, slot) index: index_copy/index_select have cheap backwards on CPU
    b, heads, d = key.shape[0], query.shape[1], query.shape[-1]
    per_row = query.new_zeros((b * width, heads, d)).index_copy(0, at, query[0].transpose(0, 1))
    per_row = per_row.view(b, width, heads, d).transpose(1, 2)
    if _shared[0] is not None:
        out = _with_head(module, per_row, key, value, mask, scaling)
    else:
        out = _stacked(per_row, key, value, mask, getattr(module, "num_key_value_groups", 1), dropout, scaling)
    return out.transpose(1, 2).reshape(b * width, heads, -1).index_select(0, at).unsqueeze(0), None


def _attention_lse(query, key, value, mask, scale):
    """Attention output and its logsumexp per query, (b, h, q) in fp32. `mask` is additive in the query's dtype
    (or None). A query whose keys are all masked gets output 0 (logsumexp 0 on CPU, -inf elsewhere): finite, and
    only padding slots have no key (every real token attends to itself)."""
    if query.device.type == "cpu":  # SDPA's CPU flash kernel computes the logsumexp anyway; SDPA drops it
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                          attn_mask=mask, scale=scale)
    return _attention_lse_math(query, key, value, mask, scale)


def _attention_lse_math(query, key, value, mask, scale):
    """`_attention_lse` by explicit products in fp32, on devices without the CPU kernel."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, -1)
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ value.float()).to(query.dtype), lse


def _with_head(module, query, key, value, mask, scaling):
    """Attention of (b, heads, q, d) queries over the shared head (`shared_head`, the same keys/values for every
    row) followed by each row's own (b, kv_heads, kv, d) keys/values under `mask` (b, 1, q, kv) (None: causal
    over the last q keys); returns (b, heads, q, d).

    Cascade attention (Juravsky et al., 2024, "Hydragen: High-Throughput LLM Inference with Shared Prefixes"):
    softmax attention over a concatenation of keys is the two partial attentions weighted by their
    logsumexps, so the head's keys/values are read once for all rows, with every row's queries stacked into one
    call, instead of once per row from a copy in each row's cache. Decode is bound by memory traffic on CPU
    (weights and cache), and the head (system prompt, rules) was ~40% of a Sokoban episode's cache."""
    head_keys, head_values = (part[module.layer_idx] for part in _shared[0])
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast (rotary leaves the queries and keys in fp32)
        dtype = torch.get_autocast_dtype(device)
        query, key, value, head_keys, head_values = (x.to(dtype) for x in (query, key, value, head_keys, head_values))
    groups = getattr(module, "num_key_value_groups", 1)
    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[-2]
    scale = scaling if scaling is not None else d ** -0.5
    if mask is None:  # transformers leaves the mask out when no position is padded
        positions = torch.arange(length, device=query.device)
        mask = (positions <= positions[length - q:, None]).expand(b, 1, q, length)
    mask = _fold_mask(mask, groups) if groups > 1 else mask
    stacked = query.reshape(b, kv_heads, groups * q, d)
    own, own_lse = _attention_lse(stacked, key, value, _additive(mask, query.dtype).expand(b, 1, groups * q, length),
                                  scale)
    every_row = stacked.transpose(0, 1).reshape(1, kv_heads, b * groups * q, d)
    top, top_lse = _attention_lse(every_row, head_keys[None], head_values[None], None, scale)
    top = top.view(kv_heads, b, groups * q, d).transpose(0, 1)
    top_lse = top_lse.view(kv_heads, b, groups * q).transpose(0, 1)
    lse = torch.logaddexp(own_lse, top_lse)
    out = own * (own_lse - lse).exp()[..., None] + top * (top_lse - lse).exp()[..., None]
    return out.to(query.dtype).reshape(b, heads, q, d)


@contextlib.contextmanager
def shared_head(keys: list[torch.Tensor], values: list[torch.Tensor]):
    """Within: every attention call of a model running `gqa_sdpa_attention` (inside `gqa_attention`, `packable`)
    attends, ahead of each row's own keys/values (its KV cache), to one head shared by all rows: per layer
    `keys[layer]`, `values[layer]` (kv_heads, head_len, head_dim), at positions 0..head_len - 1 of every row
    (the position ids of the rows' tokens count them; the cache and the 2-D attention mask do not). The HF engine
    uses it for the system prompt its rows share (`_with_head`)."""
    _shared[0] = (keys, values)
    try:
        yield
    finally:
        _shared[0] = None
        _folded_mask[0] = _bias[0] = None


def pack_layout(lengths: list[int], width: int, *, right_aligned: bool, device=None):
    """(rows, slots) of a packed sequence of rows of these `lengths`: token i is row `rows[i]`'s token at `slots[i]`
    of its window of `width` positions, the row's tokens at the window's end (`right_aligned`) or its start."""
    n = torch.tensor(lengths, device=device)
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=device), n)
    slots = torch.cat([torch.arange(width - k if right_aligned else 0, width if right_aligned else k, device=device)
                       for k in lengths])
    return rows, slots


def packable(lm) -> bool:
    """True when `lm` runs `gqa_sdpa_attention` (inside `gqa_attention`) with plain causal attention, which is what
    the mask of a packed forward applies: no sliding window (Mistral, Gemma) and no logit soft-capping."""
    config = lm.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return (config._attn_implementation == GQA_ATTENTION and window is None
            and getattr(config, "attn_logit_softcapping", None) is None)


def _mask(*args, **kwargs):
    """SDPA's mask builder, except during a packed forward, whose mask `packed_rows` holds."""
    return None if _packed[0] is not None else sdpa_mask(*args, **kwargs)


@contextlib.contextmanager
def packed_rows(rows: torch.Tensor, slots: torch.Tensor, width: int, mask: torch.Tensor):
    """Within: the model's forward takes the new tokens of several rows as one sequence (1, n), with no padding
    between them, so its projections and MLPs compute exactly the n real tokens. Token i belongs to batch row
    `rows[i]` and sits at `slots[i]` in that row's window of the last `width` positions of the KV buffer (the
    cache writes its keys/values there); `mask` (rows, 1, width, length) says which buffer positions each window
    position attends. Only for a model running `gqa_sdpa_attention` (inside `gqa_attention`).

    Used by the HF engine's prefill of later turns (32 rows' env replies differ in length by up to ~35 tokens, so
    a padded batch spent 18-25% of a SmolLM2 turn's prefill on padding) and by the update's continuations after
    their shared prompts (`shared_prefix._packed_continuations`: episodes end at different turns)."""
    _packed[0] = (rows * width + slots, width, mask)
    try:
        yield
    finally:
        _packed[0] = None
        _folded_mask[0] = _bias[0] = None


AttentionInterface.register(GQA_ATTENTION, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_ATTENTION, _mask)


@contextlib.contextmanager
def gqa_attention(lm: torch.nn.Module):
    """Runs an SDPA model with `gqa_sdpa_attention` (restored on exit, also on error); other models unchanged."""
    config = lm.config
    if config._attn_implementation != "sdpa":
        yield
        return
    config._attn_implementation = GQA_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _folded_mask[0] = _bias[0] = None
