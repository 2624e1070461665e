"""The multi-turn loop: groups × samples of episodes, rendered as chat, extended turn by turn in token ids.

Each episode is one growing token sequence. The model's tokens are appended exactly as sampled
(loss mask 1, with their logprobs); everything else (system prompt, observations, chat-template glue)
is tokenised once when it is appended (loss mask 0). Nothing already in the sequence is ever
re-tokenised, so the trainer sees the very ids the engine produced.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from turnrl.engines.base import Completion, Engine, SamplingParams
from turnrl.faults import format_error, time_limit
from turnrl.parsing import parse_reply

_CALLS = itertools.count()
_USER_SLOT, _ASSISTANT_SLOT = "\x00USER\x00", "\x00ASSISTANT\x00"


class ChatRenderer:
    """Turns observations into token ids with the tokenizer's own chat template.

    The glue between an assistant reply and the next user message is found once, by rendering a
    conversation with placeholder contents and cutting the text around them. That works for any
    template that renders earlier messages the same way whether or not more follow (ChatML, Llama 3,
    SmolLM2, Qwen2.5); other templates are refused with a clear error rather than silently mis-masked.
    """

    def __init__(self, tokenizer, *, system_prompt: str | None, response_prefix: str = ""):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.prefix = response_prefix
        self.eos_text = tokenizer.eos_token
        base = self._messages(_USER_SLOT) + [{"role": "assistant", "content": _ASSISTANT_SLOT}]
        closed = tokenizer.apply_chat_template(base, tokenize=False)
        extended = tokenizer.apply_chat_template(base + [{"role": "user", "content": _USER_SLOT}],
                                                 tokenize=False, add_generation_prompt=True)
        if not extended.startswith(closed) or _ASSISTANT_SLOT not in closed:
            raise ValueError("this chat template re-renders earlier turns when a turn is added; "
                             "turnrl needs an append-only template for exact multi-turn token ids")
        after_reply = closed[closed.rindex(_ASSISTANT_SLOT) + len(_ASSISTANT_SLOT):]
        # If the template closes a reply with the eos token, the model samples it itself; we only add
        # what comes after it (usually "\n").
        self._after_eos = after_reply[len(self.eos_text):] if after_reply.startswith(self.eos_text) else after_reply
        self._closes_with_eos = after_reply.startswith(self.eos_text)
        self._before_obs, self._after_obs = extended[len(closed):].split(_USER_SLOT)

    def _messages(self, first_user: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": first_user}]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, observation: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(self._messages(observation), tokenize=False,
                                                  add_generation_prompt=True)
        return self.encode(text + self.prefix)

    def continuation_ids(self, observation: str, *, reply_ended: bool) -> list[int]:
        """Ids that close the model's reply and open the next turn with `observation`."""
        close = "" if (reply_ended or not self._closes_with_eos) else self.eos_text
        return self.encode(close + self._after_eos + self._before_obs + observation + self._after_obs + self.prefix)


@dataclass(frozen=True)
class Trajectory:
    """One finished episode, ready for training."""

    ids: tuple[int, ...]
    loss_mask: tuple[int, ...]           # 1 on tokens the model sampled, 0 elsewhere
    logprobs: tuple[float, ...]          # sampling logprob on model tokens, 0.0 elsewhere
    turn_spans: tuple[tuple[int, int], ...]  # [start, end) of each model reply in `ids`
    turn_rewards: tuple[float, ...]      # env reward of each turn plus the format penalty
    terminated: bool
    truncated: bool
    success: bool
    env_name: str
    seed: int
    group_id: int
    num_actions: int                     # valid actions executed
    valid_turns: int                     # turns whose reply parsed and held only valid actions
    end_reason: str                      # "env" | "turn_budget" | "context_budget" | "env_error"
    transcript: tuple[tuple[str, str], ...] = ()  # (role, text) for logs and the trajectory viewer
    error: str = ""                      # end_reason "env_error": env name, seed and traceback

    @property
    def failed(self) -> bool:
        """The env raised or hung: the episode is lost and must not be trained on or scored."""
        return self.end_reason == "env_error"

    @property
    def total_reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_spans)


@dataclass
class EpisodeBuilder:
    """Accumulates one episode's token ids, mask and logprobs; shared by rollouts and SFT demos."""

    ids: list[int]
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    transcript: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.mask = [0] * len(self.ids)
        self.logprobs = [0.0] * len(self.ids)

    def add_model(self, ids, logprobs) -> None:
        start = len(self.ids)
        self.ids.extend(ids)
        self.mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)
        self.spans.append((start, len(self.ids)))

    def add_context(self, ids) -> None:
        self.ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))


@dataclass(frozen=True)
class RolloutSettings:
    max_turns: int = 5
    max_actions_per_turn: int = 1
    max_new_tokens: int = 64
    max_context_tokens: int = 2048
    think: bool = True
    format_penalty: float = -0.1
    env_timeout: float = 0.0  # seconds per env reset/step before the episode fails; 0 = no limit


@dataclass
class _Episode:
    env: object
    builder: EpisodeBuilder
    seed: int
    group_id: int
    done: bool = False
    terminated: bool = False
    truncated: bool = False
    success: bool = False
    num_actions: int = 0
    valid_turns: int = 0
    end_reason: str = ""
    error: str = ""

    def fail(self, err: BaseException, env_name: str, during: str) -> None:
        self.done, self.end_reason = True, "env_error"
        self.error = f"env {env_name!r} seed {self.seed}: {during} raised\n{format_error(err)}"


def invalid_format_message(env) -> str:
    return "Invalid answer format: reply with <answer>action</answer>.\n" + env.render()


def act(env, actions: tuple[str, ...], parsed_ok: bool) -> tuple[str, float, bool, bool, bool, int, bool]:
    """Runs a turn's actions; returns obs, env reward, terminated, truncated, success, n_valid, all_valid."""
    if not parsed_ok:
        return invalid_format_message(env), 0.0, False, False, False, 0, False
    obs, total, terminated, truncated, success, n_valid, all_valid = "", 0.0, False, False, False, 0, True
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        _check_observation(obs)
        total += float(reward)
        success = bool(info.get("success", False))
        if info.get("action_valid", False):
            n_valid += 1
        else:
            all_valid = False
        if terminated or truncated:
            break
    return obs, total, terminated, truncated, success, n_valid, all_valid


def _check_observation(obs) -> None:
    if not isinstance(obs, str):
        raise TypeError(f"the env returned an observation of type {type(obs).__name__}, not str")


def run_episodes(engine: Engine, renderer: ChatRenderer, make_env: Callable[[], object], seeds: list[int],
                 group_size: int, settings: RolloutSettings, params: SamplingParams,
                 env_name: str = "") -> list[Trajectory]:
    """Plays `group_size` episodes per seed (a group shares its seed, hence its start state).

    All active episodes of a turn are generated in one engine call; an episode leaves the batch as
    soon as it ends (env done, turn budget, or context budget). An env whose reset, step or close raises,
    or takes longer than `settings.env_timeout`, loses only its own episode: it ends with end_reason
    "env_error" and the traceback in `error` (Trajectory.failed), and the others play on.
    """
    episodes: list[_Episode] = []
    for group_id, seed in enumerate(seeds):
        for _ in range(group_size):
            ep = _Episode(None, EpisodeBuilder([]), seed, group_id)
            episodes.append(ep)
            try:
                with time_limit(settings.env_timeout):
                    ep.env = make_env()
                    obs, _info = ep.env.reset(seed=seed)
                    _check_observation(obs)
            except Exception as err:  # the env is user code: whatever it raises loses only this episode
                ep.fail(err, env_name, "reset")
                continue
            ep.builder = EpisodeBuilder(renderer.prompt_ids(obs))
            ep.builder.transcript.append(("user", obs))
            if len(ep.builder.ids) + settings.max_new_tokens > settings.max_context_tokens:
                # the first observation alone leaves no room for a reply: no turn is played
                ep.done, ep.truncated, ep.end_reason = True, True, "context_budget"

    # Keys are unique per call so an engine's per-episode cache never outlives this rollout (the
    # weights change after it).
    call = next(_CALLS)
    try:
        for turn in range(settings.max_turns):
            active = [i for i, e in enumerate(episodes) if not e.done]
            if not active:
                break
            completions: list[Completion] = engine.generate([episodes[i].builder.ids for i in active], params,
                                                            keys=[(call, i) for i in active])
            for i, completion in zip(active, completions):
                _advance(episodes[i], completion, renderer, settings, last_turn=turn == settings.max_turns - 1,
                         env_name=env_name)
            engine.release([(call, i) for i in active if episodes[i].done])
    finally:
        engine.release([(call, i) for i in range(len(episodes))])

    trajectories = []
    for ep in episodes:
        try:
            with time_limit(settings.env_timeout):
                if ep.env is not None:
                    ep.env.close()
        except Exception as err:  # user code, as above
            if not ep.error:
                ep.fail(err, env_name, "close")
        b = ep.builder
        trajectories.append(Trajectory(
            ids=tuple(b.ids), loss_mask=tuple(b.mask), logprobs=tuple(b.logprobs), turn_spans=tuple(b.spans),
            turn_rewards=tuple(b.rewards), terminated=ep.terminated, truncated=ep.truncated, success=ep.success,
            env_name=env_name, seed=ep.seed, group_id=ep.group_id, num_actions=ep.num_actions,
            valid_turns=ep.valid_turns, end_reason=ep.end_reason, transcript=tuple(b.transcript), error=ep.error))
    return trajectories


def _advance(ep: _Episode, completion: Completion, renderer: ChatRenderer, settings: RolloutSettings,
             *, last_turn: bool, env_name: str = "") -> None:
    b = ep.builder
    b.add_model(completion.ids, completion.logprobs)
    # Decoding is for the env only; training uses the sampled ids above.
    text = renderer.tokenizer.decode(list(completion.ids), skip_special_tokens=True)
    reply = parse_reply(renderer.prefix + text, think=settings.think, max_actions=settings.max_actions_per_turn,
                        split=not ep.env.free_text)
    b.transcript.append(("assistant", renderer.prefix + text))
    try:
        with time_limit(settings.env_timeout):
            obs, reward, terminated, truncated, success, n_valid, all_valid = act(ep.env, reply.actions, reply.ok)
    except Exception as err:  # the env is user code: whatever it raises loses only this episode
        b.rewards.append(0.0)
        ep.fail(err, env_name, "step")
        return
    valid = reply.ok and all_valid
    ep.num_actions += n_valid
    ep.valid_turns += int(valid)
    b.rewards.append(reward + (0.0 if valid else settings.format_penalty))
    b.transcript.append(("user", obs))
    if terminated or truncated:
        ep.done, ep.terminated, ep.truncated, ep.success, ep.end_reason = True, terminated, truncated, success, "env"
        return
    if last_turn:
        ep.done, ep.truncated, ep.end_reason = True, True, "turn_budget"
        return
    cont = renderer.continuation_ids(obs, reply_ended=completion.finish_reason == "stop")
    if len(b.ids) + len(cont) + settings.max_new_tokens > settings.max_context_tokens:
        ep.done, ep.truncated, ep.end_reason = True, True, "context_budget"
        return
    b.add_context(cont)
