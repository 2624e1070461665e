"""Sudoku (RAGEN v2's SimpleSudoku) with our own generator of unique, guess-free puzzles."""

from __future__ import annotations

import functools
import random
import re

from .base import Env, StepResult, quote_action

CLUES = {  # givens kept per difficulty, RAGEN's table
    4: {"easy": 10, "medium": 9, "hard": 6},
    9: {"easy": 36, "medium": 30, "hard": 24},
}
DEFAULT_MAX_STEPS = {4: 30, 9: 100}
CORRECT_REWARD, MISTAKE_PENALTY, SOLVED_REWARD = 1.0, -0.1, 10.0

_PLACE = re.compile(r"place\s+([0-9]{1,2})\s+(?:at\s+)?row\s+([0-9]{1,2})\s*,?\s*col(?:umn)?\s+([0-9]{1,2})")
_TRIPLE = re.compile(r"\(?\s*([0-9]{1,2})\s*(?:,\s*|\s+)([0-9]{1,2})\s*(?:,\s*|\s+)([0-9]{1,2})\s*\)?")


def _full_board(size: int, rng: random.Random) -> list[int]:
    """A random solved grid: the canonical pattern with shuffled bands, stacks, rows, columns, digits."""
    box = int(round(size**0.5))

    def order() -> list[int]:
        groups = rng.sample(range(box), box)
        return [g * box + i for g in groups for i in rng.sample(range(box), box)]

    rows, cols, digits = order(), order(), rng.sample(range(1, size + 1), size)
    pattern = lambda r, c: (box * (r % box) + r // box + c) % size  # noqa: E731
    return [digits[pattern(r, c)] for r in rows for c in cols]


def solvable_by_singles(grid: list[int], size: int) -> bool:
    """Whether naked and hidden singles alone fill the grid (then its solution is unique)."""
    box = int(round(size**0.5))
    full = (1 << size) - 1
    units = [0] * (3 * size)  # bitmask of digits used in each row, column, box

    def unit_ids(cell: int) -> tuple[int, int, int]:
        r, c = divmod(cell, size)
        return r, size + c, 2 * size + (r // box) * box + c // box

    def place(cell: int, bit: int) -> None:
        for u in unit_ids(cell):
            units[u] |= bit

    for cell, value in enumerate(grid):
        if value:
            place(cell, 1 << (value - 1))
    empty = [cell for cell, value in enumerate(grid) if not value]
    while empty:
        candidates = {}
        for cell in empty:
            a, b, c = unit_ids(cell)
            candidates[cell] = full & ~(units[a] | units[b] | units[c])
            if candidates[cell] == 0:
                return False
        forced = {cell: mask for cell, mask in candidates.items() if mask & (mask - 1) == 0}
        if not forced:  # hidden singles: a digit with one possible cell in some unit
            seen: dict[tuple[int, int], list[int]] = {}
            for cell, mask in candidates.items():
                for u in unit_ids(cell):
                    bit = mask
                    while bit:
                        low = bit & -bit
                        seen.setdefault((u, low), []).append(cell)
                        bit ^= low
            forced = {cells[0]: low for (_, low), cells in seen.items() if len(cells) == 1}
            if not forced:
                return False
        for cell, bit in forced.items():
            place(cell, bit)
        empty = [cell for cell in empty if cell not in forced]
    return True


@functools.lru_cache(maxsize=4096)
def generate_sudoku(size: int, clues: int, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(puzzle, solution) as flat tuples (0 = empty); cached because groups reset to the same seed.

    Cells are emptied in random order as long as the puzzle stays solvable by naked and hidden
    singles, which guarantees a unique solution reachable without guessing ("easy"). We stop
    at `clues` givens or when no further cell can be emptied, so a puzzle may keep a few more
    givens than asked for (never for the easy settings).
    """
    rng = random.Random(seed)
    solution = _full_board(size, rng)
    puzzle = list(solution)
    filled = size * size
    for cell in rng.sample(range(size * size), size * size):
        if filled <= clues:
            break
        puzzle[cell] = 0
        if solvable_by_singles(puzzle, size):
            filled -= 1
        else:
            puzzle[cell] = solution[cell]
    return tuple(puzzle), tuple(solution)


class SudokuEnv(Env):
    """Sudoku: fill the grid so every row, column and box holds each digit once (RAGEN v2).

    Observation:
        The grid, one row per line, `.` for empty cells, `|` between boxes and a dashed line
        between bands, e.g. "1 . | 3 .\\n. 4 | . 1\\n----+----\\n...". After an action the
        observation starts with one feedback line ("Placed 3 at row 1 col 2.", or the conflict).
    Actions:
        "place N at row R col C" or "R,C,N" (also "R C N"), rows and columns numbered from 1
        (top, left), case-insensitive; `available_actions()` lists every "R,C,N" for the
        empty cells. Text that does not parse, is out of range or names a filled cell is
        invalid: reward 0, state and budget untouched. Several actions per turn: "1,2,3 || 2,1,4".
    Rewards:
        +1 for a correct placement (the digit of the unique solution; it is written in).
        -0.1 for a placement that breaks a rule, with feedback naming each conflict, e.g.
        "Cannot place 4 at row 2 col 3: row 2 already has 4 (col 1); box rows 1-2 cols 3-4
        already has 4 (row 1 col 4)." -0.1 also for a digit that breaks no rule yet but leads
        to no solution ("... but the puzzle has no solution with it."). Neither is written in.
        +10 more when the last cell is filled (that step pays 11).
    Episode end:
        Terminated (success) when the grid is full; truncated after `max_steps` valid actions.
    Arguments:
        size: 4 or 9. difficulty: "easy" (10 / 36 givens), "medium" (9 / 30) or "hard"
        (6 / 24), RAGEN's table; or clues: an explicit number of givens. max_steps: valid
        actions allowed (30 for 4x4, 100 for 9x9). Puzzles come from a random solved grid
        emptied cell by cell while naked and hidden singles still solve it: the solution is
        unique and reachable without guessing; when no further cell can be emptied the
        puzzle keeps a few more givens than asked for (never for "easy").
    """

    name = "sudoku"

    def __init__(self, size: int = 4, difficulty: str = "easy", clues: int | None = None,
                 max_steps: int | None = None) -> None:
        if size not in CLUES:
            raise ValueError(f"size must be 4 or 9, got {size}")
        if difficulty not in CLUES[size]:
            raise ValueError(f"difficulty must be one of {sorted(CLUES[size])}, got {difficulty!r}")
        self.size, self.box, self.difficulty = size, int(round(size**0.5)), difficulty
        self.clues = CLUES[size][difficulty] if clues is None else clues
        if not 0 <= self.clues < size * size:
            raise ValueError(f"clues must be in 0..{size * size - 1}, got {self.clues}")
        self.max_steps = DEFAULT_MAX_STEPS[size] if max_steps is None else max_steps
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        self._grid: list[int] = []
        self._solution: tuple[int, ...] = ()
        self._steps = 0
        self._terminated = self._truncated = False

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        puzzle, self._solution = generate_sudoku(self.size, self.clues, self._next_episode_seed(seed))
        self._grid = list(puzzle)
        self._steps = 0
        self._terminated = self._truncated = False
        return self.render(), {"max_steps": self.max_steps, "empty_cells": self._grid.count(0)}

    def available_actions(self) -> list[str]:
        n = self.size
        return [f"{cell // n + 1},{cell % n + 1},{d}" for cell, v in enumerate(self._grid) if v == 0
                for d in range(1, n + 1)]

    def step(self, action: str) -> StepResult:
        if not self._grid:
            raise RuntimeError("call reset() before step()")
        if self._terminated or self._truncated:
            return self._after_done_step(self._terminated, self._truncated, self._terminated)
        parsed = self._parse(action)
        if isinstance(parsed, str):
            info = {"success": False, "action_valid": False, "action_effective": False}
            return StepResult(parsed + "\n" + self.render(), 0.0, False, False, info)

        row, col, digit = parsed
        cell = (row - 1) * self.size + (col - 1)
        self._steps += 1
        conflicts = self._conflicts(cell, digit)
        correct = not conflicts and self._solution[cell] == digit
        where = f"{digit} at row {row} col {col}"
        if conflicts:
            reward, message = MISTAKE_PENALTY, f"Cannot place {where}: {'; '.join(conflicts)}."
        elif not correct:
            reward, message = MISTAKE_PENALTY, f"{where} breaks no rule yet, but the puzzle has no solution with it."
        else:
            self._grid[cell] = digit
            reward, message = CORRECT_REWARD, f"Placed {where}."
            if 0 not in self._grid:
                reward += SOLVED_REWARD
                self._terminated = True
                message += " The puzzle is solved!"
        if not self._terminated and self._steps >= self.max_steps:
            self._truncated = True
        info = {
            "success": self._terminated,
            "action_valid": True,
            "action_effective": correct,
            "conflicts": len(conflicts),
            "empty_cells": self._grid.count(0),
            "steps_left": self.max_steps - self._steps,
        }
        return StepResult(message + "\n" + self.render(), round(reward, 6), self._terminated, self._truncated, info)

    def render(self) -> str:
        n, b = self.size, self.box
        lines = []
        for r in range(n):
            if r and r % b == 0:
                # dashes line up with the " | " box separators: "------+-------+------"
                lines.append("+".join("-" * (2 * b - 1 + (i > 0) + (i < b - 1)) for i in range(b)))
            cells = [str(v) if v else "." for v in self._grid[r * n:(r + 1) * n]]
            lines.append(" | ".join(" ".join(cells[i:i + b]) for i in range(0, n, b)))
        return "\n".join(lines)

    def system_prompt(self) -> str:
        n, b = self.size, self.box
        return (
            f"You are solving a {n}x{n} Sudoku. Fill every empty cell (.) with a digit from 1 to {n} so that "
            f"each row, each column and each {b}x{b} box contains every digit exactly once.\n"
            f"Rows are numbered 1 to {n} from the top, columns 1 to {n} from the left.\n"
            "Action: 'place N at row R col C' or the short form 'R,C,N'.\n"
            f"A correct placement gives +1, a wrong one -0.1 (you are told why), completing the grid +10. "
            f"You have at most {self.max_steps} placements.\n"
            "Answer inside <answer>...</answer>, e.g. <answer>place 3 at row 1 col 2</answer> or "
            "<answer>1,2,3</answer>."
        )

    def expert_action(self) -> str:
        if not self._grid or 0 not in self._grid:
            return "1,1,1"
        cell = self._grid.index(0)
        return f"{cell // self.size + 1},{cell % self.size + 1},{self._solution[cell]}"

    # ------------------------------------------------------------------ internals

    def _parse(self, action: object) -> tuple[int, int, int] | str:
        """(row, col, digit), 1-based, or the message explaining why the action is invalid."""
        n = self.size
        usage = (f"Invalid action '{{}}'. Use 'place N at row R col C' or 'R,C,N' with R, C and N "
                 f"from 1 to {n}.")
        if not isinstance(action, str):
            return usage.format(quote_action(repr(action)))
        text = action.strip().lower()
        match = _PLACE.fullmatch(text)
        if match:
            digit, row, col = map(int, match.groups())
        else:
            match = _TRIPLE.fullmatch(text)
            if not match:
                return usage.format(quote_action(action))
            row, col, digit = map(int, match.groups())
        if not (1 <= row <= n and 1 <= col <= n and 1 <= digit <= n):
            return usage.format(quote_action(action))
        filled = self._grid[(row - 1) * n + col - 1]
        if filled:
            return f"Invalid action '{quote_action(action)}': row {row} col {col} is already filled ({filled})."
        return row, col, digit

    def _conflicts(self, cell: int, digit: int) -> list[str]:
        n, b = self.size, self.box
        r, c = divmod(cell, n)
        found = []
        for j in range(n):
            if self._grid[r * n + j] == digit:
                found.append(f"row {r + 1} already has {digit} (col {j + 1})")
        for i in range(n):
            if self._grid[i * n + c] == digit:
                found.append(f"column {c + 1} already has {digit} (row {i + 1})")
        top, left = r - r % b, c - c % b
        for i in range(top, top + b):
            for j in range(left, left + b):
                if self._grid[i * n + j] == digit:
                    found.append(f"box rows {top + 1}-{top + b} cols {left + 1}-{left + b} already has {digit} "
                                 f"(row {i + 1} col {j + 1})")
        return found
