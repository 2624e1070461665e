import pytest

from scripted import ScriptedEngine
from turnrl.engines import SamplingParams
from turnrl.envs import make
from turnrl.rollout import ChatRenderer, RolloutSettings, run_episodes


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
