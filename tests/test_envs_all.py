"""Every registered env: contract (check_env), solver quality over many seeds, and a reply fuzzer.

Default run: 200 seeds per solver and ~200 fuzzed replies per env. `TURNRL_SLOW=1` adds the
issue's full targets: 1,000 seeds per solver and 10,000 fuzzed replies per env.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turnrl.envs import check_env, list_envs, make
from turnrl.envs.solvers import frozen_lake_values

ALL = list_envs()
# Stochastic envs where no policy wins every episode: checked against their optimal value instead
# (frozen_lake here; gym_frozenlake and gym_blackjack in test_gym_adapter.py).
STOCHASTIC = {"frozen_lake", "gym_frozenlake", "gym_blackjack"}
DETERMINISTIC = [name for name in ALL if name not in STOCHASTIC]


def test_registry_lists_every_env_of_the_issue():
    expected = {"bandit", "bandit_test", "frozen_lake", "frozen_lake_det", "sokoban", "sokoban_8x8",
                "sokoban_alt_vocab", "countdown", "math_qa", "math_qa_jsonl", "sudoku_4x4", "sudoku_9x9",
                "gym_frozenlake", "gym_taxi", "gym_cliffwalking", "gym_blackjack"}
    assert expected <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_check_env(name):
    check_env(make(name))


def _expert_episode(env, seed: int) -> tuple[bool, int]:
    env.reset(seed=seed)
    for steps in range(1, 10_000):
        _, _, term, trunc, info = env.step(env.expert_action())
        if term or trunc:
            return bool(info["success"]), steps
    raise AssertionError(f"seed {seed}: the expert never finished")


def _win_rate(name: str, seeds: range) -> float:
    env = make(name)
    return sum(_expert_episode(env, seed)[0] for seed in seeds) / len(seeds)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_solver_wins_99_percent_of_200_seeds(name):
    assert _win_rate(name, range(200)) >= 0.99


@pytest.mark.slow
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_solver_wins_99_percent_of_1000_seeds(name):
    assert _win_rate(name, range(1000)) >= 0.99


def _slippery_gap(seeds: range) -> tuple[float, float, float]:
    """(empirical success, mean optimal value of the seeds' maps, standard error)."""
    env = make("frozen_lake")
    wins, optimal = 0, 0.0
    for seed in seeds:
        env.reset(seed=seed)
        values, _ = frozen_lake_values(env._rows, env.max_steps, True)
        optimal += values[env.max_steps][env._pos[0] * len(env._rows[0]) + env._pos[1]]
        wins += _expert_episode(env, seed)[0]
    p = optimal / len(seeds)
    return wins / len(seeds), p, math.sqrt(p * (1 - p) / len(seeds))


def test_slippery_frozen_lake_expert_matches_optimal_value():
    rate, optimal, stderr = _slippery_gap(range(300))
    assert abs(rate - optimal) < 4 * stderr, (rate, optimal)


@pytest.mark.slow
def test_slippery_frozen_lake_expert_matches_optimal_value_1000():
    rate, optimal, stderr = _slippery_gap(range(1000))
    assert abs(rate - optimal) < 4 * stderr, (rate, optimal)


# ---------------------------------------------------------------------- fuzzing

NASTY = [
    "", " ", "\n\t", "x" * 100_000, "<answer><answer>Up</answer></answer>", "<answer>", "</answer>",
    "<think>unclosed", "__import__('os').system('ls')", "eval('1')", "1e309", "9**9**9", "(" * 500, "-" * 500,
    "nan", "inf", "-1", "0", "1/0", "\x00\x1b[2J", "\ud800", "\u202e\u200b", "🙂" * 50, "１,２,３", "٣",
    "99,99,99",
    "place 99 at row 99 col 99", "1,1,1", "Up || Down || Left", "Stick", "hit", "None", "{}", "[]", "'", "\\",
]
REPLIES = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(codec="ascii"), max_size=80),
    st.sampled_from(NASTY),
    st.from_regex(r"\s*[0-9]{1,3}\s*[, ]\s*[0-9]{1,3}\s*[, ]\s*[0-9]{1,3}\s*", fullmatch=True),
    st.from_regex(r"[0-9()+\-*/×÷= ]{1,60}", fullmatch=True),
    st.integers(0, 120_000).map(lambda n: "9" * n),
)
_CACHE: dict = {}


def _fuzz(name: str, seed: int, replies: list[str]) -> None:
    if name not in _CACHE:  # one env per name: building gym_taxi's transition table takes 15 ms
        _CACHE[name] = make(name)
    env = _CACHE[name]
    env.reset(seed=seed)
    for reply in replies + [env.expert_action()]:
        out = env.step(reply)
        assert isinstance(out, tuple) and len(out) == 5
        obs, reward, term, trunc, info = out
        assert isinstance(obs, str) and isinstance(reward, float) and math.isfinite(reward)
        assert isinstance(term, bool) and isinstance(trunc, bool)
        assert {"success", "action_valid", "action_effective"} <= set(info)
        assert len(obs) < 20_000, "a reply must not be echoed back in full"
        if term or trunc:
            env.reset(seed=seed)


_FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=200, **_FUZZ)
@given(seed=st.integers(0, 20), replies=st.lists(REPLIES, min_size=1, max_size=3))
def test_step_never_raises(name, seed, replies):
    _fuzz(name, seed, replies)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
@settings(max_examples=10_000, **{**_FUZZ, "derandomize": False})
@given(seed=st.integers(0, 2**32), replies=st.lists(REPLIES, min_size=1, max_size=1))
def test_step_never_raises_10000(name, seed, replies):
    _fuzz(name, seed, replies)
