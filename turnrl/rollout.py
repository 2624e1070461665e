"""The multi-turn loop: groups × samples of episodes, rendered as chat, extended turn by turn in token ids.

All active episodes of a turn are generated in one engine call; every episode keeps its own prompt under the
run's context policy (`turnrl.context`: full history, window or self-summary) and its training record
(`turnrl.trajectory.Trajectory`). Nothing already given to the engine is re-tokenised, so the trainer sees the
very ids the engine produced.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable

import numpy as np
import torch

from turnrl.context import CONTEXTS, ChatRenderer, TurnContext
from turnrl.engines.base import Completion, Engine, SamplingParams
from turnrl.env_pool import EnvPool
from turnrl.env_threads import run_concurrently
from turnrl.faults import EnvTimeout, format_error, time_limit
from turnrl.parsing import parse_reply
from turnrl.trajectory import EpisodeBuilder, Trajectory

_CALLS = itertools.count()


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
    context: str = "full"     # context policy: full | window | summary (turnrl.context)
    context_window: int = 2   # window: completed turns kept in the prompt
    turn_rows: bool = False   # one training row per turn (required by window and summary)
    max_live: int = 0         # episodes alive at once (envs + engine caches); 0 = all (run_episodes)
    env_threads: int = 0      # env resets, steps, closes run concurrently in this many threads (turnrl.env_threads)

    def __post_init__(self):
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {CONTEXTS}, got {self.context!r}")
        if self.context_window < 0:
            raise ValueError(f"context_window must be >= 0, got {self.context_window}")
        if self.max_live < 0:
            raise ValueError(f"max_live must be >= 0 (0 = all episodes at once), got {self.max_live}")
        if self.env_threads < 0:
            raise ValueError(f"env_threads must be >= 0 (0 = env calls in the main thread), got {self.env_threads}")
        if self.context != "full" and not self.turn_rows:
            raise ValueError(f"context {self.context!r} needs turn_rows=True: its prompts are not prefixes of one sequence")
        if self.context == "summary" and not self.think:
            raise ValueError("context 'summary' carries the model's <think> text between turns: it needs think=True")

@dataclass(kw_only=True)
class EpisodeState:
    """What the episode loop (`play`) and env fault isolation need of an episode in play; token-level
    rollouts (`_Episode`) and served evaluation (`turnrl.served.ChatEpisode`) extend it."""

    seed: int
    env: object = None
    done: bool = False
    end_reason: str = ""  # as Trajectory.end_reason
    error: str = ""
    turns: int = 0  # replies generated so far
    env_seconds: float = 0.0  # wall time in the env's construction, reset, steps and close (`env_calls`)
    options: dict | None = None  # passed to the env's `reset` (its group's, `run_episodes(options=...)`)
    env_metrics: dict = field(default_factory=dict)  # the env's `info["metrics"]`, latest value per key (`act`)

    def fail(self, err: BaseException, env_name: str, during: str) -> None:
        self.done, self.end_reason = True, "env_error"
        self.error = f"env {env_name!r} seed {self.seed}: {during} raised\n{format_error(err)}"

    @property
    def failed(self) -> bool:
        """The env raised or hung: the episode is lost and must not be trained on or scored."""
        return self.end_reason == "env_error"


@dataclass(kw_only=True)
class _Episode(EpisodeState):
    group_id: int
    ctx: TurnContext | None = None
    terminated: bool = False
    truncated: bool = False
    success: bool = False
    num_actions: int = 0
    valid_turns: int = 0

    @property
    def builder(self) -> EpisodeBuilder:
        return self.ctx.builder if self.ctx is not None else EpisodeBuilder([])


def invalid_format_message(env) -> str:
    return "Invalid answer format: reply with <answer>action</answer>.\n" + env.render()


def act(env, actions: tuple[str, ...], parsed_ok: bool, metrics: dict | None = None
        ) -> tuple[str, float, bool, bool, bool, int, bool]:
    """Runs a turn's actions; returns obs, env reward, terminated, truncated, success, n_valid, all_valid.
    `metrics` is updated with each step's `info["metrics"]` (the env's own numbers, `env_metric_values`; the
    reset's info may hold them too)."""
    if not parsed_ok:
        return invalid_format_message(env), 0.0, False, False, False, 0, False
    obs, total, terminated, truncated, success, n_valid, all_valid = "", 0.0, False, False, False, 0, True
    for action in actions:
        obs, reward, terminated, truncated, info = env.step(action)
        _check_observation(obs)
        total += float(reward)
        success = bool(info.get("success", False))
        if metrics is not None and info.get("metrics"):
            metrics.update(env_metric_values(info["metrics"]))
        if info.get("action_valid", False):
            n_valid += 1
        else:
            all_valid = False
        if terminated or truncated:
            break
    return obs, total, terminated, truncated, success, n_valid, all_valid


def env_metric_values(reported) -> dict[str, float]:
    """An env's `info["metrics"]`: a dict of names to numbers (bools count as 0/1), logged as `env/<name>` (the
    mean over the episodes that reported it; an episode's latest value per name). Anything else is a bug in the
    env, reported as such."""
    if not isinstance(reported, dict):
        raise TypeError(f'info["metrics"] must be a dict of names to numbers, got {type(reported).__name__}')
    out = {}
    for name, value in reported.items():
        if not isinstance(name, str) or not isinstance(value, (int, float, np.number, np.bool_)):
            raise TypeError(f'info["metrics"] must map names to numbers, got {name!r}: {value!r}')
        out[name] = float(value)
    return out


def _check_observation(obs) -> None:
    if not isinstance(obs, str):
        raise TypeError(f"the env returned an observation of type {type(obs).__name__}, not str")


def run_episodes(engine: Engine, renderer: ChatRenderer, make_env: Callable[[], object], seeds: list[int],
                 group_size: int, settings: RolloutSettings, params: SamplingParams,
                 env_name: str = "", *, first_group: int = 0, base: int | None = None,
                 on_end: Callable[[int], None] | None = None, options: list[dict | None] | None = None
                 ) -> list[Trajectory]:
    """Plays `group_size` episodes per seed (a group shares its seed, hence its start state).

    All active episodes of a turn are generated in one engine call; an episode leaves the batch as
    soon as it ends (env done, turn budget, or context budget), and its env is closed and its engine cache
    freed then. `settings.max_live` > 0 bounds the episodes alive at once (their envs and the engine's
    per-episode KV caches): whole groups start as earlier episodes end, and their first turns share engine
    calls with later turns of others. `make_env` may be an `EnvPool` (rollout.reuse_envs): envs are then taken
    from it and given back. Every episode samples from its own stream (rollout base, episode index,
    its own turn), so the trajectories do not depend on `max_live`. An env whose reset, step or close raises,
    or takes longer than `settings.env_timeout`, loses only its own episode: it ends with end_reason
    "env_error" and the traceback in `error` (Trajectory.failed), and the others play on. `settings.env_threads` > 0
    runs the env calls of episodes that start, play a turn or end together concurrently (turnrl.env_threads).
    Trajectories come back in episode order (group by group). `on_end(n)` is told of every n episodes that end
    together (a progress bar). `options`, one per seed: the `options` of its group's env resets (None: reset
    without options), e.g. the attacks of an attack pool (turnrl.attacks).

    A share of a larger rollout (turnrl.distributed: one worker's groups) passes the index of its first group
    in the whole and the whole's stream `base` (`draw_base`): group ids and sampling streams are then those of
    the whole rollout, so its shares played apart give the trajectories it gives played at once. By default the
    base is drawn from the engine's generator (`stream_base`).
    """
    if options is not None and len(options) != len(seeds):
        raise ValueError(f"options must give one entry per seed: {len(options)} for {len(seeds)} seeds")
    episodes = [_Episode(seed=seed, group_id=first_group + group_id,
                         options=None if options is None else options[group_id])
                for group_id, seed in enumerate(seeds) for _ in range(group_size)]
    first_episode = first_group * group_size
    # Keys are unique per call so an engine's per-episode cache never outlives this rollout (the
    # weights change after it).
    call = next(_CALLS)
    if base is None:
        base = stream_base(engine)
    elif not takes_seeds(engine):
        raise ValueError(f"{type(engine).__name__}.generate takes no per-row seeds: a rollout share cannot "
                         "sample its episodes' own streams")

    def turn(live: list[int]) -> None:
        streams = {} if base is None else {"seeds": [stream_seed(base, first_episode + i, episodes[i].turns)
                                                     for i in live]}
        completions: list[Completion] = engine.generate([episodes[i].ctx.prompt for i in live], params,
                                                        keys=[(call, i) for i in live], **streams)
        texts = []
        for i, completion in zip(live, completions):
            # Decoding is for the env (and the summary policy's reflection) only; training uses the sampled ids.
            text = renderer.prefix + renderer.tokenizer.decode(list(completion.ids), skip_special_tokens=True)
            episodes[i].ctx.add_reply(completion.ids, completion.logprobs, text)
            texts.append(text)
        played = play_replies([episodes[i] for i in live], texts, settings, env_name)
        for i, completion, outcome in zip(live, completions, played):
            ep = episodes[i]
            _advance(ep, completion, outcome, settings, last_turn=ep.turns == settings.max_turns - 1)
            ep.turns += 1

    def end(ended: list[int]) -> None:
        engine.release([(call, i) for i in ended])
        close_envs([episodes[i] for i in ended], settings, env_name,
                   make_env if isinstance(make_env, EnvPool) else None)
        if on_end is not None:
            on_end(len(ended))

    play(episodes, group_size, settings.max_live,
         start=lambda indices: _start([episodes[i] for i in indices], make_env, renderer, settings, env_name),
         turn=turn, end=end)

    trajectories = []
    for ep in episodes:
        b = ep.builder
        trajectories.append(Trajectory(
            ids=tuple(b.ids), loss_mask=tuple(b.mask), logprobs=tuple(b.logprobs), turn_spans=tuple(b.spans),
            turn_rewards=tuple(b.rewards), terminated=ep.terminated, truncated=ep.truncated, success=ep.success,
            env_name=env_name, seed=ep.seed, group_id=ep.group_id, num_actions=ep.num_actions,
            valid_turns=ep.valid_turns, end_reason=ep.end_reason, transcript=tuple(b.transcript), error=ep.error,
            row_starts=(None if ep.ctx is None or ep.ctx.row_starts is None else tuple(ep.ctx.row_starts)),
            env_seconds=ep.env_seconds, env_metrics=tuple(sorted(ep.env_metrics.items()))))
    return trajectories


def play(episodes: list, group_size: int, max_live: int, *, start: Callable[[list[int]], None],
         turn: Callable[[list[int]], None], end: Callable[[list[int]], None]) -> None:
    """The episode loop of token-level rollouts and of served evaluation (turnrl.served): runs `episodes`
    (objects with a `done` flag; `group_size` consecutive ones form a group) until every one is done.

    `start(indices)` begins those episodes (and may end some at once); `turn(live)` plays one turn of every live
    episode in one batch; `end(ended)` frees what ended episodes hold (env, engine cache). `max_live` > 0 bounds
    the episodes alive at once: whole groups start as earlier episodes end (always one group when nothing is
    alive); the groups that start together are begun in one `start` call. `end` is called exactly once for every
    episode `start` was called for, also when an exception leaves the loop."""
    live: list[int] = []
    started = 0  # whole groups episodes[:started] have been started
    begun = 0  # episodes[:begun] have had `start` called (ahead of `started` while their groups start)
    ended: set[int] = set()

    def finish(indices) -> None:
        new = [i for i in indices if i not in ended]
        ended.update(new)
        if new:
            end(new)

    try:
        while True:
            while True:  # start the groups there is room for (counting their members live), then look again
                starting = started
                while starting < len(episodes) and (max_live <= 0 or not live and starting == started
                                                    or len(live) + starting - started + group_size <= max_live):
                    starting += group_size
                if starting == started:
                    break
                begun = starting
                start(list(range(started, starting)))
                for i in range(started, starting):
                    if episodes[i].done:
                        finish([i])
                    else:
                        live.append(i)
                started = starting
            if not live:
                break
            turn(live)
            finish([i for i in live if episodes[i].done])
            live = [i for i in live if not episodes[i].done]
    finally:
        finish(range(begun))


def env_calls(calls: list[Callable[[], object]], settings: RolloutSettings
              ) -> list[tuple[object, BaseException | None, float]]:
    """Runs calls into envs: one after another in the main thread, each under `settings.env_timeout` (SIGALRM,
    turnrl.faults.time_limit), or concurrently in `settings.env_threads` threads (turnrl.env_threads: a call past
    the timeout is abandoned). For each call: (its result, the exception it raised or None, seconds it took)."""
    if settings.env_threads:
        return run_concurrently(calls, settings.env_threads, settings.env_timeout)
    out: list[tuple[object, BaseException | None, float]] = []
    for call in calls:
        start = perf_counter()
        try:
            with time_limit(settings.env_timeout):
                result = call()
            out.append((result, None, perf_counter() - start))
        except Exception as err:  # the env is user code: whatever it raises loses only its own episode
            out.append((None, err, perf_counter() - start))
    return out


def _abandoned(err: BaseException | None, settings: RolloutSettings) -> bool:
    """A call that outlived the timeout in a thread may still be running there: its env is never touched again."""
    return bool(settings.env_threads) and isinstance(err, EnvTimeout)


def open_envs(eps: list[EpisodeState], make_env: Callable[[], object], settings: RolloutSettings, env_name: str
              ) -> list[str | None]:
    """Makes and resets the episodes' envs (`env_calls`); their first observations, None for an episode whose env
    failed (it then ends as an env error). An env whose reset failed is still closed when its episode ends, unless
    it was abandoned to its thread."""
    holders: list[dict] = [{} for _ in eps]

    def opening(ep: EpisodeState, holder: dict) -> str:
        holder["env"] = make_env()
        env = holder["env"]
        obs, info = env.reset(seed=ep.seed) if ep.options is None else env.reset(seed=ep.seed, options=ep.options)
        _check_observation(obs)
        if isinstance(info, dict) and info.get("metrics"):
            ep.env_metrics.update(env_metric_values(info["metrics"]))
        return obs

    out: list[str | None] = []
    runs = env_calls([functools.partial(opening, ep, h) for ep, h in zip(eps, holders)], settings)
    for ep, holder, (obs, err, seconds) in zip(eps, holders, runs):
        ep.env_seconds += seconds
        if not _abandoned(err, settings):
            ep.env = holder.get("env")
        if err is not None:
            ep.fail(err, env_name, "reset")
        out.append(None if err is not None else obs)
    return out


def play_replies(eps: list[EpisodeState], texts: list[str], settings: RolloutSettings, env_name: str) -> list:
    """Parses each episode's reply and plays its actions on its env (`env_calls`): per episode (observation, turn
    reward with the format penalty when the reply was invalid, terminated, truncated, success, valid actions,
    reply valid), or None when the env failed (the episode then ends as an env error)."""
    replies = [parse_reply(text, think=settings.think, max_actions=settings.max_actions_per_turn,
                           split=not ep.env.free_text, strict=settings.strict_format) for ep, text in zip(eps, texts)]
    runs = env_calls([functools.partial(act, ep.env, r.actions, r.ok, ep.env_metrics) for ep, r in zip(eps, replies)],
                     settings)
    out = []
    for ep, reply, (outcome, err, seconds) in zip(eps, replies, runs):
        ep.env_seconds += seconds
        if err is not None:
            if _abandoned(err, settings):
                ep.env = None
            ep.fail(err, env_name, "step")
            out.append(None)
            continue
        obs, reward, terminated, truncated, success, n_valid, all_valid = outcome
        valid = reply.ok and all_valid
        out.append((obs, reward + (0.0 if valid else settings.format_penalty), terminated, truncated, success,
                    n_valid, valid))
    return out


def close_envs(eps: list[EpisodeState], settings: RolloutSettings, env_name: str, pool: EnvPool | None = None
               ) -> None:
    """Closes the episodes' envs once (`env_calls`); an error while closing fails an episode that had none. With
    a `pool` (rollout.reuse_envs), the env of an episode without an env error goes back to it instead."""
    closing = [(ep, ep.env) for ep in eps if ep.env is not None]
    for ep, _ in closing:
        ep.env = None
    if pool is not None:
        for ep, env in closing:
            if not ep.error:
                pool.give(env)
        closing = [(ep, env) for ep, env in closing if ep.error]
    for (ep, _), (_, err, seconds) in zip(closing, env_calls([env.close for _, env in closing], settings)):
        ep.env_seconds += seconds
        if err is not None and not ep.error:
            ep.fail(err, env_name, "close")


def _start(eps: list[_Episode], make_env: Callable[[], object], renderer: ChatRenderer, settings: RolloutSettings,
           env_name: str) -> None:
    """Makes and resets the episodes' envs and renders their first prompts (or ends them: env error, no room)."""
    for ep, obs in zip(eps, open_envs(eps, make_env, settings, env_name)):
        if obs is None:
            continue
        ep.ctx = TurnContext(renderer, settings, obs)
        if len(ep.ctx.prompt) + settings.max_new_tokens > settings.max_context_tokens:
            # the first observation alone leaves no room for a reply: no turn is played
            ep.done, ep.truncated, ep.end_reason = True, True, "context_budget"


def stream_base(engine) -> int | None:
    """One draw from the engine's generator per rollout, the base of every episode's own sampling stream, so an
    episode's replies do not depend on which episodes share an engine batch (`rollout.gen_batch_size` is a speed
    setting only). None when the engine has no generator or its `generate` takes no `seeds`."""
    generator = getattr(engine, "generator", None)
    return draw_base(generator) if generator is not None and takes_seeds(engine) else None


def takes_seeds(engine) -> bool:
    """Whether `engine.generate` samples each row from a seed of its own (`seeds=`)."""
    return "seeds" in inspect.signature(engine.generate).parameters


def draw_base(generator: torch.Generator) -> int:
    """The stream base of one rollout, drawn from `generator` (what `stream_base` draws from an engine's)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def stream_seed(base: int, episode: int, turn: int) -> int:
    """The sampling seed of one episode's turn: a well-mixed function of (rollout base, episode index, turn)."""
    return int(np.random.SeedSequence([base, episode, turn]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _advance(ep: _Episode, completion: Completion, played, settings: RolloutSettings, *, last_turn: bool) -> None:
    """Records a turn whose reply was played (`play_replies`: its outcome, None when the env failed)."""
    ctx, b = ep.ctx, ep.builder
    if played is None:
        b.rewards.append(0.0)
        return
    obs, reward, terminated, truncated, success, n_valid, valid = played
    ep.num_actions += n_valid
    ep.valid_turns += int(valid)
    b.rewards.append(reward)
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
