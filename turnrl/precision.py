"""bf16 on CPU: copies of the linear layers' fp32 weights made once instead of cast at every forward.

Under `torch.autocast` every matmul casts its fp32 weight to bf16. Autocast caches that cast only for weights that
require grad, so a frozen weight (a LoRA policy's whole base model, every weight under inference mode) is read in
fp32 and written in bf16 again at every forward: for SmolLM2-135M, ~0.8 GB of memory traffic per forward pass.
`bf16_linear_weights` swaps in bf16 copies holding the values autocast would compute (the same rounding), so
results are bit-identical and only the repeated casts go.
"""

from __future__ import annotations

import contextlib

import torch


def bf16_autocast(enabled: bool = True):
    """CPU bf16 autocast, or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@contextlib.contextmanager
def bf16_linear_weights(model: torch.nn.Module, *, frozen_only: bool, enabled: bool = True):
    """Inside the block, each `torch.nn.Linear` of `model` with an fp32 weight computes with a bf16 copy of it
    (restored on exit, also on error). `frozen_only`: only weights that do not require grad, so gradients
    still reach every trainable weight (a training step); without it, every weight (sampling under inference
    mode). Every forward inside the block must run under bf16 autocast: a bf16 weight meets an fp32 input
    otherwise. A weight already swapped by an enclosing block is left alone. An input embedding tied to an
    output layer keeps its fp32 weight, as under autocast."""
    swapped = []
    try:
        if enabled:
            for module in model.modules():
                weight = module._parameters.get("weight") if isinstance(module, torch.nn.Linear) else None
                if weight is None or weight.dtype != torch.float32 or (frozen_only and weight.requires_grad):
                    continue
                module._parameters["weight"] = torch.nn.Parameter(weight.detach().to(torch.bfloat16),
                                                                  requires_grad=False)
                swapped.append((module, weight))
        yield
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight
