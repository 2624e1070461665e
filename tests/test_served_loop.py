"""Served evaluation (`turnrl.served`) plays in the episode loop of token-level rollouts: a failing env loses only
its episode, `rollout.max_live_episodes` bounds the envs alive, and the summary counts failures and reports the
multi-attempt QA metrics as `turnrl eval` does. A scripted chat engine stands in for the server (test_serve.py
plays through a real one)."""

import itertools

import pytest

from faulty_envs import FlakyLake
from turnrl.config import EnvConfig, EvalConfig, RolloutConfig, TrainConfig
from turnrl.engines.base import SamplingParams
from turnrl.engines.openai import ChatReply
from turnrl.envs.frozen_lake import FrozenLakeEnv
from turnrl.evaluate import summarize
from turnrl.served import evaluate_served, run_chat_episodes


class ScriptedChat:
    """Answers every conversation with `reply(conversation)`; records the batch sizes it was sent."""

    def __init__(self, reply=lambda messages: "<answer>Right</answer>"):
        self.reply, self.batches = reply, []

    def chat(self, conversations, params):
        self.batches.append(len(conversations))
        return [ChatReply(self.reply(c), "stop") for c in conversations]


def config(env="frozen_lake_det", **rollout) -> TrainConfig:
    return TrainConfig(env=EnvConfig(name=env, system_prompt=False),
                       rollout=RolloutConfig(**{"max_turns": 3, "think": False, **rollout}),
                       eval=EvalConfig(episodes=4, k=2, greedy=False))


def flaky_run(mode, every, timeout=0.0):
    FlakyLake.counter = itertools.count()
    return run_chat_episodes(ScriptedChat(), lambda: FlakyLake(mode=mode, every=every), list(range(100, 103)), 2,
                             config(env_timeout=timeout), SamplingParams(max_new_tokens=16), env_name="flaky")


@pytest.mark.parametrize("mode, during, message", [
    ("reset", "reset", "reset exploded on seed"),
    ("step", "step", "ZeroDivisionError: step exploded"),
    ("sleep", "step", "exceeded rollout.env_timeout=0.2s"),
])
def test_failing_env_loses_only_its_served_episode(mode, during, message):
    episodes = flaky_run(mode, every=3, timeout=0.2)
    assert [i for i, e in enumerate(episodes) if e.failed] == [2, 5]  # every third env instance is broken
    for e in (episodes[2], episodes[5]):
        assert e.end_reason == "env_error" and e.env is None  # closed
        assert e.error.startswith(f"env 'flaky' seed {e.seed}: {during} raised") and message in e.error
    reference = flaky_run("step", every=10_000)  # nothing broken
    for i, e in enumerate(episodes):
        if not e.failed:  # the other episodes played exactly as without the faults
            assert (e.messages, e.turn_rewards, e.success, e.end_reason) == \
                   (reference[i].messages, reference[i].turn_rewards, reference[i].success, reference[i].end_reason)
    summary = summarize(episodes, k=2)
    assert summary["env_errors"] == 2
    assert summary["success_rate"] == summarize([e for e in episodes if not e.failed], k=2)["success_rate"]


class CountedLake(FrozenLakeEnv):
    """Deterministic FrozenLake that counts its open instances."""

    open, most = 0, 0

    def __init__(self):
        super().__init__(slippery=False)
        CountedLake.open += 1
        CountedLake.most = max(CountedLake.most, CountedLake.open)

    def close(self):
        CountedLake.open -= 1
        super().close()


def test_max_live_bounds_the_served_envs_alive_and_keeps_the_episodes():
    moves = itertools.cycle(["Down", "Right", "Up", "Left", "Down"])
    script = {}  # one fixed reply per (conversation so far): the episodes do not depend on the batching

    def reply(messages):
        return script.setdefault(str(messages), f"<answer>{next(moves)}</answer>")

    runs = {}
    for max_live in (0, 2, 5):
        CountedLake.open = CountedLake.most = 0
        engine = ScriptedChat(reply)
        runs[max_live] = run_chat_episodes(engine, CountedLake, list(range(6)), 2, config(max_live_episodes=max_live),
                                           SamplingParams(max_new_tokens=16))
        assert CountedLake.most == {0: 12, 2: 2, 5: 4}[max_live] and CountedLake.open == 0  # whole groups of 2
        assert max(engine.batches) == {0: 12, 2: 2, 5: 4}[max_live]
    assert len({e.num_turns for e in runs[0]}) > 1  # the test needs episodes that end at different turns
    for max_live in (2, 5):
        assert [(e.seed, e.messages, e.turn_rewards, e.end_reason) for e in runs[max_live]] == \
               [(e.seed, e.messages, e.turn_rewards, e.end_reason) for e in runs[0]]
    ends = {e.end_reason for e in runs[0]}
    assert ends <= {"env", "turn_budget"} and "turn_budget" in ends
    for e in runs[0]:
        assert e.num_turns <= 3 and [text for _role, text in e.transcript] == [m["content"] for m in e.messages]


def test_served_evaluation_reports_env_errors_and_qa_metrics():
    FlakyLake.counter = itertools.count()
    cfg = config(env="faulty_envs:FlakyLake")
    cfg.env.kwargs = {"mode": "reset", "every": 4}
    result, episodes = evaluate_served(ScriptedChat(), cfg)
    assert result.env_errors == sum(e.failed for e in episodes) == 2  # 8 episodes, every 4th env broken
    assert result.to_dict().get("qa") is None  # FrozenLake is not a multi-attempt QA env

    answers = itertools.cycle(["<answer>3</answer>", "<answer>3.0</answer>", "no tags"])
    result, episodes = evaluate_served(ScriptedChat(lambda messages: next(answers)), config(env="math_qa"))
    qa = result.to_dict()["qa"]
    assert [k for k in qa if k.startswith("succ@")] == ["succ@1", "succ@2", "succ@3"]
    assert qa["succ@3"] == pytest.approx(result.success_rate)  # every episode ends within the 3-turn budget
    assert 0.0 < qa["unique_answer_ratio"] <= 1.0 and result.env_errors == 0
