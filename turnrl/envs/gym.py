"""Gymnasium, both ways: every turnrl env as a `gymnasium.Env` with Text spaces, and gymnasium envs as turnrl envs.

    import gymnasium
    import turnrl.envs.gym  # registers "turnrl/Sokoban-v0", "turnrl/Countdown-v0", ...

    env = gymnasium.make("turnrl/Sokoban-v0")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("Up")

Importing this module needs gymnasium (the `gym` extra) and registers the turnrl envs with
gymnasium, like gymnasium's own env packages do. The other direction, `from_gymnasium`, lives
in `turnrl.envs.toy_text` and is re-exported here.
"""

from __future__ import annotations

import copy
import re
import string
from typing import Any

try:
    import gymnasium
    from gymnasium.spaces import Text
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("turnrl.envs.gym needs gymnasium: pip install 'turnrl[gym]'") from err

from .base import Env
from .registry import ENVS, make
from .toy_text import GymnasiumTextEnv, from_gymnasium

# Printable ASCII plus newline and tab, and the `√` of the Sokoban / FrozenLake grids: every
# symbol the built-in envs print. Other characters (an echoed model action, a question from
# your own data) are replaced by "?" in observations so they always lie in the space.
CHARSET = "".join(sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n\t" + "√")))
MAX_OBS_LENGTH = 4096  # longer observations are cut (the 8x8 coordinate Sokoban uses ~600)
MAX_ACTION_LENGTH = 256  # longest sampled action; step() accepts any string
NAMESPACE = "turnrl"

# Gymnasium ids of the built-in envs; other registered names are CamelCased (my_env -> MyEnv).
GYM_NAMES = {
    "bandit": "Bandit", "bandit_test": "BanditTest", "bandit_format": "BanditFormat",
    "frozen_lake": "FrozenLake", "frozen_lake_det": "FrozenLakeDet",
    "sokoban": "Sokoban", "sokoban_8x8": "Sokoban8x8", "sokoban_alt_vocab": "SokobanAltVocab",
    "countdown": "Countdown", "math_qa": "MathQA", "math_qa_jsonl": "MathQAJsonl",
    "sudoku_4x4": "Sudoku4x4", "sudoku_9x9": "Sudoku9x9",
}
_OUTSIDE = re.compile(f"[^{re.escape(CHARSET)}]")


class TurnrlGymEnv(gymnasium.Env):
    """A turnrl text env as a gymnasium env: `Text` observations and actions, same semantics.

    Observation space: `Text(max_obs_length, min_length=0, charset=CHARSET)`; characters
    outside CHARSET become "?" and longer observations are cut to `max_obs_length` (4096).
    Action space: `Text(max_action_length, min_length=0, charset=CHARSET)`; `step` passes any
    string to the turnrl env, which never raises on bad text. `reset(seed=s)` plays the same
    episode as the turnrl env's `reset(seed=s)`; infos are the turnrl infos (copied).
    `render_mode="ansi"` makes `render()` return the turnrl env's `render()` text.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, env: str | Env = "sokoban", render_mode: str | None = None,
                 max_obs_length: int = MAX_OBS_LENGTH, max_action_length: int = MAX_ACTION_LENGTH,
                 **env_kwargs: Any) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if isinstance(env, str):
            self.env = make(env, **env_kwargs)
        elif env_kwargs:
            raise ValueError("env_kwargs are only used with an env name, not an env instance")
        else:
            self.env = env
        self.render_mode = render_mode
        self.observation_space = Text(max_obs_length, min_length=0, charset=CHARSET)
        self.action_space = Text(max_action_length, min_length=0, charset=CHARSET)
        self.max_obs_length = max_obs_length

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        super().reset(seed=seed)
        obs, info = self.env.reset(seed=seed, options=options)
        return self._fit(obs), copy.deepcopy(info)

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._fit(obs), float(reward), bool(terminated), bool(truncated), copy.deepcopy(info)

    def render(self) -> str | None:
        return self.env.render() if self.render_mode == "ansi" else None

    def system_prompt(self) -> str:
        """The turnrl env's rules, for building the model's prompt."""
        return self.env.system_prompt()

    def close(self) -> None:
        self.env.close()

    def _fit(self, text: str) -> str:
        return _OUTSIDE.sub("?", text)[: self.max_obs_length]


def gym_id(name: str) -> str:
    """Gymnasium id of a registered turnrl env, e.g. "sokoban" -> "turnrl/Sokoban-v0"."""
    camel = GYM_NAMES.get(name) or "".join(part[:1].upper() + part[1:] for part in re.split(r"[_\W]+", name))
    return f"{NAMESPACE}/{camel}-v0"


def register_gymnasium_envs() -> list[str]:
    """Register every turnrl-native env (not the gym_* wrappers) with gymnasium; returns the new ids.

    Runs on import; call it again after `turnrl.envs.register(...)` to expose your own envs.
    """
    added = []
    for name, factory in sorted(ENVS.items()):
        target = getattr(factory, "func", factory)
        if isinstance(target, type) and issubclass(target, GymnasiumTextEnv):
            continue  # already a gymnasium env: use gymnasium.make on the original id
        env_id = gym_id(name)
        if env_id in gymnasium.registry:
            continue
        gymnasium.register(id=env_id, entry_point=f"{__name__}:TurnrlGymEnv", kwargs={"env": name})
        added.append(env_id)
    return added


register_gymnasium_envs()

__all__ = ["CHARSET", "GymnasiumTextEnv", "TurnrlGymEnv", "from_gymnasium", "gym_id", "register_gymnasium_envs"]
