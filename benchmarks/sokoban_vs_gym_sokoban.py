"""Sokoban throughput: turnrl's env vs. gym-sokoban (the generator RAGEN wraps), 6x6 rooms with 1 box.

An episode is: generate a room, reset, then play an optimal solution to the end, rendering the text
observation after every step (what an LLM agent sees).

- turnrl: `SokobanEnv.reset(seed)` generates the room by reverse play and already knows its optimal
  solution (`expert_action`); each `step` returns the text grid.
- gym-sokoban: `SokobanEnv(dim_room=(6, 6), num_boxes=1).reset()` generates the room; each `step` (push
  actions 1-4, `tiny_rgb_array` observation, its cheapest) is followed by a RAGEN-style text rendering of
  `room_state`. It has no solver: the solution comes from turnrl's BFS solver, and that time is NOT
  counted for the peer (in its favour).

Each side runs `--repeats` times, the two sides in turn, and keeps its fastest run. Prints episodes and env
steps per second for each, and last the ratio peer seconds per episode / turnrl seconds per episode.

    pip install 'turnrl[bench]'   # gym-sokoban needs setuptools<81 (pkg_resources)
    python benchmarks/sokoban_vs_gym_sokoban.py [--episodes 300]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
import warnings

import numpy as np

from turnrl.envs.sokoban import SokobanEnv
from turnrl.envs.solvers import sokoban_solve

GYM_ACTION = {"Up": 1, "Down": 2, "Left": 3, "Right": 4}  # gym-sokoban's push actions
SYMBOLS = np.array(list("#_O√XP"))  # room_state codes 0..5: wall, floor, target, box on target, box, player


def turnrl_episodes(n: int) -> tuple[int, float]:
    env, steps = SokobanEnv(dim=6, num_boxes=1, max_steps=100), 0
    t0 = time.perf_counter()
    for seed in range(n):
        env.reset(seed=seed)
        done = False
        while not done:
            _obs, _r, terminated, truncated, _info = env.step(env.expert_action())
            done, steps = terminated or truncated, steps + 1
    return steps, time.perf_counter() - t0


def gym_text(room_state: np.ndarray) -> str:
    return "\n".join("".join(row) for row in SYMBOLS[room_state])


def gym_solution(env) -> list[str]:
    fixed, state = env.room_fixed, env.room_state
    width = fixed.shape[1]
    cells = lambda arr, *codes: {int(r) * width + int(c) for r, c in zip(*np.nonzero(np.isin(arr, codes)))}  # noqa: E731
    (player,) = cells(state, 5)
    plan = sokoban_solve(cells(fixed, 0), width, player, cells(state, 3, 4), cells(fixed, 2))
    return plan or []


def gym_episodes(n: int) -> tuple[int, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from gym_sokoban.envs.sokoban_env import SokobanEnv as GymSokoban
    env, steps, seconds = GymSokoban(dim_room=(6, 6), num_boxes=1, max_steps=100, reset=False), 0, 0.0
    np.random.seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # its generator prints "[SOKOBAN] Retry" on failed rooms
        for _ in range(n):
            t0 = time.perf_counter()
            env.reset(render_mode="tiny_rgb_array")
            gym_text(env.room_state)
            seconds += time.perf_counter() - t0
            plan = gym_solution(env)  # not timed: gym-sokoban has no solver
            t0 = time.perf_counter()
            for action in plan:
                env.step(GYM_ACTION[action], observation_mode="tiny_rgb_array")
                gym_text(env.room_state)
            seconds += time.perf_counter() - t0
            steps += len(plan)
    return steps, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    turnrl_episodes(10)  # warm-up
    ours, peer = [], []
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both sides alike
        ours.append(turnrl_episodes(args.episodes))
        peer.append(gym_episodes(args.episodes))
    (ours_steps, ours_s), (peer_steps, peer_s) = min(ours, key=lambda x: x[1]), min(peer, key=lambda x: x[1])
    print(f"turnrl: {args.episodes} episodes, {ours_steps} steps in {ours_s:.2f} s = "
          f"{args.episodes / ours_s:.0f} episodes/s, {(ours_steps + args.episodes) / ours_s:.0f} resets+steps/s")
    print(f"gym-sokoban: {args.episodes} episodes, {peer_steps} steps in {peer_s:.2f} s = "
          f"{args.episodes / peer_s:.0f} episodes/s, {(peer_steps + args.episodes) / peer_s:.0f} resets+steps/s "
          f"(solver time not counted)")
    print(f"ratio peer/turnrl (seconds per episode): {peer_s / ours_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
