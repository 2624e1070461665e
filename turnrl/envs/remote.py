"""An environment played over HTTP: the client side of `turnrl env-server` (turnrl/env_server.py).

`--env.name remote --env.kwargs '{"url": "http://127.0.0.1:8765"}'`: each `RemoteEnv` opens its own env instance on
the server and keeps one HTTP/1.1 connection to it; every method is one request. Seeds, observations, rewards and
the solver's actions are the served env's, so training, SFT demonstrations and evaluation run as they would
in-process. A server that is down or an env that raised there surfaces as `RemoteEnvError` from that call, which
the rollout counts as that episode's env failure (docs/reliability.md).
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from .base import Env


class RemoteEnvError(RuntimeError):
    """The env server could not be reached, or the env raised on the server (its message says which)."""


class RemoteEnv(Env):
    """An env served over HTTP by `turnrl env-server` (or any server speaking its protocol); needs `url`."""

    name = "remote"

    def __init__(self, url: str = "", timeout: float = 60.0):
        if not url:
            raise ValueError("environment 'remote' needs its server's address: --env.kwargs url http://HOST:PORT "
                             "(start one with: turnrl env-server ENV)")
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"environment 'remote': url must look like http://HOST:PORT, got {url!r}")
        self.url, self.timeout = url, float(timeout)
        self._host, self._port = parts.hostname, parts.port or 80
        self._conn: http.client.HTTPConnection | None = None
        self._id = None
        opened = self._post("/open", {})
        self._id = opened["id"]
        self.name = opened["name"]
        self.action_names = None if opened["action_names"] is None else tuple(opened["action_names"])
        self.free_text = bool(opened["free_text"])
        self.multi_attempt = bool(opened.get("multi_attempt", False))  # servers before this key: no Succ@k
        self._system_prompt = opened["system_prompt"]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        reply = self._post("/reset", {"id": self._id, "seed": seed, "options": options})
        return reply["obs"], reply["info"]

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        reply = self._post("/step", {"id": self._id, "action": action if isinstance(action, str) else repr(action)})
        return reply["obs"], reply["reward"], reply["terminated"], reply["truncated"], reply["info"]

    def system_prompt(self) -> str:
        return self._system_prompt

    def expert_action(self) -> str:
        return self._call("expert_action")

    def available_actions(self) -> list[str]:
        return list(self._call("available_actions"))

    def render(self) -> str:
        return self._call("render")

    def close(self) -> None:
        if self._id is not None:
            try:
                self._post("/close", {"id": self._id})
            except RemoteEnvError:
                pass  # the server is gone: nothing left to release there
            self._id = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __getstate__(self):  # a fresh connection after pickling (Ray); the server-side env stays the same
        state = dict(self.__dict__)
        state["_conn"] = None
        return state

    # ---- transport -------------------------------------------------------------------------------------------

    def _call(self, method: str):
        return self._post("/call", {"id": self._id, "method": method})["result"]

    def _post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()  # ASCII: any string, lone surrogates included, survives the round trip
        while True:
            reused = self._conn is not None
            try:
                if self._conn is None:
                    self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
                self._conn.request("POST", path, data, {"Content-Type": "application/json"})
                response = self._conn.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, OSError) as err:
                self._conn.close()
                self._conn = None
                # A kept-alive connection the server had closed while idle fails before any reply: send again on a
                # new one. Anything else (refused, timed out, reset on a fresh connection) is the call's failure;
                # it is never resent, so a step is never applied twice.
                if not (reused and isinstance(err, (http.client.RemoteDisconnected, BrokenPipeError))):
                    raise RemoteEnvError(f"env server {self.url} {path}: {err}") from err
        try:
            reply = json.loads(payload)
        except json.JSONDecodeError as err:
            raise RemoteEnvError(f"env server {self.url} {path}: not a JSON reply ({payload[:80]!r})") from err
        if response.status != 200:
            raise RemoteEnvError(f"env server {self.url} {path}: {reply.get('error', response.status)}")
        return reply
