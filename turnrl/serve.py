"""`turnrl serve RUN_DIR`: a trained agent behind an OpenAI-compatible chat-completions endpoint.

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /health. Requests that arrive while the model
is busy are generated together in one batch (same sampling settings), with the same KV-cached engine
as training rollouts. The agent's reply format is part of the agent: the server appends the response
prefix the run was trained with (`<think>` or `<answer>`) to the generation prompt and returns it as
the start of the reply, so a client sends plain chat messages.

Written on the standard library's `http.server` on purpose: the server has three small JSON endpoints
and one worker (the model), so a web framework (FastAPI + uvicorn) would add two dependencies and
nothing we use. It is meant for loopback/LAN evaluation, not for the open internet (no auth, no TLS).
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from http.server import ThreadingHTTPServer

import torch

from turnrl.engines import HFEngine, SamplingParams
from turnrl.http_json import JSONHandler


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class AgentServer:
    """Serves `policy` as model `model_name` on (host, port); port 0 picks a free port (see `.port`)."""

    def __init__(self, policy, *, model_name: str, response_prefix: str = "", host: str = "127.0.0.1",
                 port: int = 8000, max_batch: int = 32, default_max_tokens: int = 256, seed: int = 0):
        self.policy = policy
        self.model_name = model_name
        self.prefix = response_prefix
        self.default_max_tokens = default_max_tokens
        self.max_batch = max_batch
        self.engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                               batch_size=max_batch, generator=torch.Generator().manual_seed(seed))
        self.max_positions = getattr(policy.lm.config, "max_position_embeddings", None)
        self._pending: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._generate_loop, name="turnrl-serve-model", daemon=True)
        self.httpd = ThreadingHTTPServer((host, port), _handler_for(self))
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def serve_forever(self) -> None:
        self._worker.start()
        try:
            self.httpd.serve_forever()
        finally:
            self._pending.put(None)

    def start(self) -> "AgentServer":
        """Serves from a background thread (tests, notebooks); `stop()` ends it."""
        threading.Thread(target=self.serve_forever, name="turnrl-serve-http", daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._pending.put(None)

    # ---- the model worker: batches whatever requests are waiting --------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams) -> Future:
        future: Future = Future()
        self._pending.put((prompt, params, future))
        return future

    def _generate_loop(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            batch, later = [item], []
            while len(batch) < self.max_batch:
                try:
                    nxt = self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    later.append(nxt)
                    break
                (batch if nxt[1] == item[1] else later).append(nxt)
            for x in later:  # other sampling settings: their own batch next
                self._pending.put(x)
            try:
                completions = self.engine.generate([p for p, _, _ in batch], item[1])
            except Exception as err:  # noqa: BLE001 - handed to the waiting request threads, which answer HTTP 500
                for _, _, future in batch:
                    future.set_exception(err)
                continue
            for (_, _, future), completion in zip(batch, completions):
                future.set_result(completion)

    # ---- one chat completion ----------------------------------------------------------------------------
    def complete(self, body: dict) -> dict:
        messages = _messages(body.get("messages"))
        if body.get("model") not in (None, self.model_name):
            raise BadRequest(f"model {body.get('model')!r} is not served here (this server serves {self.model_name!r})", 404)
        if body.get("stream"):
            raise BadRequest("stream=true is not supported by turnrl serve")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.default_max_tokens
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p", 1.0)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest("max_tokens must be a positive integer")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise BadRequest("temperature must be a number >= 0")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise BadRequest("top_p must be in (0, 1]")
        params = (SamplingParams(max_new_tokens=max_tokens, greedy=True) if temperature == 0
                  else SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p)))
        tok = self.policy.tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + self.prefix
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        if self.max_positions and len(prompt) + max_tokens > self.max_positions:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.max_positions} tokens")
        completion = self.submit(prompt, params).result()
        reply = self.prefix + tok.decode(list(completion.ids), skip_special_tokens=True)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": completion.finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(completion.ids),
                      "total_tokens": len(prompt) + len(completion.ids)},
        }

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "turnrl"}]}


def _messages(raw) -> list[dict]:
    """Validates chat messages; content may be a string or a list of {"type": "text", "text": ...} parts."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list")
    out = []
    for m in raw:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest("each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
        if not isinstance(content, str):
            raise BadRequest("message content must be a string or a list of text parts")
        out.append({"role": m["role"], "content": content})
    return out


def _handler_for(server: AgentServer):
    class Handler(JSONHandler):
        _send = JSONHandler.send_json

        def _error(self, status: int, message: str) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._send(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):  # noqa: N802 - stdlib name
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, server.models())
            elif self.path == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self):  # noqa: N802 - stdlib name
            if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
                self._error(404, f"no route {self.path} (this server has /v1/chat/completions)")
                return
            try:
                body = self.read_json()
                if not isinstance(body, dict):
                    raise BadRequest("the request body must be a JSON object")
                self._send(200, server.complete(body))
            except json.JSONDecodeError as err:
                self._error(400, f"invalid JSON: {err.msg}")
            except BadRequest as err:
                self._error(err.status, str(err))
            except Exception as err:  # noqa: BLE001 - the client gets a 500 with the reason, the server keeps serving
                self._error(500, f"{type(err).__name__}: {err}")

    return Handler
