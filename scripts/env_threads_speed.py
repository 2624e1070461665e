"""Rollout time of an env that waits, one env step after another vs. `rollout.env_threads` threads.

    .venv/bin/python scripts/env_threads_speed.py            # docs/performance.md, "What each number is bound by"

An env that sleeps 50 ms per step (a stand-in for a web call, a subprocess or a sandbox) plays 16 start states x 8
episodes of up to 3 turns with a scripted engine (fixed valid replies, no model), so the rollout is env-bound. Each
setting runs twice; every run must give the same episodes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from scripted import ScriptedEngine  # noqa: E402  (tests/scripted.py: an engine that replies from a list)

from turnrl.context import ChatRenderer  # noqa: E402
from turnrl.engines import SamplingParams  # noqa: E402
from turnrl.envs.frozen_lake import FrozenLakeEnv  # noqa: E402
from turnrl.models import build_tiny_tokenizer  # noqa: E402
from turnrl.rollout import RolloutSettings, run_episodes  # noqa: E402


class SlowLake(FrozenLakeEnv):
    """Deterministic FrozenLake whose every step waits 50 ms."""

    def __init__(self):
        super().__init__(slippery=False)

    def step(self, action):
        time.sleep(0.05)
        return super().step(action)


def main() -> None:
    tok = build_tiny_tokenizer()
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    reference = None
    for threads in (0, 8, 32) * 2:
        settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False,
                                   env_timeout=60, env_threads=threads)
        engine = ScriptedEngine(tok, ["Up</answer><|im_end|>", "Left</answer><|im_end|>"])
        start = time.perf_counter()
        trajs = run_episodes(engine, renderer, SlowLake, list(range(16)), 8, settings,
                             SamplingParams(max_new_tokens=16), env_name="slow_lake")
        seconds = time.perf_counter() - start
        played = [(t.ids, t.turn_rewards, t.end_reason) for t in trajs]
        reference = reference or played
        assert played == reference, "threads changed the episodes"
        print(f"env_threads {threads:>2}: {len(trajs)} episodes, {sum(t.num_turns for t in trajs)} turns, "
              f"rollout {seconds:.2f} s, time inside the envs {sum(t.env_seconds for t in trajs):.2f} s", flush=True)


if __name__ == "__main__":
    main()
