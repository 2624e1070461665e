"""turnrl.attention: grouped-query attention that stacks each key/value head's query heads instead of copying the
keys and values per head (`repeat_kv`), in the engine's prefill (tests/test_engine.py) and around the update."""

import contextlib
import copy

import pytest
import torch

from turnrl.config import AlgoConfig, OptimConfig
from turnrl.models import Policy, load_policy
from turnrl.reference import Reference
from tests.test_engine import gqa_lm
from tests.test_update_shared_prefix import grouped_batch


def test_grouped_query_attention_stacks_the_group_instead_of_repeating_keys():
    """gqa_sdpa_attention gives transformers' SDPA attention's output for a masked grouped-query prefill, without
    repeat_kv (the keys/values reach SDPA with their own 2 heads)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from turnrl.attention import gqa_sdpa_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((5, 6, 7, 16), (5, 2, 11, 16), (5, 2, 11, 16)))
    mask = torch.rand((5, 1, 7, 11), generator=g) < 0.7
    mask[..., 0] = True
    seen = []
    orig = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append(key.shape[1])
        return orig(query, key, value, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        ours, _ = gqa_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)
    assert seen == [2]
    assert ours.shape == ref.shape == (5, 7, 6, 16)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_update_of_a_grouped_query_model_stacks_the_group_with_the_same_step(checkpointing, monkeypatch):
    """ppo_update runs a GQA model's forwards and backward passes (also a gradient-checkpointed layer's
    recomputed forward) with the stacked group; the step equals the one with transformers' repeat_kv up to
    float rounding; the model is SDPA again afterwards."""
    import turnrl.attention as attention
    import turnrl.forward as forward
    import turnrl.update as update

    tiny = load_policy("tiny", seed=0)
    start = Policy(gqa_lm(tiny.tokenizer, seed=1), tiny.tokenizer)
    if checkpointing:
        start.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trajs = grouped_batch(start, seed=2, head=12)
    algo = AlgoConfig(filter="none", estimator="grpo", kl_coef=0.1, entropy_coef=0.01)
    # Under checkpointing only the stacked run could share the prompts (turnrl's attention is what makes a model
    # `packable`), so both run row by row there, as they would with transformers' attention.
    optim = OptimConfig(micro_batch_tokens=64, lr=1e-2, warmup_steps=0, shared_prefix=not checkpointing)
    folds = []
    fold = attention._fold_mask
    monkeypatch.setattr(attention, "_fold_mask", lambda mask, groups: folds.append(groups) or fold(mask, groups))
    results = []
    for stacked in (True, False):
        if not stacked:
            for module in (update, forward):  # the update's passes and the reference's
                monkeypatch.setattr(module, "gqa_attention", lambda lm: contextlib.nullcontext())
        policy = copy.deepcopy(start)
        ref = copy.deepcopy(start.lm)
        optimizer = torch.optim.SGD(policy.parameters(), lr=optim.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        stats = update.ppo_update(policy, optimizer, scheduler, trajs, algo=algo, optim=optim, temperature=1.0,
                                  ref_lm=Reference(ref), generator=torch.Generator().manual_seed(0))
        results.append((stats, dict(policy.named_parameters())))
        if stacked:
            assert folds and set(folds) == {2}
            assert policy.lm.config._attn_implementation == "sdpa" and attention._folded_mask[0] is None
            folds.clear()
    assert not folds  # the second run used transformers' own attention
    (s_gqa, p_gqa), (s_ref, p_ref) = results
    for key in s_ref:
        assert s_gqa[key] == pytest.approx(s_ref[key], rel=1e-5, abs=1e-6), key
    for name, p in p_ref.items():
        torch.testing.assert_close(p_gqa[name], p, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, start.get_parameter(n)) for n, p in p_ref.items())  # the step moved weights


def test_packing_only_for_plain_causal_attention_in_turnrls_attention():
    """Packed forwards apply their own causal mask, so they are used only where that is the model's attention:
    turnrl's attention switched on, no sliding window, no logit soft-capping; the attention refuses otherwise."""
    import types

    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from turnrl.attention import GQA_ATTENTION, gqa_sdpa_attention, packable, packed_rows

    def lm(config, implementation=GQA_ATTENTION):
        config._attn_implementation = implementation
        return types.SimpleNamespace(config=config)

    assert packable(lm(LlamaConfig()))
    assert not packable(lm(LlamaConfig(), "sdpa"))
    assert not packable(lm(MistralConfig(sliding_window=16)))
    assert packable(lm(Qwen2Config(use_sliding_window=False, sliding_window=4096)))
    q = torch.zeros(1, 2, 3, 4)
    with packed_rows(torch.zeros(3, dtype=torch.long), torch.arange(3), 3, torch.ones(1, 1, 3, 3, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match="plain causal"):
            gqa_sdpa_attention(types.SimpleNamespace(num_key_value_groups=1), q, q, q, None, sliding_window=16)


@pytest.mark.parametrize("autocast", [False, True])
def test_stacked_attention_converts_the_mask_once_and_equals_sdpa_with_the_boolean_mask(autocast):
    """`_stacked` hands SDPA the additive mask SDPA would make of the boolean one (once per forward, not per
    layer): outputs and gradients are bitwise those of SDPA given the boolean mask, in fp32 and under bf16
    autocast."""
    import turnrl.attention as attention

    g = torch.Generator().manual_seed(0)
    # 200 keys of width 64: under autocast, shorter calls run in fp32 (test_short_attention_runs_in_fp32_under_autocast)
    q = torch.randn(2, 6, 5, 64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 200, 64, generator=g, requires_grad=True) for _ in range(2))
    mask = torch.rand(2, 1, 5, 200, generator=g) > 0.3
    mask[..., 0] = True  # every query sees a key
    runs = []
    for ours in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if ours:
                out = attention._stacked(q, k, v, mask, 3, 0.0, None)
                out = attention._stacked(q, k, v, mask, 3, 0.0, None)  # a second layer reuses the conversion
            else:
                kk, vv = (x.repeat_interleave(3, dim=1) for x in (k, v))
                out = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        runs.append((out, grads))
    (out, grads), (ref, ref_grads) = runs
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6 if not autocast else 1e-2, atol=1e-6 if not autocast else 1e-2)
    cached = attention._bias[0]
    assert cached is not None and cached[2].dtype == out.dtype
    assert torch.equal(cached[2] == 0, attention._fold_mask(mask, 3))
    attention._bias[0] = attention._folded_mask[0] = None


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("width, n_queries, n_keys, fp32", [(32, 5, 9, True), (64, 5, 9, True), (64, 5, 200, False),
                                                            (16, 800, 9, False)])
def test_short_attention_runs_in_fp32_under_autocast(groups, width, n_queries, n_keys, fp32):
    """Under CPU bf16 autocast, an attention call with fewer than FP32_MAX_QUERIES queries (as SDPA gets them: the
    stacked grouped-query path multiplies them by `groups`) and keys x head width at most FP32_MAX_KEY_WIDTH runs in
    fp32 (torch's CPU bf16 flash backward is several times slower there): its output is the fp32 attention rounded
    once to bf16, and its backward is the fp32 attention's. Longer calls stay in bf16. Through the stacked
    grouped-query path (groups 3) and the delegated one (groups 1)."""
    import types

    import turnrl.attention as attention

    def run(autocast, grad_out=None):
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 6, n_queries, width, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 6 // groups, n_keys, width, generator=g, requires_grad=True) for _ in range(2))
        mask = torch.rand(2, 1, n_queries, n_keys, generator=g) > 0.3
        mask[..., 0] = True
        module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, _ = attention.gqa_sdpa_attention(module, q, k, v, mask)
        attention._bias[0] = attention._folded_mask[0] = None
        grad_out = 2 * out.detach().float() if grad_out is None else grad_out
        return out, grad_out, torch.autograd.grad(out, (q, k, v), grad_out.to(out.dtype))

    out, grad_out, grads = run(autocast=True)
    ref, _, ref_grads = run(autocast=False, grad_out=grad_out)  # the same upstream gradient, in fp32
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert torch.equal(out, ref.to(torch.bfloat16)) == fp32  # computed in bf16: not the fp32 result rounded
    if fp32:
        for a, b in zip(grads, ref_grads):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_short_attention_stays_in_bf16_in_inference_mode():
    """The engines sample in inference mode: there the fp32 switch is off (no backward to win on)."""
    import types

    import turnrl.attention as attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 5, 32, generator=g)
    k, v = (torch.randn(2, 6, 9, 32, generator=g) for _ in range(2))
    module = types.SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.gqa_sdpa_attention(module, q, k, v, None)
        bf16 = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, bf16)


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("n_queries, masked", [(1, True), (1, False), (4, True), (4, False)])
@pytest.mark.parametrize("autocast", [False, True])
def test_shared_head_equals_attention_over_the_head_and_the_rows_keys(groups, n_queries, masked, autocast):
    """Inside `shared_head`, attention over one head shared by every row and each row's own keys (the cascade
    merge of two partial attentions by their logsumexps) equals SDPA over each row's whole sequence, head then own
    keys: decode (1 query) and prefill (4), with a padding mask and without one (then causal over the last
    queries), plain and grouped-query, fp32 and bf16 autocast. Each layer reads its own head."""
    import types

    import turnrl.attention as attention

    g = torch.Generator().manual_seed(0)
    b, heads, d, n_head, n_own = 3, 6, 16, 10, 7
    q = torch.randn(b, heads, n_queries, d, generator=g)
    k, v = (torch.randn(b, heads // groups, n_own, d, generator=g) for _ in range(2))
    head_k, head_v = ([torch.randn(heads // groups, n_head, d, generator=g) for _ in range(2)] for _ in range(2))
    mask = torch.rand(b, 1, n_queries, n_own, generator=g) > 0.3
    mask[..., -1] = True  # every query sees its own position
    module = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False, layer_idx=1)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with attention.shared_head(head_k, head_v):
            out, _ = attention.gqa_sdpa_attention(module, q, k, v, mask if masked else None)
        assert attention._shared[0] is None
        own_mask = mask if masked else torch.ones(n_own, n_own, dtype=torch.bool).tril()[-n_queries:]
        full_mask = torch.cat([torch.ones(b, 1, n_queries, n_head, dtype=torch.bool),
                               own_mask.expand(b, 1, n_queries, n_own)], -1)
        full_k, full_v = (torch.cat([head[1].expand(b, -1, -1, -1), own], 2).repeat_interleave(groups, dim=1)
                          for head, own in ((head_k, k), (head_v, v)))
        ref = torch.nn.functional.scaled_dot_product_attention(q, full_k, full_v, attn_mask=full_mask).transpose(1, 2)
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert out.shape == (b, n_queries, heads, d)
    tol = 2e-2 if autocast else 1e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    attention._bias[0] = attention._folded_mask[0] = None


def test_attention_logsumexp_by_explicit_products_equals_the_cpu_kernel():
    """`_with_head` merges partial attentions by their logsumexps: off CPU they come from explicit products
    (`_attention_lse_math`), which give the CPU flash kernel's outputs and logsumexps."""
    import turnrl.attention as attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 16, generator=g)
    k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(2))
    mask = torch.rand(2, 1, 5, 9, generator=g) > 0.4
    mask[..., 0] = True
    additive = attention._additive(mask, torch.float32)
    attention._bias[0] = None
    out, lse = attention._attention_lse(q, k, v, additive, 0.25)
    ref_out, ref_lse = attention._attention_lse_math(q, k, v, additive, 0.25)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
