"""Episodes that outgrow rollout.max_context_tokens end cleanly, are counted, and never reach the engine."""

import json

import pytest

import turnrl.train as train_module
from faulty_envs import ChattyLake
from scripted import ScriptedEngine
from test_train import tiny_config
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.rollout import RolloutSettings, run_episodes


def play(tok, env, max_context=300, max_new=16):
    engine = ScriptedEngine(tok, ["Jump</answer><|im_end|>"])  # invalid moves: the episode never ends by itself
    settings = RolloutSettings(max_turns=8, max_new_tokens=max_new, max_context_tokens=max_context, think=False)
    renderer = ChatRenderer(tok, system_prompt="rules", response_prefix="<answer>")
    return run_episodes(engine, renderer, lambda: env, [1], 1, settings, SamplingParams(max_new_tokens=max_new)), engine


def test_a_growing_episode_is_cut_before_the_budget(tiny_tokenizer):
    trajs, engine = play(tiny_tokenizer, ChattyLake(growth=30, max_steps=50))
    t = trajs[0]
    assert t.end_reason == "context_budget" and t.truncated and not t.terminated
    assert 1 <= t.num_turns < 8 and len(t.turn_rewards) == t.num_turns
    assert len(t.ids) <= 300
    assert all(len(p) + 16 <= 300 for call in engine.calls for p in call)  # no prompt could overflow


def test_a_first_observation_over_the_budget_plays_no_turn(tiny_tokenizer):
    trajs, engine = play(tiny_tokenizer, ChattyLake(first=400))
    t = trajs[0]
    assert t.end_reason == "context_budget" and t.num_turns == 0 and t.total_reward == 0.0
    assert engine.calls == []  # the engine never saw it


@pytest.mark.parametrize("kwargs, all_cut", [({"growth": 40}, False), ({"first": 300}, True)])
def test_training_counts_overflow_and_never_trains_on_empty_episodes(tmp_path, monkeypatch, kwargs, all_cut):
    cfg = tiny_config(tmp_path / "run", iterations=2)
    cfg.env.name, cfg.env.kwargs = "faulty_envs:ChattyLake", kwargs
    cfg.rollout.max_turns, cfg.rollout.max_context_tokens = 4, 200
    cfg.algo.filter = "none"
    cfg.sft.episodes = 0
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 2, 1, False
    batches = []
    real = train_module.ppo_update
    monkeypatch.setattr(train_module, "ppo_update", lambda p, o, s, t, **kw: batches.append(t) or real(p, o, s, t, **kw))
    train_module.train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/context_truncated"] == 1.0 for r in records)
    assert all(len(t.ids) <= 200 for batch in batches for t in batch)
    if all_cut:
        assert batches == [] and all(r["train/skipped_update"] == 1.0 for r in records)
    else:
        assert len(batches) == 2 and all(t.num_turns >= 1 for batch in batches for t in batch)
