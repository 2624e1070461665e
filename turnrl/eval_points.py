"""A run's held-out evaluation points: eval.json (`untrained`, `after_sft`, `after_rl`, and `<point>@<env>` with
`eval.train_env`), eval_samples.json, the periodic eval/* metrics, and the sample episodes both sample files hold
(docs/metrics.md). Used by turnrl.train."""

from __future__ import annotations

import json
from pathlib import Path

from turnrl.checkpoint import atomic_write_text
from turnrl.config import TrainConfig
from turnrl.evaluate import evaluate
from turnrl.trackers import Trackers
from turnrl.trajectory import Trajectory


def write_eval(path: Path, evals: dict) -> None:
    atomic_write_text(path, json.dumps(evals, indent=2))


def eval_points(cfg: TrainConfig, name: str) -> list[tuple[str, str | None]]:
    """(eval.json key, env) of one evaluation point: the evaluation env, and with `eval.train_env` the training
    env too when they differ (key "<point>@<env name>")."""
    points = [(name, None)]
    if cfg.eval.train_env and (cfg.env.eval_name or cfg.env.name) != cfg.env.name:
        points.append((f"{name}@{cfg.env.name}", cfg.env.name))
    return points


def run_eval(policy, cfg: TrainConfig, evals: dict, name: str, path: Path, log, engine=None, pool=None,
              kept_envs: dict | None = None, trackers: Trackers | None = None) -> None:
    for key, env_name in eval_points(cfg, name):
        if key in evals:  # a resumed run that already measured it
            continue
        result, trajs = evaluate(policy, cfg, env_name=env_name, engine=engine, pool=pool, kept_envs=kept_envs,
                                 progress=f"eval {key}" if cfg.progress else None)
        if cfg.samples_per_iteration:  # a few of its episodes for turnrl report (eval_samples.json)
            _write_eval_samples(path, {key: sample_episodes(trajs, cfg.samples_per_iteration, policy.tokenizer)})
        evals[key] = result.to_dict()
        write_eval(path, evals)
        if trackers is not None:
            trackers.evaluation(key, evals[key], _eval_step(cfg, name))
        se = "" if result.success_stderr is None else f" ± {result.success_stderr:.3f}"
        greedy = "" if result.greedy_success_rate is None else f", greedy {result.greedy_success_rate:.3f}"
        log(f"[eval] {key}: success {result.success_rate:.3f}{se} (T={result.temperature}){greedy}, "
            f"return {result.mean_return:.3f}, pass@{result.k} {result.pass_at_k:.3f}"
            + (f", succ@1 {result.qa['succ@1']:.3f}, succ@{cfg.rollout.max_turns} "
               f"{result.qa[f'succ@{cfg.rollout.max_turns}']:.3f}" if result.qa else "")
            + "".join(f", {name} {value:.3f}" for name, value in (result.env_metrics or {}).items()))


def copy_eval(cfg: TrainConfig, evals: dict, src: str, dst: str, path: Path,
               trackers: Trackers | None = None) -> None:
    """The same model as an earlier point: its results, without rerunning them."""
    samples, copied = _read_eval_samples(path), {}
    for (key_src, _), (key_dst, _) in zip(eval_points(cfg, src), eval_points(cfg, dst)):
        evals[key_dst] = dict(evals[key_src])
        if trackers is not None:
            trackers.evaluation(key_dst, evals[key_dst], _eval_step(cfg, dst))
        if key_src in samples:
            copied[key_dst] = samples[key_src]
    if copied:
        _write_eval_samples(path, copied)
    write_eval(path, evals)


def _eval_step(cfg: TrainConfig, name: str) -> int:
    """The RL iteration an evaluation point is measured at, its step in the trackers."""
    return cfg.iterations if name == "after_rl" else 0


def _read_eval_samples(eval_path: Path) -> dict:
    samples_path = eval_path.with_name("eval_samples.json")
    return json.loads(samples_path.read_text()) if samples_path.exists() else {}


def _write_eval_samples(eval_path: Path, points: dict) -> None:
    """Adds (or replaces) evaluation points in eval_samples.json, next to eval.json (renamed into place)."""
    write_eval(eval_path.with_name("eval_samples.json"), {**_read_eval_samples(eval_path), **points})


def periodic_eval_metrics(result) -> dict[str, float]:
    """The eval/* keys of a held-out evaluation during training (`eval.every`, docs/metrics.md)."""
    out = {"eval/success_rate": result.success_rate, "eval/mean_return": result.mean_return,
           "eval/pass_at_k": result.pass_at_k}
    if result.greedy_success_rate is not None:
        out["eval/greedy_success_rate"] = result.greedy_success_rate
    out.update({f"eval/env/{name}": value for name, value in (result.env_metrics or {}).items()})
    return out


def sample_episodes(trajs: list[Trajectory], n: int, tokenizer=None, advantages: dict | None = None) -> list[dict]:
    """Up to `n` played episodes of a rollout for samples.jsonl (docs/metrics.md): the first successful one and
    the first unsuccessful one, then the next in rollout order. With the `tokenizer`, each reply's sampled tokens
    and their sampling logprobs too; with `advantages` (a training rollout's kept episodes' per-turn advantages,
    `ppo_update(turn_advantages=...)`, keyed by (group_id, ids)) each reply's advantage, None when its episode was
    not trained on."""
    played = [t for t in trajs if not t.failed]
    first = [next((t for t in played if t.success), None), next((t for t in played if not t.success), None)]
    chosen = [t for t in first if t is not None][:n]
    chosen += [t for t in played if all(t is not c for c in chosen)][:n - len(chosen)]
    out = []
    for t in chosen:
        episode = {"seed": t.seed, "group_id": t.group_id, "success": t.success, "reward": t.total_reward,
                   "turns": t.num_turns, "end_reason": t.end_reason, "transcript": [list(m) for m in t.transcript],
                   "turn_rewards": list(t.turn_rewards)}
        if tokenizer is not None:
            episode["replies"] = [{"tokens": [tokenizer.decode([i]) for i in t.ids[start:end]],
                                   "logprobs": [round(x, 4) for x in t.logprobs[start:end]]}
                                  for start, end in t.turn_spans]
            if advantages is not None:  # a training rollout: what the update made of each reply
                trained = advantages.get((t.group_id, t.ids)) or []
                for k, reply in enumerate(episode["replies"]):
                    reply["advantage"] = trained[k] if k < len(trained) else None
        out.append(episode)
    return out
