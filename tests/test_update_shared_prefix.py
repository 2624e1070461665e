"""turnrl.shared_prefix: the update runs a group's shared first prompt once and reuses its keys/values;
gradients and losses must equal the per-row computation."""

import contextlib
import copy
import dataclasses

import pytest
import torch

from turnrl.algos.losses import AGG_MODES
from turnrl.config import AlgoConfig, OptimConfig
from turnrl.models import LoraSpec, TinyModelSpec, load_policy
from turnrl.reference import Reference
from turnrl.shared_prefix import plan_micro_batches
from turnrl.batch import collate
from turnrl.forward import shared_head
from turnrl.update import minibatch_backward, prepare_targets
from tests.test_credit import make_traj
from tests.test_models import scale_logits

SPEC = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def grouped_batch(policy, seed: int, groups: int = 3, members: int = 4, head: int = 0, noise: float = 0.3):
    """`groups` prompts of different lengths, each followed by `members` different multi-turn continuations;
    all prompts begin with the same `head` tokens. Their sampling logprobs are the policy's plus normal noise
    of std `noise`."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(policy.tokenizer)
    common = torch.randint(0, vocab, (head,), generator=gen).tolist()
    trajs = []
    for g in range(groups):
        p = head + 6 + 5 * g
        prompt = common + torch.randint(0, vocab, (p - head,), generator=gen).tolist()
        for _ in range(members):
            segments = [("p", p)]
            for _turn in range(int(torch.randint(1, 3, (1,), generator=gen))):
                segments += [("m", int(torch.randint(1, 6, (1,), generator=gen))), ("p", 2)]
            rest = torch.randint(0, vocab, (sum(n for _, n in segments) - p,), generator=gen).tolist()
            rewards = (torch.rand(len(segments) // 2, generator=gen) - 0.3).tolist()
            trajs.append(make_traj(segments, rewards, group=g, ids=prompt + rest))
    batch = collate(trajs, policy.pad_token_id)
    with torch.no_grad():
        logits, _ = policy(batch.input_ids, batch.attention)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.targets[..., None])[..., 0]
    noisy = logp + noise * torch.randn(logp.shape, generator=gen)  # ratios != 1, some clipped
    for row, t in enumerate(trajs):
        lp = [0.0] + (noisy[row, : len(t.ids) - 1] * batch.mask[row, : len(t.ids) - 1]).tolist()
        trajs[row] = dataclasses.replace(t, logprobs=tuple(lp))
    return trajs


def grads_and_losses(policy, trajs, algo, optim, ref):
    batch = collate(trajs, policy.pad_token_id)
    rows = list(range(batch.size))
    targets = prepare_targets(policy, batch, trajs, algo=algo, optim=optim, temperature=0.8, ref_lm=Reference(ref))
    policy.train()
    policy.zero_grad(set_to_none=True)
    losses = minibatch_backward(policy, batch, targets, rows, algo=algo, optim=optim, temperature=0.8)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return grads, losses, shared_head(policy, batch, rows, algo=algo, optim=optim) is not None


SETUPS = {
    "grpo-kl-entropy-dualclip": dict(estimator="grpo", kl_coef=0.1, entropy_coef=0.01, dual_clip=2.0),
    "rloo-gspo": dict(estimator="rloo", loss="gspo", clip_low=0.02, clip_high=0.03),
}


@pytest.mark.parametrize("budget", [64, 100_000])
@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_shared_prefix_gradients_equal_per_row_gradients(setup, agg, budget):
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5)
    algo = AlgoConfig(filter="none", loss_agg=agg, **SETUPS[setup])
    ref = copy.deepcopy(policy.lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    shared = grads_and_losses(policy, trajs, algo, OptimConfig(micro_batch_tokens=budget, shared_prefix=True), ref)
    plain = grads_and_losses(policy, trajs, algo, OptimConfig(micro_batch_tokens=budget, shared_prefix=False), ref)
    assert shared[2] and not plain[2]
    assert shared[0].keys() == plain[0].keys() and len(plain[0]) > 0
    for name in plain[0]:
        torch.testing.assert_close(shared[0][name], plain[0][name], atol=2e-6, rtol=1e-4, msg=name)
    for key in plain[1]:
        assert shared[1][key] == pytest.approx(plain[1][key], abs=1e-6, rel=1e-6), key


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("setup", list(SETUPS))
def test_packed_continuations_equal_the_padded_ones(setup, lora, monkeypatch):
    """Inside turnrl's attention (where ppo_update, SFT and the KL reference run), the members' continuations
    after their shared prompts run as one unpadded sequence: the same losses and gradients as the padded forward
    (continuations of different lengths here, so the padded one has padding to skip)."""
    import turnrl.shared_prefix as shared_prefix
    from turnrl.attention import gqa_attention

    policy = load_policy("tiny", seed=3, tiny=SPEC, lora=LoraSpec(rank=4) if lora else None)
    trajs = grouped_batch(policy, seed=5, head=9)
    lengths = [len(t.ids) for t in trajs]
    assert len(set(lengths)) > 3
    ref = copy.deepcopy(policy.lm)
    packed = []
    real = shared_prefix._packed_continuations
    monkeypatch.setattr(shared_prefix, "_packed_continuations", lambda *a: packed.append(len(a[2])) or real(*a))
    algo = AlgoConfig(filter="none", **SETUPS[setup])
    optim = OptimConfig(micro_batch_tokens=100_000, shared_prefix=True)
    by_ref = int(algo.kl_coef > 0)  # the KL reference's forward runs in turnrl's attention on its own
    with gqa_attention(policy.lm):
        ours = grads_and_losses(policy, trajs, algo, optim, ref)
    assert packed == [len(trajs)] * (1 + by_ref)
    padded = grads_and_losses(policy, trajs, algo, optim, ref)
    assert packed == [len(trajs)] * (1 + 2 * by_ref), "outside turnrl's attention the update's forward stays padded"
    assert ours[0].keys() == padded[0].keys() and len(padded[0]) > 0
    for name in padded[0]:
        torch.testing.assert_close(ours[0][name], padded[0][name], atol=2e-6, rtol=1e-4, msg=name)
    for key in padded[1]:
        assert ours[1][key] == pytest.approx(padded[1][key], abs=1e-6, rel=1e-6), key


@pytest.mark.parametrize("members", [1, 3])
def test_common_head_of_different_prompts_runs_once_with_equal_gradients(members, monkeypatch):
    """Prompts that differ but begin alike (system prompt, rules): the head runs once per micro-batch, and
    gradients and losses equal the per-row computation, also when no two rows share a whole prompt."""
    import turnrl.shared_prefix as sp

    policy = load_policy("tiny", seed=4, tiny=SPEC)
    trajs = grouped_batch(policy, seed=7, groups=4, members=members, head=12)
    batch = collate(trajs, policy.pad_token_id)
    assert sp.head_length(batch.input_ids, list(range(batch.size)), batch.prompt_len) == 12
    calls = []
    decoder = policy.lm.get_decoder()  # the update runs the trunk and applies the LM head itself
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or real(*a, **k))
    algo = AlgoConfig(filter="none", estimator="rebn" if members == 1 else "grpo", entropy_coef=0.01)
    shared = grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=True), None)
    assert (1, 12) in calls  # the head, once
    calls.clear()
    plain = grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=False), None)
    assert shared[2] and not plain[2] and (1, 12) not in calls
    for name in plain[0]:
        torch.testing.assert_close(shared[0][name], plain[0][name], atol=2e-6, rtol=1e-4, msg=name)
    for key in plain[1]:
        assert shared[1][key] == pytest.approx(plain[1][key], abs=1e-6, rel=1e-6), key


def test_head_length_leaves_each_prompt_a_token_and_ignores_short_heads():
    from turnrl.shared_prefix import MIN_HEAD, head_length

    ids = torch.tensor([[1] * 20 + [2, 3], [1] * 20 + [4, 5], [1] * 22])
    assert head_length(ids, [0, 1], [22, 22, 22]) == 20
    assert head_length(ids, [0, 2], [22, 22, 22]) == 20
    assert head_length(ids, [2, 2], [22, 22, 22]) == 21  # identical prompts: all but the last token
    assert head_length(ids, [0, 1], [MIN_HEAD, 22, 22]) == 0  # too short to be worth a forward of its own
    assert head_length(ids, [0], [22, 22, 22]) == 0


@pytest.mark.parametrize("head", [0, 12])
def test_shared_prefix_with_lora_equals_per_row(head):
    pytest.importorskip("peft")
    policy = load_policy("tiny", seed=1, tiny=SPEC, lora=LoraSpec(rank=4))
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    trajs = grouped_batch(policy, seed=2, head=head)
    algo = AlgoConfig(filter="none", estimator="grpo")
    shared = grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=True), None)
    plain = grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=False), None)
    assert shared[2] and any("lora_A" in n for n in plain[0])
    for name in plain[0]:
        torch.testing.assert_close(shared[0][name], plain[0][name], atol=2e-6, rtol=1e-4, msg=name)


def test_plan_keeps_groups_together_within_budget():
    lengths = [30, 32, 31, 50, 52, 20, 21]
    prompt_len = [20, 20, 20, 40, 40, 10, 10]
    prompt_id = [0, 0, 0, 1, 1, 2, 2]
    plan = plan_micro_batches(list(range(7)), lengths, prompt_len, prompt_id, token_budget=80)
    assert sorted(r for mb in plan for r in mb) == list(range(7))
    for mb in plan:
        groups = {prompt_id[r] for r in mb}
        cost = len(groups) * max(prompt_len[r] for r in mb) + len(mb) * max(lengths[r] - prompt_len[r] for r in mb)
        assert cost <= 80 or len(mb) == 1
    # a group that fits stays in one micro-batch
    assert any({0, 1, 2} <= set(mb) for mb in plan)


def test_reference_logprobs_share_the_prompt_head_and_equal_the_per_row_ones(monkeypatch):
    """The KL reference's forward runs the prompts like the update does (common head once, each distinct prompt
    once), with the same logprobs as the per-row forward at every model token and 0 elsewhere."""
    policy = load_policy("tiny", seed=4, tiny=SPEC)
    trajs = grouped_batch(policy, seed=9, groups=4, members=3, head=12)
    ref = copy.deepcopy(policy.lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    calls = []
    decoder = ref.get_decoder()
    real = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or real(*a, **k))
    algo = AlgoConfig(filter="none", kl_coef=0.1)
    batch = collate(trajs, policy.pad_token_id)
    out = {}
    for shared in (True, False):
        calls.clear()
        out[shared] = prepare_targets(policy, batch, trajs, algo=algo, optim=OptimConfig(shared_prefix=shared),
                                      temperature=0.8, ref_lm=Reference(ref)).ref_logprobs
        assert ((1, 12) in calls) == shared  # the common head, once
    assert (out[True][batch.mask == 0] == 0).all() and (out[True][batch.mask > 0] != 0).all()
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("budget", [64, 100_000])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("estimator", ["gae", "turn_gae", "bi_level_gae"])
def test_critic_shares_the_prompt_forward_with_equal_losses_and_gradients(estimator, packed, budget, monkeypatch):
    """Critic estimators use the shared-prompt forward too (the value head reads the same hidden states as the LM
    head), in turnrl's attention also unpadded: the old values, advantages, losses and gradients (value head
    included) equal the per-row forward's."""
    import turnrl.shared_prefix as shared_prefix
    from turnrl.attention import gqa_attention

    policy = load_policy("tiny", seed=3, tiny=SPEC, value_head=True)
    with torch.no_grad():  # the value head starts at zero: make the values (and so the advantages) differ by row
        policy.value_head.weight.normal_(std=0.5)
        policy.value_head.bias.fill_(0.1)
    trajs = grouped_batch(policy, seed=5, head=9)
    calls = []
    real = shared_prefix._packed_continuations
    monkeypatch.setattr(shared_prefix, "_packed_continuations", lambda *a: calls.append(len(a[2])) or real(*a))
    algo = AlgoConfig(filter="none", estimator=estimator, entropy_coef=0.01)
    with gqa_attention(policy.lm) if packed else contextlib.nullcontext():
        shared = grads_and_losses(policy, trajs, algo, OptimConfig(micro_batch_tokens=budget, shared_prefix=True), None)
    assert (sum(calls) == 2 * len(trajs)) == packed  # the old values' forward and the update's
    plain = grads_and_losses(policy, trajs, algo, OptimConfig(micro_batch_tokens=budget, shared_prefix=False), None)
    assert shared[2] and not plain[2]
    assert "value_head.weight" in plain[0] and shared[0].keys() == plain[0].keys()
    for name in plain[0]:
        torch.testing.assert_close(shared[0][name], plain[0][name], atol=2e-6, rtol=1e-4, msg=name)
    assert plain[1]["loss/value"] > 0
    for key in plain[1]:
        assert shared[1][key] == pytest.approx(plain[1][key], abs=1e-6, rel=1e-6), key


def test_critic_of_a_model_lm_parts_cannot_split_runs_the_full_forward():
    """A value head needs the LM's last hidden state; for a model whose logits are not the plain head of its trunk
    (here scaled, like soft-capping) the shared-prompt forward gives logits, so a critic estimator runs the full
    per-row forward instead, with the same results as `shared_prefix=False`."""
    from turnrl.lm_parts import lm_parts

    policy = load_policy("tiny", seed=3, tiny=SPEC, value_head=True)
    with torch.no_grad():
        policy.value_head.weight.normal_(std=0.5)
    scale_logits(policy.lm)
    trajs = grouped_batch(policy, seed=5, head=9)
    algo = AlgoConfig(filter="none", estimator="gae")
    shared = grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=True), None)
    plain = grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=False), None)
    assert not lm_parts(policy.lm).split and not shared[2]
    assert shared[1] == plain[1] and shared[1]["loss/value"] > 0
    for name in plain[0]:
        assert torch.equal(shared[0][name], plain[0][name]), name
    grpo = grads_and_losses(policy, trajs, AlgoConfig(filter="none"), OptimConfig(shared_prefix=True), None)
    assert grpo[2]  # without a critic the same model still shares its prompts (the head applies to the logits)


@pytest.mark.parametrize("estimator, lora, head", [("grpo", False, 9), ("grpo", True, 9), ("gae", False, 0),
                                                   ("gae", True, 9)])
def test_shared_prefix_under_gradient_checkpointing_equals_it_without(estimator, lora, head):
    """Under (non-reentrant) gradient checkpointing the prompts are still shared: the checkpointed layers keep the
    prompts' keys/values, whose caches give the same keys again when the backward pass replays a layer. Losses and
    gradients equal the shared forward's without checkpointing (they would not if a replay appended the keys twice
    or if the prompts' keys carried no gradient), which other tests compare with the per-row computation."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from turnrl.attention import gqa_attention
    from turnrl.shared_prefix import shares_under_checkpointing

    if not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        pytest.skip("this transformers drops every cache in checkpointed layers: the rows run one by one")
    results = []
    for checkpointed in (True, False):
        policy = load_policy("tiny", seed=3, tiny=SPEC, value_head=True, lora=LoraSpec(rank=4) if lora else None,
                             gradient_checkpointing=checkpointed)
        with torch.no_grad():
            policy.value_head.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(1))
        trajs = grouped_batch(policy, seed=5, head=head)
        algo = AlgoConfig(filter="none", estimator=estimator, entropy_coef=0.01)
        with gqa_attention(policy.lm):
            assert shares_under_checkpointing(policy.lm) == checkpointed
            results.append(grads_and_losses(policy, trajs, algo, OptimConfig(shared_prefix=True), None))
    (checkpointed, plain) = results
    assert checkpointed[2] and plain[2]
    assert checkpointed[0].keys() == plain[0].keys() and len(plain[0]) > 0
    for name in plain[0]:
        torch.testing.assert_close(checkpointed[0][name], plain[0][name], atol=1e-7, rtol=1e-6, msg=name)
    for key in plain[1]:
        assert checkpointed[1][key] == pytest.approx(plain[1][key], abs=1e-7, rel=1e-7), key


def test_no_shared_prefix_under_a_checkpoint_that_drops_the_cache_or_its_gradient():
    """A re-entrant checkpoint computes a layer's outputs without gradient, so the prompts' keys/values would carry
    none: then (as with a layer transformers does not let keep its cache) the rows run one by one."""
    from turnrl.attention import gqa_attention
    from turnrl.shared_prefix import shares_under_checkpointing

    policy = load_policy("tiny", seed=3, tiny=SPEC)
    policy.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = collate(grouped_batch(policy, seed=5), policy.pad_token_id)
    with gqa_attention(policy.lm):
        assert not shares_under_checkpointing(policy.lm)
        assert shared_head(policy, batch, list(range(batch.size)), algo=AlgoConfig(), optim=OptimConfig()) is None
