"""A causal LM cut into its trunk (hidden states) and its head (logits), so the vocabulary-sized head runs only
at the positions a caller needs. Used by the update, SFT and the shared-prefix forward; kept apart from
turnrl.models (loading and the Policy) because it depends on nothing there."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class LMParts:
    """A causal LM cut in two: `body(**lm_kwargs)` returns an output whose `last_hidden_state` (B, T, H) feeds
    `head`, so logits = head(body(...).last_hidden_state) and the vocabulary-sized head runs only at the positions
    a caller needs (the update's model tokens: most positions of a multi-turn episode are prompt or env tokens).
    `past_key_values` is the body's cache. For a model whose logits are not plainly head(last hidden state)
    (soft-capping, logit scaling), `split` is False: body is the whole LM, its `last_hidden_state` the logits,
    and head the identity. Both bodies accept and may ignore the LM's `logits_to_keep`."""

    body: Callable
    head: Callable
    split: bool


# lm -> its split parts, or False when it cannot be split. The values hold only submodules of their key (never
# the key itself), so an entry goes away with its model.
_SPLITS: "weakref.WeakKeyDictionary[nn.Module, LMParts | bool]" = weakref.WeakKeyDictionary()


def lm_parts(lm: nn.Module) -> LMParts:
    """`lm`'s LMParts, checked once per model: the split is used only when head(body(x)) reproduces the LM's
    own logits on a short input (transformers has no generic "hidden states -> logits" contract)."""
    parts = _SPLITS.get(lm)
    if parts is None:
        parts = _SPLITS[lm] = _split(lm) or False
    return parts or LMParts(_WholeLM(lm), _identity, False)


def logits_at(lm: nn.Module, input_ids, attention_mask=None, at: torch.Tensor | None = None,
              output_hidden_states: bool = False):
    """(logits, the body's output): logits (B, T, V), or with `at` (a (B, T) bool mask) only those of the marked
    positions, (at.sum(), V), so the vocabulary-sized head runs only there."""
    parts = lm_parts(lm)
    out = parts.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                     output_hidden_states=output_hidden_states)
    hidden = out.last_hidden_state
    return parts.head(hidden if at is None else hidden[at]), out


def _identity(x):
    return x


class _WholeLM:
    def __init__(self, lm):
        self.lm = lm

    def __call__(self, **kwargs):
        out = self.lm(**kwargs)
        return SimpleNamespace(last_hidden_state=out.logits, past_key_values=output_cache(out),
                               hidden_states=out.hidden_states)


def output_cache(out):
    """The KV cache of a forward's output: `cache` in recent transformers, which deprecates `past_key_values`."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class _Decoder:
    def __init__(self, decoder):
        self.decoder = decoder

    def __call__(self, logits_to_keep=None, output_hidden_states=False, **kwargs):
        return self.decoder(**kwargs)


def _split(lm) -> LMParts | None:
    get_decoder = getattr(lm, "get_decoder", None)
    get_head = getattr(lm, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module) or decoder is lm:
        return None
    device = next(lm.parameters()).device
    ids = torch.arange(1, 6, device=device)[None] % lm.config.vocab_size
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            expected = lm(input_ids=ids, use_cache=False).logits
            got = head(decoder(input_ids=ids, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - any model this generic cut does not fit keeps the whole-LM path
        return None
    finally:
        lm.train(was_training)
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-4):
        return None
    return LMParts(_Decoder(decoder), head, True)
