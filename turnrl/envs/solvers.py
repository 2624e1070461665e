"""Exact planners behind the environments' `expert_action` (used for SFT demos and tests).

Pure functions on plain data (tuples, frozensets, flat cell indices) so they are easy to
test and cache; the env classes only translate their state into these arguments.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Any, Collection, Sequence

Cell = tuple[int, int]
Move = tuple[str, int, int]  # (action name, d_row, d_col)

# FrozenLake uses gymnasium's action order; the slip directions are (a - 1) % 4, (a + 1) % 4.
FROZEN_LAKE_MOVES: tuple[Move, ...] = (("Left", 0, -1), ("Down", 1, 0), ("Right", 0, 1), ("Up", -1, 0))
SOKOBAN_ACTIONS: tuple[str, ...] = ("Up", "Down", "Left", "Right")


def grid_shortest_path(
    blocked: Collection[Cell],
    shape: tuple[int, int],
    start: Cell,
    goal: Cell,
    moves: Sequence[Move] = FROZEN_LAKE_MOVES,
) -> list[str] | None:
    """Shortest action list from `start` to `goal` avoiding `blocked` cells (BFS), else None."""
    n_rows, n_cols = shape
    if start == goal:
        return []
    parent: dict[Cell, tuple[Cell, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        for name, dr, dc in moves:
            nxt = (cell[0] + dr, cell[1] + dc)
            if not (0 <= nxt[0] < n_rows and 0 <= nxt[1] < n_cols) or nxt in blocked or nxt in parent:
                continue
            parent[nxt] = (cell, name)
            if nxt == goal:
                path = []
                step = parent[nxt]
                while step is not None:
                    path.append(step[1])
                    step = parent[step[0]]
                return path[::-1]
            queue.append(nxt)
    return None


@functools.lru_cache(maxsize=4096)
def frozen_lake_values(
    rows: tuple[str, ...], horizon: int, slippery: bool = True
) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[int, ...], ...]]:
    """Finite-horizon value iteration on a FrozenLake map.

    `rows` uses '_' frozen, 'O' hole, 'G' goal. Returns (values, policy) where
    values[k][cell] is the best probability of reaching the goal with k moves left from
    flat cell index `cell = r * n_cols + c`, and policy[k][cell] the index (into
    FROZEN_LAKE_MOVES) of an action achieving it. Cached per map because the expert
    queries it every step.
    """
    n_rows, n_cols = len(rows), len(rows[0])
    tiles = "".join(rows)
    n_cells = len(tiles)

    def move(cell: int, direction: int) -> int:
        r, c = divmod(cell, n_cols)
        _, dr, dc = FROZEN_LAKE_MOVES[direction]
        nr, nc = r + dr, c + dc
        return nr * n_cols + nc if 0 <= nr < n_rows and 0 <= nc < n_cols else cell  # the border blocks

    successor = [[move(cell, d) for d in range(4)] for cell in range(n_cells)]
    values = [tuple(0.0 for _ in range(n_cells))]
    policy = [tuple(0 for _ in range(n_cells))]
    for _ in range(horizon):
        prev = values[-1]
        # Holes and the goal are absorbing: their worth is fixed, not looked up in `prev`.
        worth = [1.0 if t == "G" else 0.0 if t == "O" else prev[i] for i, t in enumerate(tiles)]
        new_values, new_policy = [], []
        for cell in range(n_cells):
            best_action, best_value = 0, -1.0
            for action in range(4):
                outcomes = ((action - 1) % 4, action, (action + 1) % 4) if slippery else (action,)
                value = sum(worth[successor[cell][d]] for d in outcomes) / len(outcomes)
                if value > best_value + 1e-12:  # tolerance: keep the first action on float ties
                    best_action, best_value = action, value
            new_values.append(best_value)
            new_policy.append(best_action)
        values.append(tuple(new_values))
        policy.append(tuple(new_policy))
    return tuple(values), tuple(policy)


def sokoban_solve(
    walls: Collection[int],
    width: int,
    player: int,
    boxes: Collection[int],
    targets: Collection[int],
    max_depth: int | None = None,
) -> list[str] | None:
    """Shortest move sequence putting every box on a target (BFS over (player, boxes)).

    Cells are flat indices `r * width + c`; the room must be enclosed by walls so a move
    can never leave the grid. Returns None if unsolvable (within `max_depth` moves).
    """
    deltas = {"Up": -width, "Down": width, "Left": -1, "Right": 1}
    goal = frozenset(targets)
    start = (player, frozenset(boxes))
    if start[1] == goal:
        return []

    def dead(cell: int) -> bool:
        # A box in a wall corner that is not a target can never move again: prune it.
        if cell in goal:
            return False
        vertical = cell - width in walls or cell + width in walls
        horizontal = cell - 1 in walls or cell + 1 in walls
        return vertical and horizontal

    parent: dict[tuple[int, frozenset[int]], tuple[Any, str] | None] = {start: None}
    frontier = [start]
    depth = 0
    while frontier and (max_depth is None or depth < max_depth):
        depth += 1
        next_frontier = []
        for state in frontier:
            pos, box_set = state
            for name in SOKOBAN_ACTIONS:
                delta = deltas[name]
                nxt = pos + delta
                if nxt in walls:
                    continue
                if nxt in box_set:
                    beyond = nxt + delta
                    if beyond in walls or beyond in box_set or dead(beyond):
                        continue
                    new = (nxt, (box_set - {nxt}) | {beyond})
                else:
                    new = (nxt, box_set)
                if new in parent:
                    continue
                parent[new] = (state, name)
                if new[1] == goal:
                    return _unwind(parent, new)
                next_frontier.append(new)
        frontier = next_frontier
    return None


def _unwind(parent: dict, state: Any) -> list[str]:
    actions = []
    link = parent[state]
    while link is not None:
        actions.append(link[1])
        link = parent[link[0]]
    return actions[::-1]


def solve(env: Any, max_actions: int = 10_000) -> list[str]:
    """Play the env's expert from its current state until the episode ends; return the actions.

    Meant for deterministic envs in tests and demo generation: it mutates `env`.
    """
    actions: list[str] = []
    for _ in range(max_actions):
        action = env.expert_action()
        actions.append(action)
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            break
    return actions


# ---------------------------------------------------------------------- countdown

_COUNTDOWN_OPS = "+-*/"


@functools.lru_cache(maxsize=4096)
def countdown_solve(numbers: tuple[int, ...], target: int, ops: str = _COUNTDOWN_OPS) -> str | None:
    """An expression using every number exactly once that equals `target`, else None.

    Exhaustive search over expression trees: repeatedly combine two of the remaining values
    with one operator (both orders for - and /), which enumerates every binary tree over the
    numbers. Exact rational arithmetic, so 8 / (3 - 8 / 3) = 24 is found. Multisets of values
    already explored are skipped, which keeps four numbers to a few thousand nodes.
    """
    from fractions import Fraction

    goal = Fraction(target)
    seen: set[tuple[Fraction, ...]] = set()

    def combine(a: tuple[Fraction, str], b: tuple[Fraction, str]):
        (x, ex), (y, ey) = a, b
        if "+" in ops:
            yield x + y, f"{ex} + {ey}"
        if "*" in ops:
            yield x * y, f"{_wrap(ex)} * {_wrap(ey)}"
        if "-" in ops:
            yield x - y, f"{ex} - {_wrap(ey)}"
            yield y - x, f"{ey} - {_wrap(ex)}"
        if "/" in ops:
            if y != 0:
                yield x / y, f"{_wrap(ex)} / {_wrap(ey)}"
            if x != 0:
                yield y / x, f"{_wrap(ey)} / {_wrap(ex)}"

    def search(items: list[tuple[Fraction, str]]) -> str | None:
        if len(items) == 1:
            return items[0][1] if items[0][0] == goal else None
        key = tuple(sorted(v for v, _ in items))
        if key in seen:
            return None
        seen.add(key)
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                for value, text in combine(items[i], items[j]):
                    found = search([*rest, (value, text)])
                    if found is not None:
                        return found
        return None

    if not numbers:
        return None
    return search([(Fraction(n), str(n)) for n in numbers])


def _wrap(expr: str) -> str:
    """Parenthesise a compound sub-expression (a bare number needs none)."""
    return expr if expr.isdigit() else f"({expr})"


# ---------------------------------------------------------------------- sudoku


def sudoku_candidates(grid: Sequence[int], size: int, cell: int) -> list[int]:
    """Digits allowed in `cell` of a flat size x size grid (0 = empty) by its row, column and box."""
    box = int(round(size**0.5))
    r, c = divmod(cell, size)
    top, left = r - r % box, c - c % box
    used = {grid[r * size + j] for j in range(size)} | {grid[i * size + c] for i in range(size)}
    used |= {grid[i * size + j] for i in range(top, top + box) for j in range(left, left + box)}
    return [d for d in range(1, size + 1) if d not in used]


def sudoku_solutions(grid: Sequence[int], size: int, limit: int = 2) -> list[tuple[int, ...]]:
    """Up to `limit` solutions of a flat grid (0 = empty) by backtracking on the most constrained cell."""
    work = list(grid)
    found: list[tuple[int, ...]] = []

    def search() -> None:
        best, best_options = -1, None
        for cell, value in enumerate(work):
            if value == 0:
                options = sudoku_candidates(work, size, cell)
                if best_options is None or len(options) < len(best_options):
                    best, best_options = cell, options
                    if len(options) <= 1:
                        break
        if best_options is None:  # no empty cell left: a solution
            found.append(tuple(work))
            return
        for digit in best_options:
            work[best] = digit
            search()
            if len(found) >= limit:
                break
        work[best] = 0

    # A given digit that clashes with another given makes the grid unsolvable at once.
    for cell, value in enumerate(grid):
        if value and value not in sudoku_candidates([0 if i == cell else v for i, v in enumerate(grid)], size, cell):
            return []
    search()
    return found


def sudoku_solve(grid: Sequence[int], size: int) -> tuple[int, ...] | None:
    """One solution of the grid (backtracking), or None if it has none."""
    solutions = sudoku_solutions(grid, size, limit=1)
    return solutions[0] if solutions else None


# ---------------------------------------------------------------------- tabular MDPs (gymnasium toy text)


def tabular_q_values(transitions: dict, n_states: int, n_actions: int, horizon: int):
    """Finite-horizon optimal Q values of a gymnasium transition table `env.unwrapped.P`.

    `transitions[s][a]` is a list of (probability, next_state, reward, terminated). Returns an
    array q of shape (horizon + 1, n_states, n_actions) where q[k, s, a] is the best expected
    return with k actions left after taking a in s (q[0] = 0). Maximising expected return is
    the shortest path on deterministic tables (Taxi, CliffWalking) and the success probability
    on FrozenLake. Vectorised over a padded (state, action, outcome) array, so Taxi's 500
    states x 200 steps take milliseconds.
    """
    import numpy as np

    width = max(len(transitions[s][a]) for s in range(n_states) for a in range(n_actions))
    prob = np.zeros((n_states, n_actions, width))
    nxt = np.zeros((n_states, n_actions, width), dtype=np.int64)
    reward = np.zeros((n_states, n_actions, width))
    cont = np.zeros((n_states, n_actions, width))  # 1.0 where the episode goes on
    for s in range(n_states):
        for a in range(n_actions):
            for k, (p, s2, r, done) in enumerate(transitions[s][a]):
                prob[s, a, k], nxt[s, a, k], reward[s, a, k], cont[s, a, k] = p, s2, r, 0.0 if done else 1.0
    expected_reward = (prob * reward).sum(axis=2)
    q = np.zeros((horizon + 1, n_states, n_actions))
    for k in range(1, horizon + 1):
        value = q[k - 1].max(axis=1)
        q[k] = expected_reward + (prob * cont * value[nxt]).sum(axis=2)
    return q


def blackjack_basic_action(player_sum: int, dealer_card: int, usable_ace: bool) -> int:
    """Basic strategy for hit/stick-only Blackjack (dealer stands on 17): 1 = hit, 0 = stick.

    Hard totals: stick on 17+, on 13-16 against a dealer 2-6, on 12 against 4-6; else hit.
    Soft totals (usable ace): stick on 19+, on 18 against a dealer 2-8; else hit. The dealer's
    ace is 1, as in gymnasium's observation.
    """
    weak_dealer = 2 <= dealer_card <= 6
    if usable_ace:
        if player_sum >= 19 or (player_sum == 18 and 2 <= dealer_card <= 8):
            return 0
        return 1
    if player_sum >= 17 or (13 <= player_sum <= 16 and weak_dealer) or (player_sum == 12 and 4 <= dealer_card <= 6):
        return 0
    return 1
