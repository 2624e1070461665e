"""A scripted engine for tests: replies with fixed texts, tokenised exactly once, and records its inputs."""

from __future__ import annotations

from turnrl.engines.base import Completion, SamplingParams


class ScriptedEngine:
    def __init__(self, tokenizer, replies, logprob: float = -0.5):
        """`replies(call_index, row_index, prompt_ids) -> str` or a list of strings used in turn order."""
        self.tokenizer = tokenizer
        self.replies = replies
        self.logprob = logprob
        self.calls: list[list[list[int]]] = []
        self.released: list = []

    def _reply(self, call: int, row: int, prompt: list[int]) -> str:
        if callable(self.replies):
            return self.replies(call, row, prompt)
        return self.replies[min(call, len(self.replies) - 1)]

    def generate(self, prompts, params: SamplingParams, keys=None):
        call = len(self.calls)
        self.calls.append([list(p) for p in prompts])
        out = []
        for row, prompt in enumerate(prompts):
            ids = self.tokenizer(self._reply(call, row, prompt), add_special_tokens=False)["input_ids"]
            ids = ids[: params.max_new_tokens]
            stop = self.tokenizer.eos_token_id in ids
            if stop:
                ids = ids[: ids.index(self.tokenizer.eos_token_id) + 1]
            out.append(Completion(tuple(ids), tuple([self.logprob] * len(ids)), "stop" if stop else "length"))
        return out

    def release(self, keys):
        self.released.extend(keys)
