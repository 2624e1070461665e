"""How well does a model judge? Serves a model with turnrl's OpenAI-compatible server and asks it, through
turnrl.judge, to score FrozenLake episodes whose outcome is known: in each group (same start state) half the
episodes are the solver's (they reach the goal) and half play random moves. Prints the share of requests that
parsed and the pairwise accuracy: how often a successful episode got a higher score than a failed one of its group
(ties count half; 0.5 = chance).

    python scripts/judge_probe.py [--model smollm2-135m-instruct] [--groups 8] [--mode group]

docs/algorithms.md ("LLM-judge rewards") records what it measured.
"""
from __future__ import annotations

import argparse
import random
import time

from turnrl.config import JudgeConfig, ModelConfig, TrainConfig
from turnrl.envs import make
from turnrl.judge import Judge
from turnrl.prepare import build_policy
from turnrl.serve import AgentServer
from turnrl.trajectory import Trajectory

ACTIONS = ["Up", "Down", "Left", "Right"]


def episode(seed: int, group: int, solver: bool, rng: random.Random, max_turns: int = 6) -> Trajectory:
    env = make("frozen_lake_det")
    obs, _ = env.reset(seed=seed)
    transcript, rewards, success = [("user", obs)], [], False
    for _ in range(max_turns):
        action = env.expert_action() if solver else rng.choice(ACTIONS)
        reply = f"<answer>{action}</answer>"
        obs, reward, term, trunc, info = env.step(action)
        transcript += [("assistant", reply), ("user", obs)]
        rewards.append(float(reward))
        if term or trunc:
            success = bool(info["success"])
            break
    return Trajectory(ids=(0,), loss_mask=(1,), logprobs=(0.0,), turn_spans=((0, 1),) * len(rewards),
                      turn_rewards=tuple(rewards), terminated=True, truncated=False, success=success,
                      env_name="frozen_lake_det", seed=seed, group_id=group, num_actions=len(rewards),
                      valid_turns=len(rewards), end_reason="env", transcript=tuple(transcript))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--mode", choices=("group", "single"), default="group")
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()
    rng = random.Random(0)
    trajs = []
    for g in range(args.groups):
        members = [episode(1000 + g, g, solver, rng) for solver in (True, False, True, False)]
        trajs += members
    policy = build_policy(TrainConfig(model=ModelConfig(name=args.model)))
    server = AgentServer(policy, model_name="judge", port=0, max_batch=8, default_max_tokens=args.max_tokens).start()
    try:
        judge = Judge(JudgeConfig(url=server.url, mode=args.mode, max_tokens=args.max_tokens, retries=0,
                                  env_reward=False, concurrency=8))
        t0 = time.perf_counter()
        judged, stats = judge(trajs)
        seconds = time.perf_counter() - t0
    finally:
        server.stop()
    # the episodes of a failed request are left out of `judged`: pair the groups that came back whole
    pairs = wins = 0.0
    for g in range(args.groups):
        originals = [t for t in trajs if t.group_id == g]
        scored = [t for t in judged if t.group_id == g]
        if len(scored) != len(originals):
            continue
        members = [(o.success, k.total_reward) for o, k in zip(originals, scored)]
        for s_ok, v_ok in members:
            for s_bad, v_bad in members:
                if s_ok and not s_bad:
                    pairs += 1
                    wins += 1.0 if v_ok > v_bad else 0.5 if v_ok == v_bad else 0.0
    solved = sum(t.success for t in trajs)
    print(f"model {args.model}, mode {args.mode}: {stats.requests} requests, {stats.failed} without valid scores "
          f"({1 - stats.failed / max(1, stats.requests):.2f} parsed), {seconds:.0f} s; episodes solved {solved} of "
          f"{len(trajs)}; pairwise accuracy {wins / pairs if pairs else float('nan'):.2f} over {pairs:.0f} "
          "(successful, failed) pairs (0.5 = chance)")


if __name__ == "__main__":
    main()
