"""An engine for any OpenAI-compatible chat server (vLLM, llama.cpp server, hosted APIs, `turnrl serve`).

Chat messages in, text out, through the official `openai` client (`pip install 'turnrl[openai]'`).
It is **evaluation-only**: a chat server returns text, not the sampled token ids and their logprobs,
so its replies cannot be trained on without re-tokenising (which the trainer never does). It therefore
does not implement the token-id `Engine` protocol; `turnrl.served` plays episodes with it.

Retries (with exponential backoff on connection errors, 408/409/429 and 5xx) and timeouts are the
client's own; requests of one turn run on at most `concurrency` threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from turnrl.engines.base import SamplingParams


class ServerError(RuntimeError):
    """The server could not be reached, or rejected a request after the client's retries."""


@dataclass(frozen=True)
class ChatReply:
    text: str
    finish_reason: str  # "stop" | "length" | what the server says


class OpenAIEngine:
    """Sends each conversation to `{base_url}/chat/completions` as `model`; one reply per conversation."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 3, concurrency: int = 8):
        try:
            import openai
        except ImportError as err:
            raise ServerError("--engine openai needs the `openai` package: pip install 'turnrl[openai]'") from err
        if concurrency < 1 or timeout <= 0 or max_retries < 0:
            raise ValueError("concurrency must be >= 1, timeout > 0 and max_retries >= 0")
        self._openai = openai
        self.base_url = base_url
        # Local servers need no key, but the client insists on one.
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                                    timeout=timeout, max_retries=max_retries)
        self.concurrency = concurrency
        self.model = model or self._only_model()

    def served_models(self) -> list[str]:
        """The model names the server lists (GET /models)."""
        return [m.id for m in self._call(self.client.models.list).data]

    def _only_model(self) -> str:
        """The served model when the server serves exactly one (as `turnrl serve` and `vllm serve` do)."""
        ids = self.served_models()
        if len(ids) != 1:
            raise ServerError(f"{self.base_url} serves {len(ids)} models ({', '.join(ids[:5])}): pick one with --model")
        return ids[0]

    def _call(self, fn, *args, **kwargs):
        openai = self._openai
        try:
            return fn(*args, **kwargs)
        except openai.APIConnectionError as err:  # includes timeouts
            raise ServerError(f"cannot reach an OpenAI-compatible server at {self.base_url} "
                              f"({type(err).__name__}: {err}); is it running?") from err
        except openai.APIStatusError as err:
            raise ServerError(f"{self.base_url} answered HTTP {err.status_code}: {_first_line(err.message)}") from err

    def chat(self, conversations: list[list[dict]], params: SamplingParams) -> list[ChatReply]:
        """One reply per conversation (a list of {"role", "content"} messages), in order."""
        kwargs = {"model": self.model, "max_tokens": params.max_new_tokens,
                  "temperature": 0.0 if params.greedy else params.temperature}
        if params.top_p < 1.0 and not params.greedy:
            kwargs["top_p"] = params.top_p

        def one(messages: list[dict]) -> ChatReply:
            response = self._call(self.client.chat.completions.create, messages=messages, **kwargs)
            choice = response.choices[0]
            return ChatReply(choice.message.content or "", choice.finish_reason or "stop")

        if len(conversations) <= 1 or self.concurrency == 1:
            return [one(m) for m in conversations]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            return list(pool.map(one, conversations))


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "(no message)"
