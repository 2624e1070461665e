"""Context policies (full / window / summary) and turn-as-sample training rows (turnrl/context.py, turnrl/trajectory.py)."""

import copy
import dataclasses

import pytest
import torch

from scripted import ScriptedEngine
from test_credit import SETUPS, random_batch
from turnrl.algos.losses import AGG_MODES, token_logprobs
from turnrl.cli import main
from turnrl.config import AlgoConfig, OptimConfig
from turnrl.context import SUMMARY_INSTRUCTION, ChatRenderer
from turnrl.engines import HFEngine, SamplingParams
from turnrl.envs import make
from turnrl.models import TinyModelSpec, load_policy
from turnrl.reference import Reference
from turnrl.rollout import RolloutSettings, run_episodes
from turnrl.trajectory import as_turn_rows
from turnrl.batch import collate
from turnrl.update import minibatch_backward, prepare_targets

SYSTEM = "rules"


def renderer(tok, think=False, system=SYSTEM):
    return ChatRenderer(tok, system_prompt=system, response_prefix="<think>" if think else "<answer>")


def play(engine, rend, settings, seeds=(7,), group_size=1, env="sokoban", max_new_tokens=48):
    return run_episodes(engine, rend, lambda: make(env), list(seeds), group_size, settings,
                        SamplingParams(max_new_tokens=max_new_tokens))


def rows_of(t):
    return [t.ids[s:e] for s, e in t.training_rows()]


# ------------------------------------------------------------------------- window


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_window_prompt_holds_exactly_the_last_k_turns(tiny_tokenizer, k):
    # turn t replies with a distinct (invalid) action "Xt": the episode never ends before max_turns
    engine = ScriptedEngine(tiny_tokenizer, lambda call, row, prompt: f"X{call}</answer><|im_end|>")
    settings = RolloutSettings(max_turns=6, max_new_tokens=16, max_context_tokens=4096, think=False,
                               context="window", context_window=k, turn_rows=True)
    t = play(engine, renderer(tiny_tokenizer), settings)[0]
    assert t.num_turns == 6
    observations = [text for role, text in t.transcript if role == "user"]
    prompts = [call[0] for call in engine.calls]
    for turn, prompt in enumerate(prompts):
        first = max(0, turn - k)
        # the same conversation rendered afresh by the tokenizer's chat template: the window's turns, then
        # the newest observation
        messages = [{"role": "system", "content": SYSTEM}]
        for j in range(first, turn):
            messages += [{"role": "user", "content": observations[j]},
                         {"role": "assistant", "content": f"<answer>X{j}</answer>"}]
        messages.append({"role": "user", "content": observations[turn]})
        expected = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "<answer>"
        assert tiny_tokenizer.decode(prompt) == expected
        # the turn's training row is that exact prompt, then the exact sampled reply
        assert list(rows_of(t)[turn]) == prompt + tiny_tokenizer(f"X{turn}</answer><|im_end|>",
                                                                 add_special_tokens=False)["input_ids"]
    # the previous reply sits in the prompt as the very ids the engine sampled (not re-tokenised text)
    for turn in range(1, 6 if k else 1):
        start, end = t.turn_spans[turn - 1]
        sampled = list(t.ids[start:end])
        prompt = prompts[turn]
        assert any(prompt[i:i + len(sampled)] == sampled for i in range(len(prompt) - len(sampled) + 1))
    assert t.prompt_lengths() == [len(p) for p in prompts]


def test_window_as_large_as_the_episode_equals_full_history(tiny_tokenizer):
    reply = lambda call, row, prompt: f"X{call}</answer><|im_end|>"  # noqa: E731
    full = ScriptedEngine(tiny_tokenizer, reply)
    window = ScriptedEngine(tiny_tokenizer, reply)
    base = dict(max_turns=4, max_new_tokens=16, max_context_tokens=4096, think=False, turn_rows=True)
    a = play(full, renderer(tiny_tokenizer), RolloutSettings(**base))[0]
    b = play(window, renderer(tiny_tokenizer), RolloutSettings(**base, context="window", context_window=4))[0]
    assert full.calls == window.calls
    assert a == b


# ------------------------------------------------------------------------- summary


def test_summary_prompt_stays_bounded_over_ten_turns(tiny_tokenizer):
    # each reply's reflection is longer than the last (and is cut at max_new_tokens by the engine)
    def reply(call, row, prompt):
        return f"[n{call}] " + "x" * (6 * call) + "</think><answer>Jump</answer><|im_end|>"

    rend = renderer(tiny_tokenizer, think=True, system=f"{SYSTEM}\n\n{SUMMARY_INSTRUCTION}")
    lengths = {}
    for context in ("full", "summary"):
        engine = ScriptedEngine(tiny_tokenizer, reply)
        settings = RolloutSettings(max_turns=10, max_new_tokens=40, max_context_tokens=8192, think=True,
                                   context=context, turn_rows=True)
        t = play(engine, rend, settings, env="frozen_lake_det")[0]
        assert t.num_turns == 10 and t.end_reason == "turn_budget"
        prompts = [call[0] for call in engine.calls]
        lengths[context] = [len(p) for p in prompts]
        if context == "summary":
            observations = [text for role, text in t.transcript if role == "user"]
            empty = len(rend.prompt_ids(
                "Your reflection and plan from your previous reply:\n\nYour previous answer: \n\nCurrent observation:\n"
                + max(observations, key=len)))
            for turn, prompt in enumerate(prompts[1:], start=1):
                # at most one reply's worth of reflection and answer on top of the fixed frame
                assert len(prompt) <= empty + 2 * settings.max_new_tokens
                text = tiny_tokenizer.decode(prompt)
                assert f"[n{turn - 1}]" in text and f"[n{turn - 2}]" not in text  # only the latest reflection
                assert observations[turn] in text and SUMMARY_INSTRUCTION in text
            # after the first turn the length varies only with the reflection, never with the turn count
            assert max(lengths["summary"][1:]) - min(lengths["summary"][1:]) <= settings.max_new_tokens
            assert max(lengths["summary"]) < lengths["full"][-1] / 2
    assert lengths["full"] == sorted(lengths["full"]) and lengths["full"][-1] > 5 * lengths["full"][0]


def test_summary_of_an_unparsed_reply_keeps_its_text(tiny_tokenizer):
    engine = ScriptedEngine(tiny_tokenizer, ["lost track<|im_end|>", "again</think><answer>Up</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=2, max_new_tokens=32, think=True, context="summary", turn_rows=True)
    play(engine, renderer(tiny_tokenizer, think=True), settings)
    second = tiny_tokenizer.decode(engine.calls[1][0])
    assert "previous reply:\nlost track\nYour previous answer: (none)" in second


# ------------------------------------------------------------------------- turn rows with a real engine


class Recording:
    """Passes calls through to an engine and keeps the prompts it was given."""

    def __init__(self, engine):
        self.engine, self.prompts = engine, []

    def generate(self, prompts, params, keys=None):
        self.prompts.extend(list(p) for p in prompts)
        return self.engine.generate(prompts, params, keys=keys)

    def release(self, keys):
        self.engine.release(keys)


@pytest.fixture(scope="module")
def tiny_policy():
    return load_policy("tiny", seed=3, tiny=TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2,
                                                          intermediate_size=64))


@pytest.mark.parametrize("context", ["full", "window", "summary"])
def test_turn_rows_hold_the_engine_prompts_and_sampled_logprobs(tiny_policy, context):
    policy = tiny_policy
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    recorder = Recording(engine)
    settings = RolloutSettings(max_turns=4, max_new_tokens=12, max_context_tokens=1024, think=True, context=context,
                               context_window=1, turn_rows=True)
    rend = renderer(policy.tokenizer, think=True)
    trajs = run_episodes(recorder, rend, lambda: make("frozen_lake_det"), [1, 2, 3], 2, settings,
                         SamplingParams(max_new_tokens=12))
    given = iter(recorder.prompts)
    by_turn = {}
    for turn in range(settings.max_turns):  # the engine gets, turn by turn, the active episodes in order
        for i, t in enumerate(trajs):
            if turn < t.num_turns:
                by_turn[(i, turn)] = next(given)
    rows = 0
    for i, t in enumerate(trajs):
        for turn, ((start, end), row_start) in enumerate(zip(t.turn_spans, t.row_starts)):
            prompt = list(t.ids[row_start:start])
            assert prompt == by_turn[(i, turn)]
            ids = torch.tensor([t.ids[row_start:end]])
            with torch.no_grad():
                logits = policy.lm(input_ids=ids).logits[:, :-1].float()
            recomputed = token_logprobs(logits, ids[:, 1:])[0, start - row_start - 1:]
            torch.testing.assert_close(recomputed, torch.tensor(t.logprobs[start:end]), atol=1e-4, rtol=0)
            assert all(t.loss_mask[j] == 0 for j in range(row_start, start))
            assert all(t.loss_mask[j] == 1 for j in range(start, end))
            rows += 1
    assert rows >= 8
    if context != "full":  # the prompts were not extensions: the engine reused only a shared head
        assert any(not later[:len(earlier)] == earlier for (i, k), earlier in by_turn.items()
                   if (later := by_turn.get((i, k + 1))) is not None)
    assert engine.stats["reused_tokens"] > 0


def test_full_history_turn_rows_are_the_split_episode(tiny_tokenizer):
    reply = lambda call, row, prompt: f"X{call}</answer><|im_end|>"  # noqa: E731
    base = dict(max_turns=3, max_new_tokens=16, think=False)
    one = play(ScriptedEngine(tiny_tokenizer, reply), renderer(tiny_tokenizer), RolloutSettings(**base), seeds=[4, 5])
    rows = play(ScriptedEngine(tiny_tokenizer, reply), renderer(tiny_tokenizer), RolloutSettings(**base, turn_rows=True),
                seeds=[4, 5])
    assert [as_turn_rows(t) for t in one] == rows
    for a, b in zip(one, rows):
        assert a.prompt_lengths() == b.prompt_lengths()
        assert rows_of(b)[-1] == a.ids  # the last turn's row is the whole episode


# ------------------------------------------------------------------------- loss equivalence


@pytest.mark.parametrize("setup", [s for s in SETUPS if "gspo" not in s] + ["gae-critic", "gigpo-ppo"])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_full_history_as_turn_rows_gives_the_single_sequence_loss(setup, agg):
    """Full history trained one row per turn: same advantages, same loss, same gradient (ppo loss)."""
    policy, trajs = random_batch(seed=2)
    extra = {"gae-critic": dict(estimator="gae", gamma=0.95, lam=0.9), "gigpo-ppo": dict(estimator="gigpo")}
    algo = AlgoConfig(filter="none", loss_agg=agg, **(extra.get(setup) or SETUPS[setup]))
    if algo.estimator == "gigpo":
        trajs = [dataclasses.replace(t, transcript=tuple(x for k in range(t.num_turns)
                                                        for x in (("user", f"s{k % 2}"), ("assistant", "a"))))
                 for t in trajs]
    ref = copy.deepcopy(policy.lm)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    optim = OptimConfig(micro_batch_tokens=256)
    results = []
    for form in (trajs, [as_turn_rows(t) for t in trajs]):
        batch = collate(form, policy.pad_token_id)
        targets = prepare_targets(policy, batch, form, algo=algo, optim=optim, temperature=1.0, ref_lm=Reference(ref))
        policy.train()
        policy.zero_grad(set_to_none=True)
        # two episodes' rows out of the 8, as in a mini-batch
        mb = [r for r, e in enumerate(batch.episode_of) if e in (1, 4, 6)]
        losses = minibatch_backward(policy, batch, targets, mb, algo=algo, optim=optim, temperature=1.0)
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((batch, losses, grads, targets.credit))
    (b1, l1, g1, c1), (b2, l2, g2, c2) = results
    assert b2.size > b1.size  # really one row per turn
    assert l1.keys() == l2.keys()
    for key in l1:
        assert l1[key] == pytest.approx(l2[key], abs=1e-5), key
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4, msg=name)
    # the advantages of the model tokens agree, turn by turn
    assert torch.allclose(c1.turn_advantages, c2.turn_advantages, atol=1e-5)
    assert abs(l1["loss/policy"]) > 1e-4  # a real signal, not 0 == 0


# ------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("args, field", [
    (["--rollout.context", "window", "--rollout.context-window", "-1"], "rollout.context_window"),
    (["--rollout.context", "full", "--rollout.context-window", "3"], "rollout.context_window"),
    (["--rollout.context", "summary", "--rollout.samples", "episode"], "rollout.samples"),
    (["--rollout.context", "summary", "--rollout.no-think"], "rollout.think"),
])
def test_invalid_context_settings_exit_2_naming_the_field(args, field, capsys, tmp_path):
    code = main(["train", "--out", str(tmp_path / "r")] + args)
    err = capsys.readouterr().err
    assert code == 2
    assert field in err and len(err.strip().splitlines()) == 1


def test_rollout_settings_refuse_window_without_turn_rows():
    with pytest.raises(ValueError, match="turn_rows"):
        RolloutSettings(context="window")
    with pytest.raises(ValueError, match="context_window"):
        RolloutSettings(context="window", context_window=-1, turn_rows=True)


# ------------------------------------------------------------------------- training end to end


CONTEXT_RUNS = {
    "full-turn-rows": dict(context="full", samples="turn"),
    "window": dict(context="window", context_window=1),
    "summary": dict(context="summary", think=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(CONTEXT_RUNS))
def test_training_with_a_context_policy_resumes_exactly(tmp_path, run):
    """SFT + 4 RL iterations (tiny model, frozen_lake, 1 thread) under each policy; a run killed with SIGKILL
    in iteration 3 and resumed ends with the same metrics, weights and evaluation as an uninterrupted one."""
    import json
    from pathlib import Path

    from test_resume_exact import assert_same_run, kill_during_update, resume_to_the_end, small_config
    from turnrl.train import train

    def config(out):
        cfg = small_config(out)
        # seed 1: every iteration after the kill has a nonzero advantage under each policy (with seed 0, since
        # the engine's shared-prompt prefill changed the draws, iteration 2 of full-turn-rows has none)
        cfg.seed = 1
        cfg.rollout = dataclasses.replace(cfg.rollout, max_turns=3, max_context_tokens=1024, **CONTEXT_RUNS[run])
        return cfg

    straight = config(tmp_path / "straight")
    train(straight, log=lambda *_: None)
    killed = config(tmp_path / "killed")
    kill_during_update(killed, tmp_path / "killed.json", 3)
    resume_to_the_end(killed.out)
    a = assert_same_run(straight, killed)
    assert all(r["train/skipped_update"] == 0 and r["train/adv_abs_mean"] > 0 for r in a[2:])
    assert all(r["rollout/mean_turns"] > 1 and r["rollout/prompt_tokens"] > 0 for r in a)
    assert json.loads((Path(straight.out) / "eval.json").read_text()) == json.loads(
        (Path(killed.out) / "eval.json").read_text())


@pytest.mark.parametrize("run", list(CONTEXT_RUNS))
def test_short_training_run_with_each_policy_and_exact_resume(tmp_path, run):
    """4 RL iterations straight, and 2 iterations then `resume` to 4: same metrics and weights (the fast
    version of the SIGKILL test above)."""
    from test_resume_exact import without_timing
    from test_train import tiny_config, weights
    from turnrl.checkpoint import MetricsLog
    from turnrl.train import train

    def config(name, iterations):
        cfg = tiny_config(tmp_path / name, threads=1, iterations=iterations)
        cfg.rollout = dataclasses.replace(cfg.rollout, max_turns=3, max_context_tokens=1024, **CONTEXT_RUNS[run])
        cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 2, 1, False
        # enough SFT for valid replies some of the time, so returns vary and the updates have a signal
        cfg.sft.episodes, cfg.sft.steps, cfg.sft.lr = 64, 30, 1e-2
        cfg.rollout.group_size = 4
        return cfg

    straight = config("straight", 4)
    evals = train(straight, log=lambda *_: None)
    assert set(evals) == {"untrained", "after_sft", "after_rl"}
    train(config("split", 2), log=lambda *_: None)
    train(config("split", 4), resume=True, log=lambda *_: None)
    a = MetricsLog(tmp_path / "straight" / "metrics.jsonl").read()
    b = MetricsLog(tmp_path / "split" / "metrics.jsonl").read()
    assert len(a) == 4 and without_timing(a) == without_timing(b)
    for r in a:
        assert r["rollout/mean_turns"] > 1
        assert 0 < r["rollout/prompt_tokens"] <= r["rollout/prompt_tokens_max"] <= 1024 - straight.rollout.max_new_tokens
    assert any(r["train/skipped_update"] == 0 and r["train/adv_abs_mean"] > 0 for r in a[2:])  # learned after the split
    wa, wb = weights(tmp_path / "straight" / "final"), weights(tmp_path / "split" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_served_evaluation_sends_the_policy_context():
    from types import SimpleNamespace

    from turnrl.served import context_messages

    msgs = [{"role": "system", "content": "rules"}]
    for t in range(4):
        msgs += [{"role": "user", "content": f"obs{t}"},
                 {"role": "assistant", "content": f"<think>plan{t}</think><answer>a{t}</answer>"}]
    msgs.append({"role": "user", "content": "obs4"})
    full = SimpleNamespace(context="full", context_window=2, max_new_tokens=8)
    assert context_messages(msgs, full) == msgs
    window = SimpleNamespace(context="window", context_window=2, max_new_tokens=8)
    assert [m["content"] for m in context_messages(msgs, window)] == [
        "rules", "obs2", "<think>plan2</think><answer>a2</answer>", "obs3", "<think>plan3</think><answer>a3</answer>",
        "obs4"]
    summary = SimpleNamespace(context="summary", context_window=2, max_new_tokens=8)
    sent = context_messages(msgs, summary)
    assert len(sent) == 2 and sent[0]["content"] == "rules"
    assert "plan3" in sent[1]["content"] and "a3" in sent[1]["content"] and sent[1]["content"].endswith("obs4")
    assert "plan2" not in sent[1]["content"]
