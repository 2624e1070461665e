"""Env instances kept from one rollout or evaluation to the next (`rollout.reuse_envs`).

Envs whose construction is expensive (a subprocess, a browser, a container, a large dataset) would otherwise be
built for every episode of every rollout. With a pool, an episode takes an idle env and resets it with its own
seed, and an episode that ends without an env error gives its env back instead of closing it. That is exact for
envs that follow the contract `check_env` checks: the same seed gives the same episode, on a new instance or on
one that has played before (gymnasium's reset semantics). An env that raised or timed out is never reused.
"""

from __future__ import annotations

import threading
from typing import Callable


class EnvPool:
    """Makes envs with `make_env` when none is idle; callable like `make_env` (`run_episodes` takes either)."""

    def __init__(self, make_env: Callable[[], object]):
        self._make = make_env
        self._idle: list = []
        self._lock = threading.Lock()  # env threads (rollout.env_threads) take envs concurrently
        self.made = 0  # envs constructed so far

    def __call__(self):
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.made += 1
        return self._make()  # outside the lock: construction is the slow part, and may run in several threads

    def give(self, env) -> None:
        """Takes back the env of an episode that ended without an env error."""
        with self._lock:
            self._idle.append(env)

    def close(self) -> list[BaseException]:
        """Closes the idle envs (at the end of a run); returns what their `close` raised, having closed the rest."""
        with self._lock:
            idle, self._idle = self._idle, []
        errors = []
        for env in idle:
            try:
                env.close()
            except Exception as err:  # user code: one env failing to close must not leave the others open
                errors.append(err)
        return errors
