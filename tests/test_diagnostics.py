"""turnrl.diagnostics: RAGEN-2's template-collapse statistics (mutual information between prompt and reply)."""

import json
import math

import pytest
import torch

from turnrl.algos.losses import token_logprobs
from turnrl.config import ConfigError, DiagConfig
from turnrl.diagnostics import collapse_metrics, cross_logprobs, first_replies, mutual_information
from turnrl.models import TinyModelSpec, load_policy
from turnrl.trajectory import Trajectory
from turnrl.train import train
from tests.test_train import tiny_config, weights


def test_mutual_information_on_a_hand_computed_matrix():
    # p(z_i | x_j): reply 0 was sampled for prompt 0, reply 1 for prompt 1
    p = torch.tensor([[0.5, 0.25], [0.1, 0.4]])
    stats = mutual_information(p.log(), torch.tensor([0, 1]))
    # own: 0.5 and 0.4; marginals (mean over prompts): 0.375 and 0.25
    assert stats["mi"] == pytest.approx((math.log(0.5 / 0.375) + math.log(0.4 / 0.25)) / 2)
    assert stats["conditional_entropy"] == pytest.approx(-(math.log(0.5) + math.log(0.4)) / 2)
    assert stats["mi_max"] == pytest.approx(math.log(2))
    assert stats["retrieval_accuracy"] == 1.0
    # reply 1 is more likely under prompt 0: not retrieved, and it lowers the information
    p = torch.tensor([[0.5, 0.25], [0.4, 0.1]])
    stats = mutual_information(p.log(), torch.tensor([0, 1]))
    assert stats["retrieval_accuracy"] == 0.5
    assert stats["mi"] == pytest.approx((math.log(0.5 / 0.375) + math.log(0.1 / 0.25)) / 2)


def test_mutual_information_bounds():
    n = 4
    # replies as likely under every prompt (template collapse): no information, chance-level retrieval impossible
    same = torch.full((8, n), -3.0)
    assert mutual_information(same, torch.arange(8) % n)["mi"] == pytest.approx(0.0, abs=1e-12)
    # each reply possible only under its own prompt: the full log N
    source = torch.arange(8) % n
    own_only = torch.full((8, n), -1e4)
    own_only[torch.arange(8), source] = -2.0
    stats = mutual_information(own_only, source)
    assert stats["mi"] == pytest.approx(math.log(n)) and stats["retrieval_accuracy"] == 1.0
    assert stats["conditional_entropy"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="one source per reply"):
        mutual_information(same, torch.arange(3))


def traj(prompt, reply, *, failed=False, turn_rows=False, later=()):
    """An episode whose first turn is `prompt` then `reply` (then `later` tokens as a second reply)."""
    ids = list(prompt) + list(reply) + list(later)
    spans = [(len(prompt), len(prompt) + len(reply))] + ([(len(ids) - len(later), len(ids))] if later else [])
    mask = [0] * len(prompt) + [1] * len(reply) + [1] * len(later)
    starts = None
    if turn_rows:  # one row: an unrelated row before it, so the row start is not 0
        ids = [9, 9] + ids
        mask = [0, 0] + mask
        spans = [(a + 2, b + 2) for a, b in spans]
        starts = (2,) + ((2,) if later else ())
    return Trajectory(ids=tuple(ids), loss_mask=tuple(mask), logprobs=tuple(0.0 for _ in ids), turn_spans=tuple(spans),
                      turn_rewards=tuple(0.0 for _ in spans), terminated=True, truncated=False, success=False,
                      env_name="x", seed=0, group_id=0, num_actions=0, valid_turns=0,
                      end_reason="env_error" if failed else "env", row_starts=starts)


def test_first_replies_round_robin_over_prompts():
    a, b, c = (1, 2), (3, 4, 5), (6,)
    trajs = [traj(a, (10,)), traj(a, (11,), later=(99,)), traj(a, (12,)), traj(b, (20,), turn_rows=True),
             traj(c, (30,), failed=True), traj(b, (21,)), traj(c, (31,))]
    prompts, replies, source = first_replies(trajs, max_replies=5)
    assert prompts == [a, b, c]
    assert replies == [(10,), (20,), (31,), (11,), (21,)]  # rank 0 of every prompt first; the failed one skipped
    assert source == [0, 1, 2, 0, 1]
    prompts, replies, source = first_replies(trajs, max_replies=100)
    assert len(replies) == 6 and replies[-1] == (12,)
    assert first_replies([traj(a, (10,), failed=True)], 8) == ([], [], [])


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny", seed=5, tiny=TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2,
                                                          intermediate_size=64))


@pytest.mark.parametrize("shared", [True, False])
def test_cross_logprobs_equal_a_direct_forward_of_each_pair(policy, shared):
    gen = torch.Generator().manual_seed(0)
    vocab = len(policy.tokenizer)
    head = torch.randint(0, vocab, (5,), generator=gen).tolist()  # the prompts share a head, as chat prompts do
    prompts = [tuple(head + torch.randint(0, vocab, (n,), generator=gen).tolist()) for n in (3, 6, 4)]
    replies = [tuple(torch.randint(0, vocab, (n,), generator=gen).tolist()) for n in (1, 4, 7, 2)]
    got = cross_logprobs(policy, prompts, replies, micro_batch_tokens=40, bf16=False, temperature=0.7,
                         shared_prefix=shared)
    assert got.shape == (4, 3)
    with torch.no_grad():
        for i, r in enumerate(replies):
            for j, p in enumerate(prompts):
                ids = torch.tensor([list(p) + list(r)])
                logits, _ = policy(ids)
                lp = token_logprobs(logits[:, :-1].float(), ids[:, 1:], temperature=0.7)[0, len(p) - 1:]
                assert got[i, j].item() == pytest.approx(lp.sum().item(), abs=1e-4)


def test_collapse_metrics_need_two_prompts(policy):
    one = [traj((1, 2, 3), (4,)), traj((1, 2, 3), (5,))]
    assert collapse_metrics(policy, one, max_replies=8, micro_batch_tokens=256, bf16=False, temperature=1.0) == {}
    two = one + [traj((1, 2, 6), (4,))]
    stats = collapse_metrics(policy, two, max_replies=8, micro_batch_tokens=256, bf16=False, temperature=1.0)
    assert stats["collapse/prompts"] == 2 and stats["collapse/replies"] == 3
    assert stats["collapse/mi"] <= stats["collapse/mi_max"] == pytest.approx(math.log(2))


def test_diagnostics_leave_training_unchanged(tmp_path):
    """The collapse metrics run between rollout and update without a random draw or a parameter change: a run
    with them logs the same rollouts and ends with the same weights as one without."""
    runs = {}
    for name, every in (("off", 0), ("on", 1)):
        cfg = tiny_config(tmp_path / name, iterations=2, diag=DiagConfig(mi_every=every, mi_replies=6))
        cfg.sft.episodes = 0
        train(cfg, log=lambda *_: None)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    on, off = runs["on"], runs["off"]
    assert all("collapse/mi" in r and "collapse/mi" not in s for r, s in zip(on, off))
    assert [r["rollout/mean_reward"] for r in on] == [r["rollout/mean_reward"] for r in off]
    assert [r["loss/policy"] for r in on] == [r["loss/policy"] for r in off]
    final_on, final_off = weights(tmp_path / "on" / "final"), weights(tmp_path / "off" / "final")
    assert all(torch.equal(final_on[k], final_off[k]) for k in final_on)
    with pytest.raises(ConfigError, match="diag.mi_every"):
        DiagConfig(mi_every=-1)
