"""Hand-computed tests for turnrl.algos.advantages (numbers worked out in comments)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.algos.advantages import (
    bi_level_gae,
    gae,
    gigpo_advantages,
    grpo_advantages,
    rebn_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    turn_gae,
)

T = torch.tensor


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# Groups used below (ids interleaved and non-contiguous on purpose):
#   group 7: [1, 2, 3]  mean 2, unbiased std sqrt((1+0+1)/2) = 1
#   group 3: [5, 5]     constant -> 0
#   group 2: [0, 4]     mean 2, unbiased std sqrt((4+4)/1) = 2*sqrt(2)
#   group 9: [4]        singleton -> 0
REWARDS = T([1.0, 5.0, 0.0, 2.0, 4.0, 5.0, 4.0, 3.0])
GROUPS = T([7, 3, 2, 7, 9, 3, 2, 7])


def test_grpo_hand_computed():
    adv = grpo_advantages(REWARDS, GROUPS)
    s = 1 / math.sqrt(2)  # 2 / (2*sqrt(2))
    close(adv, [-1.0, 0.0, -s, 0.0, 0.0, 0.0, s, 1.0])


def test_grpo_eps_added_to_std_not_variance():
    # group 7 std = 1: (r - mean)/(1 + 0.5) = +-2/3; sqrt(var + eps) would give 1/sqrt(1.5) = 0.816
    adv = grpo_advantages(T([1.0, 2.0, 3.0]), T([0, 0, 0]), eps=0.5)
    close(adv, [-2 / 3, 0.0, 2 / 3])


def test_dr_grpo_mean_only():
    adv = grpo_advantages(REWARDS, GROUPS, normalize_std=False)
    # group 7: -1, 0, 1; group 2: -2, 2; constant / singleton groups 0
    close(adv, [-1.0, 0.0, -2.0, 0.0, 0.0, 0.0, 2.0, 1.0])


def test_grpo_constant_group_exact_zero():
    # the float32 mean of 0.1s may be off by an ulp; the result must still be exactly 0
    r = T([0.1, 0.1, 0.1, 0.7], dtype=torch.float32)
    for ns in (True, False):
        adv = grpo_advantages(r, T([1, 1, 1, 2]), normalize_std=ns)
        assert torch.equal(adv, torch.zeros(4))


def test_grpo_empty_and_int_rewards():
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)
    close(grpo_advantages(T([0, 2]), T([1, 1])), [-1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_rloo_hand_computed():
    adv = rloo_advantages(REWARDS, GROUPS)
    # group 7: 1-(2+3)/2 = -1.5, 2-(1+3)/2 = 0, 3-(1+2)/2 = 1.5; group 2: 0-4 = -4, 4-0 = 4
    close(adv, [-1.5, 0.0, -4.0, 0.0, 0.0, 0.0, 4.0, 1.5])


def test_gae_plain_row():
    # gamma = lam = 0.5, rewards [0, 0, 1], values [0.5, 0.25, 0.5]
    # t2: delta = 1 - 0.5 = 0.5,               A2 = 0.5
    # t1: delta = 0.5*0.5 - 0.25 = 0,           A1 = 0 + 0.25*0.5 = 0.125
    # t0: delta = 0.5*0.25 - 0.5 = -0.375,      A0 = -0.375 + 0.25*0.125 = -0.34375
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.25, 0.5]]), T([[1, 1, 1]]), gamma=0.5, lam=0.5)
    close(adv, [[-0.34375, 0.125, 0.5]])
    close(ret, [[0.15625, 0.375, 1.0]])


def test_gae_skips_masked_tokens_and_ignores_their_values():
    # Same chain as above on model tokens 1, 2, 5; env/prompt tokens carry value 9 (garbage)
    # and the final reward sits on the masked position 6 -> credited to token 5.
    mask = T([[0, 1, 1, 0, 0, 1, 0]])
    values = T([[9.0, 0.5, 0.25, 9.0, 9.0, 0.5, 9.0]])
    rewards = T([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    adv, ret = gae(rewards, values, mask.bool(), gamma=0.5, lam=0.5)
    close(adv, [[0.0, -0.34375, 0.125, 0.0, 0.0, 0.5, 0.0]])
    close(ret, [[0.0, 0.15625, 0.375, 0.0, 0.0, 1.0, 0.0]])


def test_gae_env_reward_credited_to_preceding_model_token_batch():
    # gamma = lam = 1 -> A_t = (sum of rewards from t on) - V_t.
    # row 0: model tokens 1, 2, 4; reward 2 on env token 3 goes to token 2, reward 1 on token 4.
    #   G = [3, 3, 1], V = [1, 2, 3] -> A = [2, 1, -2]
    # row 1: no model tokens, no rewards -> all zero
    rewards = T([[0.0, 0.0, 0.0, 2.0, 1.0], [0.0] * 5])
    values = T([[0.0, 1.0, 2.0, 0.0, 3.0], [5.0] * 5])
    mask = T([[0.0, 1.0, 1.0, 0.0, 1.0], [0.0] * 5])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(adv, [[0.0, 2.0, 1.0, 0.0, -2.0], [0.0] * 5])
    close(ret, [[0.0, 3.0, 3.0, 0.0, 1.0], [0.0] * 5])


def test_gae_reward_before_first_model_token_raises():
    with pytest.raises(ValueError, match="before the first"):
        gae(T([[1.0, 0.0]]), T([[0.0, 0.0]]), T([[0, 1]]), gamma=1.0, lam=1.0)


def test_gae_no_grad_history():
    v = T([[0.5, 0.5]], requires_grad=True)
    adv, ret = gae(T([[0.0, 1.0]]), v, T([[1, 1]]), gamma=1.0, lam=1.0)
    assert not adv.requires_grad and not ret.requires_grad


def test_turn_gae_padding_turn_reward():
    # gamma 0.9, lam 0.5, turns 0, 1 valid, turn 2 padding.
    # row 0: r = [0, 1, 0], V = [0.5, 0.5]
    #   k1: delta = 1 - 0.5 = 0.5, A1 = 0.5; k0: delta = 0.9*0.5 - 0.5 = -0.05, A0 = -0.05 + 0.45*0.5 = 0.175
    # row 1: same, plus 0.25 on the padding turn -> credited to turn 1: r1' = 1.25
    #   A1 = 0.75; A0 = -0.05 + 0.45*0.75 = 0.2875
    r = T([[0.0, 1.0, 0.0], [0.0, 1.0, 0.25]])
    v = T([[0.5, 0.5, 3.0], [0.5, 0.5, 3.0]])
    m = T([[1, 1, 0], [1, 1, 0]])
    adv, ret = turn_gae(r, v, m, gamma=0.9, lam=0.5)
    close(adv, [[0.175, 0.5, 0.0], [0.2875, 0.75, 0.0]])
    close(ret, [[0.675, 1.0, 0.0], [0.7875, 1.25, 0.0]])


# ----------------------------------------------------------------------------- PART 2
def test_bi_level_gae_hand_computed():
    # tokens: 0,1 = turn 0 | 2 = env | 3,4 = turn 1 | 5 = env
    # turn values = value at last token of each turn: V0 = v[1] = 1.0, V1 = v[4] = 0.5
    # turn level (turn_gamma 0.5, lam 0.5), turn rewards [0, 1]:
    #   k1: delta = 1 - 0.5 = 0.5, A1 = 0.5, G1 = 1.0
    #   k0: delta = 0.5*0.5 - 1.0 = -0.75, A0 = -0.75 + 0.25*0.5 = -0.625, G0 = 0.375
    # token level (token_gamma 0.8, lam 0.5), reward G_k on the turn's last token, no bootstrap past it:
    #   t4: 1.0 - 0.5 = 0.5;   t3: delta = 0.8*0.5 - 0.25 = 0.15, A = 0.15 + 0.4*0.5 = 0.35
    #   t1: 0.375 - 1.0 = -0.625;  t0: delta = 0.8*1.0 - 0.5 = 0.3, A = 0.3 + 0.4*(-0.625) = 0.05
    mask = T([[1, 1, 0, 1, 1, 0]])
    values = T([[0.5, 1.0, 7.0, 0.25, 0.5, 7.0]])
    turn_ids = T([[0, 0, -1, 1, 1, -1]])
    adv, ret = bi_level_gae(T([[0.0, 1.0]]), values, mask, turn_ids, turn_gamma=0.5, token_gamma=0.8, lam=0.5)
    close(adv, [[0.05, -0.625, 0.0, 0.35, 0.5, 0.0]])
    close(ret, [[0.55, 0.375, 0.0, 0.6, 1.0, 0.0]])


def test_bi_level_gae_bad_turn_id():
    with pytest.raises(ValueError):
        bi_level_gae(T([[1.0]]), T([[0.0]]), T([[1]]), T([[1]]), turn_gamma=1.0, token_gamma=1.0, lam=1.0)


def test_gigpo_hand_computed():
    # episodes 0, 1 in group 0 (rewards 1, 0); episode 2 alone in group 1.
    # A^E: group 0 mean 0.5, std sqrt(0.5) -> +-0.70711; episode 2 singleton -> 0
    # step returns (gamma 0.5): ep0 r=[0,1] -> R=[0.5, 1]; ep1 r=[0,0] -> R=[0,0]; ep2 R=[1]
    # step groups (group, anchor): (0,10) = {ep0 s0: 0.5, ep1 s0: 0} -> +-0.70711 (std sqrt(0.125))
    #   (0,11), (0,12), (1,10) are singletons -> 0   (ep2 shares key 10 but NOT the group)
    # A = A^E + omega * A^S, omega = 0.5:
    #   ep0 = [0.70711 + 0.35355, 0.70711], ep1 = [-1.06066, -0.70711], ep2 = [0, pad 0]
    s = 1 / math.sqrt(2)
    adv = gigpo_advantages(
        T([1.0, 0.0, 3.0]), T([0, 0, 1]),
        T([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]),
        T([[10, 11], [10, 12], [10, -1]]),
        T([[1, 1], [1, 1], [1, 0]]),
        omega=0.5, gamma=0.5)
    close(adv, [[s + 0.5 * s, s], [-s - 0.5 * s, -s], [0.0, 0.0]])


def test_reinforce_pp_hand_computed():
    # d = r - group mean: group 0 [1,2,3] -> [-1,0,1]; group 1 [0,4] -> [-2,2]
    # batch mean of d = 0, unbiased std = sqrt((1+0+1+4+4)/4) = sqrt(2.5) = 1.5811388
    adv = reinforce_pp_advantages(T([1.0, 2.0, 3.0, 0.0, 4.0]), T([0, 0, 0, 1, 1]))
    k = 1 / math.sqrt(2.5)
    close(adv, [-k, 0.0, k, -2 * k, 2 * k])
    assert torch.equal(reinforce_pp_advantages(T([1.0, 1.0, 2.0]), T([0, 0, 1])), torch.zeros(3))


def test_rebn_hand_computed():
    # gamma 0.5. row 0 rewards [0,0,1] -> G = [0.25, 0.5, 1]; row 1: only turn 0 valid, G = [1]
    # valid G = [0.25, 0.5, 1, 1]: mean 0.6875, deviations [-0.4375, -0.1875, 0.3125, 0.3125]
    # unbiased var = (0.19140625 + 0.03515625 + 2*0.09765625)/3 = 0.140625 -> std 0.375
    adv = rebn_advantages(T([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]), T([[1, 1, 1], [1, 0, 0]]), gamma=0.5)
    close(adv, [[-0.4375 / 0.375, -0.5, 0.3125 / 0.375], [0.3125 / 0.375, 0.0, 0.0]])


# ----------------------------------------------------------------------------- property check
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_gae_equals_plain_gae_on_compressed_model_tokens(data):
    # Reference: delete env tokens, run textbook GAE per row with a Python loop.
    b, t = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 7))
    gamma, lam = data.draw(st.floats(0, 1)), data.draw(st.floats(0, 1))
    mask = T(data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))).view(b, t)
    vals = T(data.draw(st.lists(st.floats(-5, 5), min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    rew = T(data.draw(st.lists(st.floats(-5, 5), min_size=b * t, max_size=b * t)), dtype=torch.float64).view(b, t)
    rew = rew * mask  # rewards only on model tokens
    adv, ret = gae(rew, vals, mask, gamma=gamma, lam=lam)
    for i in range(b):
        idx = mask[i].nonzero().flatten().tolist()
        nxt_v, nxt_a = 0.0, 0.0
        for j in reversed(idx):
            a = float(rew[i, j]) + gamma * nxt_v - float(vals[i, j]) + gamma * lam * nxt_a
            assert float(adv[i, j]) == pytest.approx(a, abs=1e-9)
            assert float(ret[i, j]) == pytest.approx(a + float(vals[i, j]), abs=1e-9)
            nxt_v, nxt_a = float(vals[i, j]), a
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
