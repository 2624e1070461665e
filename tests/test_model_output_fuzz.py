"""Any model output flows through parsing, env, metrics logging and the evaluation summary without an
exception (property-based, hypothesis)."""

import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scripted import ScriptedEngine  # noqa: E402
from test_train import tiny_config  # noqa: E402
from turnrl.checkpoint import MetricsLog  # noqa: E402
from turnrl.context import ChatRenderer  # noqa: E402
from turnrl.engines.base import Completion, SamplingParams  # noqa: E402
from turnrl.envs import make  # noqa: E402
from turnrl.evaluate import summarize  # noqa: E402
from turnrl.models import build_tiny_tokenizer  # noqa: E402
from turnrl.parsing import parse_reply  # noqa: E402
from turnrl.rollout import RolloutSettings, run_episodes  # noqa: E402
from turnrl.shaping import shape_rewards  # noqa: E402
from turnrl.train import rollout_metrics  # noqa: E402

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<answer><answer>", "||", " || ", "<|im_end|>",
             "<|im_start|>", "<|endoftext|>", "user\n", "Up", "Down", "Left", "Right", "1+2*3", "(", "\x00", "\x1b[2J",
             "\r", "\n", "\t", "\u202e", "\ufeff", "🧊", "é", "字", " "]
# A reply: free Unicode text (control characters included), tag soup, or an endless repetition.
REPLY = st.one_of(
    st.text(max_size=80),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=20).map("".join),
    st.tuples(st.sampled_from(FRAGMENTS + ["a", "🧊"]), st.integers(50, 400)).map(lambda p: p[0] * p[1]),
)
VOCAB = len(build_tiny_tokenizer())
ENVS = ["frozen_lake_det", "sokoban", "countdown", "bandit", "math_qa"]


class IdsEngine:
    """Returns arbitrary token ids (special tokens included), as a broken model might."""

    def __init__(self, rows):
        self.rows = rows

    def generate(self, prompts, params: SamplingParams, keys=None):
        return [Completion(tuple(ids[: params.max_new_tokens]), tuple(-1.0 for _ in ids[: params.max_new_tokens]),
                           "length") for ids in (self.rows[i % len(self.rows)] for i in range(len(prompts)))]

    def release(self, keys):
        pass


def check_whole_path(trajs, tmp_path, k):
    assert all(not t.failed for t in trajs)  # built-in envs never raise on bad text
    for t in trajs:
        assert len(t.ids) == len(t.loss_mask) == len(t.logprobs)
        assert all(math.isfinite(r) for r in t.turn_rewards)
    cfg = tiny_config(tmp_path / "run")
    record = {"iteration": 0, **rollout_metrics(trajs, cfg)}
    shape_rewards(trajs, cfg.reward, 0)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append(record)
    log.append({"transcript": [list(x) for x in trajs[0].transcript]})
    assert log.read()[-2] == json.loads(json.dumps(record))
    summary = summarize(trajs, k)
    assert 0.0 <= summary["success_rate"] <= 1.0
    log.path.unlink()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(replies=st.lists(REPLY, min_size=1, max_size=4), env=st.sampled_from(ENVS), think=st.booleans(),
       max_actions=st.integers(1, 3))
def test_any_reply_text_flows_through_the_rollout(tiny_tokenizer, tmp_path, replies, env, think, max_actions):
    engine = ScriptedEngine(tiny_tokenizer, lambda call, row, prompt: replies[(call + row) % len(replies)])
    renderer = ChatRenderer(tiny_tokenizer, system_prompt="rules", response_prefix="<think>" if think else "<answer>")
    rollout = RolloutSettings(max_turns=3, max_actions_per_turn=max_actions, max_new_tokens=48,
                              max_context_tokens=600, think=think)
    trajs = run_episodes(engine, renderer, lambda: make(env), [3, 4], 2, rollout, SamplingParams(max_new_tokens=48),
                         env_name=env)
    for reply in replies:
        parse_reply(reply, think=think, max_actions=max_actions)
    check_whole_path(trajs, tmp_path, k=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(rows=st.lists(st.lists(st.integers(0, VOCAB - 1), max_size=40), min_size=1, max_size=3),
       env=st.sampled_from(ENVS))
def test_any_token_ids_flow_through_the_rollout(tiny_tokenizer, tmp_path, rows, env):
    # the ids cover the whole vocabulary, special tokens (eos, <|im_start|>, ...) included
    renderer = ChatRenderer(tiny_tokenizer, system_prompt=None, response_prefix="<answer>")
    rollout = RolloutSettings(max_turns=3, max_new_tokens=40, max_context_tokens=500, think=False)
    trajs = run_episodes(IdsEngine(rows), renderer, lambda: make(env), [7], 2, rollout,
                         SamplingParams(max_new_tokens=40), env_name=env)
    check_whole_path(trajs, tmp_path, k=2)
