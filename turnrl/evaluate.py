"""Held-out evaluation: success rate, mean return and pass@k on fixed evaluation seeds.

Evaluation seeds are 0..episodes-1; training never uses a seed below `config.TRAIN_SEED_BASE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from turnrl.config import EVAL_SEED_LIMIT, TrainConfig
from turnrl.context import SUMMARY_INSTRUCTION, ChatRenderer
from turnrl.engines import HFEngine, SamplingParams
from turnrl.env_pool import EnvPool
from turnrl.envs import make
from turnrl.parsing import parse_reply
from turnrl.qa_metrics import mean_turns_to_success, mean_unique_answer_ratio, succ_at_k
from turnrl.rollout import RolloutSettings, draw_base, run_episodes
from turnrl.trajectory import Trajectory


def renderer_for(policy, cfg: TrainConfig) -> ChatRenderer:
    env = make(cfg.env.name, **cfg.env.kwargs)
    system = env.system_prompt() if cfg.env.system_prompt else None
    env.close()
    if cfg.rollout.context == "summary":
        system = f"{system}\n\n{SUMMARY_INSTRUCTION}" if system else SUMMARY_INSTRUCTION
    return ChatRenderer(policy.tokenizer, system_prompt=system, response_prefix="<think>" if cfg.rollout.think else "<answer>")


def engine_for(policy, cfg: TrainConfig, generator: torch.Generator):
    """The engine `cfg.engine` names: HFEngine on the policy itself (cheap, built per use), or a VLLMEngine
    holding a copy of the policy (expensive to start: build one per run, `sync` it after every update and
    `close` it at the end)."""
    if cfg.engine.name == "vllm":
        from turnrl.engines.vllm import VLLMEngine

        e = cfg.engine
        return VLLMEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                          max_model_len=cfg.rollout.max_context_tokens, generator=generator, dtype=e.vllm_dtype,
                          weight_sync=e.vllm_weight_sync, gpu_memory_utilization=e.vllm_gpu_memory_utilization,
                          sleep=e.vllm_sleep, enforce_eager=e.vllm_enforce_eager,
                          cpu_kv_cache_gib=e.vllm_cpu_kv_cache_gib, max_num_seqs=cfg.rollout.gen_batch_size,
                          seed=cfg.seed)
    merge = cfg.engine.hf_merge_lora
    return HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                    batch_size=cfg.rollout.gen_batch_size, generator=generator, dtype=cfg.engine.hf_dtype,
                    merge_lora=merge == "on" or (merge == "auto" and not cfg.model.gradient_checkpointing))


def settings_for(cfg: TrainConfig) -> RolloutSettings:
    r = cfg.rollout
    return RolloutSettings(max_turns=r.max_turns, max_actions_per_turn=r.max_actions_per_turn,
                           max_new_tokens=r.max_new_tokens, max_context_tokens=r.max_context_tokens,
                           think=r.think, strict_format=r.strict_format, format_penalty=r.format_penalty,
                           env_timeout=r.env_timeout, context=r.context, context_window=r.context_window,
                           turn_rows=r.turn_rows, max_live=r.max_live_episodes, env_threads=r.env_threads)


def rollout_params(cfg: TrainConfig) -> SamplingParams:
    """The sampling of training rollouts."""
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p)


@dataclass(frozen=True)
class EvalResult:
    success_rate: float
    mean_return: float
    pass_at_k: float
    k: int
    episodes: int
    temperature: float
    valid_turn_rate: float
    mean_turns: float
    greedy_success_rate: float | None = None
    env_errors: int = 0
    success_stderr: float | None = None  # standard error of success_rate over start states (clustered_stderr)
    greedy_success_stderr: float | None = None
    # each start state's success (mean of its k samples), by seed: what pairs two evaluations of the same states
    state_success: list[float] | None = None
    greedy_state_success: list[float] | None = None
    qa: dict[str, float] | None = None  # multi-attempt QA metrics (envs with `multi_attempt`, max_turns > 1), see qa_summary
    env_metrics: dict[str, float] | None = None  # the env's own numbers (info["metrics"]), sampled episodes' means

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        for key in ("qa", "env_metrics", "state_success", "greedy_state_success"):
            if out[key] is None:
                del out[key]
        return out


def qa_summary(trajs: list[Trajectory], *, think: bool, max_turns: int) -> dict[str, float]:
    """UFO's multi-turn QA metrics over sampled episodes (turnrl.qa_metrics).

    Each turn's reply is one attempt; an episode of a multi-attempt env ends at its first correct answer,
    so its correctness flags are all False but the last, which is its success. Keys: `succ@k` for
    k = 1..max_turns (correct within k sequential attempts with feedback), `mean_turns_to_success`
    (None when nothing succeeded) and `unique_answer_ratio` (distinct / parsed answers per episode, mean).
    """
    flags = [[False] * (t.num_turns - 1) + [t.success] for t in trajs if t.num_turns > 0]
    answers = []
    for t in trajs:
        replies = [text for role, text in t.transcript if role == "assistant"]
        parsed = [parse_reply(r, think=think, split=False) for r in replies]
        answers.append([p.actions[0] for p in parsed if p.ok])
    out = {f"succ@{k}": succ_at_k(flags, k) for k in range(1, max_turns + 1)} if flags else {}
    turns = mean_turns_to_success(flags) if flags else math.nan
    out["mean_turns_to_success"] = None if math.isnan(turns) else turns
    out["unique_answer_ratio"] = mean_unique_answer_ratio(answers) if answers else 1.0
    return out


def summarize(trajs: list[Trajectory], k: int) -> dict[str, float]:
    """Success, return and pass@k over the episodes that were played to the end; episodes whose env
    failed (Trajectory.failed) are left out and counted in `env_errors`."""
    errors = sum(t.failed for t in trajs)
    trajs = [t for t in trajs if not t.failed]
    if not trajs:
        return {"success_rate": 0.0, "mean_return": 0.0, "pass_at_k": 0.0, "valid_turn_rate": 0.0,
                "mean_turns": 0.0, "env_errors": errors, "success_stderr": None, "state_success": []}
    groups: dict[int, list[Trajectory]] = {}
    for t in trajs:
        groups.setdefault(t.seed, []).append(t)
    turns = sum(t.num_turns for t in trajs)
    # each start state's success, its k samples averaged (they share the state): one observation per state
    state_success = [sum(t.success for t in g) / len(g) for _, g in sorted(groups.items())]
    return {
        "success_rate": sum(t.success for t in trajs) / len(trajs),
        "mean_return": sum(t.total_reward for t in trajs) / len(trajs),
        "pass_at_k": sum(any(t.success for t in g) for g in groups.values()) / len(groups),
        "valid_turn_rate": sum(t.valid_turns for t in trajs) / max(1, turns),
        "mean_turns": turns / len(trajs),
        "env_errors": errors,
        "success_stderr": stderr_of_mean(state_success),
        "state_success": state_success,
    }


def paired_stderr(after: list[float], before: list[float]) -> float | None:
    """The standard error of the mean difference of two evaluations of the same start states (each list one
    success per state, in the same order): the paired standard error, smaller than that of two independent
    measurements when the states' outcomes are correlated. None unless both cover the same two or more states."""
    if len(after) != len(before):
        return None
    return stderr_of_mean([a - b for a, b in zip(after, before)])


def clustered_stderr(clusters: list[list[bool]]) -> float | None:
    """The standard error of a success rate measured on several start states with several samples each: the
    samples of one start state are not independent (they share it), so each state's mean is one observation
    (the cluster-robust standard error with equal cluster sizes). None with fewer than two states."""
    return stderr_of_mean([sum(c) / len(c) for c in clusters])


def stderr_of_mean(values: list[float]) -> float | None:
    """The standard error of the mean of `values` (sample standard deviation, n - 1, over sqrt(n)); None with
    fewer than two."""
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def env_metric_means(trajs: list) -> dict[str, float]:
    """The mean of each number the envs reported in `info["metrics"]`, over the episodes that reported it
    (`Trajectory.env_metrics`, or a served episode's dict of them)."""
    values: dict[str, list[float]] = {}
    for t in trajs:
        for name, value in dict(t.env_metrics).items():  # a Trajectory's pairs or a served episode's dict
            values.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in sorted(values.items())}


def eval_arguments(cfg: TrainConfig, env_name: str | None, episodes: int | None, k: int | None,
                   temperature: float | None, greedy: bool | None) -> tuple[str, int, int, float, bool]:
    """The evaluation's env, episodes, k, temperature and greedy flag: given values, else `cfg.eval`'s
    (the env: `cfg.env.eval_name`, else `cfg.env.name`)."""
    e = cfg.eval
    env_name = env_name or cfg.env.eval_name or cfg.env.name
    episodes = e.episodes if episodes is None else episodes
    if not 1 <= episodes < EVAL_SEED_LIMIT:
        raise ValueError(f"episodes must be in [1, {EVAL_SEED_LIMIT})")
    return (env_name, episodes, e.k if k is None else k, e.temperature if temperature is None else temperature,
            e.greedy if greedy is None else greedy)


def env_factory(cfg: TrainConfig, env_name: str, kept: dict[str, EnvPool] | None = None) -> Callable[[], object]:
    """What builds `env_name`'s envs for an episode: a new env each time, or with `kept` (rollout.reuse_envs) the
    pool of that env's instances kept in it, made on first use."""
    make_env = lambda: make(env_name, **cfg.env.kwargs)  # noqa: E731
    if kept is None:
        return make_env
    if env_name not in kept:
        kept[env_name] = EnvPool(make_env)
    return kept[env_name]


def evaluate(policy, cfg: TrainConfig, *, env_name: str | None = None, episodes: int | None = None,
             k: int | None = None, temperature: float | None = None, greedy: bool | None = None,
             seed: int | None = None, engine=None, pool=None, progress: str | None = None,
             kept_envs: dict[str, EnvPool] | None = None) -> tuple[EvalResult, list[Trajectory]]:
    """Plays `episodes` held-out start states `k` times each with the policy (sampling at `temperature`).

    Arguments default to `cfg.eval`; the env defaults to `cfg.env.eval_name` or `cfg.env.name`.
    `engine`: a running engine already synced with the policy (the trainer's vLLM engine); its sampling
    generator is swapped for the evaluation's for the duration. Default: the engine `cfg.engine` names,
    built here (and closed again when it is a vLLM engine). `pool`: Ray rollout workers holding the policy's
    weights (turnrl.distributed.RolloutPool), which then play the episodes, the same ones. `progress`: the
    description of a progress bar over the episodes (None: no bar). `kept_envs`: env pools by env name kept across
    rollouts and evaluations (rollout.reuse_envs, `env_factory`).
    Returns the summary and the sampled trajectories (for logs).
    """
    env_name, episodes, k, temperature, greedy = eval_arguments(cfg, env_name, episodes, k, temperature, greedy)
    gen = torch.Generator().manual_seed(cfg.eval.seed if seed is None else seed)
    if engine is None and pool is None:
        engine = engine_for(policy, cfg, gen)
        try:
            return evaluate(policy, cfg, env_name=env_name, episodes=episodes, k=k, temperature=temperature,
                            greedy=greedy, seed=seed, engine=engine, progress=progress, kept_envs=kept_envs)
        finally:
            if hasattr(engine, "close"):
                engine.close()
    bar = tqdm(total=episodes * (k + bool(greedy)), desc=progress, disable=progress is None, leave=False,
               dynamic_ncols=True)
    settings = settings_for(cfg)
    make_env = env_factory(cfg, env_name, kept_envs)
    args = (make_env, settings, episodes, k, temperature, greedy)

    def play_pool(seeds, group_size, params):  # the stream bases the engine below would draw from `gen`
        trajs = pool.play(seeds, draw_base(gen), env_name=env_name, group_size=group_size, params=params)
        bar.update(len(trajs))
        return trajs

    if pool is not None:
        with bar:
            return _evaluate(play_pool, *args)
    saved = engine.generator
    engine.generator = gen
    renderer = renderer_for(policy, cfg)

    def play_here(seeds, group_size, params):
        return run_episodes(engine, renderer, make_env, seeds, group_size, settings, params, env_name=env_name,
                            on_end=bar.update)

    try:
        with bar:
            return _evaluate(play_here, *args)
    finally:
        engine.generator = saved


def _evaluate(play: Callable, make_env: Callable[[], object], settings: RolloutSettings, episodes: int, k: int,
              temperature: float, greedy: bool) -> tuple[EvalResult, list[Trajectory]]:
    """Plays the sampled (and greedy) held-out episodes through `play(seeds, group_size, params)`; their result."""
    seeds = list(range(episodes))
    trajs = play(seeds, k, SamplingParams(max_new_tokens=settings.max_new_tokens, temperature=temperature))
    greedy_trajs = None
    if greedy:
        greedy_trajs = play(seeds, 1, SamplingParams(max_new_tokens=settings.max_new_tokens, greedy=True))
    return eval_result(trajs, greedy_trajs, k=k, episodes=episodes, temperature=temperature, make_env=make_env,
                       settings=settings), trajs


def eval_result(sampled: list, greedy: list | None, *, k: int, episodes: int, temperature: float,
                make_env: Callable[[], object], settings: RolloutSettings) -> EvalResult:
    """The EvalResult of `k` sampled episodes per seed and of the greedy ones (None: not played), from
    token-level rollouts (Trajectory) or served evaluation (turnrl.served.ChatEpisode) alike."""
    summary = summarize(sampled, k)
    greedy_summary = None if greedy is None else summarize(greedy, 1)
    probe = make_env()
    multi_attempt = getattr(probe, "multi_attempt", False) and settings.max_turns > 1
    probe.close()
    played = [t for t in sampled if not t.failed]
    qa = qa_summary(played, think=settings.think, max_turns=settings.max_turns) if multi_attempt else None
    return EvalResult(success_rate=summary["success_rate"], mean_return=summary["mean_return"],
                      pass_at_k=summary["pass_at_k"], k=k, episodes=episodes, temperature=temperature,
                      valid_turn_rate=summary["valid_turn_rate"], mean_turns=summary["mean_turns"],
                      greedy_success_rate=None if greedy_summary is None else greedy_summary["success_rate"],
                      success_stderr=summary["success_stderr"],
                      greedy_success_stderr=None if greedy_summary is None else greedy_summary["success_stderr"],
                      state_success=summary["state_success"],
                      greedy_state_success=None if greedy_summary is None else greedy_summary["state_success"],
                      env_errors=summary["env_errors"], qa=qa, env_metrics=env_metric_means(played) or None)
