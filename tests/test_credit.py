"""turnrl.credit: per-turn tensors from hand-built trajectories, every estimator wired through the
trainer's glue, micro-batch invariance of the update's gradient, and an unbiasedness check."""

import copy
import dataclasses
import math

import pytest
import torch

from turnrl.algos.advantages import grpo_advantages, reinforce_pp_advantages
from turnrl.algos.losses import AGG_MODES
from turnrl.config import AlgoConfig, OptimConfig
from turnrl.credit import compute_credit, sequence_advantages, turn_layout
from turnrl.models import TinyModelSpec, load_policy
from turnrl.reference import Reference
from turnrl.trajectory import Trajectory
from turnrl.batch import collate, micro_batches
from turnrl.update import minibatch_backward, ppo_update, prepare_targets


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


def make_traj(segments, rewards, *, group=0, success=False, observations=None, ids=None) -> Trajectory:
    """segments: ("p", n) n prompt/env tokens or ("m", n) n model tokens (one reply = one turn)."""
    mask, spans = [], []
    for kind, n in segments:
        if kind == "m":
            spans.append((len(mask), len(mask) + n))
        mask += [int(kind == "m")] * n
    observations = observations or [f"obs{k}" for k in range(len(spans) + 1)]
    transcript = []
    for k in range(len(spans)):
        transcript += [("user", observations[k]), ("assistant", f"<answer>a{k}</answer>")]
    transcript.append(("user", observations[len(spans)] if len(observations) > len(spans) else "end"))
    ids = ids if ids is not None else [10 + (i % 50) for i in range(len(mask))]
    return Trajectory(ids=tuple(ids), loss_mask=tuple(mask), logprobs=tuple(0.0 for _ in mask),
                      turn_spans=tuple(spans), turn_rewards=tuple(float(r) for r in rewards), terminated=True,
                      truncated=False, success=success, env_name="toy", seed=0, group_id=group,
                      num_actions=len(spans), valid_turns=len(spans), end_reason="env", transcript=tuple(transcript))


# Three episodes, shifted width 11 (the longest has 12 ids). Reply tokens sit at positions start-1 .. end-2.
#   A: p3 m2 p2 m3 p1 m1 -> spans (3,5) (7,10) (11,12): positions {2,3} {6,7,8} {10}; 3 turns, env tokens between
#   B: p2 m4             -> span (2,6): positions {1..4}; a single-turn episode
#   C: p4 m1 p1 m2       -> spans (4,5) (6,8): positions {3} {5,6}
A = [("p", 3), ("m", 2), ("p", 2), ("m", 3), ("p", 1), ("m", 1)]
B = [("p", 2), ("m", 4)]
C = [("p", 4), ("m", 1), ("p", 1), ("m", 2)]


def batch3(rewards=((0, 0, 1), (0.5,), (-0.1, 1.0)), groups=(0, 0, 0)):
    trajs = [make_traj(seg, r, group=g) for seg, r, g in zip((A, B, C), rewards, groups)]
    return trajs, collate(trajs, pad_id=0)


def test_turn_layout_hand_computed():
    trajs, batch = batch3()
    layout = turn_layout(trajs, batch.input_ids.shape[1])
    close(layout.rewards, [[0, 0, 1], [0.5, 0, 0], [-0.1, 1.0, 0]])
    assert layout.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert layout.first.tolist() == [[2, 6, 10], [1, 0, 0], [3, 5, 0]]
    assert layout.last.tolist() == [[3, 8, 10], [4, 0, 0], [3, 6, 0]]
    assert layout.turn_ids.tolist() == [
        [-1, -1, 0, 0, -1, -1, 1, 1, 1, -1, 2],
        [-1, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1],
        [-1, -1, -1, 0, -1, 1, 1, -1, -1, -1, -1],
    ]
    # the reply positions are exactly the shifted loss mask
    assert ((layout.turn_ids >= 0).float() == batch.mask).all()


def test_turn_gae_uses_the_value_before_each_reply_and_broadcasts():
    trajs, batch = batch3()
    values = torch.full_like(batch.mask, 9.0)  # garbage everywhere except the state-value positions
    values[0, [2, 6, 10]] = torch.tensor([0.2, 0.5, 0.8])
    values[1, 1] = 0.1
    values[2, [3, 5]] = torch.tensor([0.3, 0.6])
    credit = compute_credit(trajs, batch.mask, values, AlgoConfig(estimator="turn_gae", gamma=0.9, lam=0.5))
    # A: d2 = 1-0.8 = 0.2; d1 = 0.9*0.8-0.5 = 0.22, A1 = 0.22+0.45*0.2 = 0.31; d0 = 0.9*0.5-0.2 = 0.25,
    #    A0 = 0.25+0.45*0.31 = 0.3895.  B: 0.5-0.1 = 0.4.  C: A1 = 1-0.6 = 0.4; d0 = -0.1+0.54-0.3 = 0.14,
    #    A0 = 0.14+0.45*0.4 = 0.32.
    close(credit.turn_advantages, [[0.3895, 0.31, 0.2], [0.4, 0, 0], [0.32, 0.4, 0]])
    close(credit.advantages, [
        [0, 0, 0.3895, 0.3895, 0, 0, 0.31, 0.31, 0.31, 0, 0.2],
        [0, 0.4, 0.4, 0.4, 0.4, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0.32, 0, 0.4, 0.4, 0, 0, 0, 0],
    ])
    # the critic is trained only at the state-value positions, towards the turn returns G = A + V
    assert credit.value_mask.nonzero().tolist() == [[0, 2], [0, 6], [0, 10], [1, 1], [2, 3], [2, 5]]
    close(credit.returns[credit.value_mask.bool()], [0.5895, 0.81, 1.0, 0.5, 0.62, 1.0])
    # GSPO's sequence advantage of a turn-level estimator: mean over the sequence's model tokens
    close(credit.seq_advantages, [(2 * 0.3895 + 3 * 0.31 + 0.2) / 6, 0.4, (0.32 + 2 * 0.4) / 3])


def test_bi_level_gae_routes_turn_and_token_discounts():
    trajs, batch = batch3(rewards=((0, 0.5, 1), (0.5,), (-0.1, 1.0)))
    values = torch.rand(batch.mask.shape, generator=torch.Generator().manual_seed(0))
    credit = compute_credit(trajs, batch.mask, values,
                            AlgoConfig(estimator="bi_level_gae", gamma=0.5, token_gamma=1.0, lam=1.0))
    # lam = 1: turn returns are discounted sums with the TURN discount 0.5, independent of values:
    #   A: G2 = 1, G1 = 0.5 + 0.5*1 = 1, G0 = 0 + 0.5*1 = 0.5;  B: 0.5;  C: G1 = 1, G0 = -0.1 + 0.5 = 0.4.
    # Inside a turn, token_gamma = lam = 1 telescope: advantage of token t of turn k = G_k - V_t.
    g = torch.zeros_like(values)
    g[0, [2, 3]], g[0, [6, 7, 8]], g[0, 10] = 0.5, 1.0, 1.0
    g[1, 1:5] = 0.5
    g[2, 3], g[2, [5, 6]] = 0.4, 1.0
    close(credit.advantages, (g - values) * batch.mask)
    close(credit.returns, g * batch.mask)
    assert torch.equal(credit.value_mask, batch.mask)


def test_gigpo_anchors_are_observations_within_a_group():
    # group 0: E1 sees s0 -> s1 and wins (rewards 0, 1); E2 sees s0 -> s1 -> s3 and gets nothing.
    # group 1: two episodes with rewards [1] from the SAME text s0: must not join group 0's s0 steps.
    e1 = make_traj([("p", 2), ("m", 1), ("p", 1), ("m", 2)], [0, 1], group=0, observations=["s0", "s1", "end"])
    e2 = make_traj([("p", 2), ("m", 1), ("p", 1), ("m", 1), ("p", 1), ("m", 1)], [0, 0, 0], group=0,
                   observations=["s0", "s1", "s3", "end"])
    e3 = make_traj([("p", 2), ("m", 1)], [1], group=1, observations=["s0", "end"])
    e4 = make_traj([("p", 2), ("m", 2)], [1], group=1, observations=["s0", "end"])
    trajs = [e1, e2, e3, e4]
    batch = collate(trajs, pad_id=0)
    credit = compute_credit(trajs, batch.mask, None, AlgoConfig(estimator="gigpo", gamma=0.5))
    # episode level, group 0: returns 1 vs 0 -> +-0.5/std, std = sqrt(0.5) -> +-0.70711; group 1 constant -> 0.
    # step level (gamma 0.5): E1 R = [0.5, 1], E2 R = [0, 0, 0]. Step groups (g0, s0): 0.5 vs 0 -> +-0.70711;
    # (g0, s1): 1 vs 0 -> +-0.70711; (g0, s3): alone -> 0; (g1, s0): 1 vs 1 -> 0.
    s = 1 / math.sqrt(2)
    close(credit.turn_advantages, [[2 * s, 2 * s, 0], [-2 * s, -2 * s, -s], [0, 0, 0], [0, 0, 0]], tol=1e-4)


def test_rebn_and_sequence_estimators():
    trajs, batch = batch3(rewards=((0, 0, 1), (0.5,), (-0.1, 1.0)), groups=(0, 0, 1))
    credit = compute_credit(trajs, batch.mask, None, AlgoConfig(estimator="rebn", gamma=0.5))
    # per-turn returns (gamma 0.5): A [0.25, 0.5, 1], B [0.5], C [0.4, 1]; z-scored over these 6 turns
    g = torch.tensor([0.25, 0.5, 1.0, 0.5, 0.4, 1.0])
    z = (g - g.mean()) / (g.std() + 1e-6)
    close(credit.turn_advantages[credit.turn_mask], z)
    totals = torch.tensor([1.0, 0.5, 0.9])
    groups = torch.tensor([0, 0, 1])
    for est, expected in (("reinforce_pp", reinforce_pp_advantages(totals, groups)),
                          ("grpo", grpo_advantages(totals, groups)),
                          ("dr_grpo", grpo_advantages(totals, groups, normalize_std=False))):
        credit = compute_credit(trajs, batch.mask, None, AlgoConfig(estimator=est))
        close(credit.seq_advantages, expected)
        close(credit.advantages, expected[:, None] * batch.mask)
        close(credit.turn_advantages, expected[:, None] * credit.turn_mask)


def test_gae_reward_sits_on_each_turn_last_token():
    trajs, batch = batch3()
    values = torch.zeros_like(batch.mask)
    credit = compute_credit(trajs, batch.mask, values, AlgoConfig(estimator="gae", gamma=1.0, lam=1.0))
    # V = 0, gamma = lam = 1: each token's advantage is the sum of the rewards from its turn on
    close(credit.advantages[0], [0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1])
    close(credit.advantages[2], [0, 0, 0, 0.9, 0, 1, 1, 0, 0, 0, 0])


def test_gigpo_without_transcript_is_an_error():
    t = make_traj(A, [0, 0, 1])
    t = dataclasses.replace(t, transcript=())
    batch = collate([t, t], pad_id=0)
    with pytest.raises(ValueError, match="transcript"):
        compute_credit([t, t], batch.mask, None, AlgoConfig(estimator="gigpo"))


# ------------------------------------------------------------------------- unbiasedness on a toy MDP
REWARD_STOP = torch.tensor([0.2, 1.0, 0.3, 0.6], dtype=torch.float64)  # reward for stopping at turn t
REWARD_GO = -0.1  # reward for going on; the episode ends after turn H-1 in any case
H, GAMMA, LAM, THETA = 4, 0.9, 0.7, -0.5


def exact_values(theta: torch.Tensor) -> torch.Tensor:
    """V(t) of the policy 'stop with probability sigmoid(theta)', by backward recursion (differentiable)."""
    p = torch.sigmoid(theta)
    v, out = torch.zeros((), dtype=torch.float64), []
    for t in reversed(range(H)):
        v = p * REWARD_STOP[t] + (1 - p) * (REWARD_GO + GAMMA * v)
        out.append(v)
    return torch.stack(out[::-1])


def sample_toy(n: int, seed: int):
    """Episodes of the toy MDP as Trajectories (1 prompt token, then reply token / env token per turn)."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.sigmoid(torch.tensor(THETA, dtype=torch.float64))
    stops = torch.rand(n, H, generator=gen, dtype=torch.float64) < p
    trajs, actions = [], []
    for row in range(n):
        acts, rewards = [], []
        for t in range(H):
            a = bool(stops[row, t])
            acts.append(a)
            rewards.append(float(REWARD_STOP[t]) if a else REWARD_GO)
            if a:
                break
        segments = [("p", 1)] + [seg for _ in acts for seg in (("m", 1), ("p", 1))]
        trajs.append(make_traj(segments[:-1], rewards))
        actions.append(acts)
    return trajs, actions, float(p)


def gradient_estimate(turn_adv: torch.Tensor, actions, p: float) -> tuple[float, float]:
    """Mean and standard error of sum_t gamma^t A_t dlog pi(a_t)/dtheta, dlog pi/dtheta = a - p."""
    per_episode = []
    for row, acts in enumerate(actions):
        per_episode.append(sum(GAMMA ** t * float(turn_adv[row, t]) * ((1.0 if a else 0.0) - p)
                               for t, a in enumerate(acts)))
    x = torch.tensor(per_episode, dtype=torch.float64)
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


def test_turn_gae_policy_gradient_is_unbiased_with_variable_episode_lengths():
    """With the exact value function, turn-level GAE(lambda) advantages give an unbiased policy gradient
    for any lambda. Episodes stop after 1..4 turns, so padding turns, env tokens between replies and
    the state-value positions all matter: a mis-wired estimator is biased (checked below)."""
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    v = exact_values(theta)
    (exact,) = torch.autograd.grad(v[0], theta)
    trajs, actions, p = sample_toy(20000, seed=0)
    assert {len(a) for a in actions} == {1, 2, 3, 4}
    batch = collate(trajs, pad_id=0)
    layout = turn_layout(trajs, batch.input_ids.shape[1])
    values = torch.full_like(batch.mask, 5.0)  # garbage off the state-value positions
    rows, cols = torch.nonzero(layout.mask, as_tuple=True)
    values[rows, layout.first[rows, cols]] = v.detach().float()[cols]
    credit = compute_credit(trajs, batch.mask, values, AlgoConfig(estimator="turn_gae", gamma=GAMMA, lam=LAM))
    mean, se = gradient_estimate(credit.turn_advantages, actions, p)
    assert abs(mean - float(exact)) < 4 * se, (mean, float(exact), se)
    assert float(exact) > 0.1 and mean > 0  # stopping more often pays at theta = -0.5

    # Power: the same data with an off-by-one-turn critic (turn t reads the value of the state after
    # its reply, V(t+1), 0 after the last turn) is biased far beyond the tolerance.
    late = values.clone()
    after = torch.cat([v.detach().float()[1:], torch.zeros(1)])
    late[rows, layout.first[rows, cols]] = after[cols]
    wrong = compute_credit(trajs, batch.mask, late, AlgoConfig(estimator="turn_gae", gamma=GAMMA, lam=LAM))
    bad, bad_se = gradient_estimate(wrong.turn_advantages, actions, p)
    assert abs(bad - float(exact)) > 8 * max(se, bad_se), (bad, float(exact))


# ------------------------------------------------------------------------- micro-batch invariance
def random_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    policy = load_policy("tiny", value_head=True, seed=seed,
                         tiny=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    torch.nn.init.normal_(policy.value_head.weight, std=0.1, generator=gen)
    vocab = len(policy.tokenizer)
    trajs = []
    for row in range(8):
        length = int(torch.randint(33, 60, (1,), generator=gen))  # > 32: micro_batch_tokens=64 holds one row
        n_turns = int(torch.randint(1, 4, (1,), generator=gen))
        segments, used = [("p", 5)], 5
        for _ in range(n_turns):
            m = int(torch.randint(2, 7, (1,), generator=gen))
            segments += [("m", m), ("p", 3)]
            used += m + 3
        segments[-1] = ("p", 3 + length - used) if length > used else segments[-1]
        ids = torch.randint(0, vocab, (sum(n for _, n in segments),), generator=gen).tolist()
        rewards = (torch.rand(n_turns, generator=gen) - 0.3).tolist()
        trajs.append(make_traj(segments, rewards, group=row // 2, ids=ids))
    # sampling logprobs = current policy + noise, so ratios differ from 1 and some tokens are clipped
    batch = collate(trajs, policy.pad_token_id)
    with torch.no_grad():
        logits, _ = policy(batch.input_ids, batch.attention, with_values=True)
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.targets[..., None])[..., 0]
    noisy = logp + 0.3 * torch.randn(logp.shape, generator=gen)
    for row, t in enumerate(trajs):
        lp = [0.0] + (noisy[row, : len(t.ids) - 1] * batch.mask[row, : len(t.ids) - 1]).tolist()
        trajs[row] = dataclasses.replace(t, logprobs=tuple(lp))
    return policy, trajs


SETUPS = {
    "grpo-ppo-kl-entropy-dualclip": dict(estimator="grpo", kl_coef=0.1, entropy_coef=0.01, dual_clip=2.0),
    "turn_gae-critic": dict(estimator="turn_gae", gamma=0.9, lam=0.8, entropy_coef=0.01),
    "bi_level_gae-critic": dict(estimator="bi_level_gae", gamma=0.9, lam=0.8),
    "rebn-gspo": dict(estimator="rebn", loss="gspo", clip_low=0.02, clip_high=0.03),
}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("agg", AGG_MODES)
def test_gradient_does_not_depend_on_micro_batch_size(setup, agg):
    policy, trajs = random_batch(seed=1)
    algo = AlgoConfig(filter="none", loss_agg=agg, **SETUPS[setup])
    ref = copy.deepcopy(policy.lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = collate(trajs, policy.pad_token_id)
    rows = list(range(batch.size))
    grads, losses = [], []
    for budget in (64, 1_000_000):
        optim = OptimConfig(micro_batch_tokens=budget)
        assert len(micro_batches(batch.lengths, rows, budget)) == (8 if budget == 64 else 1)
        targets = prepare_targets(policy, batch, trajs, algo=algo, optim=optim, temperature=1.0, ref_lm=Reference(ref))
        policy.train()
        policy.zero_grad(set_to_none=True)
        losses.append(minibatch_backward(policy, batch, targets, rows, algo=algo, optim=optim, temperature=1.0))
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    if algo.needs_critic:
        assert "value_head.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0, msg=name)
    for key in losses[0]:
        assert losses[0][key] == pytest.approx(losses[1][key], abs=1e-6), key


def test_critic_only_update_changes_the_value_head_only():
    policy, trajs = random_batch(seed=2)
    algo = AlgoConfig(estimator="turn_gae", filter="none", critic_warmup=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    stats = ppo_update(policy, optimizer, scheduler, trajs, algo=algo, optim=OptimConfig(), temperature=1.0,
                       critic_only=True)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"value_head.weight", "value_head.bias"}
    assert all(p.requires_grad for p in policy.lm.parameters())  # unfrozen again
    assert stats["loss/value"] > 0 and math.isfinite(stats["loss/policy"])


@pytest.mark.parametrize("estimator", ["grpo", "turn_gae"])
def test_the_update_reports_each_turns_advantage_as_the_estimator_gave_it(estimator):
    """`ppo_update(turn_advantages=...)`: per episode, per turn, the mean advantage of the turn's tokens, the
    same for every turn under a trajectory-level estimator (the episode's group-normalised return)."""
    policy, trajs = random_batch(seed=3)
    algo = AlgoConfig(estimator=estimator, filter="none")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    out: list = []
    ppo_update(policy, optimizer, scheduler, trajs, algo=algo, optim=OptimConfig(), temperature=1.0,
               turn_advantages=out)
    assert [len(a) for a in out] == [t.num_turns for t in trajs]
    if estimator == "grpo":
        expected = sequence_advantages(trajs, "grpo").tolist()
        for advantages, e in zip(out, expected):
            assert advantages == pytest.approx([e] * len(advantages), abs=1e-5)
    else:  # a critic tells the turns of an episode apart
        assert any(len(set(a)) > 1 for a in out if len(a) > 1)
