"""Shared-prefix forward for the update: the members of a group start from the same prompt, so that
prompt is run forward (and backward) once per group and its keys/values are reused, with gradient, by
every member's continuation.

Prompts of different groups usually begin alike too (the system prompt and the game rules): the
longest common head of a micro-batch's prompts runs once for the whole micro-batch, then each group's
rest of the prompt, then every member's continuation (a prefix tree of depth three).

The idea is the one behind prefix sharing in RL trainers (e.g. "prefix tree" / shared-prompt batching
of GRPO groups): with a group of G episodes whose first prompt has P tokens, the forward and backward
passes over the prompt shrink from G x P to P token positions, while the loss is unchanged, because a
causal model's states over the prompt do not depend on what follows it. Gradients equal the unshared
computation up to float rounding (tests/test_update_shared_prefix.py checks it).

Only the positions that can carry loss come out: for each row, a window of last hidden states starting at
the last prompt position (it predicts the first sampled token) and ending at the row's last position. The
window of row r covers shifted positions [start_r, start_r + width) of the collated batch. The caller applies
the LM head (turnrl.lm_parts) to the positions of the window it needs.
"""

from __future__ import annotations

import contextlib

import torch
from transformers.cache_utils import Cache, DynamicLayer

from turnrl.attention import pack_layout, packable, packed_rows
from turnrl.lm_parts import lm_parts, output_cache


def prompt_lengths(ids: list[tuple[int, ...]], loss_masks: list[tuple[int, ...]]) -> list[int]:
    """Length of each sequence's first prompt (tokens before the first model token), at most len - 1."""
    out = []
    for seq, mask in zip(ids, loss_masks):
        first = next((i for i, m in enumerate(mask) if m), len(seq) - 1)
        out.append(max(1, min(first, len(seq) - 1)))
    return out


def prompt_ids(ids: list[tuple[int, ...]], prompt_len: list[int]) -> list[int]:
    """A number per sequence, equal for sequences whose first prompts are identical."""
    seen: dict[tuple[int, ...], int] = {}
    return [seen.setdefault(tuple(seq[:p]), len(seen)) for seq, p in zip(ids, prompt_len)]


def prefix_groups(rows: list[int], prompt_id: list[int]) -> list[list[int]]:
    """Rows grouped by identical first prompt, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(prompt_id[r], []).append(r)
    return list(groups.values())


# A common head shorter than this is not run separately: the extra forward call costs more than it saves.
MIN_HEAD = 8


def head_length(input_ids: torch.Tensor, rows: list[int], prompt_len: list[int]) -> int:
    """Length of the common head of the rows' first prompts, leaving each prompt at least one token of its
    own (its last position's logits predict the first reply token); 0 when shorter than MIN_HEAD."""
    return common_head(input_ids[rows, :max(0, min(prompt_len[r] for r in rows) - 1)])


def common_head(x: torch.Tensor) -> int:
    """How many leading columns all rows of `x` (rows, n) agree on; 0 when fewer than MIN_HEAD or when `x`
    has fewer than two rows (nothing to share)."""
    if x.shape[0] < 2 or x.shape[1] < MIN_HEAD:
        return 0
    differs = (x != x[:1]).any(0).nonzero()
    head = int(differs[0]) if len(differs) else x.shape[1]
    return head if head >= MIN_HEAD else 0


def worth_sharing(rows: list[int], prompt_id: list[int], head: int = 0) -> bool:
    """True when at least two rows share a first prompt or the first prompts share a head of `head` tokens."""
    return head > 0 or len({prompt_id[r] for r in rows}) < len(rows)


def plan_micro_batches(rows: list[int], lengths: list[int], prompt_len: list[int], prompt_id: list[int],
                       token_budget: int, head: int = 0) -> list[list[int]]:
    """Micro-batches of at most `token_budget` padded token positions (the common head of all prompts once,
    each prompt's rest once, plus every row's continuation), packed group by group in order of prompt length;
    a group is split only when it alone exceeds the budget. `head`: the common head length of all `rows`
    (head_length); a micro-batch's own head is at least as long, so the cost is an upper bound."""
    def cost(mb: list[int]) -> int:
        return (head + len({prompt_id[r] for r in mb}) * (max(prompt_len[r] for r in mb) - head)
                + len(mb) * max(lengths[r] - prompt_len[r] for r in mb))

    groups = sorted(prefix_groups(rows, prompt_id), key=lambda g: (prompt_len[g[0]], max(lengths[r] for r in g)))
    out, current = [], []
    for g in groups:
        g = sorted(g, key=lambda r: lengths[r])
        if current and cost(current + g) > token_budget:
            out.append(current)
            current = []
        for r in g:
            if current and cost(current + [r]) > token_budget:
                out.append(current)
                current = []
            current.append(r)
    if current:
        out.append(current)
    return out


def shared_prefix_hidden(lm, input_ids: torch.Tensor, lengths: list[int], rows: list[int],
                         prompt_len: list[int], prompt_id: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Last hidden states of `rows` over their loss windows: (len(rows), width, hidden), the window starts
    (len(rows),) and width. Window position j of row r predicts token input_ids[r, start_r + j + 1] through
    lm_parts(lm).head (for a model that cannot be split, the "hidden states" are the logits themselves)."""
    from turnrl.engines.hf import _cache_argument

    # Under gradient checkpointing (which acts only where gradients are taken) every cache a checkpointed layer
    # appends to must give the same keys/values when the backward pass replays the layer (`_ReplaySafeLayer`), and
    # the packed forward, whose layout lives only during the forward, is not used. The caches are passed in, so
    # `use_cache` (which transformers switches off under checkpointing, with a warning) stays off.
    safe = checkpointing(lm) and torch.is_grad_enabled()
    with _cache_in_checkpointed_layers(lm) if safe else contextlib.nullcontext():
        return _forward(lm, input_ids, lengths, rows, prompt_len, prompt_id, _cache_argument(lm), safe)


def _forward(lm, input_ids: torch.Tensor, lengths: list[int], rows: list[int], prompt_len: list[int],
             prompt_id: list[int], cache_arg: str, safe: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`shared_prefix_hidden`'s forwards; `safe`: under gradient checkpointing."""
    body = lm_parts(lm).body
    device = input_ids.device
    fresh = {cache_arg: Cache(layer_class_to_replicate=_ReplaySafeLayer)} if safe else {}
    groups = prefix_groups(rows, prompt_id)
    g_index = {r: gi for gi, g in enumerate(groups) for r in g}
    order = rows  # output rows keep the caller's order
    p_len = [prompt_len[g[0]] for g in groups]
    # The head all prompts share runs once, its keys/values copied (with gradient) to every group.
    head = head_length(input_ids, [g[0] for g in groups], prompt_len)
    head_cache = dict(fresh)
    if head:
        out = body(input_ids=input_ids[groups[0][0], :head][None], use_cache=not safe, logits_to_keep=1, **fresh)
        to_groups = torch.zeros(len(groups), dtype=torch.long, device=device)
        head_cache = {cache_arg: _expanded(output_cache(out), to_groups)}
    r_max = max(p_len) - head
    # The prompts' rests, left-padded so every prompt ends at column head + r_max - 1 (its last logit predicts
    # the first reply token); the padding sits between the head and the rest, masked.
    pref_ids = torch.zeros((len(groups), r_max), dtype=torch.long, device=device)
    pref_attn = torch.zeros((len(groups), head + r_max), dtype=torch.long, device=device)
    pref_attn[:, :head] = 1
    pref_pos = torch.zeros((len(groups), r_max), dtype=torch.long, device=device)
    for gi, (g, p) in enumerate(zip(groups, p_len)):
        pref_ids[gi, r_max - (p - head):] = input_ids[g[0], head:p]
        pref_attn[gi, head + r_max - (p - head):] = 1
        pref_pos[gi, r_max - (p - head):] = torch.arange(head, p, device=device)
    out = body(input_ids=pref_ids, attention_mask=pref_attn, position_ids=pref_pos, use_cache=not safe,
               logits_to_keep=1, **head_cache)
    first = out.last_hidden_state[:, -1]  # (groups, hidden)
    cache = output_cache(out)
    gidx = torch.tensor([g_index[r] for r in order], dtype=torch.long, device=device)
    starts = torch.tensor([prompt_len[r] - 1 for r in order], dtype=torch.long, device=device)
    width = max(lengths[r] - prompt_len[r] for r in order)  # window: last prompt position .. last position - 1
    first = first.index_select(0, gidx)[:, None]
    if width == 1:
        return first, starts, width
    if packable(lm) and not safe:
        hidden = _packed_continuations(body, input_ids, order, lengths, prompt_len, pref_attn.index_select(0, gidx),
                                       _expanded(cache, gidx), cache_arg, width - 1)
        return torch.cat([first, hidden], dim=1), starts, width
    # Continuations: the tokens after each prompt except the last one (whose logits predict nothing), right-padded.
    cont_ids = torch.zeros((len(order), width - 1), dtype=torch.long, device=device)
    cont_attn = torch.zeros((len(order), width - 1), dtype=torch.long, device=device)
    for i, r in enumerate(order):
        n = lengths[r] - 1 - prompt_len[r]
        cont_ids[i, :n] = input_ids[r, prompt_len[r]:lengths[r] - 1]
        cont_attn[i, :n] = 1
    cont_pos = (starts + 1)[:, None] + torch.arange(width - 1, device=device)[None]
    attn = torch.cat([pref_attn.index_select(0, gidx), cont_attn], dim=1)
    out = body(input_ids=cont_ids, attention_mask=attn, position_ids=cont_pos, use_cache=not safe,
               **{cache_arg: _expanded(cache, gidx)})
    return torch.cat([first, out.last_hidden_state], dim=1), starts, width


def _packed_continuations(body, input_ids: torch.Tensor, order: list[int], lengths: list[int], prompt_len: list[int],
                          prefix_attn: torch.Tensor, past, cache_arg: str, width: int) -> torch.Tensor:
    """The continuations' forward with no padding: every row's tokens after its prompt (but the last) back to back
    as one sequence (`turnrl.attention.packed_rows`), attending the row's prompt keys/values in `past` and its own
    earlier tokens. Returns their last hidden states laid out per row, (rows, width, hidden), zeros past a row's
    end (like the padded forward's, which no loss reads). Episodes end at different turns, so a padded batch of a
    trained agent's continuations can be half padding (47% in the quickstart's first RL iterations after SFT)."""
    device = input_ids.device
    counts = [lengths[r] - 1 - prompt_len[r] for r in order]
    rows, slots = pack_layout(counts, width, right_aligned=False, device=device)
    at = rows * width + slots
    ids = torch.cat([input_ids[r, prompt_len[r]:prompt_len[r] + k] for r, k in zip(order, counts)])[None]
    positions = torch.cat([torch.arange(prompt_len[r], prompt_len[r] + k, device=device)
                           for r, k in zip(order, counts)])[None]
    inside = torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]  # (rows, key)
    own = torch.ones((width, width), dtype=torch.bool, device=device).tril()[None] & inside[:, None, :]
    mask = torch.cat([prefix_attn.bool()[:, None, :].expand(-1, width, -1), own], dim=-1)[:, None]
    cache = Cache(layers=[_ScatterLayer(layer.keys, layer.values, at, width) for layer in past.layers])
    with packed_rows(rows, slots, width, mask):
        out = body(input_ids=ids, position_ids=positions, use_cache=True, **{cache_arg: cache})
    h = out.last_hidden_state[0]
    return h.new_zeros((len(order) * width, h.shape[-1])).index_copy(0, at, h).view(len(order), width, -1)


class _ScatterLayer(DynamicLayer):
    """A row-expanded prompt's keys/values, (rows, heads, prompt, d), to which a packed forward appends: its
    (1, heads, n, d) keys are laid out per row, (rows, heads, width, d), token i at flat position `at[i]` (row *
    width + slot), zeros elsewhere (masked), with gradient."""

    def __init__(self, keys, values, at, width):
        super().__init__()
        self.keys, self.values, self.at, self.width = keys, values, at, width
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        def per_row(x):
            b, heads, d = self.keys.shape[0], x.shape[1], x.shape[-1]
            out = x.new_zeros((b * self.width, heads, d)).index_copy(0, self.at, x[0].transpose(0, 1))
            return out.view(b, self.width, heads, d).transpose(1, 2)
        self.keys = torch.cat([self.keys, per_row(key_states)], dim=-2)
        self.values = torch.cat([self.values, per_row(value_states)], dim=-2)
        return self.keys, self.values


def _expanded(cache, index: torch.Tensor) -> Cache:
    """A new cache whose row i holds row index[i] of `cache` (gradients flow back to `cache`), in
    `_ReplaySafeLayer`s (for one forward the same as the `DynamicLayer`s of a `DynamicCache`)."""
    return Cache(layers=[_ReplaySafeLayer(layer.keys.index_select(0, index), layer.values.index_select(0, index))
                         for layer in cache.layers])


class _ReplaySafeLayer(DynamicLayer):
    """A cache layer whose `update` returns (and holds) the keys/values it was built with plus the new ones,
    recomputed from the former at every call. Gradient checkpointing replays a layer's forward in the backward
    pass, which calls `update` again with the same states: a `DynamicLayer` would append them a second time (and
    the replayed attention would see twice the keys); this one gives the same keys/values again."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.past = (keys, values)
        if keys is not None:
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = self.past
        self.keys = key_states if keys is None else torch.cat([keys, key_states], dim=-2)
        self.values = value_states if values is None else torch.cat([values, value_states], dim=-2)
        self.device, self.is_initialized = key_states.device, True
        return self.keys, self.values


def checkpointing(lm) -> bool:
    """Whether some module of `lm` has gradient checkpointing on."""
    return any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())


def _checkpointed_layers(lm) -> list:
    """The layers transformers checkpoints one by one (`GradientCheckpointingLayer`)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    return [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def shares_under_checkpointing(lm) -> bool:
    """Whether the shared-prompt forward can run under `lm`'s gradient checkpointing: every checkpointed layer is
    one whose cache argument transformers can let through (`_can_checkpoint_with_cache`, transformers >= 5.15) and
    checkpoints without re-entering (a re-entrant checkpoint computes its outputs without gradient, so the prompt's
    keys/values would carry none), and the attention is plain causal (`packable`: the caches do not model a
    sliding window). Otherwise the rows run one by one."""
    layers = _checkpointed_layers(lm)
    return bool(layers) and packable(lm) and all(
        hasattr(type(m), "_can_checkpoint_with_cache")
        and getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {}).get("use_reentrant") is False
        for m in layers)


@contextlib.contextmanager
def _cache_in_checkpointed_layers(lm):
    """Within: transformers' checkpointed layers keep their cache argument (by default they drop it, because a cache
    that appends would be updated a second time by the replay; the caches passed here are `_ReplaySafeLayer`s)."""
    layers = [m for m in _checkpointed_layers(lm) if hasattr(type(m), "_can_checkpoint_with_cache")]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def windows(t: torch.Tensor, rows: list[int], starts: torch.Tensor, width: int, ends: torch.Tensor) -> torch.Tensor:
    """Per-row windows of a (B, L-1) tensor: out[i, j] = t[rows[i], starts[i] + j] for starts[i] + j < ends[i],
    else 0 (like padding)."""
    sub = t[rows]
    idx = starts[:, None] + torch.arange(width, device=t.device)[None]
    inside = idx < ends[:, None]
    out = sub.gather(1, idx.clamp(max=sub.shape[1] - 1))
    return torch.where(inside, out, torch.zeros((), dtype=out.dtype, device=out.device))
