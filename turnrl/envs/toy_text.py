"""Gymnasium toy-text environments (FrozenLake, Taxi, CliffWalking, Blackjack) as turnrl text envs.

`from_gymnasium(env_id_or_env, action_names)` wraps any gymnasium env with discrete actions and
an ANSI text render; the four registered `gym_*` envs add a readable description, a success
rule and an expert each. gymnasium is an optional extra: it is imported when such an env is
built, never when turnrl.envs is imported.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .base import Env, StepResult
from .solvers import blackjack_basic_action, tabular_q_values

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
DEFAULT_HORIZON = 100  # step budget when neither the caller nor the gymnasium spec sets one

Describe = Callable[[Any], str]  # gymnasium env -> observation text
Success = Callable[[float, bool, bool], bool]  # (reward, terminated, truncated) -> success


def _gymnasium():
    try:
        import gymnasium
    except ImportError as err:
        raise ImportError("gymnasium environments need the 'gym' extra: pip install 'turnrl[gym]'") from err
    return gymnasium


def newest_id(*env_ids: str) -> str:
    """The first of `env_ids` this gymnasium version registers (Taxi-v4 came with gymnasium 1.2)."""
    registry = _gymnasium().registry
    return next((env_id for env_id in env_ids if env_id in registry), env_ids[-1])


def strip_ansi(text: str) -> str:
    """The ANSI render without colour codes, trailing spaces and surrounding blank lines."""
    return "\n".join(line.rstrip() for line in _ANSI.sub("", text).splitlines()).strip("\n")


def positive_terminal(reward: float, terminated: bool, truncated: bool) -> bool:
    """Default success rule: the episode terminated with a positive reward."""
    return terminated and reward > 0


# Q tables of envs made from an id, shared by every instance (a rollout makes one env per episode).
_Q_TABLES: dict[tuple, Any] = {}
_MAX_Q_TABLES = 16


class GymnasiumTextEnv(Env):
    """A gymnasium env with discrete actions, played by name with a text observation.

    Built by `from_gymnasium`; see the registered `gym_frozenlake`, `gym_taxi`,
    `gym_cliffwalking` and `gym_blackjack` for complete examples.
    """

    def __init__(self, env: str | Any, action_names: dict[str, int], *, describe: Describe | None = None,
                 success: Success = positive_terminal, max_steps: int | None = None, rules: str = "",
                 expert: Callable[["GymnasiumTextEnv"], str] | None = None, render_mode: str | None = "ansi",
                 **env_kwargs: Any) -> None:
        gymnasium = _gymnasium()
        if not action_names or len({n.lower() for n in action_names}) != len(action_names):
            raise ValueError("action_names must map distinct (case-insensitive) names to action ids")
        if isinstance(env, str):
            spec = gymnasium.spec(env)
            budget = max_steps or spec.max_episode_steps or DEFAULT_HORIZON
            self._gym = gymnasium.make(env, render_mode=render_mode, max_episode_steps=budget,
                                       disable_env_checker=True, **env_kwargs)
            self.env_id = env
        else:
            if env_kwargs:
                raise ValueError("env_kwargs are only used with an env id, not an env instance")
            budget = max_steps or DEFAULT_HORIZON
            self._gym, self.env_id = env, getattr(getattr(env, "spec", None), "id", type(env).__name__)
        space = self._gym.action_space
        if not isinstance(space, gymnasium.spaces.Discrete):
            raise ValueError(f"{self.env_id}: only Discrete action spaces can be named, got {space}")
        bad = {n: a for n, a in action_names.items() if not space.contains(int(a))}
        if bad:
            raise ValueError(f"{self.env_id}: action ids {bad} are outside {space}")
        self._names = list(action_names)
        self._ids = {name: int(a) for name, a in action_names.items()}
        self.max_steps = budget
        self._describe = describe or (lambda e: strip_ansi(e.render()))
        self._success_rule, self._rules, self._expert = success, rules, expert
        self._q_key = (env, repr(sorted(env_kwargs.items())), budget) if isinstance(env, str) else None
        self._q: Any = None
        self._obs: Any = None
        self._steps = 0
        self._done = self._terminated = self._truncated = self._success = False
        self._last_reward = 0.0

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self._obs, _ = self._gym.reset(seed=self._next_episode_seed(seed), options=options)
        self._steps = 0
        self._terminated = self._truncated = self._success = False
        self._last_reward = 0.0
        return self.render(), {"max_steps": self.max_steps}

    def step(self, action: str) -> StepResult:
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        if self._terminated or self._truncated:
            return self._after_done_step(self._terminated, self._truncated, self._success)
        name = self._match_action(action)
        if name is None:
            return self._invalid_step(action)
        before = self._obs
        self._obs, reward, terminated, truncated, _ = self._gym.step(self._ids[name])
        self._steps += 1
        self._terminated, self._truncated = bool(terminated), bool(truncated)
        self._last_reward = float(reward)
        done = self._terminated or self._truncated
        self._success = bool(done and self._success_rule(float(reward), self._terminated, self._truncated))
        info = {"success": self._success, "action_valid": True, "action_effective": bool(self._obs != before or done),
                "steps_left": self.max_steps - self._steps}
        return StepResult(self.render(), float(reward), self._terminated, self._truncated, info)

    def available_actions(self) -> list[str]:
        return list(self._names)

    def render(self) -> str:
        return self._describe(self._gym.unwrapped) if self._obs is not None else ""

    def system_prompt(self) -> str:
        names = ", ".join(self._names)
        return (
            f"You are playing the gymnasium environment {self.env_id}.\n"
            f"{self._rules + chr(10) if self._rules else ''}"
            f"Actions: {names}. You have at most {self.max_steps} actions.\n"
            f"Answer with one action inside <answer>...</answer>, e.g. <answer>{self._names[0]}</answer>."
        )

    def expert_action(self) -> str:
        if self._obs is None or self._terminated or self._truncated:
            return self._names[0]
        if self._expert is not None:
            return self._expert(self)
        return self._planned_action()

    def close(self) -> None:
        self._gym.close()

    # ------------------------------------------------------------------ experts

    def _planned_action(self) -> str:
        """Best action by finite-horizon value iteration on the env's transition table `P`."""
        table = getattr(self._gym.unwrapped, "P", None)
        if table is None:
            raise ValueError(f"{self.env_id} has no transition table P; pass expert= to from_gymnasium")
        if self._q is None:
            self._q = _Q_TABLES.get(self._q_key) if self._q_key else None
            if self._q is None:
                self._q = tabular_q_values(table, len(table), int(self._gym.action_space.n), self.max_steps)
                if self._q_key:
                    if len(_Q_TABLES) >= _MAX_Q_TABLES:
                        _Q_TABLES.pop(next(iter(_Q_TABLES)))
                    _Q_TABLES[self._q_key] = self._q
        row = self._q[max(1, self.max_steps - self._steps), int(self._obs)]
        by_id = {a: name for name, a in self._ids.items()}
        named = sorted(by_id)
        best = max(named, key=lambda a: (row[a], -a))  # ties: lowest action id
        return by_id[best]


def from_gymnasium(env_id_or_env: str | Any, action_names: dict[str, int], *, describe: Describe | None = None,
                   success: Success = positive_terminal, max_steps: int | None = None, rules: str = "",
                   expert: Callable[[GymnasiumTextEnv], str] | None = None, render_mode: str | None = "ansi",
                   **env_kwargs: Any) -> GymnasiumTextEnv:
    """Wrap a gymnasium env (id or instance) with discrete actions as a turnrl text env.

    action_names: {"Left": 0, ...}; the model answers with a name (any case).
    describe: gymnasium env (unwrapped) -> observation text; default: its ANSI render without
    colour codes. render_mode: passed to `gymnasium.make` ("ansi"; None for envs without it).
    success: (reward, terminated, truncated) -> bool for the final step; default: terminated
    with a positive reward. max_steps: action budget (default: the spec's max_episode_steps,
    else 100). rules: text for the system prompt. expert: env -> action name; default:
    finite-horizon value iteration on `env.unwrapped.P` (FrozenLake, Taxi, CliffWalking).
    Extra keyword arguments go to `gymnasium.make`.
    """
    return GymnasiumTextEnv(env_id_or_env, action_names, describe=describe, success=success, max_steps=max_steps,
                            rules=rules, expert=expert, render_mode=render_mode, **env_kwargs)


# ---------------------------------------------------------------------- the four registered envs


def _describe_frozen_lake(env: Any) -> str:
    rows = [[c.decode() for c in line] for line in env.desc.tolist()]
    r, c = divmod(int(env.s), env.ncol)
    rows[r][c] = "P"
    return "\n".join("".join(row) for row in rows)


def _describe_taxi(env: Any) -> str:
    taxi_row, taxi_col, passenger, destination = env.decode(int(env.s))
    letters = "RGYB"
    if passenger == 4:
        where = "in the taxi"
    elif passenger == destination:  # only after a correct drop-off: start states never have it
        where = f"delivered at {letters[passenger]}"
    else:
        where = f"waiting at {letters[passenger]}"
    board = strip_ansi(env.render()).splitlines()[:7]  # the map, without the "(last action)" line
    return "\n".join(board) + (f"\nTaxi at row {taxi_row}, col {taxi_col}. Passenger {where}. "
                               f"Destination: {letters[destination]}.")


def _describe_blackjack(env: Any) -> str:
    player, dealer = list(env.player), list(env.dealer)
    total = sum(player) + (10 if 1 in player and sum(player) + 10 <= 21 else 0)
    soft = " (usable ace)" if 1 in player and sum(player) + 10 <= 21 else ""
    return f"Your cards: {', '.join(map(str, player))} (sum {total}{soft}). Dealer shows: {dealer[0]}."


class GymFrozenLakeEnv(GymnasiumTextEnv):
    """Gymnasium FrozenLake-v1 (fixed 4x4 map, slippery) as a text env.

    Observation:
        The map, one row per line: `S` start, `F` frozen, `H` hole, `G` goal, `P` you, e.g.
        "PFFF\\nFHFH\\nFFFH\\nHFFG".
    Actions:
        Left, Down, Right, Up. Slippery (gymnasium default): the intended move with
        probability 1/3, each perpendicular move with 1/3.
    Rewards:
        gymnasium's: 1.0 on the goal, else 0. Success: terminated with a positive reward.
    Episode end:
        Terminated on the goal or in a hole; truncated after `max_steps` (100, the spec's).
    Arguments:
        max_steps (100); any FrozenLake-v1 argument, e.g. is_slippery=False, map_name="8x8".
        The expert is finite-horizon value iteration on `env.unwrapped.P`: it maximises the
        chance of reaching the goal within the remaining steps (about 0.74 from the start).
    """

    name = "gym_frozenlake"
    action_names = ("Left", "Down", "Right", "Up")

    def __init__(self, max_steps: int | None = None, **env_kwargs: Any) -> None:
        super().__init__("FrozenLake-v1", {"Left": 0, "Down": 1, "Right": 2, "Up": 3},
                         describe=_describe_frozen_lake, max_steps=max_steps, rules=(
                             "Walk across the frozen lake from S to the goal G without falling into a hole H. "
                             "P marks you, F is safe ice. The ice is slippery unless stated otherwise: you may "
                             "slide sideways. Reaching G gives reward 1."), **env_kwargs)


class GymTaxiEnv(GymnasiumTextEnv):
    """Gymnasium Taxi-v4 (v3 before gymnasium 1.2) as a text env: pick up the passenger, drop them off.

    Observation:
        gymnasium's ANSI map without colours (`R G Y B` stops, `|` walls, `:` open
        passages), then "Taxi at row r, col c. Passenger waiting at Y (or in the taxi).
        Destination: G." Rows and columns count from 0 at the top left.
    Actions:
        South, North, East, West, Pickup, Dropoff.
    Rewards:
        gymnasium's: -1 per step, +20 for a correct drop-off, -10 for an illegal pickup or
        drop-off. Success: terminated (only a correct drop-off terminates).
    Episode end:
        Terminated on the correct drop-off; truncated after `max_steps` (200, the spec's).
    Arguments:
        max_steps (200); any Taxi-v4 argument (is_rainy, fickle_passenger). The expert is
        finite-horizon value iteration on `env.unwrapped.P` (the shortest route).
    """

    name = "gym_taxi"
    action_names = ("South", "North", "East", "West", "Pickup", "Dropoff")

    def __init__(self, max_steps: int | None = None, **env_kwargs: Any) -> None:
        super().__init__(newest_id("Taxi-v4", "Taxi-v3"), {n: i for i, n in enumerate(self.action_names)}, describe=_describe_taxi,
                         success=lambda reward, terminated, truncated: terminated, max_steps=max_steps, rules=(
                             "Drive the taxi to the passenger, pick them up, drive to the destination and drop "
                             "them off. Walls '|' block moves; ':' can be crossed. North decreases the row. "
                             "Each step costs 1, a correct drop-off gives +20, an illegal pickup or drop-off -10."),
                         **env_kwargs)


class GymCliffWalkingEnv(GymnasiumTextEnv):
    """Gymnasium CliffWalking-v1 as a text env: walk along the cliff to the target.

    Observation:
        gymnasium's ANSI render: 4 rows of 12 cells, `x` you, `o` open, `C` cliff, `T` target.
    Actions:
        Up, Right, Down, Left.
    Rewards:
        gymnasium's: -1 per step; stepping into the cliff gives -100 and sends you back to the
        start (bottom left). Success: terminated (reaching T).
    Episode end:
        Terminated on the target; truncated after `max_steps` (100; the spec sets none).
    Arguments:
        max_steps (100); any CliffWalking-v1 argument (is_slippery). The expert is
        finite-horizon value iteration on `env.unwrapped.P` (the 13-step path along the cliff).
    """

    name = "gym_cliffwalking"
    action_names = ("Up", "Right", "Down", "Left")

    def __init__(self, max_steps: int | None = None, **env_kwargs: Any) -> None:
        super().__init__(newest_id("CliffWalking-v1", "CliffWalking-v0"), {"Up": 0, "Right": 1, "Down": 2, "Left": 3},
                         success=lambda reward, terminated, truncated: terminated, max_steps=max_steps, rules=(
                             "Walk from the bottom-left corner to the target T in the bottom-right corner. x is "
                             "you, o open ground, C the cliff. Each step costs 1; stepping into the cliff costs "
                             "100 and sends you back to the start."), **env_kwargs)


def _blackjack_expert(env: GymnasiumTextEnv) -> str:
    player_sum, dealer_card, usable_ace = env._obs
    return ("Stick", "Hit")[blackjack_basic_action(int(player_sum), int(dealer_card), bool(usable_ace))]


class GymBlackjackEnv(GymnasiumTextEnv):
    """Gymnasium Blackjack-v1 as a text env: beat the dealer without going over 21.

    Observation:
        "Your cards: 10, 7 (sum 17). Dealer shows: 9." ("(usable ace)" when an ace counts as
        11). After the hand ends, a line with the dealer's cards and the outcome is added.
    Actions:
        Stick, Hit.
    Rewards:
        gymnasium's: +1 win, 0 draw, -1 loss (Sutton & Barto rules, the spec's default).
        Success: terminated with a positive reward (a win).
    Episode end:
        Terminated when you stick or go bust.
    Arguments:
        max_steps (100); any Blackjack-v1 argument (natural, sab). The expert plays basic
        strategy for hit/stick-only Blackjack (wins about 43% of hands).
    """

    name = "gym_blackjack"
    action_names = ("Stick", "Hit")

    def __init__(self, max_steps: int | None = None, **env_kwargs: Any) -> None:
        super().__init__("Blackjack-v1", {"Stick": 0, "Hit": 1}, describe=self._describe, max_steps=max_steps,
                         expert=_blackjack_expert, render_mode=None, rules=(
                             "Get a hand closer to 21 than the dealer without going over. Aces count 1 or 11, "
                             "face cards 10. Hit takes a card; Stick ends your turn and the dealer draws to 17. "
                             "A win gives +1, a draw 0, a loss -1."), **env_kwargs)

    def _describe(self, env: Any) -> str:
        text = _describe_blackjack(env)
        if self._terminated or self._truncated:
            outcome = {1.0: "You win", 0.0: "Draw", -1.0: "You lose"}.get(self._last_reward, "Hand over")
            dealer = ", ".join(map(str, env.dealer))
            text += f"\nDealer's cards: {dealer}. {outcome} (reward {self._last_reward:+g})."
        return text
