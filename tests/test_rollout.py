import dataclasses

import pytest

from scripted import ScriptedEngine
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.envs import make
from turnrl.rollout import RolloutSettings, run_episodes


def renderer(tok, think=False, system="rules"):
    return ChatRenderer(tok, system_prompt=system, response_prefix="<think>" if think else "<answer>")


def test_mask_covers_exactly_the_sampled_tokens(tiny_tokenizer):
    replies = ["Right</answer><|im_end|>", "Down</answer><|im_end|>", "Left</answer><|im_end|>"]
    engine = ScriptedEngine(tiny_tokenizer, replies, logprob=-0.25)
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False)
    trajs = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("frozen_lake_det"), [5, 6], 2, settings,
                         SamplingParams(max_new_tokens=16))
    assert len(trajs) == 4
    for t in trajs:
        assert len(t.ids) == len(t.loss_mask) == len(t.logprobs)
        # model tokens are exactly the spans, in turn order, and hold the scripted replies
        masked = [i for i, m in enumerate(t.loss_mask) if m]
        spans = [i for s, e in t.turn_spans for i in range(s, e)]
        assert masked == spans
        for k, (s, e) in enumerate(t.turn_spans):
            assert tiny_tokenizer.decode(list(t.ids[s:e])) == replies[k]
            assert all(t.logprobs[i] == -0.25 for i in range(s, e))
        assert all(t.logprobs[i] == 0.0 for i, m in enumerate(t.loss_mask) if not m)
        # the text between replies is the env observation in chat form, never model text
        text = tiny_tokenizer.decode(list(t.ids))
        assert text.startswith("<|im_start|>system\nrules<|im_end|>\n<|im_start|>user\n")
        assert len(t.turn_rewards) == t.num_turns


def test_each_turn_prompt_extends_the_previous_sequence(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, ["Up</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=4, max_actions_per_turn=1, max_new_tokens=8, think=False)
    trajs = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("sokoban"), [11], 1, settings,
                         SamplingParams(max_new_tokens=8))
    prompts = [call[0] for call in engine.calls]
    for earlier, later in zip(prompts, prompts[1:]):
        assert later[: len(earlier)] == earlier  # append-only: nothing re-tokenised
    assert list(trajs[0].ids[: len(prompts[-1])]) == prompts[-1]
    assert engine.released  # per-episode engine state is always released


def test_format_penalty_and_invalid_feedback(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, ["garbage<|im_end|>", "Jump</answer><|im_end|>", "Up</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False, format_penalty=-0.1)
    t = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("sokoban"), [3], 1, settings,
                     SamplingParams(max_new_tokens=16))[0]
    assert t.turn_rewards[0] == pytest.approx(-0.1)  # did not parse: penalty only, env not stepped
    assert t.turn_rewards[1] == pytest.approx(-0.1)  # parsed but invalid action
    assert t.valid_turns == 1 and t.num_actions == 1
    assert "Invalid answer format" in t.transcript[2][1]


@pytest.mark.parametrize("strict", [False, True])
def test_strict_format_penalises_text_after_the_answer(tiny_tokenizer, strict):
    engine = ScriptedEngine(tiny_tokenizer, ["Up</answer> ok?<|im_end|>"])
    settings = RolloutSettings(max_turns=2, max_actions_per_turn=1, max_new_tokens=16, think=False,
                               format_penalty=-0.1, strict_format=strict)
    t = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("sokoban"), [3], 1, settings,
                     SamplingParams(max_new_tokens=16))[0]
    assert t.valid_turns == (0 if strict else 2)
    assert t.num_actions == (0 if strict else 2)
    if strict:
        assert t.turn_rewards == pytest.approx((-0.1, -0.1))  # not stepped: penalty only


def test_think_mode_and_multiple_actions(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, ["plan</think><answer>Up || Left || Down</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=1, max_actions_per_turn=2, max_new_tokens=32, think=True)
    t = run_episodes(engine, renderer(tiny_tokenizer, think=True), lambda: make("sokoban"), [4], 1, settings,
                     SamplingParams(max_new_tokens=32))[0]
    assert t.num_actions <= 2 and t.valid_turns == 1
    assert t.end_reason in ("turn_budget", "env")


def test_context_budget_truncates_without_crash(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, ["Up</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=10, max_actions_per_turn=1, max_new_tokens=8, max_context_tokens=90,
                               think=False)
    t = run_episodes(engine, renderer(tiny_tokenizer, system=None), lambda: make("frozen_lake_det"), [1], 1,
                     settings, SamplingParams(max_new_tokens=8))[0]
    if t.end_reason != "env":
        assert t.end_reason == "context_budget" and t.truncated
        assert len(t.ids) + 8 <= 90 + 40  # stopped before the next turn would overflow


def test_group_members_share_the_start_state(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, ["Up</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=1, max_actions_per_turn=1, max_new_tokens=8, think=False)
    trajs = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("sokoban"), [21, 22], 3, settings,
                         SamplingParams(max_new_tokens=8))
    firsts = [t.transcript[0][1] for t in trajs]
    assert firsts[0] == firsts[1] == firsts[2] and firsts[3] == firsts[4] == firsts[5]
    assert [t.group_id for t in trajs] == [0, 0, 0, 1, 1, 1]


def test_truncated_reply_is_closed_with_eos(tiny_tokenizer):
    """A reply cut at max_new_tokens gets the eos appended as context (mask 0) before the next turn."""
    engine = ScriptedEngine(tiny_tokenizer, ["Up</answer>and on and on"])
    settings = RolloutSettings(max_turns=2, max_actions_per_turn=1, max_new_tokens=6, think=False)
    t = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("sokoban"), [8], 1, settings,
                     SamplingParams(max_new_tokens=6))[0]
    s, e = t.turn_spans[0]
    assert t.ids[e] == tiny_tokenizer.eos_token_id and t.loss_mask[e] == 0


def test_free_text_env_gets_the_whole_answer(tiny_tokenizer):
    """Countdown answers are expressions: '||' or spaces inside are not action separators."""
    env_probe = make("countdown")
    obs, _ = env_probe.reset(seed=2)
    expert = env_probe.expert_action()
    engine = ScriptedEngine(tiny_tokenizer, [f"{expert}</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=1, max_actions_per_turn=5, max_new_tokens=64, think=False)
    t = run_episodes(engine, renderer(tiny_tokenizer), lambda: make("countdown"), [2], 1, settings,
                     SamplingParams(max_new_tokens=64))[0]
    assert t.success and t.total_reward == pytest.approx(1.0)


class LiveKeys:
    """Passes calls through to an engine and records the most per-episode cache keys alive at once."""

    def __init__(self, engine):
        self.engine, self.alive, self.most = engine, set(), 0
        self.generator = engine.generator

    def generate(self, prompts, params, keys=None, seeds=None):
        self.alive.update(keys)
        self.most = max(self.most, len(self.alive))
        return self.engine.generate(prompts, params, keys=keys, seeds=seeds)

    def release(self, keys):
        self.alive.difference_update(keys)
        self.engine.release(keys)


def test_max_live_bounds_the_episodes_alive_and_keeps_the_draws():
    """rollout.max_live_episodes is a memory setting: whole groups start as others end, at most max_live
    episodes hold an env and an engine cache at once, and every episode samples from its own stream, so the
    trajectories are those of a rollout that plays every episode at once."""
    import torch

    from faulty_envs import ChattyLake
    from turnrl.engines import HFEngine
    from turnrl.models import TinyModelSpec, load_policy

    class UnevenLake(ChattyLake):  # a longer first observation for larger seeds: episodes end at different turns
        def reset(self, *, seed=None, options=None):
            self.first = 40 * (seed % 3)
            return super().reset(seed=seed, options=options)

    policy = load_policy("tiny", seed=3, tiny=TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2,
                                                            intermediate_size=64))
    settings = RolloutSettings(max_turns=4, max_new_tokens=8, max_context_tokens=400, think=False)
    runs = {}
    for max_live in (0, 2, 5):
        engine = LiveKeys(HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                                   generator=torch.Generator().manual_seed(0)))
        trajs = run_episodes(engine, renderer(policy.tokenizer), lambda: UnevenLake(growth=30), list(range(6)), 2,
                             dataclasses.replace(settings, max_live=max_live), SamplingParams(max_new_tokens=8))
        runs[max_live] = trajs
        assert engine.most == {0: 12, 2: 2, 5: 4}[max_live] and not engine.alive  # whole groups of 2
    assert len({t.num_turns for t in runs[0]}) > 1  # the test needs episodes that end at different turns
    for max_live in (2, 5):
        assert len(runs[max_live]) == 12
        for a, b in zip(runs[0], runs[max_live]):
            assert (a.ids, a.turn_rewards, a.end_reason, a.seed, a.group_id) == \
                   (b.ids, b.turn_rewards, b.end_reason, b.seed, b.group_id)
            # batched matmuls round differently in other batches (docs/engines.md)
            assert b.logprobs == pytest.approx(a.logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="max_live must be >= 0"):
        RolloutSettings(max_live=-1)


def test_rollout_config_reaches_the_rollout_settings():
    from turnrl.config import RolloutConfig, TrainConfig
    from turnrl.evaluate import settings_for

    s = settings_for(TrainConfig(rollout=RolloutConfig(strict_format=True, max_live_episodes=3, think=False)))
    assert (s.strict_format, s.max_live, s.think) == (True, 3, False)
    s = settings_for(TrainConfig())
    assert (s.strict_format, s.max_live) == (False, 0)


def test_each_episode_records_the_time_spent_in_its_env(tiny_tokenizer, monkeypatch):
    """A clock that moves only inside env calls: the episodes' env_seconds add up to all of it, each one's is its
    own env's share, and none of the model's time is counted."""
    import turnrl.rollout as rollout
    from turnrl.envs.frozen_lake import FrozenLakeEnv

    clock = {"now": 0.0}
    monkeypatch.setattr(rollout, "perf_counter", lambda: clock["now"])
    spent: dict[int, float] = {}

    class TimedLake(FrozenLakeEnv):  # construction 0.125 s, reset 0.5 s, each step 1 s, close 0.25 s
        def __init__(self):
            super().__init__(slippery=False)
            self.tick(0.125)

        def tick(self, seconds):
            clock["now"] += seconds
            spent[id(self)] = spent.get(id(self), 0.0) + seconds

        def reset(self, *, seed=None, options=None):
            self.tick(0.5)
            return super().reset(seed=seed, options=options)

        def step(self, action):
            self.tick(1.0)
            return super().step(action)

        def close(self):
            self.tick(0.25)
            super().close()

    engine = ScriptedEngine(tiny_tokenizer, ["Right</answer><|im_end|>", "oops<|im_end|>", "Down</answer><|im_end|>"])
    engine_generate = engine.generate

    def generate(*args, **kwargs):  # the model's time must not count as env time
        clock["now"] += 100.0
        return engine_generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", generate)
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False)
    trajs = run_episodes(engine, renderer(tiny_tokenizer, system=None), TimedLake, [3, 4], 2, settings,
                         SamplingParams(max_new_tokens=16), env_name="timed")
    assert sum(t.env_seconds for t in trajs) == sum(spent.values())
    assert sorted(t.env_seconds for t in trajs) == sorted(spent.values())
    assert all(t.env_seconds >= 0.875 for t in trajs)  # construction, reset and close at least
    assert dataclasses.replace(trajs[0], env_seconds=-1.0) == trajs[0]  # a timing: not part of equality


def test_on_end_counts_every_episode_as_it_ends_and_evaluation_shows_a_bar(tiny_tokenizer, monkeypatch, tmp_path):
    engine = ScriptedEngine(tiny_tokenizer, ["Right</answer><|im_end|>", "oops<|im_end|>"])
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False, max_live=4)
    ended: list[int] = []
    trajs = run_episodes(engine, renderer(tiny_tokenizer, system=None), lambda: make("frozen_lake_det"),
                         [1, 2, 3, 4], 2, settings, SamplingParams(max_new_tokens=16), on_end=ended.append)
    assert sum(ended) == len(trajs) == 8 and len(ended) > 1  # told as episodes end, not once at the end

    import turnrl.evaluate as evaluate_module
    from test_train import tiny_config
    from turnrl.prepare import build_policy

    bars = []

    class Bar:
        def __init__(self, total, desc, disable, **_):
            self.total, self.desc, self.disable, self.n, self.closed = total, desc, disable, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

    monkeypatch.setattr(evaluate_module, "tqdm", Bar)
    cfg = tiny_config(tmp_path / "run")
    evaluate_module.evaluate(build_policy(cfg), cfg, episodes=3, k=2, greedy=True, progress="eval untrained")
    (bar,) = bars
    assert (bar.total, bar.n, bar.desc, bar.disable, bar.closed) == (9, 9, "eval untrained", False, True)
