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
