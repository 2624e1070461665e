"""Sokoban with our own room generator (random-walk topology + reverse play)."""

from __future__ import annotations

import itertools
import random
from collections import deque
from typing import NamedTuple

from .base import Env, StepResult
from .solvers import SOKOBAN_ACTIONS, sokoban_solve



class Vocab(NamedTuple):
    """The seven grid symbols of a Sokoban rendering."""

    wall: str
    floor: str
    target: str
    box: str
    box_on_target: str
    player: str
    player_on_target: str

    def legend(self) -> str:
        return (f"{self.wall} wall, {self.floor} empty floor, {self.target} target, {self.box} box, "
                f"{self.box_on_target} box on target, {self.player} you, {self.player_on_target} you on a target")


# RAGEN's symbols, and the alternative vocabulary of its SokobanDifferentGridVocab variant
# (W . G C B A @), mapped one to one: W wall, . floor, G target (goal), B box, C box on target
# (completed), A player (agent), @ player on target.
VOCABS = {
    "default": Vocab("#", "_", "O", "X", "√", "P", "S"),
    "alt": Vocab("W", ".", "G", "B", "C", "A", "@"),
}
WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = VOCABS["default"]
OBSERVATION_FORMATS = ("grid", "coord", "grid_coord")
STEP_PENALTY, BOX_ON_REWARD, BOX_OFF_PENALTY, SOLVED_REWARD = -0.1, 1.0, -1.0, 10.0
FLOOR_FRACTION = 0.6  # share of interior cells carved into floor, as in gym-sokoban rooms
MAX_ROOM_ATTEMPTS = 200

State = tuple[int, frozenset]  # (player cell, box cells); cells are flat indices r * width + c


_DIRECTIONS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _carve_floor(dim: int, rng: random.Random) -> set[int]:
    """Random walk over the interior; direction changes keep the room from being one corridor."""
    lo, hi = 1, dim - 2
    wanted = max(3, round(FLOOR_FRACTION * (dim - 2) ** 2))
    r, c = rng.randint(lo, hi), rng.randint(lo, hi)
    choice, uniform = rng.choice, rng.random  # bound once: this loop is most of a room's generation time
    dr, dc = choice(_DIRECTIONS)
    floor = {r * dim + c}
    for _ in range(100 * dim * dim):
        if len(floor) >= wanted:
            break
        if uniform() < 0.35:
            dr, dc = choice(_DIRECTIONS)
        if lo <= r + dr <= hi and lo <= c + dc <= hi:
            r, c = r + dr, c + dc
            floor.add(r * dim + c)
        else:
            dr, dc = choice(_DIRECTIONS)
    return floor


def _displacement(boxes, targets: tuple[int, ...], width: int) -> int:
    """Manhattan distance of the boxes from the targets under the best box-target matching."""
    def dist(a: int, b: int) -> int:
        return abs(a // width - b // width) + abs(a % width - b % width)

    if len(targets) == 1:
        (b,), (t,) = boxes, targets
        return abs(b // width - t // width) + abs(b % width - t % width)
    if len(targets) <= 4:
        return min(sum(dist(b, t) for b, t in zip(perm, targets)) for perm in itertools.permutations(boxes))
    return sum(min(dist(b, t) for t in targets) for b in boxes)  # cheap bound for many boxes


def _reverse_search(floor: set[int], targets: frozenset, width: int, max_depth: int) -> dict[tuple[int, int], int]:
    """BFS over reverse moves (the player walks back or pulls a box) from every solved state.

    Starting from all player positions with the boxes on the targets makes the BFS depth of
    a state exactly its optimal forward solution length, so capping the depth bounds the
    puzzle's difficulty without a separate solver call per candidate. States are (player cell,
    box bitmask): bit c is set when a box is on cell c (two ints hash much faster than a frozenset,
    and this search is the largest part of generating a room).
    """
    deltas = (-width, width, -1, 1)
    goal = _mask(targets)
    depth = {(p, goal): 0 for p in sorted(floor) if p not in targets}
    queue = deque(depth)
    while queue:
        state = queue.popleft()
        d = depth[state]
        if d >= max_depth:
            continue
        player, boxes = state
        for delta in deltas:
            step = player + delta
            if step not in floor or boxes >> step & 1:
                continue
            new = (step, boxes)
            if new not in depth:
                depth[new] = d + 1
                queue.append(new)
            pulled = player - delta
            if boxes >> pulled & 1:  # the box behind the player follows it
                new = (step, boxes ^ (1 << pulled) | (1 << player))
                if new not in depth:
                    depth[new] = d + 1
                    queue.append(new)
    return depth


def _mask(cells) -> int:
    mask = 0
    for c in cells:
        mask |= 1 << c
    return mask


def _cells(mask: int) -> list[int]:
    cells = []
    while mask:
        low = mask & -mask
        cells.append(low.bit_length() - 1)
        mask ^= low
    return cells


def _replay_solution(depths: dict[tuple[int, int], int], floor: set[int], width: int,
                     state: tuple[int, int]) -> list[str]:
    """The optimal solution from `state`, read off the reverse search's depths: at each step the first action (in
    SOKOBAN_ACTIONS order) whose forward move (walk or push) reaches a state one move closer to solved. That is
    the solution `sokoban_solve` returns (its BFS meets the lexicographically first shortest one first), without
    searching again."""
    deltas = tuple(zip(SOKOBAN_ACTIONS, (-width, width, -1, 1)))  # Up, Down, Left, Right
    player, boxes = state
    d, plan = depths[state], []
    while d > 0:
        for name, delta in deltas:
            nxt = player + delta
            if nxt not in floor:
                continue
            if boxes >> nxt & 1:
                beyond = nxt + delta
                if beyond not in floor or boxes >> beyond & 1:
                    continue
                new = (nxt, boxes ^ (1 << nxt) | (1 << beyond))
            else:
                new = (nxt, boxes)
            if depths.get(new) == d - 1:
                break
        else:  # cannot happen: a state at depth d has a successor at depth d - 1
            raise AssertionError(f"no move from depth {d} toward the solved room")
        plan.append(name)
        (player, boxes), d = new, d - 1
    return plan


def generate_room(dim: int, num_boxes: int, max_solution_len: int, rng: random.Random):
    """Return (walls, targets, boxes, player, solution) for a dim x dim room; deterministic in rng."""
    for _ in range(MAX_ROOM_ATTEMPTS):
        sub = random.Random(rng.getrandbits(64))  # a fresh sub-seed per attempt
        floor = _carve_floor(dim, sub)
        if len(floor) < num_boxes + 2:
            continue
        targets = frozenset(sub.sample(sorted(floor), num_boxes))
        depths = _reverse_search(floor, targets, dim, max_solution_len)
        target_order = tuple(sorted(targets))
        scored = [(s, _displacement(_cells(s[1]), target_order, dim)) for s, d in depths.items() if d >= 1]
        if not scored:
            continue  # e.g. targets where no box can be pulled away
        best = max(score for _, score in scored)
        state = sub.choice([s for s, score in scored if score == best])
        walls = frozenset(range(dim * dim)) - floor
        return walls, targets, frozenset(_cells(state[1])), state[0], _replay_solution(depths, floor, dim, state)
    raise RuntimeError(f"could not generate a {dim}x{dim} room with {num_boxes} box(es); try a larger dim")


class SokobanEnv(Env):
    """Sokoban: push every box onto a target in a randomly generated room.

    Observation:
        With `observation_format="grid"` (default) the room, one row per line: `#` wall,
        `_` empty, `O` target, `X` box, `√` box on target, `P` player, `S` player on target.
        `vocab="alt"` uses RAGEN's alternative symbols instead: `W` wall, `.` empty, `G`
        target, `B` box, `C` box on target, `A` player, `@` player on target.
        `"coord"` lists zero-indexed (row, col) coordinates (row 0 at the top) instead:
        "Board size: 6 rows x 6 cols (zero-indexed).", then "Walls: (0, 0), ...",
        "Targets: ..." (all targets), "Boxes: ..." (boxes off target), "Boxes on target:
        ...", and "Player: (r, c)" or "Player on target: (r, c)"; empty lists are left
        out. `"grid_coord"` gives both: "Coordinates:\\n<coord>\\nGrid:\\n<grid>" (RAGEN v2's
        CoordSokoban).
    Actions:
        Up, Down, Left, Right (case-insensitive). Walking into a box pushes it if the cell
        behind it is free; boxes cannot be pulled.
    Rewards:
        -0.1 per valid action (also when bumping into a wall), +1.0 for pushing a box onto a
        target, -1.0 for pushing one off, +10.0 when all boxes are on targets; summed per
        step (the solving push gives -0.1 + 1 + 10 = 10.9).
    Episode end:
        Terminated (success) when all boxes are on targets; truncated after `max_steps`
        valid actions. Invalid actions do not use up the step budget.
    Arguments:
        dim: room side including the border walls (6). num_boxes: boxes/targets (1).
        max_steps: action budget (10). max_solution_len: generated rooms have an optimal
        solution of at most this many moves (default: max_steps).
        vocab: "default" or "alt" grid symbols. observation_format: "grid", "coord" or
        "grid_coord". `SokobanEnv.from_layout(text)` builds a fixed room from the symbol grid.
        Rooms come from our own generator: a random-walk floor, targets, then reverse play
        (pulling boxes) to the most displaced state whose optimal solution is at most
        `max_solution_len` moves. Registered variants: `sokoban_8x8` (dim 8, 2 boxes, as
        RAGEN's LargerSokoban) and `sokoban_alt_vocab` (vocab "alt").
    """

    name = "sokoban"
    action_names = SOKOBAN_ACTIONS

    def __init__(self, dim: int = 6, num_boxes: int = 1, max_steps: int = 10, max_solution_len: int | None = None,
                 vocab: str = "default", observation_format: str = "grid"):
        if vocab not in VOCABS:
            raise ValueError(f"vocab must be one of {sorted(VOCABS)}, got {vocab!r}")
        if observation_format not in OBSERVATION_FORMATS:
            raise ValueError(f"observation_format must be one of {OBSERVATION_FORMATS}, got {observation_format!r}")
        self.vocab, self.symbols, self.observation_format = vocab, VOCABS[vocab], observation_format
        if dim < 4:
            raise ValueError(f"dim must be >= 4 (border walls plus interior), got {dim}")
        if num_boxes < 1:
            raise ValueError(f"num_boxes must be >= 1, got {num_boxes}")
        if round(FLOOR_FRACTION * (dim - 2) ** 2) < num_boxes + 2:
            raise ValueError(f"a {dim}x{dim} room has too little floor for {num_boxes} box(es)")
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.dim, self.num_boxes, self.max_steps = dim, num_boxes, max_steps
        self.max_solution_len = max_steps if max_solution_len is None else max_solution_len
        if self.max_solution_len < 1:
            raise ValueError(f"max_solution_len must be >= 1, got {self.max_solution_len}")
        self._fixed_layout: str | None = None
        self._width = self._height = 0
        self._walls: frozenset[int] = frozenset()
        self._targets: frozenset[int] = frozenset()
        self._boxes: frozenset[int] = frozenset()
        self._player = 0
        self._steps = 0
        self._terminated = self._truncated = False
        self._plan: dict[State, str] = {}  # state -> next expert action along the cached plan

    @classmethod
    def from_layout(cls, text: str, max_steps: int = 10, vocab: str = "default",
                    observation_format: str = "grid") -> "SokobanEnv":
        """A fixed room parsed from RAGEN symbols, e.g. "#####\\n#P X O#\\n#####" with '_' floors.

        The room must be enclosed by walls, have one player ('P' or 'S'), as many boxes as
        targets, and not be solved already; it is written in the symbols of `vocab`.
        `reset()` always returns to this room.
        """
        if vocab not in VOCABS:
            raise ValueError(f"vocab must be one of {sorted(VOCABS)}, got {vocab!r}")
        parsed = _parse_layout(text, VOCABS[vocab])
        env = cls(dim=max(4, parsed[0], parsed[1]), num_boxes=len(parsed[4]), max_steps=max_steps, vocab=vocab,
                  observation_format=observation_format)
        env._fixed_layout = text
        env.reset(seed=0)
        return env

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        options = dict(options or {})
        layout = options.pop("layout", self._fixed_layout)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; supported: layout")
        rng = random.Random(self._next_episode_seed(seed))
        self._plan = {}
        if layout is not None:
            parsed = _parse_layout(layout, self.symbols)
            self._height, self._width, self._walls, self._targets, self._boxes, self._player = parsed
        else:
            self._height = self._width = self.dim
            walls, targets, boxes, player, solution = generate_room(self.dim, self.num_boxes, self.max_solution_len, rng)
            self._walls, self._targets, self._boxes, self._player = walls, targets, boxes, player
            self._remember_plan(solution)  # generation already solved it: seed the expert cache
        self._steps = 0
        self._terminated = self._truncated = False
        return self.render(), {"max_steps": self.max_steps}

    def step(self, action: str) -> StepResult:
        if not self._width:
            raise RuntimeError("call reset() before step()")
        if self._terminated or self._truncated:
            return self._after_done_step(self._terminated, self._truncated, self._terminated)
        name = self._match_action(action)
        if name is None:
            return self._invalid_step(action)

        delta = self._delta(name)
        before_on = len(self._boxes & self._targets)
        old = (self._player, self._boxes)
        nxt = self._player + delta
        if nxt in self._boxes:
            beyond = nxt + delta
            if beyond not in self._walls and beyond not in self._boxes:
                self._boxes = (self._boxes - {nxt}) | {beyond}
                self._player = nxt
        elif nxt not in self._walls:
            self._player = nxt
        self._steps += 1

        after_on = len(self._boxes & self._targets)
        reward = STEP_PENALTY
        if after_on > before_on:
            reward += BOX_ON_REWARD
        elif after_on < before_on:
            reward += BOX_OFF_PENALTY
        if after_on == len(self._targets):
            reward += SOLVED_REWARD
            self._terminated = True
        elif self._steps >= self.max_steps:
            self._truncated = True
        info = {
            "success": self._terminated,
            "action_valid": True,
            "action_effective": (self._player, self._boxes) != old,
            "boxes_on_target": after_on,
            "steps_left": self.max_steps - self._steps,
        }
        # round(): keep 10.9 printing as 10.9 rather than 10.899999999999999
        return StepResult(self.render(), round(reward, 6), self._terminated, self._truncated, info)

    def render(self) -> str:
        if self.observation_format == "grid":
            return self._grid()
        if self.observation_format == "coord":
            return self._coords()
        return f"Coordinates:\n{self._coords()}\nGrid:\n{self._grid()}"

    def _grid(self) -> str:
        v = self.symbols
        key = (self._walls, self._targets, self._width, self._height, v)
        w = self._width
        if getattr(self, "_grid_key", None) != key:  # the static cells, rebuilt only when the room changes
            self._grid_key = key
            # one entry per cell and a newline after every row but the last: cell c sits at c + c // w
            self._grid_base = [v.wall if c in self._walls else v.target if c in self._targets else v.floor
                               for c in range(w * self._height)]
            for r in range(self._height - 1, 0, -1):
                self._grid_base.insert(r * w, "\n")
        cells = self._grid_base.copy()
        for b in self._boxes:
            cells[b + b // w] = v.box_on_target if b in self._targets else v.box
        p = self._player
        cells[p + p // w] = v.player_on_target if p in self._targets else v.player
        return "".join(cells)

    def _coords(self) -> str:
        def listed(cells) -> str:
            return ", ".join(f"({c // self._width}, {c % self._width})" for c in sorted(cells))

        player_label = "Player on target" if self._player in self._targets else "Player"
        lines = [f"Board size: {self._height} rows x {self._width} cols (zero-indexed)."]
        for label, cells in (("Walls", self._walls), ("Targets", self._targets),
                             ("Boxes", self._boxes - self._targets), ("Boxes on target", self._boxes & self._targets),
                             (player_label, {self._player})):
            if cells:
                lines.append(f"{label}: {listed(cells)}")
        return "\n".join(lines)

    def system_prompt(self) -> str:
        board = {
            "grid": f"The room is shown as a grid. Symbols: {self.symbols.legend()}.\n",
            "coord": "The room is described by zero-indexed (row, col) coordinates; row 0 is the top "
                     "row and column 0 the left column, so Up decreases the row and Left decreases the column.\n",
            "grid_coord": "The room is described by zero-indexed (row, col) coordinates (row 0 is the top, "
                          "Up decreases the row) and as a grid. Grid symbols: "
                          f"{self.symbols.legend()}.\n",
        }[self.observation_format]
        return (
            "You are solving the Sokoban puzzle. Push every box onto a target.\n"
            f"{board}"
            "Actions: Up, Down, Left, Right. You move one cell; walking into a box pushes it "
            "one cell if the cell behind it is free. You cannot pull boxes, so avoid pushing "
            "a box into a corner.\n"
            f"Each move costs 0.1; pushing a box onto a target gives +1, off a target -1, and "
            f"solving the puzzle gives +10. You have at most {self.max_steps} moves.\n"
            "Answer with one action inside <answer>...</answer>, e.g. <answer>Up</answer>."
        )

    def expert_action(self) -> str:
        state = (self._player, self._boxes)
        if not self._width or self._terminated or self._truncated:
            return SOKOBAN_ACTIONS[0]
        if state not in self._plan:  # first call, or the agent left the cached plan
            plan = sokoban_solve(self._walls, self._width, self._player, self._boxes, self._targets)
            if plan is None:
                return SOKOBAN_ACTIONS[0]  # unsolvable (deadlock): any valid action
            self._remember_plan(plan)
        return self._plan[state]

    # ------------------------------------------------------------------ internals

    def _delta(self, name: str) -> int:
        return {"Up": -self._width, "Down": self._width, "Left": -1, "Right": 1}[name]

    def _remember_plan(self, plan: list[str]) -> None:
        """Map every state along `plan` (from the current state) to its next action."""
        self._plan = {}
        player, boxes = self._player, self._boxes
        for name in plan:
            self._plan[(player, boxes)] = name
            delta = self._delta(name)
            nxt = player + delta
            if nxt in boxes:
                boxes = (boxes - {nxt}) | {nxt + delta}
            if nxt not in self._walls:
                player = nxt


def _parse_layout(text: str, vocab: Vocab = VOCABS["default"]):
    """Parse a symbol grid into (height, width, walls, targets, boxes, player)."""
    WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET = vocab  # noqa: N806
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines or len({len(line) for line in lines}) != 1:
        raise ValueError("layout must be a non-empty rectangle of symbols")
    height, width = len(lines), len(lines[0])
    cells = "".join(lines)
    allowed = {WALL, FLOOR, TARGET, BOX, BOX_ON_TARGET, PLAYER, PLAYER_ON_TARGET}
    if set(cells) - allowed:
        raise ValueError(f"unknown symbol(s) {sorted(set(cells) - allowed)}; allowed: {''.join(sorted(allowed))}")
    border = lines[0] + lines[-1] + "".join(line[0] + line[-1] for line in lines)
    if set(border) != {WALL}:
        raise ValueError(f"layout must be enclosed by walls '{WALL}'")
    find = lambda *symbols: frozenset(i for i, ch in enumerate(cells) if ch in symbols)  # noqa: E731
    players = find(PLAYER, PLAYER_ON_TARGET)
    boxes = find(BOX, BOX_ON_TARGET)
    targets = find(TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET)
    if len(players) != 1:
        raise ValueError(f"layout needs exactly one player ('{PLAYER}' or '{PLAYER_ON_TARGET}'), found {len(players)}")
    if not boxes or len(boxes) != len(targets):
        raise ValueError(f"layout needs as many boxes as targets (>= 1); got {len(boxes)} and {len(targets)}")
    if boxes == targets:
        raise ValueError("layout is already solved")
    return height, width, find(WALL), targets, boxes, next(iter(players))
