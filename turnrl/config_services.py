"""The configs of what a run talks to or plays against: an LLM judge's server (`judge.*`), an evolving pool of
injected attacks (`attack.*`) and experiment trackers (`track.*`). Nested in `turnrl.config.TrainConfig` like the
others."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from turnrl.attacks import DEFAULT_SEEDS, PLACEHOLDER
from turnrl.config_json import check as _check


@dataclass
class JudgeConfig:
    """LLM-judge rewards (turnrl.judge, docs/algorithms.md): a chat model behind an OpenAI-compatible API scores
    the played episodes, each group's together (RULER) or one by one."""

    url: str = ""  # base URL of the judge's OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (key: OPENAI_API_KEY); "" = off
    model: str = ""  # the judge model's name on that server; "" = the server's only model
    mode: Literal["group", "single"] = "group"  # group: a group's episodes in one request, scored against each other (RULER); single: one request per episode
    rubric: str = ""  # what makes an episode good, put in the judge's instructions; "" = a generic rubric (turnrl.judge.DEFAULT_RUBRIC)
    weight: float = 1.0  # the judge's score (in [0, 1]) times this is added to the episode's last turn reward
    env_reward: bool = True  # keep the env's rewards (and format penalties); false = the judge's score is the only reward
    max_chars: int = 4000  # transcript characters per episode sent to the judge (the middle is cut)
    max_tokens: int = 512  # the judge's reply length limit
    retries: int = 1  # asks again when a reply holds no valid scores
    concurrency: int = 8  # judge requests in flight
    timeout: float = 120.0  # seconds per judge request

    def __post_init__(self):
        _check(self.weight > 0, f"judge.weight must be > 0, got {self.weight}")
        _check(self.max_chars >= 200 and self.max_tokens >= 1, "judge.max_chars must be >= 200 and judge.max_tokens >= 1")
        _check(self.retries >= 0 and self.concurrency >= 1 and self.timeout > 0,
               "judge.retries must be >= 0, judge.concurrency >= 1 and judge.timeout > 0")
        changed = [f.name for f in dataclasses.fields(self) if f.name != "url" and getattr(self, f.name) != f.default]
        _check(bool(self.url) or not changed, f"judge.{changed[0] if changed else ''} configures LLM-judge rewards, "
               "which are off: set judge.url or remove it")


@dataclass
class AttackConfig:
    """An evolving pool of attacks injected into the env (turnrl.attacks: Evo-MARL's co-evolving attacker); the
    env must take them as reset options (`Env.reset_options` holding "attack" and "attack_target": role_chain)."""

    pool: bool = False  # evolve a pool of attacks and play each rollout group under one of them
    target: str = "999"  # the answer every attack wants from the team; an episode whose answer holds it is compromised
    seeds: tuple[str, ...] = DEFAULT_SEEDS  # the first attacks, each holding the placeholder {target}
    children: int = 2  # new attacks (crossover + mutation) waiting after every rollout to be tried on the next
    max_pool: int = 16  # attacks kept; the least successful leave first
    share: float = 1.0  # fraction of each rollout's groups played under an attack (the others play clean)
    url: str = ""  # an OpenAI-compatible server whose chat model writes the children (Evo-MARL's LLM crossover and mutation), e.g. http://127.0.0.1:8000/v1 (key: OPENAI_API_KEY); "" = text rules
    model: str = ""  # that server's model; "" = its only model

    def __post_init__(self):
        self.seeds = tuple(self.seeds)  # a list after a JSON round trip
        changed = [f.name for f in dataclasses.fields(self) if f.name != "pool" and getattr(self, f.name) != f.default]
        _check(self.pool or not changed, f"attack.{changed[0] if changed else ''} configures the attack pool, which "
               "is off: set attack.pool or remove it")
        _check(bool(self.target.strip()), "attack.target must not be empty")
        _check(bool(self.seeds) and all(PLACEHOLDER in s for s in self.seeds),
               f"every attack.seeds entry must hold the placeholder {PLACEHOLDER} (where the target goes)")
        _check(self.children >= 0 and self.max_pool >= 1, "attack.children must be >= 0 and attack.max_pool >= 1")
        _check(0 < self.share <= 1, f"attack.share must be in (0, 1], got {self.share}")
        _check(bool(self.url) or not self.model, "attack.model names the breeder's model, but attack.url is not set")


@dataclass
class TrackConfig:
    """Experiment trackers (turnrl.trackers): metrics.jsonl and eval.json mirrored to TensorBoard and/or W&B."""

    to: tuple[Literal["tensorboard", "wandb"], ...] = ()  # trackers to log to (pip install 'turnrl[track]'); tensorboard writes <out>/tensorboard, wandb logs to a W&B run (WANDB_MODE=offline: into <out>/wandb)
    project: str = "turnrl"  # wandb: project of the run
    name: str = ""  # wandb: display name of the run; "" = the run directory's name
    samples_every: int = 10  # the trackers get the sample episodes of every N-th iteration and of the last (a W&B table each time); samples.jsonl keeps every iteration's

    def __post_init__(self):
        self.to = tuple(self.to)  # a list after a JSON round trip
        _check(len(set(self.to)) == len(self.to), f"track.to names a tracker twice: {list(self.to)}")
        _check("wandb" in self.to or (self.project == "turnrl" and not self.name),
               "track.project and track.name configure a W&B run, but track.to does not include 'wandb': add it "
               "or remove them")
        _check(self.samples_every >= 1, f"track.samples_every must be >= 1, got {self.samples_every}")
        _check(bool(self.to) or self.samples_every == 10, "track.samples_every sets how often the trackers get "
               "sample episodes, but track.to names none: add one or remove it")
