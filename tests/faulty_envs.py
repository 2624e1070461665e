"""Envs that misbehave on purpose, for the fault-tolerance tests (loaded as 'faulty_envs:Class')."""

import itertools
import time

from turnrl.envs.frozen_lake import FrozenLakeEnv


class FlakyLake(FrozenLakeEnv):
    """Deterministic FrozenLake whose every `every`-th instance fails: `mode` = 'reset' or 'step' raises,
    'hang' spins in pure Python on its first step, 'sleep' blocks in time.sleep on its first step."""

    counter = itertools.count()

    def __init__(self, mode: str = "step", every: int = 5, **kwargs):
        super().__init__(slippery=False, **kwargs)
        self.mode = mode
        self.broken = next(FlakyLake.counter) % every == every - 1

    def reset(self, *, seed=None, options=None):
        if self.broken and self.mode == "reset":
            raise RuntimeError(f"reset exploded on seed {seed}")
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self.broken and self.mode == "step":
            raise ZeroDivisionError("step exploded")
        if self.broken and self.mode == "hang":
            while True:
                pass
        if self.broken and self.mode == "sleep":
            time.sleep(3600)
        return super().step(action)


class ChattyLake(FrozenLakeEnv):
    """Deterministic FrozenLake whose rendering grows by `growth` words each time it is shown (after
    reset, a step or an invalid reply), and whose first observation can be padded with `first` words:
    pushes episodes past the context budget."""

    def __init__(self, growth: int = 40, first: int = 0, **kwargs):
        super().__init__(slippery=False, **kwargs)
        self.growth, self.first, self.shown = growth, first, -1

    def reset(self, *, seed=None, options=None):
        self.shown = -1
        obs, info = super().reset(seed=seed, options=options)
        return obs + " pad" * self.first, info

    def render(self) -> str:
        self.shown += 1
        return super().render() + " more" * (self.growth * self.shown)
