"""Warm start from solver demonstrations: behaviour cloning on the exact chat token layout of rollouts.

Demonstrations are built with the same `ChatRenderer` and `TurnContext` as rollouts, so SFT and
RL train on identical sequences under every context policy (full history, window, self-summary). With `epsilon > 0` each action is replaced by a uniformly random one
with that probability and the label is the action actually taken: the demos are noisy, which leaves
room for RL to improve on behaviour cloning.
"""

from __future__ import annotations

import math
import random
from typing import Callable

import torch

from turnrl.algos.losses import token_logprobs_entropy
from turnrl.attention import gqa_attention
from turnrl.context import ChatRenderer, TurnContext
from turnrl.parsing import format_reply
from turnrl.rollout import RolloutSettings
from turnrl.trajectory import Trajectory
from turnrl.batch import collate
from turnrl.forward import model_token_logits, plan, sharable_head


def demonstration(env, renderer: ChatRenderer, seed: int, settings: RolloutSettings, epsilon: float,
                  rng: random.Random) -> Trajectory:
    """Plays one episode with the env's expert (epsilon-noisy) and records it as a trajectory."""
    obs, _ = env.reset(seed=seed)
    ctx = TurnContext(renderer, settings, obs)
    builder = ctx.builder
    eos = renderer.tokenizer.eos_token_id
    terminated = truncated = success = False
    num_actions = 0
    for turn in range(settings.max_turns):
        actions, reward = [], 0.0
        for _ in range(1 if env.free_text else settings.max_actions_per_turn):
            choices = env.available_actions()  # [] for free-text envs: no random alternative exists
            action = rng.choice(choices) if choices and rng.random() < epsilon else env.expert_action()
            actions.append(action)
            obs, r, terminated, truncated, info = env.step(action)
            reward += r
            num_actions += 1
            success = bool(info.get("success", False))
            if terminated or truncated:
                break
        text = format_reply(actions, think=settings.think)
        assert text.startswith(renderer.prefix)
        reply_ids = renderer.encode(text[len(renderer.prefix):]) + [eos]
        ctx.add_reply(reply_ids, [0.0] * len(reply_ids), text)
        builder.rewards.append(reward)
        builder.transcript.append(("user", obs))
        if terminated or truncated or turn == settings.max_turns - 1:
            break
        ctx.commit(obs, ctx.next_prompt(obs, reply_ended=True))
    env.close()
    return Trajectory(tuple(builder.ids), tuple(builder.mask), tuple(builder.logprobs), tuple(builder.spans),
                      tuple(builder.rewards), terminated, truncated, success, "", seed, 0, num_actions,
                      len(builder.spans), "env", transcript=tuple(builder.transcript),
                      row_starts=None if ctx.row_starts is None else tuple(ctx.row_starts))


def make_demonstrations(make_env: Callable[[], object], renderer: ChatRenderer, seeds: list[int],
                        settings: RolloutSettings, epsilon: float, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    return [demonstration(make_env(), renderer, s, settings, epsilon, rng) for s in seeds]


def sft(policy, demos: list[Trajectory], *, steps: int, batch_size: int, lr: float, micro_batch_tokens: int,
        seed: int = 0, bf16: bool = False, shared_prefix: bool = True,
        on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Cross-entropy on the model tokens of `demos` (AdamW, 10-step warm-up, cosine decay to 10%).

    Returns the per-step losses. The loss of a batch is the mean over its model tokens. With `shared_prefix`
    the demonstrations' common prompt head runs once per micro-batch, as in the RL update (turnrl.shared_prefix).
    """
    if not demos:
        raise ValueError("SFT needs at least one demonstration")
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = min(10, steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    policy.train()
    for step in range(steps):
        if len(order) < batch_size:  # epochs over shuffled demos
            more = list(range(len(demos)))
            rng.shuffle(more)
            order.extend(more)
        chosen, order = order[:batch_size], order[batch_size:]
        batch = collate([demos[i] for i in chosen], policy.pad_token_id, policy.device)
        total_tokens = batch.mask.sum().clamp(min=1)
        step_loss = 0.0
        rows = list(range(batch.size))
        head = sharable_head(policy.lm, batch, rows, enabled=shared_prefix)
        with gqa_attention(policy.lm):  # grouped-query attention without repeat_kv copies (turnrl.attention)
            for mb in plan(batch, rows, micro_batch_tokens, head):
                # the LM head runs only where a demonstrated token is predicted
                logits, targets, _, _ = model_token_logits(policy.lm, batch, mb, share=head is not None, bf16=bf16)
                logps = token_logprobs_entropy(logits, targets, entropy=False)[0]
                loss = -logps.sum() / total_tokens
                loss.backward()
                step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, step_loss)
    return losses
