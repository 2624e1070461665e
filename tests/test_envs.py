"""Tests for turnrl.envs: contract, solvers, determinism, rewards, registry, robustness."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import turnrl.envs  # noqa: F401
except ModuleNotFoundError:  # running `pytest` without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from turnrl.envs import (
    ENVS,
    Env,
    StepResult,
    UnknownEnvError,
    check_env,
    env_summary,
    list_envs,
    make,
    register,
)
from turnrl.envs.bandit import FORMAT_PAIRS, TEST_PAIRS, TRAIN_PAIRS, BanditEnv
from turnrl.envs.frozen_lake import FrozenLakeEnv
from turnrl.envs.sokoban import SokobanEnv
from turnrl.envs.solvers import solve

BUILTINS = ["bandit", "bandit_test", "bandit_format", "frozen_lake", "frozen_lake_det", "sokoban"]


class MyTinyEnv(Env):
    """Guess the secret word in one try."""

    name = "tiny"
    action_names = ("Yes", "No")

    def __init__(self, answer: str = "Yes") -> None:
        self.answer, self.done = answer, False

    def reset(self, *, seed=None, options=None):
        self.done = False
        return self.render(), {}

    def step(self, action):
        if self.done:
            return self._after_done_step(True, False, False)
        choice = self._match_action(action)
        if choice is None:
            return self._invalid_step(action)
        self.done = True
        won = choice == self.answer
        return StepResult(self.render(), float(won), True, False,
                          {"success": won, "action_valid": True, "action_effective": True})

    def render(self):
        return "done" if self.done else "Yes or No?"

    def system_prompt(self):
        return "Say Yes or No in <answer>...</answer>."

    def expert_action(self):
        return self.answer


def _play(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    return [obs] + [tuple(env.step(a))[:4] for a in actions]


# ---------------------------------------------------------------------- contract


def test_builtins_registered():
    assert set(BUILTINS) <= set(list_envs())
    assert list_envs() == sorted(ENVS)
    for name in BUILTINS:
        assert env_summary(name) and "\n" not in env_summary(name)


@pytest.mark.parametrize("name", BUILTINS)
def test_check_env(name):
    check_env(make(name))


def test_check_env_on_custom_env():
    check_env(MyTinyEnv())


def test_check_env_catches_missing_info_key():
    class Broken(MyTinyEnv):
        def step(self, action):
            obs, r, te, tr, info = super().step(action)
            info.pop("action_effective")
            return obs, r, te, tr, info

    with pytest.raises(AssertionError, match="action_effective"):
        check_env(Broken())


def test_invalid_action_message_and_budget():
    env = make("frozen_lake_det", max_steps=2)
    start, _ = env.reset(seed=4)
    for bad in ["xyz", "\x00" * 100, "<answer>Up</answer>"]:
        obs, reward, term, trunc, info = env.step(bad)
        first, rest = obs.split("\n", 1)
        assert first.startswith("Invalid action '") and "Valid actions: Left, Down, Right, Up." in first
        assert rest == start and reward == 0.0 and not (term or trunc)
        assert info == {"success": False, "action_valid": False, "action_effective": False}
    assert "\\x00" in env.step("\x00")[0].split("\n")[0]
    assert "x" * 31 not in env.step("x" * 500)[0]
    # Invalid actions did not use the budget: two valid moves are still allowed.
    assert not env.step("Left")[3]
    assert env.step("Left")[3] or env.step("Left")[2]


# ---------------------------------------------------------------------- solvers


def test_sokoban_expert_solves_100_seeds():
    env = make("sokoban")
    for seed in range(100):
        env.reset(seed=seed)
        actions = solve(env)
        assert 1 <= len(actions) <= env.max_steps
        assert env.step("Up")[4]["success"] is True, f"seed {seed} not solved"


def test_sokoban_bigger_room_expert():
    env = make("sokoban", dim=8, num_boxes=2)
    for seed in range(5):
        env.reset(seed=seed)
        assert env.render().count("X") + env.render().count("√") == 2
        solve(env)
        assert env.step("Up")[4]["success"] is True


@pytest.mark.parametrize("dim, num_boxes, max_len", [(6, 1, 10), (6, 1, 100), (8, 2, 30)])
def test_sokoban_generated_solution_is_the_solvers(dim, num_boxes, max_len):
    """generate_room reads its solution off the reverse search instead of searching again: it is exactly the
    shortest solution sokoban_solve finds, for every room."""
    from turnrl.envs.sokoban import generate_room
    from turnrl.envs.solvers import sokoban_solve
    for seed in range(150 if dim == 6 else 40):
        walls, targets, boxes, player, solution = generate_room(dim, num_boxes, max_len, random.Random(seed))
        assert 1 <= len(solution) <= max_len
        assert solution == sokoban_solve(walls, dim, player, boxes, targets), seed


def test_frozen_lake_det_expert_reaches_goal():
    env = make("frozen_lake_det")
    for seed in range(100):
        env.reset(seed=seed)
        solve(env)
        assert "√" in env.render(), f"seed {seed}"


def _success_rate(env, policy, seeds):
    wins = 0
    for seed in seeds:
        env.reset(seed=seed)
        rng = random.Random(10_000 + seed)
        while True:
            action = env.expert_action() if policy == "expert" else rng.choice(env.action_names)
            _, _, term, trunc, info = env.step(action)
            if term or trunc:
                break
        wins += info["success"]
    return wins / len(seeds)


def test_slippery_expert_beats_random():
    env = make("frozen_lake")
    expert = _success_rate(env, "expert", range(300))
    rand = _success_rate(env, "random", range(300))
    assert expert > rand + 0.15, (expert, rand)


def test_bandit_expert_and_payouts():
    env = make("bandit")
    rewards = []
    for seed in range(2000):
        env.reset(seed=seed)
        hi = env.expert_action()
        assert hi in {h for _, h in TRAIN_PAIRS}
        _, reward, term, _, info = env.step(hi)
        assert term and info["success"] and info["arm"] == hi
        rewards.append(reward)
    assert abs(sum(rewards) / len(rewards) - 0.25) < 0.05
    for seed in range(50):
        env.reset(seed=seed)
        lo = next(a for a in env.available_actions() if a != env.expert_action())
        obs, reward, _, _, info = env.step(lo.upper())
        assert reward == 0.15 and not info["success"] and obs == f"{lo}: 0.15 points"


# ---------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", ["frozen_lake", "frozen_lake_det", "sokoban", "bandit"])
def test_same_seed_same_episode(name):
    env = make(name)
    env.reset(seed=7)
    actions = (env.available_actions() * 5)[:12]
    assert _play(env, 7, actions) == _play(make(name), 7, actions)


@pytest.mark.parametrize("name", ["frozen_lake", "sokoban"])
def test_seeds_give_distinct_maps(name):
    env = make(name)
    maps = {env.reset(seed=seed)[0] for seed in range(100)}
    assert len(maps) >= 90


def test_reset_without_seed_continues_seeded_stream():
    a, b = make("sokoban"), make("sokoban")
    a.reset(seed=3)
    b.reset(seed=3)
    assert a.reset()[0] == b.reset()[0]


def test_bandit_splits_and_order():
    train = {n for pair in TRAIN_PAIRS for n in pair}
    test = {n for pair in TEST_PAIRS for n in pair}
    assert len(TRAIN_PAIRS) >= 6 and len(TEST_PAIRS) >= 4 and not train & test
    env, env_test = make("bandit"), make("bandit_test")
    firsts = set()
    for seed in range(100):
        env.reset(seed=seed)
        env_test.reset(seed=seed)
        assert set(env.available_actions()) <= train and set(env_test.available_actions()) <= test
        firsts.add(env.available_actions()[0] == env.expert_action())
    assert firsts == {True, False}
    # the format split (warm starts) shares no name with either split, in any case, and has many pairs
    fmt = {n.lower() for pair in FORMAT_PAIRS for n in pair}
    assert len(FORMAT_PAIRS) >= 40 and len(fmt) == 2 * len(FORMAT_PAIRS)
    assert not fmt & {n.lower() for n in train | test}
    env_fmt = make("bandit_format")
    assert {tuple(sorted(env_fmt.reset(seed=s)[1]["arms"])) for s in range(200)} >= {tuple(sorted(FORMAT_PAIRS[0]))}
    custom = BanditEnv(pairs=[("Calm", "Wild")])
    obs, _ = custom.reset(seed=0)
    assert "Calm" in obs and "Wild" in obs and custom.expert_action() == "Wild"


# ---------------------------------------------------------------------- sokoban rewards

def test_sokoban_layout_rewards():
    layout = "#######\n#_PX_O#\n#__√__#\n#######"
    env = SokobanEnv.from_layout(layout)
    assert env.render() == layout
    obs, reward, term, trunc, info = env.step("Up")  # wall bump
    assert reward == pytest.approx(-0.1) and not info["action_effective"] and info["action_valid"]
    assert obs == layout and not (term or trunc)
    env.step("Right")  # box to column 4
    obs, reward, term, _, info = env.step("Right")  # box onto the last target
    assert reward == pytest.approx(10.9) and term and info["success"]


def test_sokoban_push_off_target():
    env = SokobanEnv.from_layout("######\n#P√__#\n#__XO#\n######")
    obs, reward, term, _, info = env.step("right")
    assert reward == pytest.approx(-1.1) and not term and info["action_effective"]
    assert obs == "######\n#_SX_#\n#__XO#\n######"
    _, reward, term, _, _ = env.step("  LEFT ")  # walk back: plain step, nothing pushed
    assert reward == pytest.approx(-0.1) and not term


def test_sokoban_truncates_after_max_steps():
    env = SokobanEnv.from_layout("######\n#PX_O#\n######", max_steps=3)
    results = [env.step(a) for a in ["Left", "Up", "nope", "Left"]]
    assert [r[3] for r in results] == [False, False, False, True]
    assert env.expert_action() in SokobanEnv.action_names


# ---------------------------------------------------------------------- frozen lake


def test_frozen_lake_render_and_slip_statistics():
    layout = "____\n_P__\n____\n___G"
    env = FrozenLakeEnv.from_layout(layout, slippery=True)
    assert env.render() == layout
    counts = {"Right": 0, "Up": 0, "Down": 0, "Left": 0}
    for seed in range(3000):
        env.reset(seed=seed)
        obs, _, _, _, info = env.step("Right")
        counts[info["moved"]] += 1
        if info["moved"] == "Right":
            assert obs == "____\n__P_\n____\n___G"
    assert abs(counts["Right"] / 3000 - 1 / 3) < 0.04
    assert counts["Left"] == 0 and min(counts["Up"], counts["Down"]) > 800


def test_frozen_lake_hole_goal_and_border():
    env = FrozenLakeEnv.from_layout("PO\nG_", slippery=False)
    _, reward, _, _, info = env.step("Up")
    assert reward == 0.0 and info["action_valid"] and not info["action_effective"]
    obs, reward, term, _, info = env.step("Down")
    assert obs == "_O\n√_" and reward == 1.0 and term and info["success"]
    env.reset()
    obs, reward, term, _, info = env.step("Right")
    assert obs == "_X\nG_" and reward == 0.0 and term and not info["success"]


# ---------------------------------------------------------------------- registry


def test_registry_typo_suggestion():
    with pytest.raises(UnknownEnvError, match="did you mean 'sokoban'") as err:
        make("sokobn")
    assert isinstance(err.value, ValueError) and "(known: bandit, bandit_format, bandit_test" in str(err.value)
    with pytest.raises(UnknownEnvError) as err:
        make("qqqqqqqq")
    assert "did you mean" not in str(err.value)


def test_registry_import_path_and_kwargs():
    env = make(f"{__name__}:MyTinyEnv", answer="No")
    assert isinstance(env, MyTinyEnv) and env.answer == "No"
    with pytest.raises(UnknownEnvError, match="cannot import"):
        make("no_such_pkg_xyz.mod:Env")
    with pytest.raises(UnknownEnvError, match="no attribute"):
        make(f"{__name__}:Missing")
    with pytest.raises(ValueError, match="accepted: size, p, slippery, max_steps") as err:
        make("frozen_lake", foo=1)
    assert "'foo'" in str(err.value)
    assert make("frozen_lake", slippery=False).slippery is False  # kwargs override defaults


def test_register_rules():
    register("tiny_test_env", MyTinyEnv, answer="No")
    try:
        assert make("tiny_test_env").answer == "No"
        assert env_summary("tiny_test_env") == "Guess the secret word in one try."
        with pytest.raises(ValueError, match="already registered"):
            register("tiny_test_env", MyTinyEnv)
        register("tiny_test_env", MyTinyEnv, overwrite=True)
        assert make("tiny_test_env").answer == "Yes"
    finally:
        ENVS.pop("tiny_test_env", None)


# ---------------------------------------------------------------------- robustness

_ENVS = {name: make(name) for name in BUILTINS}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(BUILTINS), text=st.text(), seed=st.integers(0, 2**32))
def test_step_never_raises(name, text, seed):
    env = _ENVS[name]
    env.reset(seed=seed)
    for _ in range(2):  # once mid-episode, once possibly after a valid action ended it
        out = env.step(text)
        assert isinstance(out, tuple) and len(out) == 5
        obs, reward, term, trunc, info = out
        assert isinstance(obs, str) and isinstance(reward, float)
        assert {"success", "action_valid", "action_effective"} <= set(info)
        env.step(env.expert_action())
