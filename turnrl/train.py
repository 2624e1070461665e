"""`train(cfg)`: evaluate, warm-start with SFT, evaluate, then StarPO(-S) iterations, then evaluate.

One RL iteration reads top to bottom:
    rollout (groups x samples, multi-turn) -> reward shaping -> group filter (StarPO-S std / DAPO dynamic)
    -> advantages (turnrl.credit: GRPO / RLOO / GAE / turn-GAE / GiGPO / ...) -> PPO or GSPO update
    -> metrics.jsonl, checkpoint
"""

from __future__ import annotations

import json
import os
import random
import time
from contextlib import ExitStack
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from turnrl.algos.correction import STATS as CORRECTION_STATS
from turnrl.algos.filters import dynamic_sampling_keep, filter_by_reward_std
from turnrl.attacks import attack_pool
from turnrl.checkpoint import (MetricsLog, latest_checkpoint, load_ahead, remove_stale_temps,
                               save_checkpoint, save_model_atomic, set_rng_state)
from turnrl.config import DYNAMIC_SEED_OFFSET, TRAIN_SEED_BASE, ConfigError, TrainConfig, diff_configs
from turnrl.diagnostics import collapse_metrics
from turnrl.distributed import Playing, RolloutPool
from turnrl.env_pool import EnvPool
from turnrl.eval_points import copy_eval, eval_points, periodic_eval_metrics, run_eval, sample_episodes
from turnrl.evaluate import (engine_for, env_factory, env_metric_means, evaluate, renderer_for, rollout_params,
                             settings_for)
from turnrl.faults import EnvFailureError, Interrupted, StopSignals
from turnrl.judge import Judge, JudgeStats
from turnrl.prepare import (build_policy, check_engine, check_env_config, check_model_fits, check_output_dir,
                            reference_model, rl_optimizer, run_sft, teacher_model)
from turnrl.rollout import draw_base, run_episodes
from turnrl.shaping import shape_rewards
from turnrl.trackers import Trackers
from turnrl.trajectory import Trajectory
from turnrl.update import ppo_update

# Config fields that may change when a run is resumed (they do not shape what is learned). gen_batch_size,
# max_live_episodes and the vLLM memory settings only size the engine's batches and caches: every episode samples
# from its own stream. For the same reason Ray rollout workers (distributed.*) play the same trajectories;
# env threads (rollout.env_threads) only overlap independent envs' calls.
RESUMABLE_CHANGES = ("iterations", "progress", "threads", "out", "rollout.gen_batch_size", "rollout.max_live_episodes",
                     "engine.vllm_gpu_memory_utilization", "engine.vllm_cpu_kv_cache_gib", "diag.mi_every",
                     "diag.mi_replies", "samples_per_iteration", "eval.every", "eval.every_episodes",
                     "distributed.workers", "distributed.address", "distributed.cpus_per_worker", "rollout.env_threads",
                     "rollout.reuse_envs", "track.to", "track.project", "track.name",
                     "judge.url", "judge.concurrency", "judge.timeout")


def iteration_seeds(cfg: TrainConfig, iteration: int, round_: int = 0) -> list[int]:
    """Distinct start states for each iteration, from a deterministic stream disjoint from eval seeds.

    Round 0 is the iteration's regular batch. Dynamic sampling's extra rounds 1 .. dynamic_max_rounds-1
    draw from a second range of the run's seed block, DYNAMIC_SEED_OFFSET above the first, laid out by
    (iteration, round): every (iteration, round, group) has its own seed, a resumed run replays the same
    ones, and round 0 is the same with or without dynamic sampling.
    """
    n = cfg.rollout.n_groups
    base = TRAIN_SEED_BASE + cfg.seed * 10_000_000
    if round_ == 0:
        return [base + iteration * n + g for g in range(n)]
    extra = cfg.algo.dynamic_max_rounds - 1
    return [base + DYNAMIC_SEED_OFFSET + (iteration * extra + round_ - 1) * n + g for g in range(n)]


def env_return(t: Trajectory, format_penalty: float) -> float:
    """The env's own reward, without format penalties (what the StarPO-S filter ranks)."""
    return t.total_reward - (t.num_turns - t.valid_turns) * format_penalty


def rollout_and_filter(cfg: TrainConfig, iteration: int, play: Callable[[list[int]], list[Trajectory]],
                       judge: Judge | None = None) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
    """Rollout -> LLM-judge rewards (`judge`, if any) -> reward shaping -> group filter. Returns (every episode
    played, as played; the kept episodes, judged and shaped; filter metrics).

    filter='std' (StarPO-S) ranks groups by the std of raw env returns (before shaping and format
    penalties; with a judge, of the judged returns). filter='dynamic' (DAPO) keeps groups whose shaped
    returns are not all equal and plays n_groups new start states per extra round until n_groups such
    groups are kept (the first ones, in round then group order) or dynamic_max_rounds rounds were played.

    Episodes whose env failed are dropped before shaping and filtering (their group simply has fewer
    members) and counted in `rollout/env_errors`; past `rollout.max_env_error_rate` of a round's episodes
    the run stops (EnvFailureError). Episodes without a single turn (first observation over the context
    budget) are played and counted but never trained on.
    """
    n, algo = cfg.rollout.n_groups, cfg.algo
    rounds = algo.dynamic_max_rounds if algo.filter == "dynamic" else 1
    played_all: list[Trajectory] = []
    kept: list[Trajectory] = []
    shaped_returns: list[float] = []
    env_errors, env_seconds = 0, 0.0
    judge_stats, judge_seconds = JudgeStats(), 0.0
    for round_ in range(rounds):
        played = play(iteration_seeds(cfg, iteration, round_))
        env_seconds += sum(t.env_seconds for t in played)  # failed episodes too: a hanging env is where time goes
        failed = [t for t in played if t.failed]
        check_env_errors(failed, len(played), cfg)
        env_errors += len(failed)
        played = [t for t in played if not t.failed]
        if round_ > 0:  # group ids stay unique across rounds
            played = [replace(t, group_id=t.group_id + round_ * n) for t in played]
        played_all += played
        if judge is not None:  # episodes whose judge request failed are left out, as failed envs are
            t_judge = time.perf_counter()
            played, judged = judge(played)
            judge_stats += judged
            judge_seconds += time.perf_counter() - t_judge
        shaped = shape_rewards(played, cfg.reward, iteration)
        shaped_returns += [t.total_reward for t in shaped]
        group_ids = torch.tensor([t.group_id for t in played])
        if algo.filter == "std":
            raw = torch.tensor([t.total_reward if judge is not None else env_return(t, cfg.rollout.format_penalty)
                                for t in played])
            keep = set(filter_by_reward_std(raw, group_ids, algo.filter_keep, drop_zero_std=algo.drop_zero_std).tolist())
        elif algo.filter == "dynamic":
            informative = dynamic_sampling_keep(torch.tensor([t.total_reward for t in shaped]), group_ids).tolist()
            keep = set(informative[: n - len({t.group_id for t in kept})])
        else:
            keep = {t.group_id for t in played}
        kept += [t for t in shaped if t.group_id in keep and t.num_turns > 0]
        if len({t.group_id for t in kept}) >= n:
            break
    metrics = {"filter/kept_fraction": len(kept) / len(played_all), "filter/rollout_rounds": float(round_ + 1),
               "rollout/env_errors": float(env_errors), "perf/env_seconds": env_seconds}
    if cfg.reward.active:
        metrics["reward/shaped_mean"] = sum(shaped_returns) / max(1, len(shaped_returns))
    if judge is not None:
        metrics.update({**judge_stats.metrics(), "perf/judge_seconds": judge_seconds})
    return played_all, kept, metrics


def check_env_errors(failed: list[Trajectory], played: int, cfg: TrainConfig) -> None:
    """Raises EnvFailureError when more than `rollout.max_env_error_rate` of `played` episodes failed."""
    if failed and len(failed) / played > cfg.rollout.max_env_error_rate:
        raise EnvFailureError(
            f"{len(failed)} of {played} episodes failed in their env, more than rollout.max_env_error_rate="
            f"{cfg.rollout.max_env_error_rate}; first failure: {failed[0].error}")


def rollout_metrics(trajs: list[Trajectory], cfg: TrainConfig) -> dict[str, float]:
    rewards = torch.tensor([t.total_reward for t in trajs])
    turns = sum(t.num_turns for t in trajs)
    model_tokens = sum(sum(t.loss_mask) for t in trajs)
    prompts = [n for t in trajs for n in t.prompt_lengths()]  # tokens the engine was given at each turn
    groups: dict[int, list[bool]] = {}
    for t in trajs:
        groups.setdefault(t.group_id, []).append(t.success)
    return {
        "rollout/success_rate": sum(t.success for t in trajs) / len(trajs),
        "rollout/mean_reward": rewards.mean().item(),
        "rollout/reward_std": rewards.std().item() if len(trajs) > 1 else 0.0,
        "rollout/pass_at_group": sum(any(g) for g in groups.values()) / len(groups),
        "rollout/valid_turn_rate": sum(t.valid_turns for t in trajs) / max(1, turns),
        "rollout/mean_turns": turns / len(trajs),
        "rollout/mean_actions": sum(t.num_actions for t in trajs) / len(trajs),
        "rollout/response_tokens": model_tokens / max(1, turns),
        "rollout/prompt_tokens": sum(prompts) / max(1, len(prompts)),
        "rollout/prompt_tokens_max": float(max(prompts, default=0)),
        "rollout/context_truncated": sum(t.end_reason == "context_budget" for t in trajs) / len(trajs),
        "rollout/turn_budget_truncated": sum(t.end_reason == "turn_budget" for t in trajs) / len(trajs),
        **{f"env/{name}": value for name, value in env_metric_means(trajs).items()},
    }


def train(cfg: TrainConfig, *, resume: bool = False, log=print) -> dict:
    """Runs a whole training job and returns the held-out evaluations (also in `cfg.out`/eval.json).

    With `resume=True`, continues from the newest checkpoint in `cfg.out`; the saved config must match
    `cfg` except for fields in RESUMABLE_CHANGES. SIGINT and SIGTERM stop the run after the current
    iteration with a checkpoint (`Interrupted`); a second signal stops it at once (turnrl.faults.StopSignals).
    """
    with StopSignals() as stop, ExitStack() as cleanup:
        return _train(cfg, resume, log, stop, cleanup)


def _train(cfg: TrainConfig, resume: bool, log, stop: StopSignals, cleanup: ExitStack) -> dict:
    # ---- setup ------------------------------------------------------------------------------------
    run_dir = check_output_dir(cfg.out)
    check_env_config(cfg)
    check_engine(cfg)
    remove_stale_temps(run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume:
        if not (run_dir / "config.json").exists():
            raise ConfigError(f"cannot resume: {run_dir} has no config.json")
        saved = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        changed = diff_configs(saved, cfg, ignore=RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"cannot resume {run_dir} with a different config; differing fields: {', '.join(changed)}")
    elif latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    (run_dir / "config.json").write_text(cfg.to_json())
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    generators = {"rollout": torch.Generator().manual_seed(cfg.seed + 1),
                  "update": torch.Generator().manual_seed(cfg.seed + 2)}
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    samples = MetricsLog(run_dir / "samples.jsonl")  # a few episodes' transcripts per iteration (turnrl report)
    eval_path = run_dir / "eval.json"
    evals = json.loads(eval_path.read_text()) if (resume and eval_path.exists()) else {}
    if not resume:  # no held-out samples of an earlier attempt in this directory
        eval_path.with_name("eval_samples.json").unlink(missing_ok=True)
    state = {"phase": "start", "iteration": 0}
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
    # TensorBoard / W&B (track.to): a missing package or a refused login fails here, before any compute
    trackers = Trackers(cfg, run_dir, state["iteration"] if resume else None, log)
    cleanup.push(lambda kind, *_: trackers.close(failed=kind is not None))
    if ckpt is not None:
        policy = build_policy(cfg, str(ckpt / "model"))
        log(f"[resume] {ckpt.name}: phase {state['phase']}, iteration {state['iteration']}")
    else:
        policy = build_policy(cfg)
    check_model_fits(policy, cfg, run_dir)
    teacher = teacher_model(cfg, policy, log) if cfg.distill.teacher else None  # fails here, before any compute
    judge = Judge(cfg.judge) if cfg.judge.url else None  # an unreachable judge server too
    attacks, breeder = attack_pool(cfg)  # attack.pool: Evo-MARL's evolving attacker, saved with each checkpoint
    if attacks is not None and "attacks" in state:
        attacks.load_state_dict(state["attacks"])
    # Ray rollout workers (distributed.workers) hold copies of the policy, each with its own engine, and play the
    # rollouts and the evaluations: weights pushed now, after SFT and after every update; the workers and their
    # Ray instance ended however the run ends. Without them, a vLLM engine holds its own copy of the policy here:
    # started once, re-synced whenever the weights change, shut down however the run ends. The HF engine samples
    # from the policy itself and is built where it is used.
    pool = RolloutPool(cfg) if cfg.distributed.workers else None
    if pool is not None:
        cleanup.callback(pool.close)
        pool.sync(policy.lm)
    shared = engine_for(policy, cfg, generators["rollout"]) if cfg.engine.name == "vllm" and pool is None else None
    if shared is not None:
        cleanup.callback(shared.close)
    # rollout.reuse_envs: env instances kept across rollouts and evaluations, by env name, closed however the run
    # ends (Ray workers keep their own)
    kept_envs: dict[str, EnvPool] | None = {} if cfg.rollout.reuse_envs and pool is None else None
    if kept_envs is not None:
        cleanup.callback(close_kept_envs, kept_envs, log)
    # Keep only the iterations the checkpoint knows about (a crash may have logged more).
    for log_file in (metrics, samples):
        log_file.truncate_to([r for r in log_file.read() if r.get("iteration", 0) < state["iteration"]])

    # ---- evaluation before training and SFT warm start --------------------------------------------
    run_eval(policy, cfg, evals, "untrained", eval_path, log, shared, pool, kept_envs, trackers)
    if state["phase"] == "start":
        if cfg.sft.episodes > 0:
            run_sft(policy, cfg, log)
            for copy in (shared, pool):
                if copy is not None:
                    copy.sync(policy.lm)
        state = {"phase": "rl", "iteration": 0}
        save_checkpoint(run_dir, 0, policy, None, None, state, generators, cfg.keep_checkpoints)
    if cfg.sft.episodes == 0:  # same model, same eval seeds and sampling seed: the same result, no need to rerun
        copy_eval(cfg, evals, "untrained", "after_sft", eval_path, trackers)
    else:
        run_eval(policy, cfg, evals, "after_sft", eval_path, log, shared, pool, kept_envs, trackers)

    # ---- RL ---------------------------------------------------------------------------------------
    optimizer, scheduler = rl_optimizer(policy, cfg)
    trainer_state = (torch.load(ckpt / "trainer.pt", weights_only=False, map_location="cpu")
                     if ckpt is not None else None)
    if trainer_state is not None:
        if trainer_state["optimizer"] is not None:
            optimizer.load_state_dict(trainer_state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
        set_rng_state(trainer_state["rng"], generators)
    ref_lm = reference_model(run_dir, policy, cfg, state["iteration"], log) if cfg.algo.kl_coef > 0 else None
    if pool is None:
        engine = shared if shared is not None else engine_for(policy, cfg, generators["rollout"])
        renderer, settings = renderer_for(policy, cfg), settings_for(cfg)
        params = rollout_params(cfg)
        make_env = env_factory(cfg, cfg.env.name, kept_envs)

    # distributed.overlap: the workers play an iteration's first round while the previous iteration updates, with
    # the weights before that update; `ahead` = (its seeds, the rollout being played), or what a checkpoint saved.
    saved_ahead = load_ahead(ckpt) if ckpt is not None else None
    ahead = None if saved_ahead is None else (saved_ahead[0], Playing.done(saved_ahead[1]))

    def reset_options(seeds: list[int]) -> list[dict | None] | None:
        """Each group's env reset options: its attack (attack.pool), else none."""
        return None if attacks is None else attacks.assign(seeds)

    def play(seeds: list[int]) -> list[Trajectory]:
        nonlocal ahead
        if ahead is not None and ahead[0] == seeds:
            (_, playing), ahead = ahead, None
            return playing.result()
        options = reset_options(seeds)
        if pool is not None:  # the same trajectories as below, played by the workers (turnrl.distributed)
            return pool.play(seeds, base=draw_base(generators["rollout"]), options=options)
        return run_episodes(engine, renderer, make_env, seeds, cfg.rollout.group_size, settings, params,
                            env_name=cfg.env.name, options=options)

    start = state["iteration"]
    bar = tqdm(range(start, cfg.iterations), initial=start, total=cfg.iterations, desc="RL",
               disable=not cfg.progress, dynamic_ncols=True)
    t_run = time.perf_counter()
    bad_streak = state.get("bad_updates", 0)
    try:
        # A first SIGINT/SIGTERM only marks the stop: the iteration ends, is checkpointed, then we exit. Deferred
        # over the whole loop, not per iteration: a signal landing between two iterations would otherwise stop the
        # run at once, before the last finished iteration was checkpointed, and the resume would redo the logged
        # iterations since the last periodic checkpoint. (One landing after an iteration's check of `stop` runs one
        # more iteration before stopping; after the last iteration's, it stops the run before the final evaluation.)
        with stop.deferred():
            for iteration in bar:
                t0 = time.perf_counter()
                lagged = ahead is not None  # this iteration's first round was played during the last update
                # rollout (n_groups start states x group_size samples each), reward shaping, then the group
                # filter: StarPO-S keeps the groups whose raw env returns vary most; DAPO dynamic sampling
                # drops groups with equal returns and plays more start states to refill the batch. Episodes
                # whose env raised or hung are counted and left out (EnvFailureError past the allowed rate).
                trajs, kept, filter_stats = rollout_and_filter(cfg, iteration, play, judge)
                t_rollout = time.perf_counter() - t0
                record = {"iteration": iteration, **rollout_metrics(trajs, cfg), **filter_stats}
                if attacks is not None:  # score the attacks played, breed the next ones (before the next rollout)
                    record.update(attacks.record(trajs))
                    record.update(attacks.evolve(iteration, breeder))
                if cfg.distributed.overlap:
                    record["rollout/policy_lag"] = float(lagged)
                    if iteration + 1 < cfg.iterations:  # the next rollout, played while this iteration updates
                        seeds = iteration_seeds(cfg, iteration + 1)
                        ahead = (seeds, pool.start(seeds, base=draw_base(generators["rollout"]),
                                                   options=reset_options(seeds)))
                if cfg.diag.mi_every and iteration % cfg.diag.mi_every == 0:  # under the policy that sampled
                    record.update(collapse_metrics(policy, trajs, max_replies=cfg.diag.mi_replies,
                                                   micro_batch_tokens=cfg.optim.micro_batch_tokens, bf16=cfg.optim.bf16,
                                                   temperature=cfg.rollout.temperature,
                                                   shared_prefix=cfg.optim.shared_prefix))

                # advantages + PPO update; during critic warm-up (ERA) only the value head learns
                critic_only = iteration < cfg.algo.critic_warmup
                advantages: list = []  # each kept episode's per-turn advantages, for the sample episodes
                t1 = time.perf_counter()
                if kept:
                    if shared is not None:
                        shared.sleep()  # GPU: free vLLM's memory for the update
                    update_stats = ppo_update(policy, optimizer, scheduler, kept, algo=cfg.algo, optim=cfg.optim,
                                              temperature=cfg.rollout.temperature, ref_lm=ref_lm,
                                              generator=generators["update"], critic_only=critic_only,
                                              teacher=teacher, distill=cfg.distill, turn_advantages=advantages)
                    for copy in (shared, pool):  # the next rollout samples from the updated policy
                        if copy is not None:
                            copy.sync(policy.lm)
                else:  # every group had identical returns: nothing to learn from this batch
                    update_stats = {}
                t_update = time.perf_counter() - t1
                record.update(update_metrics(update_stats, cfg))
                if cfg.algo.needs_critic:
                    record["train/critic_warmup"] = float(critic_only)
                # NaN/inf in advantages, loss or gradients skipped optimizer steps (turnrl.update); a streak of
                # such updates means the run has diverged: stop before checkpointing anything from it.
                bad_streak = bad_streak + 1 if update_stats.get("actor/skipped_steps", 0.0) > 0 else 0
                record["actor/bad_update_streak"] = float(bad_streak)
                elapsed = time.perf_counter() - t0
                record.update({
                    "perf/rollout_seconds": t_rollout,
                    "perf/update_seconds": t_update,
                    "perf/iteration_seconds": elapsed,
                    "perf/gen_tokens_per_second": sum(sum(t.loss_mask) for t in trajs) / max(t_rollout, 1e-9),
                    "perf/tokens_per_second": (sum(len(t.ids) for t in trajs) + update_stats.get("train/tokens", 0.0))
                    / max(elapsed, 1e-9),
                    "time/elapsed_seconds": time.perf_counter() - t_run,
                })
                if cfg.eval.every and (iteration + 1) % cfg.eval.every == 0:
                    # held-out progress during training; evaluation samples from its own generator, so training
                    # goes on exactly as without it
                    t_eval = time.perf_counter()
                    result, _ = evaluate(policy, cfg, episodes=cfg.eval.every_episodes or None, engine=shared,
                                           pool=pool, kept_envs=kept_envs)
                    record.update(periodic_eval_metrics(result))
                    record["perf/eval_seconds"] = time.perf_counter() - t_eval
                metrics.append(record)
                trackers.iteration(record)
                if cfg.samples_per_iteration:
                    trained = {(t.group_id, t.ids): a for t, a in zip(kept, advantages)}
                    episodes = sample_episodes(trajs, cfg.samples_per_iteration, policy.tokenizer, trained)
                    samples.append({"iteration": iteration, "episodes": episodes})
                    trackers.samples(iteration, episodes)
                bar.set_postfix(reward=f"{record['rollout/mean_reward']:.2f}",
                                success=f"{record['rollout/success_rate']:.2f}",
                                kept=f"{record['filter/kept_fraction']:.2f}")
                if bad_streak >= cfg.optim.max_bad_updates:
                    last = latest_checkpoint(run_dir)
                    raise FloatingPointError(
                        f"{bad_streak} consecutive updates had non-finite advantages, loss or gradients "
                        f"(optim.max_bad_updates={cfg.optim.max_bad_updates}) at iteration {iteration}; the last "
                        f"good checkpoint is {last}. Lower optim.lr or check the rewards.")
                state = {"phase": "rl", "iteration": iteration + 1, "bad_updates": bad_streak}
                if attacks is not None:
                    state["attacks"] = attacks.state_dict()
                stopping = stop.requested  # read once: a signal after this line stops the run one iteration later
                if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations or stopping:
                    save_checkpoint(run_dir, iteration + 1, policy, optimizer, scheduler, state, generators,
                                    cfg.keep_checkpoints, None if ahead is None else (ahead[0], ahead[1].result()))
                if stopping:
                    break
        if stop.requested:  # also one that came after the last iteration's check (the last one is checkpointed)
            log(f"[interrupted] saved checkpoint at iteration {state['iteration']} in {run_dir}; continue with "
                f"`turnrl train --resume {run_dir}`")
            raise Interrupted(stop.requested)
    finally:
        bar.close()

    # ---- evaluation after RL and the final model --------------------------------------------------
    if cfg.iterations == 0:  # no RL step was taken: the after_sft evaluation already measured this model
        copy_eval(cfg, evals, "after_sft", "after_rl", eval_path, trackers)
    else:
        for key, _ in eval_points(cfg, "after_rl"):  # a resumed run with more iterations: measure the new end
            evals.pop(key, None)
        run_eval(policy, cfg, evals, "after_rl", eval_path, log, shared, pool, kept_envs, trackers)
    save_model_atomic(policy, run_dir / "final")
    return evals


def close_kept_envs(kept: dict[str, EnvPool], log) -> None:
    """Closes the envs a run kept for reuse; an env whose `close` raised is reported, the others closed anyway."""
    for name, pool in kept.items():
        for err in pool.close():
            log(f"[envs] a {name} env kept for reuse (rollout.reuse_envs) raised in close: {type(err).__name__}: {err}")


def update_metrics(stats: dict[str, float], cfg: TrainConfig) -> dict[str, float | None]:
    keys = ["loss/policy", "loss/entropy", "actor/clip_frac", "actor/grad_norm", "actor/lr",
            "actor/logprob_mismatch", "actor/skipped_steps", "train/adv_abs_mean", "train/adv_turn_std",
            "train/tokens"]
    if cfg.algo.kl_coef > 0:
        keys.append("loss/kl")
    if cfg.algo.needs_critic:
        keys.append("loss/value")
    if cfg.algo.mismatch_correction != "off":
        keys += [f"mismatch/{k}" for k in CORRECTION_STATS]
    if cfg.distill.teacher:
        keys += ["distill/reverse_kl", "distill/teacher_logprob"]
    if cfg.algo.off_policy_mask is not None:
        keys.append("actor/off_policy_masked_frac")
    if cfg.algo.top_entropy_frac < 1:
        keys += ["entropy_select/threshold", "entropy_select/kept_frac"]
    out = {k: stats.get(k) for k in keys}
    out["train/skipped_update"] = 0.0 if stats else 1.0
    return out

