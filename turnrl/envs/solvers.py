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
