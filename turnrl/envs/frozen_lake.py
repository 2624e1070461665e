"""FrozenLake on a random map, rendered with RAGEN's text symbols."""

from __future__ import annotations

import random

from .base import Env, StepResult
from .solvers import FROZEN_LAKE_MOVES, frozen_lake_values, grid_shortest_path

ACTIONS = tuple(name for name, _, _ in FROZEN_LAKE_MOVES)  # ("Left", "Down", "Right", "Up")
FROZEN, HOLE, GOAL, PLAYER = "_", "O", "G", "P"
PLAYER_IN_HOLE, PLAYER_ON_GOAL = "X", "√"
MAX_MAP_ATTEMPTS = 10_000
OBSERVATION_FORMATS = ("grid", "coord", "grid_coord")


def parse_layout(text: str) -> tuple[tuple[str, ...], tuple[int, int]]:
    """Parse a symbol grid ('P', '_', 'O', 'G') into (rows without the player, start)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or len({len(line) for line in lines}) != 1:
        raise ValueError("layout must be a non-empty rectangle of symbols")
    flat = "".join(lines)
    if set(flat) - {PLAYER, FROZEN, HOLE, GOAL}:
        raise ValueError(f"layout may only contain 'P', '_', 'O', 'G'; got {sorted(set(flat))}")
    if flat.count(PLAYER) != 1 or flat.count(GOAL) != 1:
        raise ValueError("layout needs exactly one 'P' and one 'G'")
    start = divmod(flat.index(PLAYER), len(lines[0]))
    return tuple(line.replace(PLAYER, FROZEN) for line in lines), start


class FrozenLakeEnv(Env):
    """FrozenLake: walk across a random icy grid to the goal without falling into a hole.

    Observation:
        With `observation_format="grid"` (default) the grid, one row per line without spaces:
        `P` player, `_` frozen, `O` hole, `G` goal, `X` player in a hole, `√` player on the
        goal, e.g. "P_O_\\n____\\n_O__\\n___G". `"coord"` lists zero-indexed (row, col)
        coordinates (row 0 at the top): "Board size: 4 rows x 4 cols (zero-indexed).",
        "Player: (0, 0)", "Goal: (3, 3)", "Holes: (0, 2), (2, 1)" (the line is left out when
        there are none). `"grid_coord"` gives both: "Coordinates:\\n<coord>\\nGrid:\\n<grid>"
        (RAGEN v2's CoordFrozenLake).
    Actions:
        Left, Down, Right, Up (case-insensitive). With `slippery=True` the player moves in
        the intended direction with probability 1/3 and in each perpendicular direction
        with probability 1/3. Walking into the border keeps the position.
    Rewards:
        +1.0 on reaching the goal, 0.0 otherwise (including falling into a hole).
    Episode end:
        Terminated on the goal (success) or in a hole; truncated after `max_steps` valid
        actions. Invalid actions do not use up the step budget.
    Arguments:
        size: grid side (4). p: probability that a tile is frozen (0.8).
        slippery: stochastic moves (True, RAGEN default). max_steps: action budget (10).
        observation_format: "grid", "coord" or "grid_coord".
        Maps (start and goal too) are random and regenerated until the goal is reachable from
        the start within `max_steps`. `FrozenLakeEnv.from_layout(text)` fixes a hand-written map.
    """

    name = "frozen_lake"
    action_names = ACTIONS

    def __init__(self, size: int = 4, p: float = 0.8, slippery: bool = True, max_steps: int = 10,
                 observation_format: str = "grid") -> None:
        if observation_format not in OBSERVATION_FORMATS:
            raise ValueError(f"observation_format must be one of {OBSERVATION_FORMATS}, got {observation_format!r}")
        self.observation_format = observation_format
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.size, self.p, self.slippery, self.max_steps = size, p, bool(slippery), max_steps
        self._fixed_layout: str | None = None
        self._rows: tuple[str, ...] = ()
        self._pos = self._goal = (0, 0)
        self._steps = 0
        self._terminated = self._truncated = self._success = False
        self._rng = random.Random(0)

    @classmethod
    def from_layout(cls, text: str, **kwargs) -> "FrozenLakeEnv":
        """An env that always starts from this hand-written map (reset seeds only the slips)."""
        parse_layout(text)  # fail now, not at the first reset
        env = cls(**kwargs)
        env._fixed_layout = text
        env.reset(seed=0)
        return env

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        options = dict(options or {})
        layout = options.pop("layout", self._fixed_layout)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; supported: layout")
        # Separate streams for the map and the slips, so the slip sequence of an episode
        # does not depend on how many map attempts generation needed.
        master = random.Random(self._next_episode_seed(seed))
        map_rng, self._rng = random.Random(master.getrandbits(64)), random.Random(master.getrandbits(64))
        if layout is not None:
            self._rows, self._pos = parse_layout(layout)
        else:
            self._rows, self._pos = self._generate(map_rng)
        self._goal = divmod("".join(self._rows).index(GOAL), len(self._rows[0]))
        self._steps = 0
        self._terminated = self._truncated = self._success = False
        return self.render(), {"max_steps": self.max_steps, "slippery": self.slippery}

    def step(self, action: str) -> StepResult:
        if not self._rows:
            raise RuntimeError("call reset() before step()")
        if self._terminated or self._truncated:
            return self._after_done_step(self._terminated, self._truncated, self._success)
        intended = self._match_action(action)
        if intended is None:
            return self._invalid_step(action)

        index = ACTIONS.index(intended)
        if self.slippery:
            index = (index + self._rng.randrange(3) - 1) % 4  # -1/+1 are the perpendicular moves
        _, dr, dc = FROZEN_LAKE_MOVES[index]
        r, c = self._pos[0] + dr, self._pos[1] + dc
        old = self._pos
        if 0 <= r < len(self._rows) and 0 <= c < len(self._rows[0]):
            self._pos = (r, c)
        self._steps += 1

        tile = self._rows[self._pos[0]][self._pos[1]]
        reward = 0.0
        if tile == GOAL:
            reward, self._terminated, self._success = 1.0, True, True
        elif tile == HOLE:
            self._terminated = True
        elif self._steps >= self.max_steps:
            self._truncated = True
        info = {
            "success": self._success,
            "action_valid": True,
            "action_effective": self._pos != old,
            "intended": intended,
            "moved": ACTIONS[index],
            "steps_left": self.max_steps - self._steps,
        }
        return StepResult(self.render(), reward, self._terminated, self._truncated, info)

    def render(self) -> str:
        if self.observation_format == "grid":
            return self._grid()
        if self.observation_format == "coord":
            return self._coords()
        return f"Coordinates:\n{self._coords()}\nGrid:\n{self._grid()}"

    def _coords(self) -> str:
        if not self._rows:
            return ""
        n_rows, n_cols = self._shape()
        lines = [f"Board size: {n_rows} rows x {n_cols} cols (zero-indexed).",
                 f"Player: ({self._pos[0]}, {self._pos[1]})", f"Goal: ({self._goal[0]}, {self._goal[1]})"]
        holes = sorted(self._holes())
        if holes:
            lines.append("Holes: " + ", ".join(f"({r}, {c})" for r, c in holes))
        return "\n".join(lines)

    def _grid(self) -> str:
        grid = [list(row) for row in self._rows]
        if grid:
            r, c = self._pos
            grid[r][c] = {HOLE: PLAYER_IN_HOLE, GOAL: PLAYER_ON_GOAL}.get(grid[r][c], PLAYER)
        return "\n".join("".join(row) for row in grid)

    def system_prompt(self) -> str:
        slip = (
            "The ice is slippery: you move in the intended direction only 1/3 of the time; "
            "otherwise you slide to one of the two perpendicular directions (1/3 each).\n"
            if self.slippery
            else "Moves are deterministic.\n"
        )
        symbols = ("Symbols: P is you, _ is frozen ice (safe), O is a hole, G is the goal, "
                   "X means you fell into a hole, √ means you reached the goal.\n")
        coords = ("Positions are zero-indexed (row, col) coordinates; row 0 is the top row and column 0 "
                  "the left column, so Up decreases the row and Left decreases the column.\n")
        board = {"grid": symbols, "coord": coords, "grid_coord": coords + "The grid is shown too. " + symbols}
        return (
            "You are solving the FrozenLake puzzle. Walk from your position to the goal "
            "without falling into a hole.\n"
            f"{board[self.observation_format]}"
            f"Actions: {', '.join(ACTIONS)}. Moving into the border keeps you in place.\n"
            f"{slip}"
            f"Reaching the goal gives reward 1. You have at most {self.max_steps} moves.\n"
            "Answer with one action inside <answer>...</answer>, e.g. <answer>Left</answer>."
        )

    def expert_action(self) -> str:
        if not self._rows or self._terminated or self._truncated:
            return ACTIONS[0]
        shortest = grid_shortest_path(self._holes(), self._shape(), self._pos, self._goal, FROZEN_LAKE_MOVES)
        fallback = shortest[0] if shortest else ACTIONS[0]
        if not self.slippery:
            return fallback
        # Slippery: maximise P(reach goal within the remaining budget); the table is cached per map.
        steps_left = self.max_steps - self._steps
        values, policy = frozen_lake_values(self._rows, self.max_steps, True)
        cell = self._pos[0] * len(self._rows[0]) + self._pos[1]
        if values[steps_left][cell] <= 0.0:
            return fallback  # hopeless within budget: at least head for the goal
        return ACTIONS[policy[steps_left][cell]]

    # ------------------------------------------------------------------ internals

    def _shape(self) -> tuple[int, int]:
        return len(self._rows), len(self._rows[0])

    def _holes(self) -> frozenset[tuple[int, int]]:
        return frozenset((r, c) for r, row in enumerate(self._rows) for c, t in enumerate(row) if t == HOLE)

    def _generate(self, rng: random.Random) -> tuple[tuple[str, ...], tuple[int, int]]:
        n = self.size
        for _ in range(MAX_MAP_ATTEMPTS):
            grid = [[FROZEN if rng.random() < self.p else HOLE for _ in range(n)] for _ in range(n)]
            frozen = [(r, c) for r in range(n) for c in range(n) if grid[r][c] == FROZEN]
            if len(frozen) < 2:
                continue
            start, goal = rng.sample(frozen, 2)
            holes = frozenset((r, c) for r in range(n) for c in range(n) if grid[r][c] == HOLE)
            path = grid_shortest_path(holes, (n, n), start, goal, FROZEN_LAKE_MOVES)
            # Also require the goal within the step budget, or the episode is unwinnable.
            if path is not None and len(path) <= self.max_steps:
                grid[goal[0]][goal[1]] = GOAL
                return tuple("".join(row) for row in grid), start
        raise RuntimeError(f"could not generate a solvable {n}x{n} map with p={self.p}; increase p")
