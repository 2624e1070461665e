"""Text environments for multi-turn RL: base class, registry and the built-in games.

Built-ins: `bandit`, `bandit_test`, `frozen_lake` (slippery), `frozen_lake_det`, `sokoban`.
Use `make(name, **kwargs)`; `make("mypkg.mod:MyEnv")` loads your own env class.
"""

from .bandit import BanditEnv
from .base import Env, StepResult, check_env
from .frozen_lake import FrozenLakeEnv
from .registry import ENVS, UnknownEnvError, env_summary, list_envs, make, register
from .sokoban import SokobanEnv

register("bandit", BanditEnv)
register("bandit_test", BanditEnv, split="test")
register("frozen_lake", FrozenLakeEnv, slippery=True)
register("frozen_lake_det", FrozenLakeEnv, slippery=False)
register("sokoban", SokobanEnv)

__all__ = [
    "ENVS",
    "BanditEnv",
    "Env",
    "FrozenLakeEnv",
    "SokobanEnv",
    "StepResult",
    "UnknownEnvError",
    "check_env",
    "env_summary",
    "list_envs",
    "make",
    "register",
]
