"""The algorithm menu in the trainer: two iterations with each new estimator / loss, dynamic sampling,
critic warm-up and reward shaping; trainer-level config validation."""

import json
import math

import pytest
import torch
from test_train import tiny_config, weights

from turnrl.config import EVAL_SEED_LIMIT, AlgoConfig, ConfigError, RewardConfig, RolloutConfig, TrainConfig
from turnrl.train import iteration_seeds, rollout_and_filter, train
from turnrl.trajectory import Trajectory


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def quick_config(tmp_path, **algo):
    cfg = tiny_config(tmp_path / "run", iterations=2, keep_checkpoints=3)
    cfg.algo = AlgoConfig(**algo)
    cfg.eval.greedy = False
    return cfg


@pytest.mark.parametrize("algo", [
    dict(estimator="turn_gae", gamma=0.9, lam=0.95, filter="none"),
    dict(estimator="bi_level_gae", gamma=0.95, token_gamma=0.99, lam=0.95, filter="none"),
    dict(estimator="gigpo", gamma=0.95, gigpo_omega=0.5, filter="none"),
    dict(estimator="reinforce_pp", filter="std", filter_keep=0.5),
    dict(estimator="rebn", gamma=0.9, filter="none"),
    dict(estimator="rloo", loss="gspo", clip_low=3e-4, clip_high=4e-4, filter="none", loss_agg="seq-mean-token-mean"),
], ids=lambda a: f"{a['estimator']}-{a.get('loss', 'ppo')}")
def test_new_estimators_train_two_iterations(tmp_path, algo):
    cfg = quick_config(tmp_path, **algo)
    train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    recs = records(run)
    assert [r["iteration"] for r in recs] == [0, 1]
    for r in recs:
        assert r["train/skipped_update"] == 0.0
        assert all(math.isfinite(r[k]) for k in ("loss/policy", "loss/entropy", "actor/grad_norm", "train/adv_abs_mean"))
        if cfg.algo.needs_critic:
            assert r["loss/value"] >= 0 and r["train/critic_warmup"] == 0.0
    start, final = weights(run / "checkpoints" / "ckpt-000000" / "model"), weights(run / "final")
    assert any(not torch.equal(start[k], final[k]) for k in final)
    if cfg.algo.needs_critic:
        assert (run / "final" / "value_head.pt").exists()


def test_critic_warmup_trains_only_the_value_head(tmp_path):
    cfg = quick_config(tmp_path, estimator="turn_gae", filter="none", critic_warmup=1)
    train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    assert [r["train/critic_warmup"] for r in records(run)] == [1.0, 0.0]
    ckpt = [run / "checkpoints" / f"ckpt-00000{i}" / "model" for i in range(3)]
    lm = [weights(c) for c in ckpt]
    heads = [torch.load(c / "value_head.pt", weights_only=True) for c in ckpt]
    assert all(torch.equal(lm[0][k], lm[1][k]) for k in lm[0])  # warm-up iteration: policy untouched
    assert not torch.equal(heads[0]["weight"], heads[1]["weight"])  # ... but the critic learned
    assert any(not torch.equal(lm[1][k], lm[2][k]) for k in lm[1])  # afterwards the policy trains


def test_dynamic_sampling_run_logs_rounds(tmp_path):
    cfg = quick_config(tmp_path, estimator="grpo", filter="dynamic", dynamic_max_rounds=2)
    train(cfg, log=lambda *_: None)
    for r in records(tmp_path / "run"):
        assert r["filter/rollout_rounds"] in (1.0, 2.0)
        assert 0.0 <= r["filter/kept_fraction"] <= 1.0


def test_reward_shaping_run_logs_the_shaped_return(tmp_path):
    cfg = quick_config(tmp_path, estimator="rebn", gamma=0.9, filter="none")
    cfg.reward = RewardConfig(turn_decay=0.5, repetition_penalty=0.2, dense_until=1)
    train(cfg, log=lambda *_: None)
    recs = records(tmp_path / "run")
    assert all(r["reward/shaped_mean"] is not None for r in recs)
    # iteration 1 is sparse: each episode's shaped return is decay^t * success - penalty <= success rate
    assert recs[1]["reward/shaped_mean"] <= recs[1]["rollout/success_rate"] + 1e-9


# ------------------------------------------------------------------------- dynamic sampling, no model
def fake_play(group_size, informative):
    """A stand-in for the rollout: group g of seed s has rewards [1, 0, ...] if informative(s), else all 0."""
    played_seeds = []

    def play(seeds):
        played_seeds.append(list(seeds))
        out = []
        for g, seed in enumerate(seeds):
            for i in range(group_size):
                r = 1.0 if (informative(seed) and i == 0) else 0.0
                out.append(Trajectory(ids=(1, 2, 3), loss_mask=(0, 1, 0), logprobs=(0.0,) * 3, turn_spans=((1, 2),),
                                      turn_rewards=(r,), terminated=True, truncated=False, success=r > 0,
                                      env_name="toy", seed=seed, group_id=g, num_actions=1, valid_turns=1,
                                      end_reason="env", transcript=(("user", "s"), ("assistant", "a"), ("user", "t"))))
        return out
    return play, played_seeds


def dyn_config(rounds=3, n_groups=4):
    return TrainConfig(rollout=RolloutConfig(n_groups=n_groups, group_size=2),
                       algo=AlgoConfig(filter="dynamic", dynamic_max_rounds=rounds), iterations=10)


def test_dynamic_sampling_refills_until_the_batch_is_full():
    cfg = dyn_config()
    play, played = fake_play(2, lambda seed: seed % 3 == 0)  # about a third of the start states are informative
    sampled, kept, stats = rollout_and_filter(cfg, 5, play)
    groups = {t.group_id for t in kept}
    assert len(groups) == 4  # filled up to n_groups ...
    assert stats["filter/rollout_rounds"] == len(played) > 1  # ... which took extra rounds
    assert all(any(t.turn_rewards[0] > 0 for t in kept if t.group_id == g) for g in groups)  # all informative
    assert len({t.group_id for t in sampled}) == 4 * len(played)  # group ids unique across rounds
    assert stats["filter/kept_fraction"] == pytest.approx(len(kept) / len(sampled))
    assert [t.seed for t in sampled[::2]] == [s for seeds in played for s in seeds]
    # informative groups are taken in round-then-group order, the surplus of the last round is dropped
    informative = [s for seeds in played for s in seeds if s % 3 == 0]
    assert sorted({t.seed for t in kept}) == sorted(informative[:4])


def test_dynamic_sampling_stops_at_the_round_cap():
    cfg = dyn_config(rounds=3)
    play, played = fake_play(2, lambda seed: False)
    sampled, kept, stats = rollout_and_filter(cfg, 0, play)
    assert kept == [] and len(played) == 3 and stats["filter/rollout_rounds"] == 3.0
    play, played = fake_play(2, lambda seed: True)
    _, kept, stats = rollout_and_filter(cfg, 0, play)
    assert len(played) == 1 and stats["filter/rollout_rounds"] == 1.0 and len(kept) == 8


def test_dynamic_sampling_seeds_are_disjoint_and_deterministic():
    cfg = dyn_config(rounds=3, n_groups=4)
    plain = TrainConfig(rollout=RolloutConfig(n_groups=4, group_size=2), iterations=10)
    seeds = [s for it in range(10) for r in range(3) for s in iteration_seeds(cfg, it, r)]
    assert len(seeds) == len(set(seeds)) and min(seeds) >= EVAL_SEED_LIMIT
    assert all(iteration_seeds(cfg, it, 0) == iteration_seeds(plain, it) for it in range(10))
    assert iteration_seeds(cfg, 7, 2) == iteration_seeds(dyn_config(), 7, 2)


@pytest.mark.parametrize("over, message", [
    (dict(rollout=RolloutConfig(group_size=1), algo=AlgoConfig(filter="dynamic", estimator="dr_grpo")),
     "rollout.group_size must be >= 2"),
    (dict(rollout=RolloutConfig(group_size=1), algo=AlgoConfig(filter="none", estimator="gigpo")),
     "compares episodes within a group"),
    (dict(algo=AlgoConfig(estimator="turn_gae", critic_warmup=5), iterations=5), "policy would never be updated"),
    (dict(reward=RewardConfig(dense_until=10), iterations=10), "rewards never turn sparse"),
])
def test_trainer_level_validation_names_the_fix(over, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**over)


def test_config_round_trips_with_reward_section():
    cfg = TrainConfig(algo=AlgoConfig(estimator="bi_level_gae", gamma=0.95, token_gamma=0.9, filter="none",
                                      critic_warmup=2, loss="ppo"),
                      reward=RewardConfig(turn_decay=0.5, repetition_penalty=0.5, dense_until=3), iterations=10)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = json.loads(cfg.to_json())
    del old["reward"]  # a config.json written before the reward section existed
    assert TrainConfig.from_dict(old).reward == RewardConfig()
