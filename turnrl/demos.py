"""`turnrl demos ENV`: the env's solver played as chat conversations, written as JSONL for any SFT trainer.

One line per episode: {"messages": [system, user, assistant, user, ...], "env", "seed", "success", "return",
"turns"}. The messages are the conversation turnrl's own SFT warm start and rollouts use (the env's system prompt
unless left out, its observations as user turns, replies `<answer>A</answer>` or `<think></think><answer>A</answer>`), in the
"messages" format TRL's SFTTrainer and most chat fine-tuning tools read. With `epsilon` > 0 an action is replaced
by a random valid one with that probability (noisy demonstrations, as `sft.epsilon`). Seeds start at turnrl's SFT
seed range by default, so exported demonstrations never hold a start state of turnrl's held-out evaluation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from turnrl.config import SFT_SEED_BASE
from turnrl.envs import make
from turnrl.parsing import format_reply


def demo_episode(env, seed: int, *, max_turns: int, max_actions_per_turn: int = 1, think: bool = False,
                 epsilon: float = 0.0, system_prompt: bool = True, rng: random.Random | None = None) -> dict:
    """One expert episode from `seed` as a chat record (the module docstring's format); without `system_prompt`
    the conversation starts at the first observation (as turnrl's runs with env.system_prompt=false)."""
    rng = rng or random.Random(seed)
    obs, _ = env.reset(seed=seed)
    messages = [{"role": "system", "content": env.system_prompt()}] if system_prompt else []
    messages.append({"role": "user", "content": obs})
    total, success, turns = 0.0, False, 0
    for _ in range(max_turns):
        actions, done = [], False
        for _ in range(1 if env.free_text else max_actions_per_turn):
            choices = env.available_actions()
            action = rng.choice(choices) if choices and rng.random() < epsilon else env.expert_action()
            actions.append(action)
            obs, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            success = bool(info.get("success", False))
            done = terminated or truncated
            if done:
                break
        turns += 1
        messages.append({"role": "assistant", "content": format_reply(actions, think=think)})
        if done:
            break
        messages.append({"role": "user", "content": obs})
    return {"messages": messages, "env": getattr(env, "name", ""), "seed": seed, "success": success,
            "return": total, "turns": turns}


def demo_records(env_name: str, episodes: int, *, env_kwargs: dict | None = None, first_seed: int = SFT_SEED_BASE,
                 max_turns: int = 10, max_actions_per_turn: int = 1, think: bool = False,
                 epsilon: float = 0.0, system_prompt: bool = True) -> Iterator[dict]:
    """`episodes` demonstration records from seeds `first_seed`, `first_seed + 1`, ..., one env reused."""
    env = make(env_name, **(env_kwargs or {}))
    try:
        for seed in range(first_seed, first_seed + episodes):
            yield demo_episode(env, seed, max_turns=max_turns, max_actions_per_turn=max_actions_per_turn,
                               think=think, epsilon=epsilon, system_prompt=system_prompt, rng=random.Random(seed))
    finally:
        env.close()


def write_demos(path: Path, records) -> dict:
    """Writes `records` as JSONL to `path` (through a temporary file: an interrupted export leaves nothing half
    written); returns {episodes, success_rate, mean_turns}."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = solved = turns = 0
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            n, solved, turns = n + 1, solved + record["success"], turns + record["turns"]
    tmp.replace(path)
    return {"episodes": n, "success_rate": solved / max(n, 1), "mean_turns": turns / max(n, 1)}
