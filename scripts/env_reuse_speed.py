"""Rollout time of an env that is slow to build, one env per episode vs. `rollout.reuse_envs` (turnrl.env_pool).

    .venv/bin/python scripts/env_reuse_speed.py            # docs/performance.md, "What each number is bound by"

An env whose construction waits 100 ms (a stand-in for starting a subprocess, a browser or a container) plays
three rollouts of 16 start states x 4 episodes of up to 3 turns with a scripted engine (fixed valid replies, no
model), so the rollout is bound by building envs. Both settings must give the same episodes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from scripted import ScriptedEngine  # noqa: E402  (tests/scripted.py: an engine that replies from a list)

from turnrl.context import ChatRenderer  # noqa: E402
from turnrl.engines import SamplingParams  # noqa: E402
from turnrl.env_pool import EnvPool  # noqa: E402
from turnrl.envs.frozen_lake import FrozenLakeEnv  # noqa: E402
from turnrl.models import build_tiny_tokenizer  # noqa: E402
from turnrl.rollout import RolloutSettings, run_episodes  # noqa: E402


class SlowToBuildLake(FrozenLakeEnv):
    """Deterministic FrozenLake whose construction waits 100 ms."""

    def __init__(self):
        time.sleep(0.1)
        super().__init__(slippery=False)


def main() -> None:
    tok = build_tiny_tokenizer()
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False, env_timeout=60)
    reference = None
    for reuse in (False, True) * 2:
        make_env = EnvPool(SlowToBuildLake) if reuse else SlowToBuildLake
        start, played = time.perf_counter(), []
        for rollout in range(3):
            engine = ScriptedEngine(tok, ["Up</answer><|im_end|>", "Left</answer><|im_end|>"])
            trajs = run_episodes(engine, renderer, make_env, list(range(16 * rollout, 16 * rollout + 16)), 4,
                                 settings, SamplingParams(max_new_tokens=16), env_name="slow_lake")
            played += [(t.ids, t.turn_rewards, t.end_reason) for t in trajs]
        seconds = time.perf_counter() - start
        reference = reference or played
        assert played == reference, "reusing envs changed the episodes"
        built = make_env.made if reuse else len(played)
        print(f"reuse_envs {str(reuse):5}: 3 rollouts, {len(played)} episodes, {built} envs built, "
              f"{seconds:.2f} s", flush=True)
        if reuse:
            make_env.close()


if __name__ == "__main__":
    main()
