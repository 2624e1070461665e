"""Text environments for multi-turn RL: base class, registry and the built-in games.

Built-ins include `bandit`, `frozen_lake` (slippery), `sokoban` and its variants,
`countdown`, `math_qa` (UFO multi-turn math); `list_envs()` has them all and docs/envs.md
describes each. Use `make(name, **kwargs)`; `make("mypkg.mod:MyEnv")` loads your own env class.
"""

from .bandit import BanditEnv
from .base import Env, StepResult, check_env, has_solver
from .countdown import CountdownEnv
from .frozen_lake import FrozenLakeEnv
from .math_qa import MathQAEnv
from .qa import MultiTurnQAEnv, StaticQAEnv
from .registry import ADAPTERS, ENVS, UnknownEnvError, env_summary, list_envs, make, register
from .remote import RemoteEnv, RemoteEnvError
from .rgym import ReasoningGymEnv
from .role_chain import RoleChainEnv
from .sokoban import SokobanEnv
from .sudoku import SudokuEnv
from .tarena import TextArenaEnv
from .tools import CalculatorMathEnv, ToolEnv, ToolError, tool
from .toy_text import GymBlackjackEnv, GymCliffWalkingEnv, GymFrozenLakeEnv, GymTaxiEnv

register("bandit", BanditEnv)
register("bandit_test", BanditEnv, split="test")
register("bandit_format", BanditEnv, split="format")
register("frozen_lake", FrozenLakeEnv, slippery=True)
register("frozen_lake_det", FrozenLakeEnv, slippery=False)
register("sokoban", SokobanEnv)
register("sokoban_8x8", SokobanEnv, dim=8, num_boxes=2)
register("sokoban_alt_vocab", SokobanEnv, vocab="alt")
register("countdown", CountdownEnv)
register("math_qa", MathQAEnv)
register("math_qa_jsonl", StaticQAEnv)
register("sudoku_4x4", SudokuEnv, size=4)
register("sudoku_9x9", SudokuEnv, size=9)
# gymnasium toy text, played by action name (gymnasium is imported only when one is made)
register("gym_frozenlake", GymFrozenLakeEnv)
register("gym_taxi", GymTaxiEnv)
register("gym_cliffwalking", GymCliffWalkingEnv)
register("gym_blackjack", GymBlackjackEnv)
register("role_chain", RoleChainEnv)
register("tool_math", CalculatorMathEnv)  # tool calling (JSON function calls); ToolEnv for your own tools
# Reasoning Gym's ~100 procedural tasks (reasoning-gym is imported only when one is made)
register("reasoning_gym", ReasoningGymEnv)
# TextArena's 100+ text games, single- and multi-player (textarena is imported only when one is made)
register("textarena", TextArenaEnv)
ADAPTERS["remote"] = RemoteEnv  # needs url: served by `turnrl env-server` (turnrl.env_server)

__all__ = [
    "ADAPTERS",
    "ENVS",
    "BanditEnv",
    "CountdownEnv",
    "Env",
    "FrozenLakeEnv",
    "MathQAEnv",
    "MultiTurnQAEnv",
    "ReasoningGymEnv",
    "RemoteEnv",
    "RemoteEnvError",
    "RoleChainEnv",
    "SokobanEnv",
    "StaticQAEnv",
    "StepResult",
    "SudokuEnv",
    "TextArenaEnv",
    "ToolEnv",
    "ToolError",
    "CalculatorMathEnv",
    "UnknownEnvError",
    "check_env",
    "has_solver",
    "env_summary",
    "list_envs",
    "make",
    "register",
    "tool",
]
