"""Sudoku: generator (unique, guess-free), parsing, conflict feedback, rewards, solver."""

from __future__ import annotations

import pytest

from turnrl.envs import SudokuEnv, make
from turnrl.envs.solvers import solve, sudoku_solutions, sudoku_solve
from turnrl.envs.sudoku import CLUES, generate_sudoku, solvable_by_singles

# A 4x4 puzzle with a known unique solution, set directly to test feedback texts.
SOLUTION = (1, 2, 3, 4,
            3, 4, 1, 2,
            2, 1, 4, 3,
            4, 3, 2, 1)
PUZZLE = (1, 0, 0, 4,
          0, 4, 1, 0,
          2, 0, 0, 3,
          0, 3, 0, 0)


def _fixed_env(**kwargs) -> SudokuEnv:
    env = SudokuEnv(size=4, **kwargs)
    env.reset(seed=0)
    env._grid, env._solution = list(PUZZLE), SOLUTION
    return env


def _valid_solution(grid, size):
    box = int(size**0.5)
    units = [[r * size + c for c in range(size)] for r in range(size)]
    units += [[r * size + c for r in range(size)] for c in range(size)]
    units += [[(br + i) * size + bc + j for i in range(box) for j in range(box)]
              for br in range(0, size, box) for bc in range(0, size, box)]
    return all(sorted(grid[i] for i in unit) == list(range(1, size + 1)) for unit in units)


def test_render_and_prompt():
    env = _fixed_env()
    assert env.render() == "1 . | . 4\n. 4 | 1 .\n----+----\n2 . | . 3\n. 3 | . ."
    nine, _ = make("sudoku_9x9").reset(seed=1)
    lines = nine.splitlines()
    assert len(lines) == 11 and lines[3] == "------+-------+------" and lines[0][6] == "|"
    assert "'R,C,N'" in make("sudoku_9x9").system_prompt()


@pytest.mark.parametrize("size", [4, 9])
def test_generator_unique_and_guess_free(size):
    for seed in range(30):
        puzzle, solution = generate_sudoku(size, CLUES[size]["easy"], seed)
        assert sum(1 for v in puzzle if v) == CLUES[size]["easy"]
        assert all(p in (0, s) for p, s in zip(puzzle, solution)) and _valid_solution(solution, size)
        assert sudoku_solutions(puzzle, size, limit=2) == [solution]  # unique (backtracking count)
        assert solvable_by_singles(list(puzzle), size)


def test_backtracking_solver():
    assert sudoku_solve(PUZZLE, 4) == SOLUTION
    assert len(sudoku_solutions((0,) * 16, 4, limit=5)) == 5
    assert sudoku_solve((1, 1) + (0,) * 14, 4) is None  # clashing givens
    assert not solvable_by_singles([0] * 16, 4)


def test_action_formats_and_rewards():
    env = _fixed_env()
    obs, reward, term, trunc, info = env.step("place 2 at row 1 col 2")
    assert obs.startswith("Placed 2 at row 1 col 2.\n1 2 | . 4") and reward == 1.0 and info["action_effective"]
    for text in ["1,3,3", " Place 3 AT Row 2 Col 1 ", "(3, 2, 1)", "3 3 4", "place 2 row 2 column 4"]:
        _, reward, _, _, info = env.step(text)
        assert reward == 1.0 and info["action_valid"], text
    assert env.render() == "1 2 | 3 4\n3 4 | 1 2\n----+----\n2 1 | 4 3\n. 3 | . ."


def test_conflict_feedback_names_the_clash():
    env = _fixed_env()
    obs, reward, term, trunc, info = env.step("1,2,4")
    assert reward == pytest.approx(-0.1) and info["action_valid"] and not info["action_effective"]
    assert obs.splitlines()[0] == ("Cannot place 4 at row 1 col 2: row 1 already has 4 (col 4); column 2 already "
                                   "has 4 (row 2); box rows 1-2 cols 1-2 already has 4 (row 2 col 2).")
    assert info["conflicts"] == 3 and env.render() == _fixed_env().render()
    obs, reward, *_ = env.step("2,1,2")
    assert obs.startswith("Cannot place 2 at row 2 col 1: column 1 already has 2 (row 3).")
    obs, reward, *_ = env.step("4,4,2")  # no clash, but the solution has 1 there
    assert obs.startswith("2 at row 4 col 4 breaks no rule yet, but the puzzle has no solution with it.")
    assert reward == pytest.approx(-0.1)


def test_invalid_actions_leave_state_and_budget():
    env = _fixed_env(max_steps=2)
    before = env.render()
    for bad in ["", "1,1,1", "5,1,1", "1,2,9", "0,1,1", "place 1", "1,2", "١,٢,٣", "up", "1,2,3,4"]:
        obs, reward, term, trunc, info = env.step(bad)
        assert not info["action_valid"] and reward == 0.0 and not (term or trunc), bad
        assert obs.endswith("\n" + before)
    assert "row 1 col 1 is already filled (1)" in env.step("1,1,1")[0]
    assert not env.step("1,2,4")[3]  # two valid (wrong) moves use the budget of 2
    assert env.step("1,2,4")[3]


def test_completion_bonus_and_expert():
    env = _fixed_env()
    rewards = []
    while True:
        _, reward, term, trunc, info = env.step(env.expert_action())
        rewards.append(reward)
        if term or trunc:
            break
    assert term and info["success"] and rewards == [1.0] * 8 + [11.0]
    assert tuple(env._grid) == SOLUTION


@pytest.mark.parametrize("name", ["sudoku_4x4", "sudoku_9x9"])
def test_expert_fills_each_empty_cell_once(name):
    env = make(name)  # (test_envs_all checks the win rate over 200 / 1,000 seeds)
    for seed in range(20):
        obs, info = env.reset(seed=seed)
        actions = solve(env)
        assert len(actions) == info["empty_cells"] and env.step("1,1,1")[4]["success"], seed


def test_available_actions_and_arguments():
    env = _fixed_env()
    actions = env.available_actions()
    assert len(actions) == 9 * 4 and actions[:2] == ["1,2,1", "1,2,2"]
    for kwargs in ({"size": 16}, {"difficulty": "evil"}, {"clues": 16}, {"max_steps": 0}):
        with pytest.raises(ValueError):
            SudokuEnv(**kwargs)
    assert sum(1 for v in make("sudoku_9x9", difficulty="medium").reset(seed=0)[0] if v.isdigit()) == 30
