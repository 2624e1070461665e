"""The engine contract: `generate(prompts, params) -> completions`, in token ids only.

The trainer learns on exactly the ids an engine sampled, with the logprobs it reports, so nothing is
decoded and re-tokenised between sampling and training.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Hashable
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling (use greedy=True), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Completion:
    ids: tuple[int, ...]        # sampled tokens, including the stop token when one was sampled
    logprobs: tuple[float, ...]  # log pi(token) under softmax(logits / temperature), one per id
    finish_reason: Literal["stop", "length"]


class Engine(Protocol):
    """Generation backend. `keys` name the episode of each prompt: an engine may keep per-episode
    state (a KV cache) between calls for the same key until `release(keys)`; it must return the same
    distribution as if it had prefilled the whole prompt. `seeds` (one per prompt) give each prompt its own
    random stream: its completion must not depend on which other prompts share the call or how the engine
    batches them (the rollout passes them when `generate` accepts the argument)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 keys: list[Hashable] | None = None, seeds: list[int] | None = None) -> list[Completion]: ...

    def release(self, keys: list[Hashable]) -> None: ...


def check_prompts(prompts: list[list[int]], keys: list[Hashable] | None, seeds: list[int] | None = None) -> None:
    """The input checks every engine makes before generating (one message for every backend)."""
    if keys is not None and len(keys) != len(prompts):
        raise ValueError("keys must have one entry per prompt")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError("seeds must have one entry per prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
