"""Train/inference mismatch correction (turnrl.algos.correction, algo.mismatch_correction): hand-computed weights
and masks, the config's checks, and what it does inside the update."""

import dataclasses
import math

import pytest
import torch

from turnrl.algos.correction import STATS, mismatch_correction
from turnrl.config import AlgoConfig, ConfigError, OptimConfig
from turnrl.models import load_policy
from turnrl.batch import collate
from turnrl.update import minibatch_backward, prepare_targets, without_rejected
from tests.test_update_shared_prefix import SPEC, grouped_batch

LOG = math.log


def test_tis_caps_the_ratio_and_masks_nothing():
    train = torch.tensor([[0.0, LOG(3.0), LOG(0.5), -1e9]])  # the last position is not a model token
    rollout = torch.zeros(1, 4)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, keep, stats = mismatch_correction(train, rollout, mask, mode="tis")
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, 0.5, 1.0]]))  # default cap 2
    assert torch.equal(keep, mask)
    assert tuple(stats) == STATS  # the keys the trainer logs as mismatch/*
    assert stats["affected_frac"] == pytest.approx(1 / 3)
    assert stats["ratio_max"] == pytest.approx(3.0) and stats["ratio_min"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.5)
    k3 = ((1 - 1 - 0) + (3 - 1 - LOG(3)) + (0.5 - 1 - LOG(0.5))) / 3
    assert stats["k3_kl"] == pytest.approx(k3)
    weights, _, _ = mismatch_correction(train, rollout, mask, mode="tis", high=4.0)
    torch.testing.assert_close(weights[0, :3], torch.tensor([1.0, 3.0, 0.5]))


def test_icepop_drops_the_tokens_outside_the_band():
    train = torch.tensor([[0.0, LOG(6.0), LOG(0.4), LOG(2.0)]])
    weights, keep, stats = mismatch_correction(train, torch.zeros(1, 4), torch.ones(1, 4), mode="icepop")
    assert torch.equal(keep, torch.tensor([[1.0, 0.0, 0.0, 1.0]]))  # band [0.5, 5]
    assert torch.equal(weights, torch.ones(1, 4)) and stats["affected_frac"] == 0.5
    _, keep, _ = mismatch_correction(train, torch.zeros(1, 4), torch.ones(1, 4), mode="icepop", low=0.3, high=7)
    assert torch.equal(keep, torch.ones(1, 4))


def test_geo_mask_drops_whole_rows_by_their_geometric_mean_ratio():
    train = torch.tensor([[LOG(1.0005), LOG(1.0005), 0.0],   # geometric mean 1.0005: kept
                          [LOG(1.01), 0.0, 0.0],             # sqrt(1.01) = 1.005 > 1.001: dropped whole
                          [LOG(1.01), LOG(1 / 1.01), 0.0],   # 1.0: kept, although each token is off by 1%
                          [5.0, 5.0, 5.0]])                  # no model token: nothing to drop
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    _, keep, stats = mismatch_correction(train, torch.zeros(4, 3), mask, mode="geo-mask")
    assert torch.equal(keep, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    assert stats["affected_frac"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="must be one of"):
        mismatch_correction(train, torch.zeros(4, 3), mask, mode="clip")


def test_mismatch_settings_are_checked():
    with pytest.raises(ConfigError, match="mismatch correction, which is off"):
        AlgoConfig(mismatch_high=3.0)
    with pytest.raises(ConfigError, match="mismatch_low is not used by mismatch_correction='tis'"):
        AlgoConfig(mismatch_correction="tis", mismatch_low=0.5)
    with pytest.raises(ConfigError, match="a band around"):
        AlgoConfig(mismatch_correction="icepop", mismatch_low=1.2)
    with pytest.raises(ConfigError, match="must be > 0"):
        AlgoConfig(mismatch_correction="tis", mismatch_high=0.0)
    AlgoConfig(mismatch_correction="geo-mask", mismatch_low=0.99, mismatch_high=1.01)


def update_grads(policy, trajs, algo):
    """Gradients, losses and stats of one whole-batch update step (as ppo_update takes it)."""
    batch = collate(trajs, policy.pad_token_id)
    optim = OptimConfig()
    targets = prepare_targets(policy, batch, trajs, algo=algo, optim=optim, temperature=1.0)
    batch = without_rejected(batch, targets)
    policy.train()
    policy.zero_grad(set_to_none=True)
    stats: dict = {}
    losses = minibatch_backward(policy, batch, targets, list(range(batch.size)), algo=algo, optim=optim,
                                temperature=1.0, stats=stats)
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return grads, losses, stats, targets


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["tis", "icepop", "geo-mask"])
def test_an_exact_sampler_leaves_the_update_as_it_is(mode):
    """The engine's logprobs are the trainer's (fp32 HF engine): nothing is weighted or dropped, same gradients."""
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5, noise=0.0)
    plain = update_grads(policy, trajs, AlgoConfig(filter="none", entropy_coef=0.01))
    corrected = update_grads(policy, trajs, AlgoConfig(filter="none", entropy_coef=0.01, mismatch_correction=mode))
    stats = corrected[3].stats
    assert stats["mismatch/affected_frac"] == 0.0 and stats["actor/logprob_mismatch"] < 1e-5
    assert abs(stats["mismatch/ratio_max"] - 1) < 1e-5 and abs(stats["mismatch/ratio_min"] - 1) < 1e-5
    assert_same_grads(corrected[0], plain[0])


def test_with_a_noisy_sampler_the_ratio_starts_at_one_and_tis_weights_the_loss():
    """Decoupled: PPO's ratio is against the trainer's own view of the sampling policy, so nothing is clipped at
    the first step; the sampler's gap enters only through the truncated weights."""
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5, noise=0.5)
    _, _, plain_stats, _ = update_grads(policy, trajs, AlgoConfig(filter="none"))
    grads, _, stats, targets = update_grads(policy, trajs, AlgoConfig(filter="none", mismatch_correction="tis"))
    assert plain_stats["actor/clip_frac"][0][0] > 0.1  # against the noisy sampler's logprobs
    assert stats["actor/clip_frac"][0][0] == 0.0
    c = targets.stats
    assert c["mismatch/ratio_max"] > 2.0 and 0 < c["mismatch/affected_frac"] < 0.5
    assert 0.25 < c["actor/logprob_mismatch"] < 0.55  # mean |N(0, 0.5)| = 0.40
    on = targets.loss_weights[collate(trajs, policy.pad_token_id).mask > 0]
    assert on.max() == 2.0 and on.min() < 0.7
    assert any(g.abs().sum() > 0 for g in grads.values())


def turn_row_episodes(policy):
    """FrozenLake episodes played by the fp32 HF engine at T=1, one training row per turn (exact logprobs)."""
    from turnrl.engines import HFEngine, SamplingParams
    from turnrl.envs import make
    from turnrl.context import ChatRenderer
    from turnrl.rollout import RolloutSettings, run_episodes

    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    settings = RolloutSettings(max_turns=3, max_new_tokens=10, max_context_tokens=1024, think=False, turn_rows=True)
    render = ChatRenderer(policy.tokenizer, system_prompt="Move on the lake.", response_prefix="<answer>")
    trajs = run_episodes(engine, render, lambda: make("frozen_lake_det"), [1, 2, 3], 2, settings,
                         SamplingParams(max_new_tokens=10))
    # returns that differ inside each group (the untrained policy fails every episode alike): non-zero advantages
    return [dataclasses.replace(t, turn_rewards=t.turn_rewards[:-1] + (r,))
            for t, r in zip(trajs, (1.0, 0.0, 0.5, -0.5, -1.0, 1.0))]


@pytest.mark.parametrize("mode, rows, agg", [("icepop", "episode", "token-mean"), ("geo-mask", "episode", "token-mean"),
                                             ("icepop", "turn", "seq-mean-token-mean"),
                                             ("geo-mask", "turn", "seq-mean-token-mean")])
def test_rejected_tokens_train_as_if_they_were_not_in_the_loss(mode, rows, agg):
    """Tokens whose sampler logprob is far off are dropped from every loss term and from the denominators (the
    episode's token count of seq-mean-token-mean too): the same gradients as the uncorrected update on
    trajectories where they are not model tokens."""
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5, noise=0.0) if rows == "episode" else turn_row_episodes(policy)
    assert all((t.row_starts is not None) == (rows == "turn") for t in trajs)
    off, masked = [], []
    for i, t in enumerate(trajs):
        model = [k for k, m in enumerate(t.loss_mask) if m]
        bad = set(model[:: 3] if mode == "icepop" else (model if i % 3 == 0 else []))
        logprobs = [lp - 3.0 if k in bad else lp for k, lp in enumerate(t.logprobs)]  # ratio e^3 > 5
        off.append(dataclasses.replace(t, logprobs=tuple(logprobs)))
        masked.append(dataclasses.replace(t, loss_mask=tuple(0 if k in bad else m for k, m in enumerate(t.loss_mask))))
    grads, losses, _, targets = update_grads(policy, off, AlgoConfig(filter="none", entropy_coef=0.01, loss_agg=agg,
                                                                    mismatch_correction=mode))
    expected, expected_losses, _, _ = update_grads(policy, masked, AlgoConfig(filter="none", entropy_coef=0.01,
                                                                              loss_agg=agg))
    n_bad = sum(1 - m for t in masked for m, o in zip(t.loss_mask, next(x for x in off if x.ids == t.ids).loss_mask)
                if o)
    n_model = sum(sum(t.loss_mask) for t in off)
    assert targets.stats["mismatch/affected_frac"] == pytest.approx(n_bad / n_model) and n_bad > 0
    assert_same_grads(grads, expected)
    assert losses == pytest.approx(expected_losses, rel=1e-4, abs=1e-6)
    uncorrected, _, _, _ = update_grads(policy, off, AlgoConfig(filter="none", entropy_coef=0.01, loss_agg=agg))
    assert any(not torch.allclose(uncorrected[k], expected[k], rtol=1e-3, atol=1e-5) for k in expected)
