"""NaN/inf in advantages, loss or gradients skip the optimizer step; a streak of them stops the run."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import turnrl.update as update
from scripted import ScriptedEngine
from test_train import tiny_config, weights
from turnrl.config import AlgoConfig, OptimConfig, TrainConfig
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.envs import make
from turnrl.models import TinyModelSpec, load_policy
from turnrl.rollout import RolloutSettings, run_episodes
from turnrl.prepare import rl_optimizer
from turnrl.train import train


@pytest.fixture
def setup():
    policy = load_policy("tiny", tiny=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    tok = policy.tokenizer
    replies = lambda call, row, prompt: "Right</answer><|im_end|>" if row % 2 else "oops<|im_end|>"  # noqa: E731
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    trajs = run_episodes(ScriptedEngine(tok, replies), renderer, lambda: make("frozen_lake_det"), [1, 2], 2,
                         RolloutSettings(max_turns=2, max_new_tokens=8, think=False), SamplingParams(max_new_tokens=8))
    assert len({t.total_reward for t in trajs}) > 1  # a real learning signal
    cfg = TrainConfig(iterations=4, optim=OptimConfig(lr=1e-2, warmup_steps=0),
                      algo=AlgoConfig(estimator="grpo", filter="none", epochs=2, minibatches=2))
    optimizer, scheduler = rl_optimizer(policy, cfg)
    return policy, optimizer, scheduler, trajs, cfg


def run_update(setup):
    policy, optimizer, scheduler, trajs, cfg = setup
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    stats = update.ppo_update(policy, optimizer, scheduler, trajs, algo=cfg.algo, optim=cfg.optim, temperature=1.0)
    changed = any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())
    return stats, changed


def nan_advantages(monkeypatch):
    real = update.compute_credit

    def poisoned(*args, **kwargs):
        credit = real(*args, **kwargs)
        credit.advantages[0] = float("nan")
        return credit
    monkeypatch.setattr(update, "compute_credit", poisoned)


def test_a_finite_update_steps(setup):
    stats, changed = run_update(setup)
    assert changed and stats["actor/skipped_steps"] == 0.0


@pytest.mark.parametrize("fault", ["advantages", "loss", "gradients"])
def test_non_finite_values_skip_the_step(setup, monkeypatch, fault):
    policy, optimizer, scheduler, _, cfg = setup
    if fault == "advantages":
        nan_advantages(monkeypatch)
    elif fault == "loss":
        real = update.ppo_clip_loss
        monkeypatch.setattr(update, "ppo_clip_loss", lambda *a, **k: (lambda pg, s: (pg * float("inf"), s))(*real(*a, **k)))
    else:
        next(policy.lm.parameters()).register_hook(lambda g: g * float("nan"))
    stats, changed = run_update(setup)
    assert not changed
    assert optimizer.state == {}  # Adam moments untouched
    assert scheduler.last_epoch == 0  # the lr schedule did not advance
    assert stats["actor/skipped_steps"] == cfg.algo.epochs * cfg.algo.minibatches


def small(out, **over):
    cfg = tiny_config(out, **over)
    cfg.sft.episodes = 0
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 1, 1, False
    cfg.algo = AlgoConfig(estimator="grpo", filter="none")
    return cfg


def test_a_streak_of_bad_updates_stops_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_advantages(monkeypatch)
    cfg = small(tmp_path / "run", iterations=5)
    cfg.optim = replace(cfg.optim, max_bad_updates=2)
    with pytest.raises(FloatingPointError, match=r"2 consecutive updates .*optim.max_bad_updates=2.*ckpt-000001"):
        train(cfg, log=lambda *_: None)
    run = Path(cfg.out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["actor/skipped_steps"], r["actor/bad_update_streak"], r["loss/policy"]) for r in records] == [
        (1.0, 1.0, None), (1.0, 2.0, None)]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts[-1] == "ckpt-000001"  # the iteration that hit the limit was not checkpointed
    start, last = weights(run / "checkpoints" / ckpts[0] / "model"), weights(run / "checkpoints" / ckpts[-1] / "model")
    assert all(torch.equal(start[k], last[k]) and torch.isfinite(last[k]).all() for k in start)


def test_an_isolated_bad_update_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    calls = []
    real = update.compute_credit

    def first_poisoned(*args, **kwargs):
        credit = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            credit.advantages[0] = float("inf")
        return credit
    monkeypatch.setattr(update, "compute_credit", first_poisoned)
    cfg = small(tmp_path / "run", iterations=3)
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["actor/bad_update_streak"] for r in records] == [1.0, 0.0, 0.0]
    assert records[0]["actor/skipped_steps"] == 1.0 and records[1]["actor/skipped_steps"] == 0.0
    assert all(r["loss/policy"] is not None for r in records[1:])
