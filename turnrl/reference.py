"""The frozen KL reference: the policy at the start of RL, called like `Policy.forward(..., at=)` for logits.

A full model is deep-copied. A LoRA policy shares its base in memory: fresh adapters give the base with adapters
switched off; trained ones (after an SFT warm start, or a LoRA checkpoint as the starting model) give the base plus
a frozen copy of the adapter weights, swapped in for the reference pass.
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
from torch import nn

from turnrl.lm_parts import logits_at
from turnrl.models import ModelLoadError


def reference_of(policy) -> "Reference":
    """The reference for `policy` as it is now (the start of RL)."""
    if not policy.is_lora:
        return Reference(copy.deepcopy(policy.lm).eval().requires_grad_(False))
    return Reference.frozen_adapters(policy.lm, adapter_weights(policy.lm))


def adapter_weights(lm: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable (adapter) parameters of a LoRA model, by parameter name."""
    return {name: p.detach().clone() for name, p in lm.named_parameters() if p.requires_grad}


def saved_adapter_weights(lm: nn.Module, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter weights saved in `directory` (a LoRA policy's `save`), by `lm`'s parameter names. PEFT saves
    them under names without the adapter's name; its own state-dict function says which live tensor each
    saved name is, so the mapping follows whatever renaming the installed PEFT does."""
    from peft import get_peft_model_state_dict, load_peft_weights

    by_storage = {p.data_ptr(): name for name, p in lm.named_parameters() if p.requires_grad}
    names = {key: by_storage.get(t.data_ptr()) for key, t in get_peft_model_state_dict(lm).items()}
    saved = load_peft_weights(str(directory), device="cpu")
    if set(saved) != set(names) or None in names.values():
        raise ModelLoadError(f"the adapter in {str(directory)!r} does not match this model's adapters")
    device = next(lm.parameters()).device
    return {names[key]: t.to(device) for key, t in saved.items()}


class Reference:
    """The frozen KL reference, called as `ref(input_ids, attention_mask, at=mask)` -> the logits of the marked
    positions, (at.sum(), V) (like `Policy.forward(..., at=)`: the vocabulary-sized head runs only there).

    For LoRA it shares the policy's model: `frozen_adapters` runs it with the adapter weights swapped for frozen
    copies (or with adapters off when every lora_B copy is zero, the same function without the adapter
    matmuls). Not an nn.Module, so `.eval()` / `.requires_grad_(False)` can never reach the trained adapters."""

    def __init__(self, lm: nn.Module, context=contextlib.nullcontext):
        self.lm, self.context = lm, context

    @classmethod
    def frozen_adapters(cls, lm: nn.Module, weights: dict[str, torch.Tensor]) -> "Reference":
        if all(not t.any() for name, t in weights.items() if "lora_B" in name):
            return cls(lm, lm.disable_adapter)
        params = dict(lm.named_parameters())
        missing = sorted(set(weights) - set(params))
        if missing:
            raise ModelLoadError(f"reference adapter weights name no parameter of this model: {missing[:3]}")
        swaps = [(params[name], w) for name, w in weights.items()]

        @contextlib.contextmanager
        def swapped():
            live = [p.data for p, _ in swaps]
            # autocast caches its bf16 copy of each trainable weight per autocast region: clear it on both
            # sides, so neither model ever sees the other's cast weights.
            torch.clear_autocast_cache()
            for p, w in swaps:
                p.data = w
            try:
                yield
            finally:
                for (p, _), data in zip(swaps, live):
                    p.data = data
                torch.clear_autocast_cache()

        return cls(lm, swapped)

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask=None, *, at: torch.Tensor) -> torch.Tensor:
        with self.context():
            return logits_at(self.lm, input_ids, attention_mask, at)[0]
