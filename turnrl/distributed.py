"""Ray rollout workers: training rollouts and evaluations played by separate processes, on one machine or a cluster.

Each worker (`RolloutWorker`, a Ray actor) holds its own copy of the policy, its own engine and its own envs; the
trainer keeps the policy it updates and pushes its weights to every worker when they start, after SFT and after
every update (`RolloutPool.sync`: every tensor the first time, then only the trained ones, e.g. a LoRA adapter).
`RolloutPool.play` splits a rollout's groups over the workers in contiguous shares and gathers the trajectories
in group order. The trainer draws the rollout's stream base from its own rollout generator, as a single-process
rollout does, and every share samples its episodes' own streams under their indices in the whole rollout
(`turnrl.rollout.run_episodes`'s `first_group` and `base`): the trajectories are those of a single-process rollout,
whatever the number of workers, so a run can be resumed with another number (or none). `RolloutPool.start` plays
a rollout without waiting for it (`distributed.overlap`: the next iteration's rollout during the update). A worker
with a vLLM engine pushes every weight load into it; with `rollout.reuse_envs` it keeps its envs across rollouts.

Ray is an optional extra (`pip install 'turnrl[ray]'`), imported only when `distributed.workers` > 0. Without a
cluster address the pool starts a local Ray instance (node address 127.0.0.1) and shuts it down when it closes. Ray runs
our actors and moves the weights and trajectories; what is written here is only the split of a rollout over the
actors and the weight push, which are specific to turnrl's rollout and policy.
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import torch

from turnrl.checkpoint import to_host
from turnrl.config import ConfigError, TrainConfig
from turnrl.engines.base import SamplingParams
from turnrl.envs.registry import ENVS
from turnrl.faults import WorkerLostError
from turnrl.trajectory import Trajectory

INSTALL_HINT = "distributed.workers needs Ray: pip install 'turnrl[ray]' (or set distributed.workers=0)"


def shares(n_groups: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous (start, stop) group ranges, one per worker with work, sizes differing by at most one."""
    size, extra = divmod(n_groups, workers)
    bounds, start = [], 0
    for w in range(workers):
        stop = start + size + (w < extra)
        if stop > start:
            bounds.append((start, stop))
        start = stop
    return bounds


def trained_state(lm: torch.nn.Module, full: bool) -> dict[str, torch.Tensor]:
    """The tensors a worker needs to hold `lm`'s weights: all of them (`full`), or only those the optimizer
    changes (parameters with requires_grad; a LoRA policy's adapters)."""
    if full:
        return to_host(lm.state_dict())
    return to_host({k: p for k, p in lm.named_parameters() if p.requires_grad})


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the named tensors' bytes, in name order: what the trainer pushed against what a worker holds
    after loading it. A push that silently did not arrive (a LoRA adapter that never reached the sampler, the
    failure that looks like a stale policy) fails the run at once instead."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RolloutWorker:
    """One rollout process: builds the policy `cfg` names (weights from the trainer's `load`), an engine on it and
    the env; `play` runs one share of a rollout. A plain class, so tests can run it without Ray."""

    def __init__(self, cfg_data: dict, env_factories: dict | None = None, threads: int = 1,
                 model_name: str | None = None):
        from turnrl.evaluate import engine_for, renderer_for, rollout_params, settings_for
        from turnrl.prepare import build_policy

        torch.set_num_threads(max(1, threads))
        self.cfg = cfg = TrainConfig.from_dict(cfg_data)
        cfg.model.device = "cpu"  # a worker's hf engine samples on its CPUs (a vllm engine places itself on its GPU)
        ENVS.update(env_factories or {})  # envs registered in the trainer's process only (a user's script)
        self.policy = build_policy(cfg, model_name, value_head=False)  # `model_name`: a saved run's model
        self.policy.lm.eval()
        self.engine = engine_for(self.policy, cfg, torch.Generator())
        self.renderer = renderer_for(self.policy, cfg)
        self.settings, self.params = settings_for(cfg), rollout_params(cfg)
        self.kept_envs = {} if cfg.rollout.reuse_envs else None  # env pools by name, across this worker's rollouts

    def ready(self) -> int:
        return os.getpid()

    def load(self, state: dict[str, torch.Tensor], full: bool) -> str:
        """Takes the trainer's weights (`trained_state`); `full` ones must name every tensor of the policy.
        Returns the digest of the same tensors read back from the policy (`weights_digest`)."""
        missing, unexpected = self.policy.lm.load_state_dict(state, strict=False)
        if unexpected or (full and missing):
            raise RuntimeError(f"rollout worker: the trainer's weights do not fit this worker's policy "
                               f"(unexpected {unexpected[:3]}, missing {missing[:3]})")
        held = self.policy.lm.state_dict()
        if self.cfg.engine.name == "vllm":  # the vLLM engine samples from a copy of its own: push the policy into it
            self.engine.sync(self.policy.lm)
        return weights_digest({k: held[k] for k in state})

    def close(self) -> None:
        """Shuts the engine down (a vLLM engine's memory and temporary files; the HF engine holds nothing) and
        closes the envs kept for reuse."""
        if self.cfg.engine.name == "vllm":
            self.engine.close()
        for envs in (self.kept_envs or {}).values():
            envs.close()

    def play(self, seeds: list[int], first_group: int, base: int, env_name: str | None = None,
             group_size: int | None = None, params: SamplingParams | None = None,
             options: list[dict | None] | None = None) -> list[Trajectory]:
        """One share of a rollout: the training rollout's env, group size and sampling unless given (an
        evaluation's); `options`: its groups' env reset options (`run_episodes`)."""
        from turnrl.evaluate import env_factory
        from turnrl.rollout import run_episodes

        cfg, env_name = self.cfg, env_name or self.cfg.env.name
        return run_episodes(self.engine, self.renderer, env_factory(cfg, env_name, self.kept_envs), seeds,
                            group_size or cfg.rollout.group_size, self.settings, params or self.params,
                            env_name=env_name, first_group=first_group, base=base, options=options)


class Playing:
    """A rollout the workers are playing (`RolloutPool.start`); `result()` waits for its trajectories."""

    def __init__(self, pool: RolloutPool | None, futures: list, trajectories: list[Trajectory] | None = None):
        self._pool, self._futures, self._trajectories = pool, futures, trajectories

    @classmethod
    def done(cls, trajectories: list[Trajectory]) -> Playing:
        """A rollout already played (one a checkpoint saved)."""
        return cls(None, [], list(trajectories))

    def result(self) -> list[Trajectory]:
        if self._trajectories is None:
            self._trajectories = [t for part in self._pool._gather(self._futures) for t in part]
        return self._trajectories


def check_pushed(held: list[str], pushed: str) -> None:
    """RuntimeError unless every worker's digest after a push (`RolloutWorker.load`) is the pushed weights'."""
    wrong = [i for i, digest in enumerate(held) if digest != pushed]
    if wrong:
        raise RuntimeError(f"rollout workers {wrong} do not hold the weights the trainer pushed (digest mismatch "
                           "after loading them); their rollouts would sample another policy")


def check_gpus(available: float, workers: int, gpus_per_worker: float) -> None:
    """ConfigError when the Ray cluster has fewer GPUs than the workers ask for (Ray would wait for them forever)."""
    needed = workers * gpus_per_worker
    if needed > available + 1e-9:
        raise ConfigError(f"distributed.workers={workers} x distributed.gpus_per_worker={gpus_per_worker:g} needs "
                          f"{needed:g} GPUs, but the Ray cluster has {available:g}: use fewer workers or GPUs per "
                          "worker, or join a cluster with more (distributed.address)")


def import_ray():
    try:
        import ray
    except ImportError as err:
        raise ConfigError(INSTALL_HINT) from err
    return ray


class RolloutPool:
    """`cfg.distributed.workers` Ray actors playing the rollouts and evaluations of `cfg` (module docstring), with
    policies built like the trainer's: from `cfg.model`, or from the saved model `model_name` (`turnrl eval RUN`).
    `close` ends the actors, and the local Ray instance if the pool started one."""

    def __init__(self, cfg: TrainConfig, model_name: str | None = None):
        ray = self._ray = import_ray()
        d = cfg.distributed
        self._own_ray = not ray.is_initialized()
        self._close_workers = cfg.engine.name == "vllm" or cfg.rollout.reuse_envs  # state to end (RolloutWorker.close)
        if self._own_ray:
            if d.address:
                ray.init(address=d.address, logging_level="warning")
            else:  # a private instance for the run, sized for the workers (the trainer waits while they play)
                ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(d.workers * d.cpus_per_worker)),
                         include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="warning")
        self._workers = []
        try:
            check_gpus(ray.cluster_resources().get("GPU", 0.0), d.workers, d.gpus_per_worker)
            actor = ray.remote(num_cpus=d.cpus_per_worker, num_gpus=d.gpus_per_worker)(RolloutWorker)
            envs = {name: ENVS[name] for name in (cfg.env.name, cfg.env.eval_name) if name in ENVS}
            self._workers = [actor.remote(cfg.to_dict(), envs, int(d.cpus_per_worker), model_name)
                             for _ in range(d.workers)]
            ray.get([w.ready.remote() for w in self._workers])  # a worker that cannot start fails the run here
        except BaseException:
            self.close()
            raise
        self._synced = False

    @property
    def workers(self) -> int:
        return len(self._workers)

    def sync(self, lm: torch.nn.Module) -> None:
        """Pushes `lm`'s weights to every worker: all of them the first time, then the trained ones; checks that
        every worker then holds exactly them."""
        full = not self._synced
        state = trained_state(lm, full)
        ref = self._ray.put(state)
        check_pushed(self._gather([w.load.remote(ref, full) for w in self._workers]), weights_digest(state))
        self._synced = True

    def play(self, seeds: list[int], base: int, **share) -> list[Trajectory]:
        """The trajectories of `seeds` (one group each), as `run_episodes` on all of them with stream `base`;
        `share`: `RolloutWorker.play`'s env_name, group_size and params (an evaluation's)."""
        return self.start(seeds, base, **share).result()

    def start(self, seeds: list[int], base: int, *, options: list[dict | None] | None = None, **share) -> Playing:
        """`play` without waiting: the workers play with the weights they hold now (a later `sync` reaches
        each worker after its share of this rollout, as Ray runs an actor's calls in order). `options`: the
        groups' env reset options, one per seed, each worker given its share's."""
        if not self._synced:
            raise RuntimeError("RolloutPool.play before sync: the workers do not hold the policy's weights yet")
        futures = [w.play.remote(seeds[a:b], a, base, **share, options=None if options is None else options[a:b])
                   for w, (a, b) in zip(self._workers, shares(len(seeds), self.workers))]
        return Playing(self, futures)

    def _gather(self, futures: list) -> list:
        """The workers' results; a worker whose process died is one line (WorkerLostError), not Ray's report."""
        try:
            return self._ray.get(futures)
        except self._ray.exceptions.RayActorError as err:
            pid = re.search(r"\bpid: (\d+)", str(err))
            raise WorkerLostError(
                f"a Ray rollout worker{f' (pid {pid[1]})' if pid else ''} died: its process was killed, ran out of "
                "memory or crashed; a training run's last checkpoint is intact: continue it with `turnrl train "
                "--resume RUN_DIR` (with another number of workers if need be)") from err

    def close(self) -> None:
        """Ends the actors; workers with a vLLM engine or reused envs first close them (30 s at most, as a worker
        finishes the call it is in first)."""
        if self._workers and self._close_workers:
            self._ray.wait([w.close.remote() for w in self._workers], num_returns=len(self._workers), timeout=30)
        for w in self._workers:
            self._ray.kill(w)
        self._workers = []
        if self._own_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._own_ray = False
