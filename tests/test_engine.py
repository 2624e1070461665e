import contextlib
import random

import pytest
import torch

from turnrl.engines import HFEngine, SamplingParams
from turnrl.models import load_policy


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny", seed=0)


def full_forward_logprobs(policy, prompt, completion, temperature=1.0):
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logits = policy.lm(ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)]


def test_logprobs_match_full_forward_with_padding(policy):
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id, batch_size=3)
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 250) for _ in range(n)] for n in (2, 9, 17, 5)]
    comps = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.7))
    for prompt, c in zip(prompts, comps):
        ref = full_forward_logprobs(policy, prompt, c.ids, temperature=0.7)
        assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 1e-4


def test_kv_reuse_across_turns_is_exact(policy):
    """Episodes keep their cache across calls; logprobs equal a fresh full forward of the whole history."""
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id, batch_size=4)
    rng = random.Random(1)
    prompts = [[rng.randrange(0, 250) for _ in range(rng.randrange(3, 15))] for _ in range(5)]
    keys = list(range(5))
    for _turn in range(3):
        comps = engine.generate(prompts, SamplingParams(max_new_tokens=5), keys=keys)
        for prompt, c in zip(prompts, comps):
            ref = full_forward_logprobs(policy, prompt, c.ids)
            assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 1e-4
        prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(rng.randrange(1, 6))]
                   for p, c in zip(prompts, comps)]
    assert engine.stats["reused_tokens"] > 0
    engine.release(keys)
    assert not engine._cache


def test_same_generator_seed_same_samples(policy):
    prompts = [[256, 70, 71], [256, 72]]
    outs = []
    for _ in range(2):
        engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                          generator=torch.Generator().manual_seed(7))
        outs.append([c.ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=8))])
    assert outs[0] == outs[1]


def test_seeded_prompts_do_not_depend_on_their_batch(policy):
    """With `seeds`, a prompt's completion is the same alone, in a larger call, in another order and under another
    batch size: each prompt has its own random stream."""
    rng = random.Random(3)
    prompts = [[rng.randrange(0, 250) for _ in range(rng.randrange(2, 12))] for _ in range(6)]
    seeds = [11, 12, 13, 14, 15, 16]
    params = SamplingParams(max_new_tokens=8, temperature=1.5)

    def run(batch_size, order):
        engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                          batch_size=batch_size, generator=torch.Generator().manual_seed(batch_size))
        comps = engine.generate([prompts[i] for i in order], params, seeds=[seeds[i] for i in order])
        return {i: c.ids for i, c in zip(order, comps)}

    full = run(6, list(range(6)))
    assert run(2, [5, 3, 1, 0, 2, 4]) == full
    assert run(1, [4])[4] == full[4]
    assert len({full[i] for i in range(6)}) > 1
    other = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id)
    assert [c.ids for c in other.generate(prompts, params, seeds=[s + 100 for s in seeds])] != list(full.values())
    with pytest.raises(ValueError, match="seeds must have one entry per prompt"):
        other.generate(prompts, params, seeds=seeds[:2])


def test_stops_at_eos_and_reports_reason(policy):
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    # A high temperature makes the untrained model's distribution nearly uniform, so some of these
    # 256 samples of 8 tokens sample eos (deterministic under the fixed generator seed).
    comps = engine.generate([[256, 70]] * 256, SamplingParams(max_new_tokens=8, temperature=5.0))
    stopped = [c for c in comps if c.finish_reason == "stop"]
    assert stopped, "expected some replies to stop at eos"
    for c in comps:
        assert len(c.ids) <= 8 and len(c.ids) == len(c.logprobs)
        assert policy.eos_token_id not in c.ids[:-1]
        assert (c.finish_reason == "stop") == (c.ids[-1] == policy.eos_token_id)
        if c.finish_reason == "length":
            assert len(c.ids) == 8


def test_greedy_is_deterministic(policy):
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id)
    a = engine.generate([[256, 70, 71]], SamplingParams(max_new_tokens=6, greedy=True))
    b = engine.generate([[256, 70, 71]], SamplingParams(max_new_tokens=6, greedy=True))
    assert a[0].ids == b[0].ids


def test_shared_prompt_prefilled_once_same_logprobs_as_separate_prefill(policy):
    """Members of a group share their first prompt: it is prefilled once and its keys/values copied to
    every member; each member's logprobs equal those of a separate full forward of its own sequence."""
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(3))
    rng = random.Random(2)
    a, b = [rng.randrange(0, 250) for _ in range(11)], [rng.randrange(0, 250) for _ in range(6)]
    prompts = [a] * 4 + [b] * 3 + [a[:5]]
    comps = engine.generate(prompts, SamplingParams(max_new_tokens=7, temperature=0.9), keys=list(range(8)))
    assert engine.stats["shared_prefill_tokens"] == 3 * len(a) + 2 * len(b)
    assert engine.stats["prefill_tokens"] == sum(len(p) for p in prompts)
    assert len({c.ids for c in comps[:4]}) > 1, "members must sample independently after the shared prefill"
    for prompt, c in zip(prompts, comps):
        ref = full_forward_logprobs(policy, prompt, c.ids, temperature=0.9)
        assert max(abs(x - y) for x, y in zip(ref, c.logprobs)) < 1e-4
    # Greedy: the shared prefill decodes exactly what a separate call per prompt decodes.
    greedy = SamplingParams(max_new_tokens=6, greedy=True)
    together = engine.generate([a] * 3 + [b], greedy)
    alone = [engine.generate([p], greedy)[0] for p in (a, b)]
    assert [c.ids for c in together] == [alone[0].ids] * 3 + [alone[1].ids]
    for x, y in zip(together[0].logprobs, alone[0].logprobs):
        assert abs(x - y) < 1e-4


def test_later_turns_prefill_packed_rows_same_as_padded(policy, monkeypatch):
    """Later turns prefill the rows' new tokens back to back with no padding (`attention.packed_rows`): the same
    samples and logprobs as the padded prefill (the engine without turnrl's attention), and equal to a full
    forward; the buffer positions left of shorter suffixes are finite (they are read, masked, by every step): new
    buffers come filled with NaN here, as uninitialised memory may be."""
    import turnrl.engines.hf as hf

    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    packed = []
    real_packed = hf.HFEngine._packed_prefill

    def counting(self, cache, suffixes, *args):
        packed.append(sorted(len(x) for x in suffixes))
        out = real_packed(self, cache, suffixes, *args)
        assert all(torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all() for layer in cache.layers)
        return out

    monkeypatch.setattr(hf.HFEngine, "_packed_prefill", counting)

    def rollout():
        engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                          batch_size=6, generator=torch.Generator().manual_seed(5))
        rng = random.Random(6)
        prompts = [[rng.randrange(0, 250) for _ in range(rng.randrange(4, 20))] for _ in range(6)]
        turns = []
        for _turn in range(3):
            comps = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0.8), keys=list(range(6)))
            turns.append([(p, c.ids, c.logprobs) for p, c in zip(prompts, comps)])
            prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(rng.randrange(1, 12))]
                       for p, c in zip(prompts, comps)]
        return turns

    ours = rollout()
    assert len(packed) == 2 and all(len(set(lengths)) > 1 for lengths in packed), packed
    for turn in ours:
        for prompt, ids, logprobs in turn:
            ref = full_forward_logprobs(policy, prompt, ids, temperature=0.8)
            assert max(abs(a - b) for a, b in zip(ref, logprobs)) < 1e-4
    monkeypatch.setattr(hf, "gqa_attention", lambda lm: contextlib.nullcontext())
    padded = rollout()
    assert len(packed) == 2, "the padded engine must not pack"
    for turn_a, turn_b in zip(ours, padded):
        for (_, ids_a, lp_a), (_, ids_b, lp_b) in zip(turn_a, turn_b):
            assert ids_a == ids_b
            assert max(abs(a - b) for a, b in zip(lp_a, lp_b)) < 1e-5


def test_common_head_of_distinct_prompts_prefilled_once(policy):
    """Distinct first prompts that begin alike (system prompt, rules): their common head is prefilled once;
    every row's logprobs equal a separate full forward, also on the next turn served from the kept cache."""
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(4))
    rng = random.Random(5)
    head = [rng.randrange(0, 250) for _ in range(12)]
    tails = [[rng.randrange(0, 250) for _ in range(n)] for n in (3, 7, 1)]
    prompts = [head + tails[0], head + tails[1], head + tails[1], head + tails[2]]
    params = SamplingParams(max_new_tokens=5, temperature=0.9)
    comps = engine.generate(prompts, params, keys=list(range(4)))
    assert engine.stats["shared_prefill_tokens"] == len(head + tails[1]) + 2 * len(head)
    for prompt, c in zip(prompts, comps):
        ref = full_forward_logprobs(policy, prompt, c.ids, temperature=0.9)
        assert max(abs(x - y) for x, y in zip(ref, c.logprobs)) < 1e-4
    nexts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(3)] for p, c in zip(prompts, comps)]
    reused = engine.stats["reused_tokens"]
    comps = engine.generate(nexts, params, keys=list(range(4)))
    assert engine.stats["reused_tokens"] - reused >= sum(len(p) for p in prompts)  # whole first prompts, head too
    for prompt, c in zip(nexts, comps):
        ref = full_forward_logprobs(policy, prompt, c.ids, temperature=0.9)
        assert max(abs(x - y) for x, y in zip(ref, c.logprobs)) < 1e-4


def test_finished_rows_leave_batch_and_keep_exact_cache(policy):
    """Rows that sample eos early are dropped from the decode batch (compaction); their cache, saved on
    the way out, still serves their next turn exactly."""
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    engine.compact_fraction = 1e-9  # drop finished rows as soon as any finishes
    rng = random.Random(4)
    prompts = [[256] + [rng.randrange(0, 250) for _ in range(rng.randrange(2, 9))] for _ in range(32)]
    keys = list(range(32))
    params = SamplingParams(max_new_tokens=16, temperature=5.0)  # near-uniform: some rows sample eos early
    for _turn in range(3):
        comps = engine.generate(prompts, params, keys=keys)
        for prompt, c in zip(prompts, comps):
            ref = full_forward_logprobs(policy, prompt, c.ids, temperature=5.0)
            assert max(abs(x - y) for x, y in zip(ref, c.logprobs)) < 1e-4
            assert (c.finish_reason == "stop") == (c.ids[-1] == policy.eos_token_id)
        prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(3)] for p, c in zip(prompts, comps)]
    assert engine.stats["compactions"] > 0
    assert engine.stats["reused_tokens"] > 0


def test_sample_rows_follows_the_distribution_and_never_draws_zero_probability():
    from turnrl.engines.hf import sample_rows

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0],
                          [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = torch.stack([sample_rows(probs, g) for _ in range(n)])  # (n, 3)
    counts = torch.bincount(draws[:, 0], minlength=6).double() / n
    assert counts[[0, 2, 5]].sum() == 0
    # Each frequency within 4 standard errors of its probability.
    se = (probs[0].double() * (1 - probs[0].double()) / n).sqrt()
    assert ((counts - probs[0].double()).abs() <= 4 * se + 1e-12).all(), counts
    assert (draws[:, 1] == 0).all() and (draws[:, 2] == 5).all()
    again = torch.stack([sample_rows(probs, torch.Generator().manual_seed(0)) for _ in range(3)])
    assert torch.equal(again[0], again[1])


def test_evaluation_does_not_depend_on_the_generation_batch_size(tmp_path):
    """rollout.gen_batch_size is a speed setting: every episode samples from its own stream, so the sampled
    evaluation plays the same episodes whatever the engine's batches are."""
    from test_train import tiny_config
    from turnrl.evaluate import evaluate
    from turnrl.prepare import build_policy

    cfg = tiny_config(tmp_path / "run", eval__episodes=6, eval__k=2)
    policy = build_policy(cfg)
    runs = []
    for size in (3, 64):
        cfg.rollout.gen_batch_size = size
        _, trajs = evaluate(policy, cfg, greedy=False)
        runs.append([t.ids for t in trajs])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 1


def test_bf16_engine_runs_bf16_and_restores_the_fp32_weights(policy):
    """dtype="bfloat16": every linear layer computes with a bf16 weight under autocast during `generate`; the
    logprobs are those of a bf16-autocast forward up to bf16 rounding; afterwards (also after an error) the
    model holds its own fp32 parameters again."""
    from turnrl.engines.hf import bf16_weights

    before = {n: p for n, p in policy.lm.named_parameters()}
    seen = set()
    linear = next(m for m in policy.lm.modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda m, args, out: seen.add((m.weight.dtype, out.dtype)))
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      dtype="bfloat16")
    rng = random.Random(2)
    prompts = [[rng.randrange(0, 250) for _ in range(n)] for n in (4, 11, 7)]
    try:
        comps = engine.generate(prompts, SamplingParams(max_new_tokens=6), keys=[0, 1, 2])
        prompts = [p + list(c.ids) + [70, 71] for p, c in zip(prompts, comps)]
        comps = engine.generate(prompts, SamplingParams(max_new_tokens=6), keys=[0, 1, 2])  # cached bf16 keys/values
    finally:
        hook.remove()
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    for prompt, c in zip(prompts, comps):
        ids = torch.tensor([prompt + list(c.ids)])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logp = torch.log_softmax(policy.lm(ids).logits[0].float(), -1)
        ref = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c.ids)]
        assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 2e-2
    assert all(p is before[n] for n, p in policy.lm.named_parameters())
    assert all(p.dtype == torch.float32 for p in policy.lm.parameters())

    def fail(*_):
        raise RuntimeError("boom")

    hook = linear.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        with bf16_weights(policy.lm):
            policy.lm(torch.tensor([[256, 70]]))
    hook.remove()
    assert all(p is before[n] for n, p in policy.lm.named_parameters())
    assert all(p.dtype == torch.float32 for p in policy.lm.parameters())
    with pytest.raises(ValueError, match="dtype"):
        HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id, dtype="float16")


def gqa_lm(tokenizer, seed=0):
    """A tiny Llama with grouped-query attention (4 query heads sharing 2 key/value heads), like SmolLM2's 9/3."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def test_engine_with_grouped_query_attention_matches_full_forward_and_restores_sdpa(monkeypatch):
    """A GQA model's multi-turn rollouts go through the stacked-group prefill; logprobs equal a full forward and
    the samples equal those of the engine with transformers' own attention; the model is SDPA again after."""
    import turnrl.attention as attention
    import turnrl.engines.hf as hf

    tiny = load_policy("tiny", seed=0)
    lm = gqa_lm(tiny.tokenizer)
    policy = type("P", (), {"lm": lm})()
    folds = []
    fold = attention._fold_mask
    monkeypatch.setattr(attention, "_fold_mask", lambda mask, groups: folds.append(groups) or fold(mask, groups))

    def rollout():
        engine = HFEngine(lm, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id, batch_size=4,
                          generator=torch.Generator().manual_seed(3))
        rng = random.Random(4)
        prompts = [[rng.randrange(0, 250) for _ in range(rng.randrange(3, 15))] for _ in range(5)]
        turns = []
        for _turn in range(3):
            comps = engine.generate(prompts, SamplingParams(max_new_tokens=5), keys=list(range(5)))
            turns.append([(p, c.ids, c.logprobs) for p, c in zip(prompts, comps)])
            prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(rng.randrange(1, 6))]
                       for p, c in zip(prompts, comps)]
        return turns

    ours = rollout()
    assert folds and set(folds) == {2}
    assert lm.config._attn_implementation == "sdpa" and attention._folded_mask[0] is None
    for turn in ours:
        for prompt, ids, logprobs in turn:
            ref = full_forward_logprobs(policy, prompt, ids)
            assert max(abs(a - b) for a, b in zip(ref, logprobs)) < 1e-4
    monkeypatch.setattr(hf, "gqa_attention", lambda lm: contextlib.nullcontext())
    assert rollout() == ours


def test_shared_head_read_once_and_stored_once_across_turns(monkeypatch):
    """Distinct prompts with a common head on a grouped-query model: every prefill and decode step attends to the
    head through `shared_head` (one copy for all rows) and the kept caches hold only each episode's own
    positions; over three turns, with finished rows leaving the batch, every logprob equals a full forward."""
    import turnrl.attention as attention

    tiny = load_policy("tiny", seed=0)
    lm = gqa_lm(tiny.tokenizer)
    policy = type("P", (), {"lm": lm})()
    calls = []
    with_head = attention._with_head
    monkeypatch.setattr(attention, "_with_head", lambda *a: calls.append(a[1].shape[2]) or with_head(*a))
    engine = HFEngine(lm, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
                      generator=torch.Generator().manual_seed(2))
    engine.compact_fraction = 1e-9
    rng = random.Random(6)
    head = [rng.randrange(0, 250) for _ in range(20)]
    prompts = [head + [rng.randrange(0, 250) for _ in range(n)] for n in (1, 4, 4, 9, 2, 6)]
    prompts[2] = list(prompts[1])  # a group of two: prefilled once
    params = SamplingParams(max_new_tokens=6, temperature=3.0)
    for turn in range(3):
        before = len(calls)
        comps = engine.generate(prompts, params, keys=list(range(6)))
        assert len(calls) - before >= 2 * (1 + min(len(c.ids) for c in comps) - 1)  # every forward, both layers
        if turn == 0:
            assert max(calls) > 1 and min(calls) == 1  # prefill and decode
        for prompt, c in zip(prompts, comps):
            ref = full_forward_logprobs(policy, prompt, c.ids, temperature=3.0)
            assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 1e-4
        shared = engine._cache[0].head
        for key in range(6):
            kept = engine._cache[key]
            assert kept.head is shared and kept.head.tokens == head
            assert kept.keys[0].shape[1] == len(kept.tokens) - len(head)
        prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(rng.randrange(1, 5))]
                   for p, c in zip(prompts, comps)]
    assert engine.stats["compactions"] > 0
    assert attention._shared[0] is None


def test_rows_cached_under_different_heads_are_served_exactly(monkeypatch):
    """Episodes whose caches came from different calls (each with its own shared head) meet in one call: their
    heads are copied into the rows' caches (no shared head) and the logprobs still equal a full forward."""
    import turnrl.attention as attention

    tiny = load_policy("tiny", seed=0)
    lm = gqa_lm(tiny.tokenizer)
    policy = type("P", (), {"lm": lm})()
    engine = HFEngine(lm, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
                      generator=torch.Generator().manual_seed(1))
    rng = random.Random(7)
    head = [rng.randrange(0, 250) for _ in range(16)]
    prompts = [head + [rng.randrange(0, 250) for _ in range(n)] for n in (2, 5, 3, 8)]
    params = SamplingParams(max_new_tokens=4)
    comps = engine.generate(prompts[:2], params, keys=[0, 1]) + engine.generate(prompts[2:], params, keys=[2, 3])
    assert engine._cache[0].head is not engine._cache[2].head
    prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(3)] for p, c in zip(prompts, comps)]
    calls = []
    with_head = attention._with_head
    monkeypatch.setattr(attention, "_with_head", lambda *a: calls.append(1) or with_head(*a))
    cached, reused = sum(len(engine._cache[k].tokens) for k in range(4)), engine.stats["reused_tokens"]
    comps = engine.generate(prompts, params, keys=[0, 1, 2, 3])
    assert not calls
    assert engine.stats["reused_tokens"] - reused == cached  # the heads too, from each row's own call
    for prompt, c in zip(prompts, comps):
        ref = full_forward_logprobs(policy, prompt, c.ids)
        assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 1e-4


def test_bf16_engine_attends_to_the_shared_head_in_bf16(monkeypatch):
    """dtype="bfloat16" with a shared head: the head and the rows' keys meet in bf16 (as SDPA under autocast) and
    the logprobs are those of a bf16-autocast forward up to bf16 rounding, on the first and the next turn."""
    import turnrl.attention as attention

    tiny = load_policy("tiny", seed=0)
    lm = gqa_lm(tiny.tokenizer)
    dtypes = []
    with_head = attention._with_head
    monkeypatch.setattr(attention, "_with_head", lambda *a: dtypes.append(with_head(*a).dtype) or with_head(*a))
    engine = HFEngine(lm, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id, dtype="bfloat16")
    rng = random.Random(8)
    head = [rng.randrange(0, 250) for _ in range(12)]
    prompts = [head + [rng.randrange(0, 250) for _ in range(n)] for n in (3, 6, 2)]
    for _turn in range(2):
        comps = engine.generate(prompts, SamplingParams(max_new_tokens=5), keys=[0, 1, 2])
        for prompt, c in zip(prompts, comps):
            ids = torch.tensor([prompt + list(c.ids)])
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logp = torch.log_softmax(lm(ids).logits[0].float(), -1)
            ref = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c.ids)]
            assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 2e-2
        prompts = [p + list(c.ids) + [70, 71] for p, c in zip(prompts, comps)]
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_batches_of_one_call_share_one_head_on_every_turn(monkeypatch):
    """With more prompts than `batch_size`, the call's uncached prompts get one shared head, so the next turn,
    which sorts the rows into other batches, still attends to one copy of it; logprobs equal a full forward."""
    import turnrl.attention as attention

    tiny = load_policy("tiny", seed=0)
    lm = gqa_lm(tiny.tokenizer)
    policy = type("P", (), {"lm": lm})()
    engine = HFEngine(lm, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id, batch_size=2,
                      generator=torch.Generator().manual_seed(5))
    calls = []
    with_head = attention._with_head
    monkeypatch.setattr(attention, "_with_head", lambda *a: calls.append(1) or with_head(*a))
    rng = random.Random(9)
    head = [rng.randrange(0, 250) for _ in range(14)]
    prompts = [head + [rng.randrange(0, 250) for _ in range(n)] for n in (5, 1, 3, 8, 2, 6)]
    for _turn in range(2):
        before = len(calls)
        comps = engine.generate(prompts, SamplingParams(max_new_tokens=4), keys=list(range(6)))
        assert len(calls) - before >= 3 * 2  # every batch of two rows, both layers
        assert len({id(engine._cache[k].head) for k in range(6)}) == 1
        for prompt, c in zip(prompts, comps):
            ref = full_forward_logprobs(policy, prompt, c.ids)
            assert max(abs(a - b) for a, b in zip(ref, c.logprobs)) < 1e-4
        prompts = [p + list(c.ids) + [rng.randrange(0, 250) for _ in range(rng.randrange(1, 6))]
                   for p, c in zip(prompts, comps)]


def test_cached_span_reads_across_the_shared_head():
    """`_Cached.span` serves any range of an episode stored as a shared head plus its own positions: inside the
    head, across the boundary and after it, equal to the same range of the whole sequence."""
    from turnrl.engines.kv_cache import _Cached

    whole_k, whole_v = torch.randn(2, 3, 11, 4).unbind(0)
    head = _Cached(list(range(5)), [whole_k[:, :5]], [whole_v[:, :5]])
    episode = _Cached(list(range(11)), [whole_k[:, 5:]], [whole_v[:, 5:]], head)
    for start, stop in [(0, 3), (0, 5), (2, 9), (0, 11), (5, 8), (7, 11), (5, 5)]:
        k, v = episode.span(0, start, stop)
        assert torch.equal(k, whole_k[:, start:stop]) and torch.equal(v, whole_v[:, start:stop])


def test_bf16_engine_keeps_keys_in_bf16_and_samples_as_with_fp32_keys(monkeypatch):
    """In bf16 mode the KV buffers hold bf16 keys (rotary hands over fp32 ones, which attention under autocast
    would round to bf16 at every call anyway): the samples and logprobs are exactly those of fp32-stored keys."""
    import turnrl.engines.kv_cache as kv_cache

    tiny = load_policy("tiny", seed=0)
    lm = gqa_lm(tiny.tokenizer)
    rng = random.Random(10)
    head = [rng.randrange(0, 250) for _ in range(10)]
    firsts = [head + [rng.randrange(0, 250) for _ in range(n)] for n in (3, 6, 2)] + [[7, 8, 9]]

    def rollout():
        engine = HFEngine(lm, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id, dtype="bfloat16",
                          generator=torch.Generator().manual_seed(2))
        prompts, out = [list(p) for p in firsts[:3]], []
        for _turn in range(2):
            comps = engine.generate(prompts, SamplingParams(max_new_tokens=5), keys=[0, 1, 2])
            out.append([(c.ids, c.logprobs) for c in comps])
            prompts = [p + list(c.ids) + [70, 71] for p, c in zip(prompts, comps)]
        out.append([(c.ids, c.logprobs) for c in engine.generate(firsts[3:], SamplingParams(max_new_tokens=5))])
        return out, {engine._cache[k].keys[0].dtype for k in range(3)} | {engine._cache[0].head.keys[0].dtype}

    ours, dtypes = rollout()
    assert dtypes == {torch.bfloat16}
    monkeypatch.setattr(kv_cache, "_stored", lambda states: states.dtype)
    theirs, dtypes = rollout()
    assert torch.float32 in dtypes  # rotary's fp32 keys, stored as they come
    assert ours == theirs
