"""turnrl.shaping.shape_rewards: each option on hand-built episodes, their order, and purity."""

import dataclasses

import pytest

from turnrl.config import ConfigError, RewardConfig
from turnrl.shaping import normalized_answer, repetition_fraction, shape_rewards
from turnrl.trajectory import Trajectory


def episode(rewards, replies=None, success=False) -> Trajectory:
    k = len(rewards)
    replies = replies or [f"<answer>a{i}</answer>" for i in range(k)]
    transcript = [("user", "start")]
    for r in replies:
        transcript += [("assistant", r), ("user", "obs")]
    spans = tuple((3 * i + 1, 3 * i + 2) for i in range(k))
    return Trajectory(ids=(0,) * (3 * k + 1), loss_mask=(0,) * (3 * k + 1), logprobs=(0.0,) * (3 * k + 1),
                      turn_spans=spans, turn_rewards=tuple(rewards), terminated=success, truncated=not success,
                      success=success, env_name="toy", seed=0, group_id=0, num_actions=k, valid_turns=k,
                      end_reason="env", transcript=tuple(transcript))


def test_everything_off_returns_the_same_episodes():
    trajs = [episode([0.0, 1.0], success=True), episode([-0.1])]
    out = shape_rewards(trajs, RewardConfig(), iteration=5)
    assert out == trajs and all(a is b for a, b in zip(out, trajs))


def test_turn_decay_scales_the_successful_turn_only():
    won = episode([-0.1, 0.0, 1.0], success=True)       # succeeded in turn t = 2
    lost = episode([-0.1, 0.0, 0.0])
    first = episode([1.0], success=True)                 # succeeded in turn 0: gamma^0 = 1
    out = shape_rewards([won, lost, first], RewardConfig(turn_decay=0.5), iteration=0)
    assert out[0].turn_rewards == (-0.1, 0.0, 0.25)
    assert out[1].turn_rewards == lost.turn_rewards
    assert out[2].turn_rewards == (1.0,)
    assert won.turn_rewards == (-0.1, 0.0, 1.0)  # the input is not modified
    assert dataclasses.replace(out[0], turn_rewards=won.turn_rewards) == won  # nothing else changed


def test_repetition_penalty_counts_distinct_normalised_answers():
    # answers "up", "up" (case and whitespace ignored), "left": E = 2 distinct of T = 3 -> 1 - 2/3
    replies = ["<answer>Up</answer>", "<think>hmm</think><answer> u p</answer>", "<answer>Left</answer>"]
    t = episode([0.0, 0.0, 1.0], replies, success=True)
    assert repetition_fraction(t) == pytest.approx(1 / 3)
    (out,) = shape_rewards([t], RewardConfig(repetition_penalty=0.5), iteration=0)
    assert out.turn_rewards[:2] == (0.0, 0.0)
    assert out.turn_rewards[2] == pytest.approx(1.0 - 0.5 / 3)
    # single reply: nothing to repeat; all distinct: no penalty
    assert repetition_fraction(episode([1.0])) == 0.0
    assert shape_rewards([episode([0.0, 0.0])], RewardConfig(repetition_penalty=0.5), 0)[0].turn_rewards == (0.0, 0.0)
    # a reply without answer tags is compared whole
    assert normalized_answer("No Tags Here") == "notagshere"


def test_dense_until_switches_to_the_success_reward_on_the_last_turn():
    won = episode([-0.1, 0.5, 3.0], success=True)
    lost = episode([-0.1, -0.5])
    cfg = RewardConfig(dense_until=2)
    assert [t.turn_rewards for t in shape_rewards([won, lost], cfg, iteration=1)] == [won.turn_rewards,
                                                                                    lost.turn_rewards]
    sparse = shape_rewards([won, lost], cfg, iteration=2)
    assert sparse[0].turn_rewards == (0.0, 0.0, 1.0)
    assert sparse[1].turn_rewards == (0.0, 0.0)


def test_options_compose_in_the_documented_order():
    # sparse (1.0 on the last turn) -> decay 0.5^2 -> minus 0.4 * (1 - 2/3)
    replies = ["<answer>x</answer>", "<answer>x</answer>", "<answer>y</answer>"]
    t = episode([-0.1, 0.2, 3.0], replies, success=True)
    (out,) = shape_rewards([t], RewardConfig(dense_until=1, turn_decay=0.5, repetition_penalty=0.4), iteration=1)
    assert out.turn_rewards[:2] == (0.0, 0.0)
    assert out.turn_rewards[2] == pytest.approx(0.25 - 0.4 / 3)


def test_repetition_penalty_needs_the_transcript():
    t = dataclasses.replace(episode([0.0, 1.0]), transcript=())
    with pytest.raises(ValueError, match="transcript"):
        shape_rewards([t], RewardConfig(repetition_penalty=0.5), 0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(turn_decay=0.0), "turn_decay"),
    (dict(turn_decay=1.5), "turn_decay"),
    (dict(repetition_penalty=-0.1), "repetition_penalty"),
    (dict(dense_until=-1), "dense_until"),
])
def test_reward_config_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RewardConfig(**kwargs)
