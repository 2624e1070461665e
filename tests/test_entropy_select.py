"""Token selection in the policy loss: high-entropy tokens only (algo.top_entropy_frac, `high_entropy_mask`) and
DeepSeek-V3.2's off-policy sequence mask (algo.off_policy_mask, `off_policy_sequence_mask`): by hand, the update
each gives, the config's checks and their metrics in a run."""

import dataclasses
import json

import pytest
import torch

from turnrl.algos.losses import high_entropy_mask, off_policy_sequence_mask
from turnrl.batch import collate
from turnrl.config import AlgoConfig, ConfigError, OptimConfig
from turnrl.models import load_policy
from turnrl.train import train
from turnrl.update import minibatch_backward, prepare_targets
from tests.test_train import tiny_config
from tests.test_update_shared_prefix import SPEC, grouped_batch


def test_the_threshold_is_the_quantile_of_the_model_tokens_entropies():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    keep, threshold = high_entropy_mask(entropy, mask, 0.4)
    # masked entropies 0.5, 1, 2, 3, 5: the 0.6 quantile interpolates 2.4 between 2 and 3
    assert threshold == pytest.approx(2.4)
    assert torch.equal(keep, torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))  # 4 and 9 are not model tokens
    keep, _ = high_entropy_mask(entropy, mask, 1.0)
    assert torch.equal(keep, mask.float())
    keep, threshold = high_entropy_mask(torch.ones(2, 3), torch.ones(2, 3), 0.25)
    assert threshold == 1.0 and keep.sum() == 6  # ties at the threshold are all kept
    keep, threshold = high_entropy_mask(entropy, torch.zeros(2, 4), 0.2)
    assert keep.sum() == 0 and threshold == 0.0
    with pytest.raises(ValueError, match="frac must be in"):
        high_entropy_mask(entropy, mask, 0.0)


def policy_gradients(policy, trajs, algo, targets_edit=None):
    batch = collate(trajs, policy.pad_token_id)
    optim = OptimConfig()
    targets = prepare_targets(policy, batch, trajs, algo=algo, optim=optim, temperature=1.0)
    if targets_edit is not None:
        targets = targets_edit(batch, targets)
    policy.train()
    policy.zero_grad(set_to_none=True)
    minibatch_backward(policy, batch, targets, list(range(batch.size)), algo=algo, optim=optim, temperature=1.0)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}, targets


def test_only_the_high_entropy_tokens_get_the_policy_gradient():
    """The update equals the plain update with the advantage zeroed on every token below the threshold, with the
    entropies taken from an independent full forward of the policy."""
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5, noise=0.0, head=4)
    algo = AlgoConfig(filter="none", entropy_coef=0.0, top_entropy_frac=0.3)
    got, targets = policy_gradients(policy, trajs, algo)
    batch = collate(trajs, policy.pad_token_id)
    with torch.no_grad():
        logits = policy.lm(input_ids=batch.input_ids, attention_mask=batch.attention).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    on = batch.mask > 0
    threshold = torch.quantile(entropy[on], 0.7)
    high = (on & (entropy >= threshold)).float()
    assert targets.stats["entropy_select/threshold"] == pytest.approx(float(threshold), abs=1e-4)
    assert targets.stats["entropy_select/kept_frac"] == pytest.approx(float(high.sum() / on.sum()))
    assert 0.25 < float(high.sum() / on.sum()) < 0.4

    def zero_low(_batch, t):
        credit = dataclasses.replace(t.credit, advantages=t.credit.advantages * high)
        return dataclasses.replace(t, credit=credit)
    expected, _ = policy_gradients(policy, trajs, AlgoConfig(filter="none", entropy_coef=0.0), zero_low)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    everything, _ = policy_gradients(policy, trajs, AlgoConfig(filter="none", entropy_coef=0.0))
    assert any(not torch.allclose(everything[n], expected[n], rtol=1e-3, atol=1e-5) for n in expected)


def test_top_entropy_frac_is_checked():
    with pytest.raises(ConfigError, match="top_entropy_frac must be in"):
        AlgoConfig(top_entropy_frac=0.0)
    with pytest.raises(ConfigError, match="loss='gspo' takes one ratio per sequence"):
        AlgoConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4, top_entropy_frac=0.2)


def test_a_run_logs_the_selection(tmp_path):
    cfg = tiny_config(tmp_path / "run", algo=AlgoConfig(filter="none", top_entropy_frac=0.2))
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert 0.2 <= r["entropy_select/kept_frac"] < 0.5 and r["entropy_select/threshold"] > 0


# ---- off-policy sequence mask (algo.off_policy_mask, DeepSeek-V3.2) -----------------------------------------------

def test_the_off_policy_mask_by_hand():
    current = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    sampled = torch.tensor([[-0.5, -0.7, -9.0], [-2.0, -1.0, 0.0], [-1.4, -1.2, -1.0]])
    advantages = torch.tensor([[-1.0, 1.0, -1.0], [-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    keep, row_kl = off_policy_sequence_mask(current, sampled, advantages, mask, threshold=0.3)
    # row 0 drifted by (0.5 + 0.3) / 2 = 0.4: its negative-advantage token goes, the positive one stays;
    # row 1 not at all; row 2 by (-0.4 - 0.2 + 0) / 3 < 0 (the current policy likes its tokens more)
    torch.testing.assert_close(row_kl, torch.tensor([0.4, 0.0, -0.2]))
    assert torch.equal(keep, torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="threshold must be > 0"):
        off_policy_sequence_mask(current, sampled, advantages, mask, threshold=0.0)


def test_drifted_rows_lose_their_negative_advantage_tokens_in_the_update():
    """Rows whose sampling logprobs sit 0.15 above the policy's on every model token (ratio 0.86: inside PPO's clip
    band, so PPO alone still trains on them): with off_policy_mask 0.1 the update equals the plain one with the
    advantage zeroed on those rows' negative-advantage tokens; the other rows (exact logprobs) are untouched. With
    exact logprobs everywhere nothing is masked."""
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    exact = grouped_batch(policy, seed=5, noise=0.0, head=4)
    algo = AlgoConfig(filter="none", entropy_coef=0.0, off_policy_mask=0.1)
    plain_algo = AlgoConfig(filter="none", entropy_coef=0.0)
    got, _ = policy_gradients(policy, exact, algo)
    expected, _ = policy_gradients(policy, exact, plain_algo)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)
    drifted = {1, 4, 6, 10}
    trajs = [dataclasses.replace(t, logprobs=tuple(lp + 0.15 * m for lp, m in zip(t.logprobs, t.loss_mask)))
             if i in drifted else t for i, t in enumerate(exact)]
    got, targets = policy_gradients(policy, trajs, algo)
    rows = torch.tensor([float(i in drifted) for i in range(len(trajs))])[:, None]
    negative = (targets.credit.advantages < 0).float()
    assert (negative * rows).sum() > 0 and (negative * (1 - rows)).sum() > 0

    def zero_drifted_negative(_batch, t):
        advantages = t.credit.advantages * (1 - negative * rows)
        return dataclasses.replace(t, credit=dataclasses.replace(t.credit, advantages=advantages))
    expected, _ = policy_gradients(policy, trajs, plain_algo, zero_drifted_negative)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    unmasked, _ = policy_gradients(policy, trajs, plain_algo)
    assert any(not torch.allclose(unmasked[n], expected[n], rtol=1e-3, atol=1e-5) for n in expected)


def test_off_policy_mask_is_checked_and_logged(tmp_path):
    with pytest.raises(ConfigError, match="off_policy_mask must be > 0"):
        AlgoConfig(off_policy_mask=0.0)
    cfg = tiny_config(tmp_path / "run", algo=AlgoConfig(filter="none", off_policy_mask=0.05, epochs=2))
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["actor/off_policy_masked_frac"] < 1 for r in records)
