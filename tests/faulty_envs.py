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
    """Deterministic FrozenLake whose observations grow by `growth` words every turn (and whose first
    one can be made `first` words long): pushes episodes past the context budget."""

    def __init__(self, growth: int = 40, first: int = 0, **kwargs):
        super().__init__(slippery=False, **kwargs)
        self.growth, self.first, self.turn = growth, first, 0

    def reset(self, *, seed=None, options=None):
        self.turn = 0
        obs, info = super().reset(seed=seed, options=options)
        return obs + " pad" * self.first, info

    def step(self, action):
        self.turn += 1
        obs, reward, terminated, truncated, info = super().step(action)
        return obs + " more" * (self.growth * self.turn), reward, terminated, truncated, info
