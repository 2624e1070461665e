"""RAGEN variants: Sokoban 8x8 / alternative symbols / coordinate observations, FrozenLake coordinates."""

from __future__ import annotations

import re

import pytest

from turnrl.envs import FrozenLakeEnv, SokobanEnv, check_env, make
from turnrl.envs.sokoban import VOCABS
from turnrl.envs.solvers import solve

LAYOUT = "#######\n#_PX_O#\n#__√__#\n#######"


def _coords(line: str) -> list[tuple[int, int]]:
    return [(int(r), int(c)) for r, c in re.findall(r"\((\d+), (\d+)\)", line)]


def test_sokoban_8x8_two_boxes():
    env = make("sokoban_8x8")  # (test_envs_all checks the solver over 200 / 1,000 seeds)
    for seed in range(20):
        obs, _ = env.reset(seed=seed)
        assert len(obs.splitlines()) == 8 and len(obs.splitlines()[0]) == 8
        assert obs.count("X") + obs.count("√") == 2 and obs.count("P") + obs.count("S") == 1
        assert 1 <= len(solve(env)) <= env.max_steps


def test_sokoban_alt_vocab_is_a_relabelling():
    default, alt = make("sokoban"), make("sokoban_alt_vocab")
    table = str.maketrans("".join(VOCABS["default"]), "".join(VOCABS["alt"]))
    for seed in range(30):
        a, _ = default.reset(seed=seed)
        b, _ = alt.reset(seed=seed)
        assert a.translate(table) == b and set(b) <= set("WGCBA@.\n")
    assert "W wall, . empty floor, G target, B box, C box on target, A you, @ you on a target" in alt.system_prompt()
    alt_layout = LAYOUT.translate(table)
    env = SokobanEnv.from_layout(alt_layout, vocab="alt")
    assert env.render() == alt_layout
    env.step("Right")
    _, reward, term, _, _ = env.step("Right")
    assert term and reward == pytest.approx(10.9) and env.render() == "WWWWWWW\nW...ACW\nW..C..W\nWWWWWWW"
    with pytest.raises(ValueError, match=r"unknown symbol\(s\).*allowed: .@ABCGW"):
        SokobanEnv.from_layout(LAYOUT, vocab="alt")


def test_sokoban_coord_observation():
    env = SokobanEnv.from_layout(LAYOUT, observation_format="coord")
    assert env.render() == (
        "Board size: 4 rows x 7 cols (zero-indexed).\n"
        "Walls: (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 0), (1, 6), (2, 0), (2, 6), "
        "(3, 0), (3, 1), (3, 2), (3, 3), (3, 4), (3, 5), (3, 6)\n"
        "Targets: (1, 5), (2, 3)\n"
        "Boxes: (1, 3)\n"
        "Boxes on target: (2, 3)\n"
        "Player: (1, 2)"
    )
    env.step("Right")
    env.step("Right")  # solved: the player stands at (1, 4), both boxes on targets
    lines = env.render().splitlines()
    assert "Boxes: " not in env.render() and lines[-2:] == ["Boxes on target: (1, 5), (2, 3)", "Player: (1, 4)"]
    on_target = SokobanEnv.from_layout("######\n#S___#\n#_X__#\n#__XO#\n######", observation_format="coord")
    assert on_target.render().splitlines()[-1] == "Player on target: (1, 1)"


@pytest.mark.parametrize("seed", range(10))
def test_sokoban_coords_agree_with_grid(seed):
    grid_env = make("sokoban")
    both = make("sokoban", observation_format="grid_coord")
    grid, _ = grid_env.reset(seed=seed)
    obs, _ = both.reset(seed=seed)
    head, tail = obs.split("\nGrid:\n")
    assert tail == grid and head.startswith("Coordinates:\nBoard size: 6 rows x 6 cols")
    rows = grid.splitlines()
    found = {line.split(":")[0]: _coords(line) for line in head.splitlines()[2:]}

    def where(*symbols):
        return sorted((r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch in symbols)

    assert found["Walls"] == where("#")
    assert found["Targets"] == where("O", "√", "S")
    assert found.get("Boxes", []) == where("X") and found.get("Boxes on target", []) == where("√")
    assert found.get("Player", []) + found.get("Player on target", []) == where("P", "S")


def test_frozen_lake_coord_observation():
    env = FrozenLakeEnv.from_layout("P_O_\n____\n_O__\n___G", slippery=False, observation_format="coord")
    expected = "Board size: 4 rows x 4 cols (zero-indexed).\nPlayer: (0, 0)\nGoal: (3, 3)\nHoles: (0, 2), (2, 1)"
    assert env.render() == expected
    obs, *_ = env.step("Down")
    assert obs.splitlines()[1] == "Player: (1, 0)"
    both = FrozenLakeEnv.from_layout("P_\n_G", slippery=False, observation_format="grid_coord")
    assert both.render() == ("Coordinates:\nBoard size: 2 rows x 2 cols (zero-indexed).\nPlayer: (0, 0)\n"
                             "Goal: (1, 1)\nGrid:\nP_\n_G")
    assert "zero-indexed (row, col)" in both.system_prompt() and "√" in both.system_prompt()


@pytest.mark.parametrize("kwargs", [{"observation_format": "coord"}, {"observation_format": "grid_coord"},
                                    {"vocab": "alt", "observation_format": "grid_coord"}])
def test_sokoban_variants_pass_check_env(kwargs):
    check_env(make("sokoban", **kwargs))


@pytest.mark.parametrize("fmt", ["coord", "grid_coord"])
def test_frozen_lake_variants_pass_check_env(fmt):
    check_env(make("frozen_lake", observation_format=fmt))
    check_env(make("frozen_lake_det", observation_format=fmt))


def test_variant_arguments_are_checked():
    with pytest.raises(ValueError, match="observation_format"):
        make("sokoban", observation_format="image")
    with pytest.raises(ValueError, match="vocab"):
        make("sokoban", vocab="emoji")
    with pytest.raises(ValueError, match="observation_format"):
        make("frozen_lake", observation_format="xy")
