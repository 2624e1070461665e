"""Multi-turn QA metrics, each against a hand-computed value."""

from __future__ import annotations

import itertools
import math

import pytest

from turnrl.qa_metrics import (
    first_success,
    mean_pass_at_k,
    mean_turns_to_success,
    mean_unique_answer_ratio,
    pass_at_k,
    succ_at_k,
    unique_answer_ratio,
)

EPISODES = [[True], [False, True], [False, False, False], [False, False, True]]


def test_first_success():
    assert [first_success(e) for e in EPISODES] == [0, 1, None, 2]
    assert first_success([]) is None


def test_succ_at_k_hand_computed():
    assert succ_at_k(EPISODES, 1) == 0.25
    assert succ_at_k(EPISODES, 2) == 0.5
    assert succ_at_k(EPISODES, 3) == 0.75
    assert succ_at_k(EPISODES, 5) == 0.75  # k beyond the episode length
    with pytest.raises(ValueError):
        succ_at_k(EPISODES, 0)
    with pytest.raises(ValueError):
        succ_at_k([], 1)


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)  # pass@1 = c / n
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))  # = 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert mean_pass_at_k([(5, 2), (10, 1)], 1) == pytest.approx((0.4 + 0.1) / 2)
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_pass_at_k_is_the_subset_probability():
    # Brute force over all k-subsets of a fixed sample set: the estimator is exact, not approximate.
    samples = [True, False, False, True, False, False]
    for k in range(1, 7):
        subsets = list(itertools.combinations(samples, k))
        assert pass_at_k(6, 2, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_mean_turns_to_success():
    assert mean_turns_to_success(EPISODES) == pytest.approx((1 + 2 + 3) / 3)
    assert math.isnan(mean_turns_to_success([[False], [False, False]]))


def test_unique_answer_ratio():
    assert unique_answer_ratio(["4", "4.0", "5"]) == pytest.approx(2 / 3)  # env normalisation: 4 == 4.0
    assert unique_answer_ratio(["4", "4.0", "5"], normalize=str) == 1.0
    assert unique_answer_ratio(["a"] * 5) == pytest.approx(0.2)
    assert unique_answer_ratio([]) == 1.0
    assert mean_unique_answer_ratio([["1", "1"], ["1", "2"]]) == pytest.approx(0.75)


def _episode(replies: list[str], success: bool, seed: int = 0):
    from turnrl.trajectory import Trajectory

    transcript = [("user", "question")]
    for r in replies:
        transcript += [("assistant", r), ("user", "Incorrect. Please think again.")]
    spans = tuple((i, i + 1) for i in range(len(replies)))
    return Trajectory(ids=(), loss_mask=(), logprobs=(), turn_spans=spans, turn_rewards=(0.0,) * len(replies),
                      terminated=success, truncated=not success, success=success, env_name="math_qa", seed=seed,
                      group_id=seed, num_actions=len(replies), valid_turns=len(replies), end_reason="env",
                      transcript=tuple(transcript))


def test_qa_summary_reads_attempts_from_the_transcripts():
    from turnrl.evaluate import qa_summary

    trajs = [
        _episode(["<answer>4</answer>"], True),                                        # right at once
        _episode(["<answer>3</answer>", "<answer>3.0</answer>", "<answer>4</answer>"], True),  # third try
        _episode(["<answer>7</answer>", "no tags", "<answer>7</answer>"], False),       # gave up repeating
    ]
    qa = qa_summary(trajs, think=False, max_turns=3)
    assert qa["succ@1"] == pytest.approx(1 / 3)
    assert qa["succ@2"] == pytest.approx(1 / 3)
    assert qa["succ@3"] == pytest.approx(2 / 3)
    assert qa["mean_turns_to_success"] == pytest.approx((1 + 3) / 2)
    # per episode: 1/1, 2/3 ("3" and "3.0" are one answer), 1/2 (the untagged reply is no answer)
    assert qa["unique_answer_ratio"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    nothing = qa_summary([_episode(["<answer>1</answer>"], False)], think=False, max_turns=2)
    assert nothing["mean_turns_to_success"] is None and nothing["succ@2"] == 0.0


def test_evaluate_reports_qa_metrics_only_for_multi_attempt_envs():
    from turnrl.config import EnvConfig, EvalConfig, RolloutConfig, TrainConfig
    from turnrl.evaluate import evaluate
    from turnrl.models import load_policy

    policy = load_policy("tiny")
    rollout = RolloutConfig(max_turns=3, max_new_tokens=6, think=False, max_context_tokens=1024)
    cfg = TrainConfig(env=EnvConfig(name="math_qa", system_prompt=False), rollout=rollout,
                      eval=EvalConfig(episodes=4, k=2, greedy=False))
    result, trajs = evaluate(policy, cfg)
    qa = result.to_dict()["qa"]
    assert [k for k in qa if k.startswith("succ@")] == ["succ@1", "succ@2", "succ@3"]
    assert qa["succ@3"] == pytest.approx(result.success_rate)  # every episode ends within the 3-turn budget
    assert 0.0 <= qa["unique_answer_ratio"] <= 1.0
    cfg_grid = TrainConfig(env=EnvConfig(name="frozen_lake", system_prompt=False), rollout=rollout,
                           eval=EvalConfig(episodes=2, k=1, greedy=False))
    assert "qa" not in evaluate(policy, cfg_grid)[0].to_dict()
