"""An env that raises or hangs loses only its episode; too many failures stop the run with the details."""

import json
from pathlib import Path

import pytest

import turnrl.train as train_module
from faulty_envs import FlakyLake
from scripted import ScriptedEngine
from test_train import tiny_config
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.evaluate import summarize
from turnrl.faults import EnvFailureError
from turnrl.rollout import RolloutSettings, run_episodes


def play(tok, mode, *, timeout=0.0, every=3, groups=3, group_size=2):
    engine = ScriptedEngine(tok, ["Right</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False,
                               env_timeout=timeout)
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    FlakyLake.counter = iter(range(10_000))
    return run_episodes(engine, renderer, lambda: FlakyLake(mode=mode, every=every), list(range(100, 100 + groups)),
                        group_size, settings, SamplingParams(max_new_tokens=16), env_name="flaky"), engine


@pytest.mark.parametrize("mode, during, message", [
    ("reset", "reset", "reset exploded on seed 100"),
    ("step", "step", "ZeroDivisionError: step exploded"),
    ("hang", "step", "exceeded rollout.env_timeout=0.2s"),   # a pure-Python busy loop
    ("sleep", "step", "exceeded rollout.env_timeout=0.2s"),  # blocked in a system call
])
def test_failing_env_loses_only_its_episode(tiny_tokenizer, mode, during, message):
    trajs, engine = play(tiny_tokenizer, mode, timeout=0.2)
    failed = [t for t in trajs if t.failed]
    assert [trajs.index(t) for t in failed] == [2, 5]  # every third env instance is broken
    for t in failed:
        assert t.end_reason == "env_error"
        assert t.error.startswith(f"env 'flaky' seed {t.seed}: {during} raised")
        assert "Traceback" in t.error and message.replace("seed 100", f"seed {t.seed}") in t.error
    healthy = [t for t in trajs if not t.failed]
    reference, _ = play(tiny_tokenizer, "step", every=10_000)  # nothing broken
    for t in healthy:  # the other episodes played exactly as without the faults
        assert t == reference[trajs.index(t)]
    assert engine.released  # engine state was still released
    summary = summarize(trajs, k=2)
    assert summary["env_errors"] == 2
    assert summary["success_rate"] == summarize(healthy, k=2)["success_rate"]


def test_failed_episodes_are_counted_and_never_trained_on(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", iterations=2)
    cfg.env.name, cfg.env.kwargs = "faulty_envs:FlakyLake", {"mode": "reset", "every": 4}
    cfg.rollout.max_env_error_rate = 0.5
    cfg.sft.episodes = 0
    cfg.algo.filter = "none"
    updated = []
    real = train_module.ppo_update
    monkeypatch.setattr(train_module, "ppo_update", lambda p, o, s, trajs, **kw: updated.append(trajs) or real(p, o, s, trajs, **kw))
    train_module.train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    assert all(r["rollout/env_errors"] == 2 for r in records)  # 8 episodes, every 4th env broken
    assert len(updated) == 2 and all(len(batch) == 6 and not any(t.failed for t in batch) for batch in updated)
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert all(e["env_errors"] > 0 for e in evals.values())


def test_too_many_env_failures_stop_the_run_naming_env_seed_and_traceback(tmp_path):
    cfg = tiny_config(tmp_path / "run", iterations=2)
    cfg.env.name, cfg.env.kwargs = "faulty_envs:FlakyLake", {"mode": "reset", "every": 4}
    cfg.rollout.max_env_error_rate = 0.2
    cfg.sft.episodes = 0
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 2, 1, False
    with pytest.raises(EnvFailureError) as info:
        train_module.train(cfg, log=lambda *_: None)
    text = str(info.value)
    assert "2 of 8 episodes failed" in text and "rollout.max_env_error_rate=0.2" in text
    assert "env 'faulty_envs:FlakyLake' seed " in text and "Traceback" in text and "reset exploded" in text
    # nothing of the failed iteration was logged or checkpointed; the RL-start checkpoint is intact
    assert not (Path(cfg.out) / "metrics.jsonl").read_text()
    assert [p.name for p in (Path(cfg.out) / "checkpoints").iterdir()] == ["ckpt-000000"]
