"""Held-out evaluation statistics: the standard error of a success rate over start states."""

import math

import pytest

from turnrl.evaluate import clustered_stderr, summarize


def test_the_standard_error_of_success_counts_each_start_state_once():
    """k samples of one start state are one observation: with states at 1, 1, 0, 0 (k=2 each) the mean of the
    state means is 0.5 and their sample standard deviation 0.577, so the standard error is 0.289, not the 0.189
    that 8 independent episodes would give."""
    assert clustered_stderr([[True, True], [True, True], [False, False], [False, False]]) == pytest.approx(
        math.sqrt(1 / 3) / 2)
    assert clustered_stderr([[True, False], [True, False]]) == 0.0  # every state at 0.5: no spread between states
    assert clustered_stderr([[True, False, True]]) is None


def test_summarize_reports_the_clustered_standard_error():
    from types import SimpleNamespace

    def ep(seed, success):
        return SimpleNamespace(seed=seed, success=success, failed=False, total_reward=float(success), num_turns=1,
                               valid_turns=1)

    trajs = [ep(0, True), ep(0, True), ep(1, True), ep(1, False), ep(2, False), ep(2, False)]
    summary = summarize(trajs, k=2)
    assert summary["success_rate"] == 0.5
    assert summary["success_stderr"] == pytest.approx(clustered_stderr([[1, 1], [1, 0], [0, 0]])) == pytest.approx(
        0.5 / math.sqrt(3))


def test_the_paired_standard_error_of_a_gain_uses_the_same_start_states():
    from turnrl.evaluate import paired_stderr

    before, after = [0.0, 0.5, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0]  # +0.5, +0.5, 0, 0 per state
    assert paired_stderr(after, before) == pytest.approx(math.sqrt(1 / 12) / 2)
    assert paired_stderr([1.0, 0.0], [1.0, 0.0]) == 0.0  # the same outcome on every state: no doubt about a zero gain
    assert paired_stderr([1.0], [0.0]) is None and paired_stderr([1.0, 0.0], [1.0]) is None
