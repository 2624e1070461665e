import json
import re
from pathlib import Path

import pytest
import torch

from turnrl.config import (AlgoConfig, ConfigError, DiagConfig, EnvConfig, EvalConfig, ModelConfig, OptimConfig,
                           RewardConfig, RolloutConfig, SFTConfig, TrainConfig)
from turnrl.models import load_policy
from turnrl.train import train

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def tiny_config(out, **over) -> TrainConfig:
    cfg = TrainConfig(
        model=ModelConfig(name="tiny", tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_ff=64),
        env=EnvConfig(name="frozen_lake_det", system_prompt=False),
        rollout=RolloutConfig(n_groups=4, group_size=2, max_turns=2, max_actions_per_turn=1, max_new_tokens=6,
                              max_context_tokens=256, think=False),
        algo=AlgoConfig(estimator="grpo", filter="std", filter_keep=0.5),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        sft=SFTConfig(episodes=16, epsilon=0.2, steps=3, batch_size=8),
        eval=EvalConfig(episodes=4, k=2),
        iterations=2, save_every=1, out=str(out), progress=False,
    )
    for key, value in over.items():
        section, _, field = key.partition("__")
        setattr(getattr(cfg, section), field, value) if field else setattr(cfg, section, value)
    return cfg


def weights(path):
    policy = load_policy(str(path))
    return {k: v.clone() for k, v in policy.lm.state_dict().items()}


def test_two_iterations_write_everything_and_change_parameters(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    evals = train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "eval.json", "final/config.json"):
        assert (run / name).exists(), name
    saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    assert saved == cfg
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    for key in ("rollout/success_rate", "rollout/mean_reward", "rollout/reward_std", "filter/kept_fraction",
                "loss/policy", "loss/entropy", "actor/grad_norm", "perf/tokens_per_second"):
        assert key in records[0]
    held_out = json.loads((run / "eval_samples.json").read_text())
    assert list(held_out) == ["untrained", "after_sft", "after_rl"]
    assert all(1 <= len(episodes) <= cfg.samples_per_iteration for episodes in held_out.values())
    assert all(e["seed"] < cfg.eval.episodes for episodes in held_out.values() for e in episodes)  # held-out seeds
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["iteration"] for s in samples] == [0, 1]
    for line, record in zip(samples, records):
        episodes = line["episodes"]
        assert len(episodes) == cfg.samples_per_iteration
        assert [e["success"] for e in episodes] in ([True, False], [False, False], [True, True])
        for e in episodes:  # the transcript alternates observation and reply, one reply per turn
            roles = [role for role, _text in e["transcript"]]
            assert roles[0] == "user" and roles.count("assistant") == e["turns"] >= 1
    assert set(evals) == {"untrained", "after_sft", "after_rl"}
    for e in evals.values():
        assert {"success_rate", "mean_return", "pass_at_k"} <= set(e)
    assert json.loads((run / "eval.json").read_text()) == evals
    # RL changed the weights: compare the checkpoint at the start of RL with the final model
    start = weights(run / "checkpoints" / "ckpt-000000" / "model") if (run / "checkpoints" / "ckpt-000000").exists() else None
    final = weights(run / "final")
    ckpts = sorted((run / "checkpoints").iterdir())
    assert len(ckpts) == cfg.keep_checkpoints  # older ones pruned
    assert ckpts[-1].name == "ckpt-000002"
    if start is not None:
        assert any(not torch.equal(start[k], final[k]) for k in final)


@pytest.mark.parametrize("algo, reward, iterations, expected", [
    # gae + KL logs loss/value and loss/kl; the collapse diagnostics run in every case
    (dict(estimator="gae", filter="none", kl_coef=0.01), {}, 1, {"loss/value", "loss/kl", "collapse/mi"}),
    # turn-level critic with warm-up, dynamic sampling and every reward-shaping option
    (dict(estimator="turn_gae", gamma=0.9, filter="dynamic", critic_warmup=1),
     dict(turn_decay=0.5, repetition_penalty=0.1, dense_until=1), 2,
     {"loss/value", "train/critic_warmup", "filter/rollout_rounds", "reward/shaped_mean", "train/adv_turn_std"}),
    # critic-free turn-level estimator with the sequence-level loss
    (dict(estimator="gigpo", filter="none", loss="gspo", clip_low=3e-4, clip_high=4e-4), {}, 1,
     {"train/adv_turn_std"}),
])
def test_every_metric_key_is_documented(tmp_path, algo, reward, iterations, expected):
    cfg = tiny_config(tmp_path / "run", iterations=iterations)
    cfg.algo = AlgoConfig(**algo)
    cfg.reward = RewardConfig(**reward)
    cfg.diag = DiagConfig(mi_every=1)
    cfg.sft.episodes = 0
    train(cfg, log=lambda *_: None)
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(), flags=re.M))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    written = set().union(*(r.keys() for r in records))
    written |= set(json.loads((tmp_path / "run" / "eval.json").read_text())["after_rl"])
    assert written - documented == set()
    assert expected <= written


def test_ppo_with_value_head_runs_and_learns_values(tmp_path):
    cfg = tiny_config(tmp_path / "run", iterations=2)
    cfg.algo = AlgoConfig(estimator="gae", gamma=0.99, lam=0.95, filter="none")
    train(cfg, log=lambda *_: None)
    assert (tmp_path / "run" / "final" / "value_head.pt").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/value"] is not None and r["loss/value"] >= 0 for r in records)


def test_resume_continues_from_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "run", iterations=1)
    train(cfg, log=lambda *_: None)
    cfg.iterations = 3
    train(cfg, resume=True, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny_config(tmp_path / "run", iterations=1)
    train(cfg, log=lambda *_: None)
    cfg.algo.clip_high = 0.3
    with pytest.raises(ConfigError, match="algo.clip_high"):
        train(cfg, resume=True, log=lambda *_: None)


def test_resume_may_change_the_generation_batch_size_and_learns_the_same(tmp_path):
    """rollout.gen_batch_size and rollout.max_live_episodes are speed/memory settings (every episode samples from
    its own stream): a run resumed with others is accepted and logs the same iterations as a run that never
    changed them."""
    def records(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in rows]

    straight = tiny_config(tmp_path / "a", iterations=2, rollout__gen_batch_size=8)
    train(straight, log=lambda *_: None)
    cfg = tiny_config(tmp_path / "b", iterations=1, rollout__gen_batch_size=8)
    train(cfg, log=lambda *_: None)
    cfg.iterations, cfg.rollout.gen_batch_size, cfg.rollout.max_live_episodes = 2, 3, 4
    train(cfg, resume=True, log=lambda *_: None)
    assert records(tmp_path / "b") == records(tmp_path / "a")
    assert len(records(tmp_path / "a")) == 2


def test_refuses_to_overwrite_a_run(tmp_path):
    cfg = tiny_config(tmp_path / "run", iterations=1)
    train(cfg, log=lambda *_: None)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg, log=lambda *_: None)


@pytest.mark.parametrize("kwargs, message", [
    (dict(algo=dict(filter="std", filter_keep=1.0)), "keeps everything"),
    (dict(algo=dict(estimator="grpo", gamma=0.9)), "algo.gamma is only used by estimators gae, turn_gae"),
    (dict(algo=dict(estimator="gigpo", lam=0.9)), "algo.lam is only used by"),
    (dict(algo=dict(estimator="turn_gae", token_gamma=0.9)), "token_gamma is only used by estimator 'bi_level_gae'"),
    (dict(algo=dict(estimator="rebn", gigpo_omega=0.5)), "gigpo_omega is only used by estimator 'gigpo'"),
    (dict(algo=dict(estimator="grpo", critic_warmup=2)), "critic_warmup > 0 warms up a value head"),
    (dict(algo=dict(estimator="gigpo", vf_coef=1.0)), "vf_coef/value_clip configure the value head"),
    (dict(algo=dict(estimator="rloo", value_clip=0.5)), "vf_coef/value_clip configure the value head"),
    (dict(algo=dict(estimator="gae", loss="gspo")), "use loss='ppo' or a sequence/turn-level estimator"),
    (dict(algo=dict(estimator="bi_level_gae", loss="gspo")), "use loss='ppo'"),
    (dict(algo=dict(estimator="grpo", loss="gspo", dual_clip=3.0)), "dual_clip applies to loss='ppo' only"),
    (dict(algo=dict(filter="std", dynamic_max_rounds=5)), "only used by algo.filter='dynamic'"),
    (dict(algo=dict(filter="dynamic", dynamic_max_rounds=0)), "dynamic_max_rounds must be >= 1"),
    (dict(rollout=dict(temperature=0.0)), "temperature"),
    (dict(rollout=dict(format_penalty=0.5)), "penalty"),
])
def test_config_validation_names_the_fix(kwargs, message):
    sections = {"algo": AlgoConfig, "rollout": RolloutConfig}
    with pytest.raises(ConfigError, match=message):
        for section, values in kwargs.items():
            sections[section](**values)


def test_unknown_env_fails_early(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.env.name = "frozen_lak"
    with pytest.raises(ConfigError, match="did you mean 'frozen_lake'"):
        train(cfg, log=lambda *_: None)


def test_sft_env_plays_the_demonstrations_in_another_env(tmp_path, monkeypatch):
    """sft.env: the warm start's demonstrations come from that env (without the training env's kwargs); RL and
    evaluation stay on env.name. An unknown sft.env fails before anything runs."""
    import turnrl.prepare as prepare

    made = []
    real = prepare.make_demonstrations

    def spy(make_env, *args, **kwargs):
        demos = real(make_env, *args, **kwargs)
        made.append(make_env())
        return demos

    monkeypatch.setattr(prepare, "make_demonstrations", spy)
    cfg = tiny_config(tmp_path / "run", env=EnvConfig(name="bandit", system_prompt=False), rollout__max_turns=1,
                      sft=SFTConfig(episodes=8, epsilon=1.0, steps=1, batch_size=4, env="bandit_format"),
                      iterations=1)
    train(cfg, log=lambda *_: None)
    assert len(made) == 1 and made[0].split == "format"
    cfg = tiny_config(tmp_path / "bad", sft=SFTConfig(episodes=8, steps=1, env="bandit_formt"))
    with pytest.raises(ConfigError, match="did you mean 'bandit_format'"):
        train(cfg, log=lambda *_: None)


def test_no_reference_model_when_kl_is_off(tmp_path, monkeypatch):
    """KL off: the trainer never builds a reference model and never runs a reference forward pass."""
    import turnrl.prepare as prepare
    import turnrl.update as update

    calls = []
    for name in ("reference_logprobs", "policy_values"):
        real = getattr(update, name)
        monkeypatch.setattr(update, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    def no_reference(*_a, **_k):
        raise AssertionError("the trainer built a reference model")

    monkeypatch.setattr(prepare, "reference_of", no_reference)
    cfg = tiny_config(tmp_path / "run", iterations=1)
    cfg.sft.episodes = 0
    train(cfg, log=lambda *_: None)
    assert calls == []  # grpo: no critic pass, no reference pass


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_warms_up_then_follows_the_schedule(schedule):
    from turnrl.prepare import rl_optimizer

    cfg = TrainConfig(iterations=20, optim=OptimConfig(lr=1e-3, warmup_steps=4, lr_schedule=schedule))
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = rl_optimizer(_Holder(param), cfg)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    after = lrs[4:]
    if schedule == "constant":
        assert after == pytest.approx([1e-3] * 16)
    else:
        assert after[0] == pytest.approx(1e-3)
        assert all(a > b for a, b in zip(after, after[1:]))
        assert scheduler.get_last_lr()[0] == pytest.approx(1e-4)  # decayed to 10% at the last step


class _Holder(torch.nn.Module):
    def __init__(self, param):
        super().__init__()
        self.param = param


def test_eval_train_env_measures_each_point_on_the_training_env_too(tmp_path):
    """eval.train_env: next to the held-out env, every point is also measured on the training env, and the
    after_rl entry is what `evaluate` on the final model and the training env gives."""
    from turnrl.evaluate import evaluate
    from turnrl.prepare import build_policy

    cfg = tiny_config(tmp_path / "run", env=EnvConfig(name="bandit", eval_name="bandit_test", system_prompt=False),
                      rollout__max_turns=1, eval__train_env=True, eval__greedy=True)
    evals = train(cfg, log=lambda *_: None)
    assert set(evals) == {p + s for p in ("untrained", "after_sft", "after_rl") for s in ("", "@bandit")}
    final = build_policy(cfg, str(tmp_path / "run" / "final"))
    on_train, _ = evaluate(final, cfg, env_name="bandit")
    on_test, _ = evaluate(final, cfg)
    assert evals["after_rl@bandit"] == on_train.to_dict()
    assert evals["after_rl"] == on_test.to_dict()
    # train_env is a no-op when the evaluation env is the training env
    cfg = tiny_config(tmp_path / "same", eval__train_env=True, iterations=0, sft=SFTConfig(episodes=0))
    assert set(train(cfg, log=lambda *_: None)) == {"untrained", "after_sft", "after_rl"}


def test_periodic_evaluation_logs_held_out_success_and_leaves_training_unchanged(tmp_path):
    """eval.every: eval/* keys on every N-th iteration, the same numbers as evaluating that model, and the same
    training (metrics and final weights) as a run without it."""
    runs = {}
    for every in (0, 2):
        cfg = tiny_config(tmp_path / f"every{every}", iterations=4)
        cfg.eval.every, cfg.eval.every_episodes = every, 3
        train(cfg, log=lambda *_: None)
        lines = (tmp_path / f"every{every}" / "metrics.jsonl").read_text().splitlines()
        runs[every] = [json.loads(line) for line in lines]
    with_eval = [r for r in runs[2] if "eval/success_rate" in r]
    assert [r["iteration"] for r in with_eval] == [1, 3]
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(), flags=re.M))
    assert set().union(*(r.keys() for r in runs[2])) <= documented
    for r in with_eval:
        assert {"eval/greedy_success_rate", "eval/mean_return", "eval/pass_at_k", "perf/eval_seconds"} <= set(r)
    def training_keys(records):
        return [{k: v for k, v in r.items() if not k.startswith(("eval/", "perf/", "time/"))} for r in records]
    assert training_keys(runs[2]) == training_keys(runs[0])
    wa, wb = weights(tmp_path / "every0" / "final"), weights(tmp_path / "every2" / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the last one is the final model's evaluation on 3 start states
    from turnrl.evaluate import evaluate
    from turnrl.prepare import build_policy
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "every2" / "config.json").read_text()))
    result, _ = evaluate(build_policy(cfg, str(tmp_path / "every2" / "final")), cfg, episodes=3)
    assert with_eval[-1]["eval/success_rate"] == result.success_rate
    assert with_eval[-1]["eval/mean_return"] == pytest.approx(result.mean_return)
