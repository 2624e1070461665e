"""Hand-computed tests for turnrl.algos.filters."""

import math

import pytest
import torch

from turnrl.algos.filters import dynamic_sampling_keep, filter_by_reward_std, group_reward_stats

T = torch.tensor

# group : rewards -> unbiased std
#   3   : [0, 2]  -> sqrt(2)        (listed first, ties with group 1)
#   0   : [1, 1]  -> 0
#   1   : [2, 0]  -> sqrt(2)
#   2   : [0, 1]  -> sqrt(0.5)
#   5   : [3]     -> 0 (singleton)
# ranking by std desc, ties by smaller id: 1, 3, 2, 0, 5
REWARDS = T([0.0, 1.0, 2.0, 0.0, 2.0, 1.0, 0.0, 1.0, 3.0])
GROUPS = T([3, 0, 1, 2, 3, 0, 1, 2, 5])


@pytest.mark.parametrize(
    "keep, drop, expected",
    [
        (0.2, False, [1]),             # round(1.0) = 1 -> tie between 1 and 3 goes to 1
        (0.4, False, [1, 3]),          # round(2.0) = 2
        (0.5, False, [1, 3]),          # round(2.5) = 2 (half to even)
        (0.6, False, [1, 2, 3]),       # round(3.0) = 3
        (0.8, False, [0, 1, 2, 3]),    # 4: zero-std tie 0 vs 5 -> 0
        (0.9, False, [0, 1, 2, 3]),    # round(4.5) = 4
        (1.0, False, [0, 1, 2, 3, 5]),
        (0.0, False, [1]),             # max(1, 0) = 1
        (1.0, True, [1, 2, 3]),        # zero-std groups 0 and 5 dropped after ranking
        (0.8, True, [1, 2, 3]),
        (0.4, True, [1, 3]),
    ],
)
def test_filter_by_reward_std(keep, drop, expected):
    kept = filter_by_reward_std(REWARDS, GROUPS, keep, drop_zero_std=drop)
    assert kept.dtype == torch.long
    assert kept.tolist() == expected


def test_filter_all_zero_std_can_return_empty():
    kept = filter_by_reward_std(T([1.0, 1.0, 0.3, 0.3, 0.3]), T([4, 4, 6, 6, 6]), 1.0, drop_zero_std=True)
    assert kept.tolist() == [] and kept.dtype == torch.long


def test_filter_constant_float_group_is_zero_std():
    # three 0.1s have a float mean that may differ from 0.1 by an ulp; still std == 0 -> dropped
    kept = filter_by_reward_std(T([0.1, 0.1, 0.1, 0.0, 1.0]), T([0, 0, 0, 1, 1]), 1.0, drop_zero_std=True)
    assert kept.tolist() == [1]


def test_filter_bad_keep():
    with pytest.raises(ValueError):
        filter_by_reward_std(REWARDS, GROUPS, 1.5)


def test_group_reward_stats():
    # stds [0, sqrt2, sqrt0.5, sqrt2, 0] -> mean = (2*1.4142136 + 0.7071068)/5 = 0.7071068
    stats = group_reward_stats(REWARDS, GROUPS)
    assert stats["reward_std_mean"] == pytest.approx(0.7071068, abs=1e-6)
    assert stats["reward_std_max"] == pytest.approx(math.sqrt(2), abs=1e-6)
    assert stats["zero_std_frac"] == pytest.approx(0.4)
    assert stats["num_groups"] == 5.0
    assert all(isinstance(v, float) for v in stats.values())


def test_dynamic_sampling_keep():
    # non-zero variance groups: 1, 2, 3 (0 is constant, 5 a singleton)
    assert dynamic_sampling_keep(REWARDS, GROUPS).tolist() == [1, 2, 3]
