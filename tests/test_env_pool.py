"""Env instances reused across rollouts (rollout.reuse_envs, turnrl.env_pool): same episodes, fewer envs built,
failed envs never reused, every env closed at the end."""

import itertools

import pytest

from scripted import ScriptedEngine
from test_env_threads import REPLIES, fields
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.env_pool import EnvPool
from turnrl.envs.frozen_lake import FrozenLakeEnv
from turnrl.rollout import RolloutSettings, run_episodes


class CountedLake(FrozenLakeEnv):
    """Deterministic FrozenLake that counts its constructions and closes; seed 12's steps raise when `fail`."""

    built = closed = 0
    fail = False

    def __init__(self):
        super().__init__(slippery=False)
        type(self).built += 1

    def reset(self, *, seed=None, options=None):
        self.seed_ = seed
        return super().reset(seed=seed, options=options)

    def step(self, action):
        if self.fail and self.seed_ == 12:
            raise RuntimeError("step exploded")
        return super().step(action)

    def close(self):
        type(self).closed += 1
        super().close()


@pytest.fixture
def lake():
    CountedLake.built = CountedLake.closed = 0
    yield CountedLake
    CountedLake.fail = False


def rollouts(tok, make_env, seeds_list, threads=0, max_live=0):
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False,
                               env_threads=threads, max_live=max_live)
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    return [run_episodes(ScriptedEngine(tok, REPLIES), renderer, make_env, seeds, 2, settings,
                         SamplingParams(max_new_tokens=16), env_name="lake") for seeds in seeds_list]


SEEDS = [[11, 12, 13], [14, 15, 16], [17, 11, 12]]


@pytest.mark.parametrize("threads, max_live", [(0, 0), (4, 0), (0, 2)])
def test_reused_envs_play_the_episodes_of_new_ones_and_fewer_are_built(tiny_tokenizer, lake, threads, max_live):
    fresh = rollouts(tiny_tokenizer, lake, SEEDS, threads, max_live)
    assert lake.built == lake.closed == 18  # one per episode, each closed when it ended
    lake.built = lake.closed = 0
    pool = EnvPool(lake)
    reused = rollouts(tiny_tokenizer, pool, SEEDS, threads, max_live)
    assert [fields(r) for r in reused] == [fields(r) for r in fresh]
    assert lake.built == pool.made <= (6 if max_live == 0 else 4)  # at most the episodes alive at once
    assert lake.closed == 0
    assert pool.close() == [] and lake.closed == lake.built  # the run's end closes every env it kept
    assert pool.close() == []  # once


def test_an_env_that_failed_is_closed_not_reused(tiny_tokenizer, lake):
    lake.fail = True
    pool = EnvPool(lake)
    first, second = rollouts(tiny_tokenizer, pool, [[11, 12, 13], [14, 15, 16]])
    assert [t.seed for t in first if t.failed] == [12, 12]
    assert lake.closed == 2  # the two envs of seed 12, at once
    assert not any(t.failed for t in second)  # the next rollout got healthy envs (and made 2 new ones)
    assert lake.built == 8 and pool.made == 8
    pool.close()
    assert lake.closed == 8


def test_closing_goes_on_past_an_env_whose_close_raises():
    closed = []

    class Env:
        ids = itertools.count()

        def __init__(self):
            self.id = next(Env.ids)

        def close(self):
            if self.id == 0:
                raise OSError("socket already gone")
            closed.append(self.id)

    pool = EnvPool(Env)
    envs = [pool() for _ in range(3)]
    for env in envs:
        pool.give(env)
    errors = pool.close()
    assert [type(e).__name__ for e in errors] == ["OSError"] and sorted(closed) == [1, 2]
    from turnrl.train import close_kept_envs  # what a run does with them: one log line each

    pool.give(Env.__new__(Env))  # an env whose id attribute is missing: its close raises AttributeError
    lines = []
    close_kept_envs({"lake": pool}, lines.append)
    assert len(lines) == 1 and "raised in close: AttributeError" in lines[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_with_reused_envs_is_the_run_without(tmp_path, monkeypatch, workers):
    """Same metrics, samples and final weights, in the training process and in Ray rollout workers; in the
    training process the rollouts and evaluations build hardly more than one rollout's envs."""
    import importlib.util
    from pathlib import Path

    import torch

    from test_resume_exact import small_config, without_timing
    from test_train import weights
    from turnrl.checkpoint import MetricsLog
    from turnrl.config import DistributedConfig
    from turnrl.train import train

    if workers and importlib.util.find_spec("ray") is None:
        pytest.skip("needs Ray: pip install 'turnrl[ray]'")
    import turnrl.evaluate as evaluate_module  # env_factory's make: training rollouts and evaluations

    built, real_make = [], evaluate_module.make
    monkeypatch.setattr(evaluate_module, "make", lambda *a, **kw: built.append(1) or real_make(*a, **kw))
    runs, counts = [], []
    for reuse in (False, True):
        cfg = small_config(tmp_path / f"reuse-{reuse}")
        cfg.iterations, cfg.rollout.reuse_envs = 3, reuse
        if workers:
            cfg.distributed = DistributedConfig(workers=workers)
        built.clear()
        train(cfg, log=lambda *_: None)
        runs.append(cfg)
        counts.append(len(built))
    episodes = runs[0].rollout.n_groups * runs[0].rollout.group_size
    if not workers:  # every episode of 3 rollouts builds its env, and those of the evaluations
        assert counts[0] >= 3 * episodes and counts[1] <= counts[0] - 2 * episodes
    a, b = (without_timing(MetricsLog(Path(c.out) / "metrics.jsonl").read()) for c in runs)
    assert a == b
    assert MetricsLog(Path(runs[0].out) / "samples.jsonl").read() == MetricsLog(Path(runs[1].out) / "samples.jsonl").read()
    wa, wb = weights(Path(runs[0].out) / "final"), weights(Path(runs[1].out) / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
