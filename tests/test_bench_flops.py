"""benchmarks/update_flops.py counts the CPU flash-attention kernels' FLOPs (torch's counter has no formula for
them): forward as the two products SDPA's math backend runs as bmm, backward as torch's own backward formula."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.utils.flop_counter import FlopCounterMode

_spec = importlib.util.spec_from_file_location(
    "update_flops", Path(__file__).resolve().parents[1] / "benchmarks" / "update_flops.py")
update_flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_flops)


def _count(backend, q, k, v, **kw):
    with sdpa_kernel([backend]), FlopCounterMode(display=False, custom_mapping=update_flops.CPU_ATTENTION) as c:
        sdpa(q, k, v, **kw)
    return c.get_total_flops()


def _qkv(b=2, h=3, s_q=40, s_k=56, d=16, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g, requires_grad=grad) for s in (s_q, s_k, s_k)]


def test_torch_does_not_count_the_cpu_flash_kernel_by_itself():
    q, k, v = _qkv()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), FlopCounterMode(display=False) as c:
        sdpa(q, k, v)
    assert c.get_total_flops() == 0  # the gap CPU_ATTENTION fills; if torch adds a formula, drop ours


@pytest.mark.parametrize("masked", [False, True])
def test_forward_counts_what_the_math_backend_runs_as_bmm(masked):
    q, k, v = _qkv()
    mask = torch.rand(40, 56, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    flash = _count(SDPBackend.FLASH_ATTENTION, q, k, v, attn_mask=mask)
    assert flash == _count(SDPBackend.MATH, q, k, v, attn_mask=mask) == 2 * (2 * 2 * 3 * 40 * 56 * 16)


def test_causal_counts_the_lower_triangle_only():
    q, k, v = _qkv(s_q=64, s_k=64)
    full = _count(SDPBackend.FLASH_ATTENTION, q, k, v)
    assert _count(SDPBackend.FLASH_ATTENTION, q, k, v, is_causal=True) == int(full * (64 * 65 / 2) / 64 ** 2)


def test_backward_counts_torchs_five_products():
    q, k, v = _qkv(grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = sdpa(q, k, v)
        with FlopCounterMode(display=False, custom_mapping=update_flops.CPU_ATTENTION) as c:
            out.sum().backward()
    # scores recomputed, then dV, dP, dQ, dK: five products of the forward's size each
    assert c.get_total_flops() == 5 * (2 * 2 * 3 * 40 * 56 * 16)


def test_kernel_log_records_the_counted_calls_and_replays_them():
    """The ceiling line replays exactly the calls the FLOP count covers, with their shapes, strides and dtypes."""
    q, k, v = _qkv(grad=True)
    w = torch.randn(16, 24, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), update_flops.KernelLog() as log:
        out = sdpa(q, k, v) @ w  # (2, 3, 40, 24): one matmul, run as mm
        out.sum().backward()
    ops = [func.overloadpacket for func, _, _ in log.calls]
    assert ops.count(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu) == 1
    assert ops.count(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward) == 1
    assert ops.count(torch.ops.aten.mm) == 3  # forward, and the gradients of its two inputs
    assert all(op in update_flops.KernelLog().counted for op in ops)
    first = next(args for func, args, _ in log.calls if func.overloadpacket is torch.ops.aten.mm)
    tensor = update_flops._materialise(first[1])
    assert first[1][0] == "tensor" and (tuple(tensor.shape), tensor.stride(), tensor.dtype) == first[1][1:]
    matmul_s, attention_s = update_flops.replay_seconds(log.calls)
    assert matmul_s > 0 and attention_s > 0


def _batch():
    import argparse

    args = argparse.Namespace(groups=2, group_size=2, prompt_tokens=12, turns=3, reply_tokens=6, env_tokens=5)
    return update_flops.synthetic_batch(200, args), args


def test_trl_inputs_rebuild_every_episode_with_the_loss_on_its_model_tokens_only():
    """The peer's batch: prompt (left-padded) + completion (right-padded) give back each episode's ids, and
    `tool_mask` marks exactly its model tokens (the env replies inside the completion carry no loss)."""
    trajs, _ = _batch()
    inputs = update_flops.trl_inputs(trajs, pad=0, advantages=torch.zeros(len(trajs)))
    for i, t in enumerate(trajs):
        prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()].tolist()
        completion = inputs["completion_ids"][i][inputs["completion_mask"][i].bool()].tolist()
        assert prompt + completion == list(t.ids)
        assert inputs["prompt_mask"][i, -1] == 1 and inputs["completion_mask"][i, 0] == 1  # left / right padding
        assert inputs["tool_mask"][i][: len(completion)].tolist() == list(t.loss_mask[len(prompt):])
        assert not any(t.loss_mask[: len(prompt)]) and t.loss_mask[len(prompt)] == 1
    assert inputs["num_items_in_batch"] == sum(sum(t.loss_mask) for t in trajs)


def test_the_trl_peer_scores_the_same_tokens_with_the_same_model():
    """TRL's log-probabilities on the peer's batch equal the model's own at every model token: the peer computes
    the same quantity as turnrl's update, on the same weights."""
    pytest.importorskip("trl")
    from turnrl.models import load_policy

    trajs, args = _batch()
    update, trainer = update_flops.trl_update("tiny", trajs, args, lora=False, bf16=False)
    inputs = update_flops.trl_inputs(trajs, trainer.processing_class.pad_token_id, torch.zeros(len(trajs)))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width)
    lm = load_policy("tiny", seed=0).lm.eval()
    for i, t in enumerate(trajs):
        with torch.no_grad():
            own = torch.log_softmax(lm(input_ids=torch.tensor([t.ids])).logits[0, :-1].float(), -1)
        expected = own.gather(-1, torch.tensor(t.ids[1:])[:, None])[:, 0]
        start = len(t.ids) - int(inputs["completion_mask"][i].sum())
        at = inputs["tool_mask"][i].bool()
        torch.testing.assert_close(logps[i][at], expected[start - 1:][at[: len(t.ids) - start]], rtol=1e-4,
                                   atol=1e-4)
    update()  # and its update runs
