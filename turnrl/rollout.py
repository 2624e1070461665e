"""The multi-turn loop: groups × samples of episodes, rendered as chat, extended turn by turn in token ids.

Context policies (`RolloutSettings.context`) decide what the model sees at each turn:

* ``full`` (RAGEN, UFO): the whole history. Each episode is one growing token sequence: the model's
  tokens are appended exactly as sampled (loss mask 1, with their logprobs); everything else (system
  prompt, observations, chat-template glue) is tokenised once when it is appended (loss mask 0).
* ``window`` (VAGEN): the last `context_window` turns (observation + reply) and the newest observation.
  The prompt is assembled from the same once-tokenised pieces as under ``full`` (the sampled reply ids
  and the continuation glue), only the window's first observation is rendered afresh as the opening
  user message.
* ``summary`` (ERA's self-summary): the system prompt plus one user message holding the model's own
  reflection and plan from its previous reply (the text of its ``<think>`` block) and the newest
  observation; the context length stays bounded whatever the number of turns.

Under ``window`` and ``summary`` a turn's prompt is not a prefix of the next one, so an episode cannot be
one training sequence: each turn is its own training sample (`RolloutSettings.turn_rows`, ERA/SkyRL's
turn-as-sample training), holding the exact prompt ids the engine was given followed by the exact
sampled ids. ``full`` can be trained either way. Nothing already given to the engine is re-tokenised,
so the trainer sees the very ids the engine produced.
"""

from __future__ import annotations

import inspect
import itertools
import re
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from turnrl.engines.base import Completion, Engine, SamplingParams
from turnrl.faults import format_error, time_limit
from turnrl.parsing import parse_reply

_CALLS = itertools.count()
_USER_SLOT, _ASSISTANT_SLOT = "\x00USER\x00", "\x00ASSISTANT\x00"

CONTEXTS = ("full", "window", "summary")
# Appended to the system prompt under the `summary` policy (it creates one if the env has none).
SUMMARY_INSTRUCTION = ("Earlier turns are not shown again: each turn you see only your own reflection from your "
                       "previous reply and the newest observation. Inside <think>, say what you have learned "
                       "so far and your plan for the next steps.")


def summary_message(reflection: str, answer: str, observation: str) -> str:
    """The user message of every turn after the first under the `summary` context policy."""
    return (f"Your reflection and plan from your previous reply:\n{reflection or '(none)'}\n"
            f"Your previous answer: {answer or '(none)'}\n\n"
            f"Current observation:\n{observation}")


def reflection_of(reply: str, tokenizer, max_tokens: int) -> tuple[str, str]:
    """(reflection, answer) of a reply `<think>reflection</think><answer>answer</answer>`, tolerant of
    unclosed tags: the reflection is the text after `<think>` up to `</think>` or `<answer>`. With a
    tokenizer, each is cut to `max_tokens` tokens so the next prompt's length stays bounded (a served
    model's reply, which has no tokenizer here, is already bounded by its max_tokens)."""
    text = reply
    if "<think>" in text:
        text = text.split("<think>", 1)[1]
    reflection = re.split(r"</think>|<answer>", text, maxsplit=1)[0].strip()
    answer = ""
    if "<answer>" in reply:
        answer = reply.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    if tokenizer is None:
        return reflection, answer
    ids = tokenizer(reflection, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        reflection = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        answer = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    return reflection, answer


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
    # Turn-as-sample episodes (RolloutSettings.turn_rows): turn k's training row is
    # ids[row_starts[k]:turn_spans[k][1]], the exact prompt the engine was given then the sampled reply;
    # the rows are packed back to back in `ids`. None: the whole of `ids` is one training row.
    row_starts: tuple[int, ...] | None = None

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

    def training_rows(self) -> list[tuple[int, int]]:
        """[start, end) in `ids` of each training row: one per turn (turn rows), else the whole episode."""
        if self.row_starts is None:
            return [(0, len(self.ids))]
        return [(start, end) for start, (_, end) in zip(self.row_starts, self.turn_spans)]

    def prompt_lengths(self) -> list[int]:
        """Number of prompt tokens the engine was given at each turn."""
        if self.row_starts is None:
            return [start for start, _ in self.turn_spans]
        return [start - row for row, (start, _) in zip(self.row_starts, self.turn_spans)]


def as_turn_rows(t: Trajectory) -> Trajectory:
    """A full-history episode recorded as one sequence, re-recorded as turn-as-sample rows: turn k's row is
    the sequence up to the end of reply k (its prompt is the history, loss mask 0 on earlier replies).
    This is exactly what `run_episodes` records with context "full" and `turn_rows=True`."""
    if t.row_starts is not None:
        return t
    ids, mask, logprobs, spans, starts = [], [], [], [], []
    for start, end in t.turn_spans:
        starts.append(len(ids))
        ids += t.ids[:end]
        mask += [0] * start + list(t.loss_mask[start:end])
        logprobs += [0.0] * start + list(t.logprobs[start:end])
        spans.append((starts[-1] + start, starts[-1] + end))
    return replace(t, ids=tuple(ids), loss_mask=tuple(mask), logprobs=tuple(logprobs), turn_spans=tuple(spans),
                   row_starts=tuple(starts))


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
    max_context_tokens: int = 2048  # limit of every prompt + reply the engine is given
    think: bool = True
    strict_format: bool = False  # text after </answer> makes the reply invalid (parse_reply's strict)
    format_penalty: float = -0.1
    env_timeout: float = 0.0  # seconds per env reset/step before the episode fails; 0 = no limit
    context: str = "full"     # context policy: full | window | summary (module docstring)
    context_window: int = 2   # window: completed turns kept in the prompt
    turn_rows: bool = False   # one training row per turn (required by window and summary)
    max_live: int = 0         # episodes alive at once (envs + engine caches); 0 = all (run_episodes)

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if self.context_window < 1:
            raise ValueError(f"context_window must be >= 1, got {self.context_window}")
        if self.max_live < 0:
            raise ValueError(f"max_live must be >= 0 (0 = all episodes at once), got {self.max_live}")
        if self.context != "full" and not self.turn_rows:
            raise ValueError(f"context {self.context!r} needs turn_rows=True: its prompts are not prefixes of one sequence")
        if self.context == "summary" and not self.think:
            raise ValueError("context 'summary' carries the model's <think> text between turns: it needs think=True")


class TurnContext:
    """One episode's prompts under a context policy, and its training record (`builder`).

    `prompt` is what the engine is given this turn. After the reply, `add_reply` records it; after the
    env step, `next_prompt(obs)` builds the next turn's prompt and `commit` makes it current (the caller
    checks it against the context budget in between).
    """

    def __init__(self, renderer: ChatRenderer, settings: RolloutSettings, first_obs: str):
        self.renderer, self.settings = renderer, settings
        self.prompt = renderer.prompt_ids(first_obs)
        self.row_starts: list[int] | None = [] if settings.turn_rows else None
        self.builder = EpisodeBuilder([] if settings.turn_rows else list(self.prompt))
        self.builder.transcript.append(("user", first_obs))
        # window: per turn, its observation, the ids that open it in-line (None for turn 0), its reply ids
        self._obs: list[str] = [first_obs]
        self._openings: dict[int, list[int]] = {0: self.prompt}
        self._inline: list[list[int] | None] = [None]
        self._replies: list[list[int]] = []
        self._reply_text = ""
        self._pending: list[int] | None = None  # full, one sequence: the continuation ids to append

    def add_reply(self, ids, logprobs, text: str) -> None:
        b = self.builder
        if self.row_starts is not None:
            self.row_starts.append(len(b.ids))
            b.add_context(self.prompt)
        b.add_model(ids, logprobs)
        b.transcript.append(("assistant", text))
        self._replies.append(list(ids))
        self._reply_text = text

    def next_prompt(self, obs: str, *, reply_ended: bool) -> list[int]:
        """The prompt of the next turn, whose newest observation is `obs` (not yet committed)."""
        r, policy = self.renderer, self.settings.context
        if policy == "summary":
            reflection, answer = reflection_of(self._reply_text, r.tokenizer, self.settings.max_new_tokens)
            self._pending = None
            return r.prompt_ids(summary_message(reflection, answer, obs))
        cont = r.continuation_ids(obs, reply_ended=reply_ended)
        self._pending = cont
        if policy == "full":
            return self.prompt + self._replies[-1] + cont
        # window: the last k completed turns, then the newest observation
        turn = len(self._replies)  # index of the turn being opened
        first = max(0, turn - self.settings.context_window)
        if first not in self._openings:
            self._openings[first] = r.prompt_ids(self._obs[first])
        ids = list(self._openings[first])
        for t in range(first, turn):
            if t > first:
                ids += self._inline[t]
            ids += self._replies[t]
        return ids + cont

    def commit(self, obs: str, prompt: list[int]) -> None:
        if self.row_starts is None:  # full, one sequence: the prompt is the sequence so far
            self.builder.add_context(self._pending)
        self._obs.append(obs)
        self._inline.append(self._pending)
        self.prompt = prompt


@dataclass
class _Episode:
    env: object
    ctx: TurnContext | None
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
    turns: int = 0  # replies generated so far

    def fail(self, err: BaseException, env_name: str, during: str) -> None:
        self.done, self.end_reason = True, "env_error"
        self.error = f"env {env_name!r} seed {self.seed}: {during} raised\n{format_error(err)}"

    @property
    def builder(self) -> EpisodeBuilder:
        return self.ctx.builder if self.ctx is not None else EpisodeBuilder([])


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
    soon as it ends (env done, turn budget, or context budget), and its env is closed and its engine cache
    freed then. `settings.max_live` > 0 bounds the episodes alive at once (their envs and the engine's
    per-episode KV caches): whole groups start as earlier episodes end, and their first turns share engine
    calls with later turns of others. Every episode samples from its own stream (rollout base, episode index,
    its own turn), so the trajectories do not depend on `max_live`. An env whose reset, step or close raises,
    or takes longer than `settings.env_timeout`, loses only its own episode: it ends with end_reason
    "env_error" and the traceback in `error` (Trajectory.failed), and the others play on.
    Trajectories come back in episode order (group by group).
    """
    episodes = [_Episode(None, None, seed, group_id) for group_id, seed in enumerate(seeds) for _ in range(group_size)]
    # Keys are unique per call so an engine's per-episode cache never outlives this rollout (the
    # weights change after it).
    call = next(_CALLS)
    base = stream_base(engine)
    live: list[int] = []
    started = 0  # episodes[:started] have been reset
    try:
        while True:
            # Start whole groups while there is room (always one group when nothing is alive).
            while started < len(episodes) and (settings.max_live <= 0 or not live
                                               or len(live) + group_size <= settings.max_live):
                for i in range(started, started + group_size):
                    _start(episodes[i], make_env, renderer, settings, env_name)
                    if episodes[i].done:
                        _close(episodes[i], settings, env_name)
                    else:
                        live.append(i)
                started += group_size
            if not live:
                break
            streams = {} if base is None else {"seeds": [stream_seed(base, i, episodes[i].turns) for i in live]}
            completions: list[Completion] = engine.generate([episodes[i].ctx.prompt for i in live], params,
                                                            keys=[(call, i) for i in live], **streams)
            for i, completion in zip(live, completions):
                ep = episodes[i]
                _advance(ep, completion, renderer, settings, last_turn=ep.turns == settings.max_turns - 1,
                         env_name=env_name)
                ep.turns += 1
            ended = [i for i in live if episodes[i].done]
            engine.release([(call, i) for i in ended])
            for i in ended:
                _close(episodes[i], settings, env_name)
            live = [i for i in live if not episodes[i].done]
    finally:
        engine.release([(call, i) for i in range(len(episodes))])
        for ep in episodes:
            _close(ep, settings, env_name)

    trajectories = []
    for ep in episodes:
        b = ep.builder
        trajectories.append(Trajectory(
            ids=tuple(b.ids), loss_mask=tuple(b.mask), logprobs=tuple(b.logprobs), turn_spans=tuple(b.spans),
            turn_rewards=tuple(b.rewards), terminated=ep.terminated, truncated=ep.truncated, success=ep.success,
            env_name=env_name, seed=ep.seed, group_id=ep.group_id, num_actions=ep.num_actions,
            valid_turns=ep.valid_turns, end_reason=ep.end_reason, transcript=tuple(b.transcript), error=ep.error,
            row_starts=(None if ep.ctx is None or ep.ctx.row_starts is None else tuple(ep.ctx.row_starts))))
    return trajectories


def _start(ep: _Episode, make_env: Callable[[], object], renderer: ChatRenderer, settings: RolloutSettings,
           env_name: str) -> None:
    """Makes and resets the episode's env and renders its first prompt (or ends it: env error, no room)."""
    try:
        with time_limit(settings.env_timeout):
            ep.env = make_env()
            obs, _info = ep.env.reset(seed=ep.seed)
            _check_observation(obs)
    except Exception as err:  # the env is user code: whatever it raises loses only this episode
        ep.fail(err, env_name, "reset")
        return
    ep.ctx = TurnContext(renderer, settings, obs)
    if len(ep.ctx.prompt) + settings.max_new_tokens > settings.max_context_tokens:
        # the first observation alone leaves no room for a reply: no turn is played
        ep.done, ep.truncated, ep.end_reason = True, True, "context_budget"


def _close(ep: _Episode, settings: RolloutSettings, env_name: str) -> None:
    """Closes the episode's env once (an error while closing fails an episode that had none)."""
    env, ep.env = ep.env, None
    if env is None:
        return
    try:
        with time_limit(settings.env_timeout):
            env.close()
    except Exception as err:  # user code, as above
        if not ep.error:
            ep.fail(err, env_name, "close")


def stream_base(engine) -> int | None:
    """One draw from the engine's generator per rollout, the base of every episode's own sampling stream, so an
    episode's replies do not depend on which episodes share an engine batch (`rollout.gen_batch_size` is a speed
    setting only). None when the engine has no generator or its `generate` takes no `seeds`."""
    generator = getattr(engine, "generator", None)
    if generator is None or "seeds" not in inspect.signature(engine.generate).parameters:
        return None
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def stream_seed(base: int, episode: int, turn: int) -> int:
    """The sampling seed of one episode's turn: a well-mixed function of (rollout base, episode index, turn)."""
    return int(np.random.SeedSequence([base, episode, turn]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _advance(ep: _Episode, completion: Completion, renderer: ChatRenderer, settings: RolloutSettings,
             *, last_turn: bool, env_name: str = "") -> None:
    ctx, b = ep.ctx, ep.builder
    # Decoding is for the env (and the summary policy's reflection) only; training uses the sampled ids.
    text = renderer.tokenizer.decode(list(completion.ids), skip_special_tokens=True)
    ctx.add_reply(completion.ids, completion.logprobs, renderer.prefix + text)
    reply = parse_reply(renderer.prefix + text, think=settings.think, max_actions=settings.max_actions_per_turn,
                        split=not ep.env.free_text, strict=settings.strict_format)
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
    prompt = ctx.next_prompt(obs, reply_ended=completion.finish_reason == "stop")
    if len(prompt) + settings.max_new_tokens > settings.max_context_tokens:
        ep.done, ep.truncated, ep.end_reason = True, True, "context_budget"
        return
    ctx.commit(obs, prompt)
