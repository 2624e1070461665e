"""LoRA adapters (peft) as turnrl runs them: a faster forward for plain adapters in training, and merged weight
copies for sampling. `turnrl.models.add_lora` builds the adapters; both that and loading an adapter checkpoint
pass the model through `prepared_lora`."""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn


def prepared_lora(lm: nn.Module) -> nn.Module:
    """peft's LoRA layers as turnrl runs them: plain adapters on linear layers get `_lora_linear_forward`, and no
    layer casts its input to the adapter weights' dtype. turnrl's weights are fp32 and the update runs under bf16
    autocast, where each adapter's matmul casts its input back to bf16 anyway: the cast is an exact round trip that
    copied every down_proj input (bf16 -> fp32) in forward and again in backward (7% of a profile of the SmolLM2
    update, ~5% of its wall time; docs/performance.md). In fp32 there is nothing to cast."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer  # what peft.helpers.disable_input_dtype_casting sets

    for module in lm.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_lora_linear_forward, module)
    return lm


def _lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA `Linear.forward`, base(x) + B(A(x)) * scaling, with the adapter's product accumulated into the
    base output by one `addmm` (the scaling folded into B's small weight) and, under autocast, the input cast
    once. peft's form runs a multiplication and an addition over the whole (tokens, out features) output, and
    their backward another, and casts the input once for the base layer and once for A: on every projection of
    every layer, forward and backward. Inside `merged_lora` (sampling) it is one matmul with the merged weight.
    Anything else (an adapter disabled, merged or mixed, dropout, a LoRA variant such as DoRA, a bias on B, extra
    arguments) runs peft's own forward."""
    merged = self.__dict__.get("_turnrl_merged")  # set by `merged_lora` only for a plain adapter
    if merged is not None and not args and not kwargs:
        return nn.functional.linear(x, merged, self.base_layer.bias)
    name = _plain_adapter(self)
    if name is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        x = x.to(torch.get_autocast_dtype(device))
    base = self.base_layer(x)
    h = self.lora_A[name](x)
    up = (self.lora_B[name].weight * self.scaling[name]).t()
    out = torch.addmm(base.reshape(-1, base.shape[-1]), h.reshape(-1, h.shape[-1]), up.to(h.dtype))
    return out.view(base.shape)


def _plain_adapter(module) -> str | None:
    """The name of a peft LoRA Linear's one active, plain adapter (no dropout, no variant, no bias on B, neither
    disabled nor merged by peft), which `_lora_linear_forward` computes itself; else None."""
    names = module.active_adapters
    name = names[0] if len(names) == 1 else None
    if (name is None or module.disable_adapters or module.merged or name not in module.lora_A
            or name in getattr(module, "lora_variant", {})  # peft >= 0.15: DoRA and other variants
            or getattr(module, "use_dora", {}).get(name, False)  # older peft
            or not isinstance(module.lora_dropout[name], nn.Identity) or module.lora_B[name].bias is not None):
        return None
    return name


@contextlib.contextmanager
def merged_lora(lm: nn.Module):
    """Inside the block, every LoRA linear layer with a plain adapter (`_plain_adapter`) and an fp32 base weight
    computes its output with one matmul by a merged copy of that weight, W + scaling * B @ A, instead of the base
    matmul plus the adapter's two small ones and the sum: for sampling, where no gradient flows. The parameters are
    not touched (no merge/unmerge round trip that would drift the frozen base); the copies are dropped on exit, also
    on error. They hold one more copy of the adapted weights while the block runs. Lower-precision weights are not
    merged: in bf16 the merged weight would round an adapter's small update away (a weight's bf16 step, ~1/256 of
    it, is larger than early LoRA updates), which the unmerged form keeps as a separate term."""
    merged = []
    try:
        with torch.no_grad():
            for module in lm.modules():
                bound = module.__dict__.get("forward")
                name = _plain_adapter(module) if getattr(bound, "__func__", None) is _lora_linear_forward else None
                if name is None or module.base_layer.weight.dtype not in (torch.float32, torch.float64):
                    continue
                weight = module.base_layer.weight
                delta = module.lora_B[name].weight @ module.lora_A[name].weight
                module._turnrl_merged = torch.add(weight, delta.to(weight.dtype), alpha=module.scaling[name])
                merged.append(module)
        yield
    finally:
        for module in merged:
            del module._turnrl_merged
