"""Gymnasium both ways: turnrl envs through gymnasium (Text spaces, checker) and gymnasium envs as turnrl envs."""

from __future__ import annotations

import random
import warnings

import pytest

gymnasium = pytest.importorskip("gymnasium")

from gymnasium.utils.env_checker import check_env as gym_check_env  # noqa: E402

import turnrl.envs.gym as turnrl_gym  # noqa: E402
from turnrl.envs import ENVS, check_env, make, register  # noqa: E402
from turnrl.envs.gym import CHARSET, TurnrlGymEnv, from_gymnasium, gym_id, register_gymnasium_envs  # noqa: E402
from turnrl.envs.solvers import solve  # noqa: E402
from turnrl.envs.toy_text import GymnasiumTextEnv  # noqa: E402

GYM_WRAPPERS = ["gym_frozenlake", "gym_taxi", "gym_cliffwalking", "gym_blackjack"]
NATIVE = sorted(name for name in ENVS if name not in GYM_WRAPPERS)


# ---------------------------------------------------------------------- turnrl -> gymnasium


@pytest.mark.parametrize("name", NATIVE)
def test_every_native_env_passes_the_gymnasium_checker(name):
    env_id = gym_id(name)
    assert env_id in gymnasium.registry
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gymnasium.make(env_id)
        gym_check_env(env.unwrapped)
    assert not [str(w.message) for w in caught], name  # the checker warns about any doubtful behaviour


def test_documented_ids_and_semantics_match_turnrl():
    for env_id in ["turnrl/Sokoban-v0", "turnrl/FrozenLake-v0", "turnrl/Bandit-v0", "turnrl/Countdown-v0",
                   "turnrl/MathQA-v0", "turnrl/Sudoku4x4-v0"]:
        assert env_id in gymnasium.registry
    gym_env, native = gymnasium.make("turnrl/Sokoban-v0"), make("sokoban")
    obs, _ = gym_env.reset(seed=11)
    assert obs == native.reset(seed=11)[0]
    for action in ["Up", "left", "nonsense", "Right"]:
        assert gym_env.step(action)[:4] == tuple(native.step(action))[:4]
    big = gymnasium.make("turnrl/Sokoban-v0", dim=8, num_boxes=2, observation_format="grid_coord")
    obs, _ = big.reset(seed=0)
    assert obs == make("sokoban_8x8", observation_format="grid_coord").reset(seed=0)[0] and len(obs) < 1000


def test_charset_covers_every_builtin_symbol():
    assert {"√", "\n", "|", "#", "@", "."} <= set(CHARSET)
    for name in NATIVE:
        env = make(name)
        rng = random.Random(0)
        for seed in range(5):
            obs, _ = env.reset(seed=seed)
            texts = [obs, env.system_prompt()]
            for _ in range(30):
                vocab = env.available_actions()
                action = rng.choice(vocab) if vocab and rng.random() < 0.5 else env.expert_action()
                obs, _, term, trunc, _ = env.step(action)
                texts.append(obs)
                if term or trunc:
                    break
            outside = {ch for text in texts for ch in text if ch not in CHARSET}
            assert not outside, (name, outside)


def test_observations_are_sanitised_and_cut():
    env = TurnrlGymEnv("countdown", max_obs_length=60)
    obs, _ = env.reset(seed=0)
    obs, reward, term, trunc, info = env.step("🙂 + ü")
    assert not info["action_valid"] and obs in env.observation_space and "?" in obs
    assert len(obs) == 60 and "🙂" not in obs


def test_render_modes_and_arguments():
    env = gymnasium.make("turnrl/FrozenLakeDet-v0", render_mode="ansi")
    obs, _ = env.reset(seed=3)
    assert env.render() == obs
    plain = gymnasium.make("turnrl/FrozenLakeDet-v0")
    plain.reset(seed=3)
    assert plain.render() is None
    with pytest.raises(ValueError, match="render_mode"):
        TurnrlGymEnv("sokoban", render_mode="rgb_array")
    wrapped = TurnrlGymEnv(make("bandit"))
    assert "bandit" in wrapped.system_prompt()
    with pytest.raises(ValueError, match="env_kwargs"):
        TurnrlGymEnv(make("bandit"), split="test")


def test_register_gymnasium_envs_exposes_user_envs():
    from turnrl.envs import BanditEnv

    register("my_tiny_env", BanditEnv, pairs=[("Calm", "Wild")], hi_prob=1.0)
    try:
        assert register_gymnasium_envs() == ["turnrl/MyTinyEnv-v0"]
        assert register_gymnasium_envs() == []  # idempotent
        env = gymnasium.make("turnrl/MyTinyEnv-v0")
        env.reset(seed=0)
        assert env.step("wild")[1] == 1.0
    finally:
        ENVS.pop("my_tiny_env", None)
        gymnasium.registry.pop("turnrl/MyTinyEnv-v0", None)
    assert turnrl_gym.gym_id("sokoban_8x8") == "turnrl/Sokoban8x8-v0"


# ---------------------------------------------------------------------- gymnasium -> turnrl


@pytest.mark.parametrize("name", GYM_WRAPPERS)
def test_gym_wrappers_reject_unknown_actions(name):
    env = make(name)  # (test_envs_all runs check_env on every registered env)
    assert isinstance(env, GymnasiumTextEnv)
    obs, _ = env.reset(seed=0)
    bad = env.step("Jump")
    assert bad.obs.startswith("Invalid action 'Jump'. Valid actions: ") and not bad.info["action_valid"]
    assert bad.obs.endswith(obs)


def test_gym_observations():
    lake, _ = make("gym_frozenlake").reset(seed=0)
    assert lake == "PFFF\nFHFH\nFFFH\nHFFG"
    taxi, _ = make("gym_taxi").reset(seed=0)
    lines = taxi.splitlines()
    assert lines[0] == "+---------+" and lines[6] == "+---------+" and "\x1b" not in taxi
    assert lines[7].startswith("Taxi at row ") and "Destination: " in lines[7]
    cliff, _ = make("gym_cliffwalking").reset(seed=0)
    assert cliff.splitlines()[-1] == "x  C  C  C  C  C  C  C  C  C  C  T"
    env = make("gym_blackjack")
    hand, _ = env.reset(seed=0)
    assert hand.startswith("Your cards: ") and "Dealer shows: " in hand
    obs, reward, term, _, _ = env.step("Stick")
    assert term and "Dealer's cards: " in obs.splitlines()[-1]


def test_deterministic_gym_experts_take_the_shortest_route():
    cliff = make("gym_cliffwalking")
    cliff.reset(seed=0)
    assert solve(cliff) == ["Up"] + ["Right"] * 11 + ["Down"]  # along the cliff edge: return -13
    taxi = make("gym_taxi")
    for seed in range(20):
        taxi.reset(seed=seed)
        actions = solve(taxi)
        assert actions.count("Pickup") == 1 and actions[-1] == "Dropoff" and len(actions) <= 20


def test_slippery_frozenlake_expert_matches_its_optimal_value():
    env = make("gym_frozenlake")
    env.reset(seed=0)
    env.expert_action()  # builds the value table
    optimal = env._q[env.max_steps, 0].max()
    assert 0.6 < optimal < 0.8
    n = 400
    wins = 0
    for seed in range(n):
        env.reset(seed=seed)
        while True:
            _, _, term, trunc, info = env.step(env.expert_action())
            if term or trunc:
                break
        wins += info["success"]
    stderr = (optimal * (1 - optimal) / n) ** 0.5
    assert abs(wins / n - optimal) < 4 * stderr, (wins / n, optimal)


def test_blackjack_basic_strategy_beats_simple_policies():
    env = make("gym_blackjack")

    def play(policy, n=2000):
        total = wins = 0.0
        for seed in range(n):
            env.reset(seed=seed)
            while True:
                _, reward, term, trunc, info = env.step(policy())
                if term or trunc:
                    break
            total, wins = total + reward, wins + info["success"]
        return total / n, wins / n

    expert_return, expert_wins = play(env.expert_action)
    stick_return, _ = play(lambda: "Stick")
    rng = random.Random(0)
    random_return, _ = play(lambda: rng.choice(["Stick", "Hit"]))
    assert expert_wins > 0.40 and expert_return > stick_return + 0.05 and expert_return > random_return + 0.05


def test_from_gymnasium_with_an_instance_and_custom_names():
    raw = gymnasium.make("FrozenLake-v1", render_mode="ansi", is_slippery=False)
    env = from_gymnasium(raw, {"W": 0, "S": 1, "E": 2, "N": 3}, max_steps=20)
    obs, _ = env.reset(seed=0)
    assert "\x1b" not in obs and obs.splitlines()[0] == "SFFF" and env.available_actions() == ["W", "S", "E", "N"]
    while True:
        _, reward, term, trunc, info = env.step(env.expert_action().lower())
        if term or trunc:
            break
    assert term and reward == 1.0 and info["success"]
    check_env(env)
    assert "FrozenLake-v1" in env.system_prompt()


def test_from_gymnasium_errors():
    with pytest.raises(ValueError, match="outside"):
        from_gymnasium("FrozenLake-v1", {"Left": 0, "Fly": 7})
    with pytest.raises(ValueError, match="distinct"):
        from_gymnasium("FrozenLake-v1", {"Left": 0, "left": 1})
    with pytest.raises(ValueError, match="Discrete"):
        from_gymnasium("Pendulum-v1", {"Push": 0}, render_mode=None)
    blackjack = from_gymnasium("Blackjack-v1", {"Stick": 0, "Hit": 1}, render_mode=None,
                               describe=lambda e: f"sum {sum(e.player)}")
    blackjack.reset(seed=0)
    with pytest.raises(ValueError, match="no transition table"):
        blackjack.expert_action()


def test_gymnasium_is_imported_only_when_needed():
    import subprocess
    import sys

    code = ("import sys, turnrl.envs as e; assert 'gymnasium' not in sys.modules; "
            "e.make('sokoban'); assert 'gymnasium' not in sys.modules; e.make('gym_taxi'); "
            "assert 'gymnasium' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
