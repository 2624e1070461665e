"""Evaluation of served models: the env loop of `turnrl.rollout`, in chat messages instead of token ids.

Each episode keeps its conversation as messages (system rules, observations, the model's replies); a
turn sends every active conversation to the server at once (the engine spreads them over its
concurrency limit), parses the replies with the same parser and steps the envs with the same `act`
as training rollouts, so success and return mean exactly what they mean in `turnrl eval`.

Differences to token-level rollouts: there is no response prefix (the server's reply must carry the
whole `<think>…</think><answer>…</answer>` or `<answer>…</answer>`; `turnrl serve` adds the prefix its
agent was trained with itself), and no context budget (the server enforces its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from turnrl.config import TrainConfig
from turnrl.context import SUMMARY_INSTRUCTION, reflection_of, summary_message
from turnrl.engines.base import SamplingParams
from turnrl.engines.openai import OpenAIEngine
from turnrl.envs import make
from turnrl.evaluate import EvalResult, eval_arguments, summarize
from turnrl.parsing import parse_reply
from turnrl.rollout import act


@dataclass
class ChatEpisode:
    """One episode played through a chat server (the fields `evaluate.summarize` reads)."""

    env: object
    seed: int
    messages: list[dict]
    turn_rewards: list[float] = field(default_factory=list)
    valid_turns: int = 0
    success: bool = False
    done: bool = False

    @property
    def total_reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def failed(self) -> bool:
        """Always False: this loop does not isolate env faults (an env error stops the evaluation)."""
        return False


def context_messages(messages: list[dict], r) -> list[dict]:
    """The messages sent for the next reply under the run's context policy (`rollout.context`, see
    turnrl.context): the whole conversation (full), the system message plus the last
    `rollout.context_window` exchanges and the newest observation (window), or the system message plus
    one user message with the previous reply's reflection and answer and the newest observation (summary)."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(head):]  # user, assistant, user, ..., user
    if r.context == "window":
        return head + body[-(2 * r.context_window + 1):]
    if r.context == "summary" and len(body) > 1:
        reflection, answer = reflection_of(body[-2]["content"], None, r.max_new_tokens)
        return head + [{"role": "user", "content": summary_message(reflection, answer, body[-1]["content"])}]
    return messages


def run_chat_episodes(engine: OpenAIEngine, make_env: Callable[[], object], seeds: list[int], k: int,
                      cfg: TrainConfig, params: SamplingParams) -> list[ChatEpisode]:
    """Plays `k` episodes per seed with the served model, at most `cfg.rollout.max_turns` replies each."""
    r = cfg.rollout
    episodes = []
    for seed in seeds:
        for _ in range(k):
            env = make_env()
            obs, _ = env.reset(seed=seed)
            rules = env.system_prompt() if cfg.env.system_prompt else None
            if r.context == "summary":
                rules = f"{rules}\n\n{SUMMARY_INSTRUCTION}" if rules else SUMMARY_INSTRUCTION
            system = [{"role": "system", "content": rules}] if rules else []
            episodes.append(ChatEpisode(env, seed, system + [{"role": "user", "content": obs}]))
    try:
        for _turn in range(r.max_turns):
            active = [e for e in episodes if not e.done]
            if not active:
                break
            for ep, reply in zip(active, engine.chat([context_messages(e.messages, r) for e in active], params)):
                parsed = parse_reply(reply.text, think=r.think, max_actions=r.max_actions_per_turn,
                                     split=not ep.env.free_text, strict=r.strict_format)
                obs, reward, terminated, truncated, success, _n_valid, all_valid = act(ep.env, parsed.actions, parsed.ok)
                valid = parsed.ok and all_valid
                ep.valid_turns += int(valid)
                ep.turn_rewards.append(reward + (0.0 if valid else r.format_penalty))
                ep.messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": obs}]
                if terminated or truncated:
                    ep.done, ep.success = True, success
    finally:
        for ep in episodes:
            ep.env.close()
    return episodes


def evaluate_served(engine: OpenAIEngine, cfg: TrainConfig, *, env_name: str | None = None,
                    episodes: int | None = None, k: int | None = None, temperature: float | None = None,
                    greedy: bool | None = None) -> tuple[EvalResult, list[ChatEpisode]]:
    """`turnrl.evaluate.evaluate` for a served model: same seeds, same metrics, same defaults."""
    env_name, episodes, k, temperature, greedy = eval_arguments(cfg, env_name, episodes, k, temperature, greedy)
    make_env = lambda: make(env_name, **cfg.env.kwargs)  # noqa: E731
    seeds = list(range(episodes))
    sampled = run_chat_episodes(engine, make_env, seeds, k, cfg,
                                SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=temperature))
    summary = summarize(sampled, k)
    greedy_rate = None
    if greedy:
        g = run_chat_episodes(engine, make_env, seeds, 1, cfg,
                              SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, greedy=True))
        greedy_rate = summarize(g, 1)["success_rate"]
    result = EvalResult(success_rate=summary["success_rate"], mean_return=summary["mean_return"],
                        pass_at_k=summary["pass_at_k"], k=k, episodes=episodes, temperature=temperature,
                        valid_turn_rate=summary["valid_turn_rate"], mean_turns=summary["mean_turns"],
                        greedy_success_rate=greedy_rate)
    return result, sampled
