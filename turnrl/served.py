"""Evaluation of served models: the episode loop of `turnrl.rollout` (`play`), in chat messages instead of token ids.

Each episode keeps its conversation as messages (system rules, observations, the model's replies); a
turn sends every live conversation to the server at once (the engine spreads them over its
concurrency limit), parses the replies with the same parser and steps the envs with the same guarded
`act` as training rollouts (env faults and timeouts lose only their episode), so success, return and
`env_errors` mean exactly what they mean in `turnrl eval`.

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
from turnrl.evaluate import EvalResult, eval_arguments, eval_result, settings_for
from turnrl.rollout import EpisodeState, close_envs, open_envs, play, play_replies


@dataclass(kw_only=True)
class ChatEpisode(EpisodeState):
    """One episode played through a chat server (the fields `evaluate.summarize` and `qa_summary` read)."""

    group_id: int
    messages: list[dict] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    valid_turns: int = 0
    success: bool = False

    @property
    def total_reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_rewards)

    @property
    def transcript(self) -> tuple[tuple[str, str], ...]:
        """(role, text) of the conversation after the system message, as Trajectory.transcript."""
        return tuple((m["role"], m["content"]) for m in self.messages if m["role"] != "system")


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
                      cfg: TrainConfig, params: SamplingParams, env_name: str = "") -> list[ChatEpisode]:
    """Plays `k` episodes per seed with the served model, at most `cfg.rollout.max_turns` replies each, in the
    episode loop of token-level rollouts (`turnrl.rollout.play`): `rollout.max_live_episodes` bounds the envs
    alive at once, and an env whose reset, step or close raises or exceeds `rollout.env_timeout` loses only its
    own episode (end_reason "env_error", `failed`), as in `run_episodes`. Episodes come back seed by seed."""
    settings = settings_for(cfg)
    rules = None
    episodes = [ChatEpisode(seed=seed, group_id=g) for g, seed in enumerate(seeds) for _ in range(k)]

    def start(indices: list[int]) -> None:
        nonlocal rules
        eps = [episodes[i] for i in indices]
        for ep, obs in zip(eps, open_envs(eps, make_env, settings, env_name)):
            if obs is None:
                continue
            if rules is None:  # the rules are the env's, the same for every episode
                rules = ep.env.system_prompt() if cfg.env.system_prompt else ""
                if settings.context == "summary":
                    rules = f"{rules}\n\n{SUMMARY_INSTRUCTION}" if rules else SUMMARY_INSTRUCTION
            ep.messages = ([{"role": "system", "content": rules}] if rules else []) + [{"role": "user", "content": obs}]

    def turn(live: list[int]) -> None:
        replies = engine.chat([context_messages(episodes[i].messages, settings) for i in live], params)
        outcomes = play_replies([episodes[i] for i in live], [reply.text for reply in replies], settings, env_name)
        for i, reply, played in zip(live, replies, outcomes):
            ep = episodes[i]
            ep.turns += 1
            if played is None:
                ep.turn_rewards.append(0.0)
                continue
            obs, reward, terminated, truncated, success, _n_valid, valid = played
            ep.valid_turns += int(valid)
            ep.turn_rewards.append(reward)
            ep.messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": obs}]
            if terminated or truncated:
                ep.done, ep.success, ep.end_reason = True, success, "env"
            elif ep.turns == settings.max_turns:
                ep.done, ep.end_reason = True, "turn_budget"

    def end(ended: list[int]) -> None:
        close_envs([episodes[i] for i in ended], settings, env_name)

    play(episodes, k, settings.max_live, start=start, turn=turn, end=end)
    return episodes


def evaluate_served(engine: OpenAIEngine, cfg: TrainConfig, *, env_name: str | None = None,
                    episodes: int | None = None, k: int | None = None, temperature: float | None = None,
                    greedy: bool | None = None) -> tuple[EvalResult, list[ChatEpisode]]:
    """`turnrl.evaluate.evaluate` for a served model: same seeds, same metrics, same defaults."""
    env_name, episodes, k, temperature, greedy = eval_arguments(cfg, env_name, episodes, k, temperature, greedy)
    make_env = lambda: make(env_name, **cfg.env.kwargs)  # noqa: E731
    seeds = list(range(episodes))
    sampled = run_chat_episodes(engine, make_env, seeds, k, cfg,
                                SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=temperature),
                                env_name=env_name)
    greedy_episodes = None
    if greedy:
        greedy_episodes = run_chat_episodes(engine, make_env, seeds, 1, cfg,
                                            SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, greedy=True),
                                            env_name=env_name)
    return eval_result(sampled, greedy_episodes, k=k, episodes=episodes, temperature=temperature, make_env=make_env,
                       settings=settings_for(cfg)), sampled
