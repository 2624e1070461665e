"""`turnrl env-server ENV`: any turnrl environment served over HTTP, for `RemoteEnv` (turnrl/envs/remote.py).

An environment that cannot live in the trainer's process (other dependencies or another Python, a machine of its
own, a simulator that takes minutes to start) runs here, and the trainer, its Ray workers or `turnrl eval` play it
through `--env.name remote --env.kwargs '{"url": "http://HOST:PORT"}'`. Each client env is its own instance on
the server (`/open`), so episodes stay independent and deterministic per seed, exactly as in-process.

Protocol (JSON bodies, POST unless noted): `/open` {} -> {id, name, action_names, free_text, multi_attempt, system_prompt};
`/reset` {id, seed, options} -> {obs, info}; `/step` {id, action} -> {obs, reward, terminated, truncated, info};
`/call` {id, method} -> {result} for `expert_action`, `available_actions`, `render`, `system_prompt`;
`/close` {id} -> {}; GET `/health` -> {env, open}. An env that raises answers 500 with {error}; an unknown id or
method, 404/400. Another server (any language) speaking this protocol works the same.

Written on the standard library's `http.server` (turnrl.http_json, like `turnrl serve`): five small JSON endpoints
need no web framework. Meant for loopback or a private network (no auth, no TLS); it binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import math
import threading
import uuid
from http.server import ThreadingHTTPServer

from turnrl.envs import make
from turnrl.http_json import JSONHandler

CALLS = ("expert_action", "available_actions", "render", "system_prompt")


class _Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def jsonable(value):
    """`value` with numpy scalars and arrays as Python numbers and lists, non-finite floats as strings (JSON has
    none), other unknown objects as their str: env infos are free-form."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):  # numpy scalar or array
        return jsonable(value.tolist())
    return str(value)


class EnvServer:
    """Serves env `env_name` (made with `env_kwargs`) on (host, port); port 0 picks a free port (see `.port`).
    `start()` serves in a background thread, `close()` stops it and closes every env still open."""

    def __init__(self, env_name: str, env_kwargs: dict | None = None, *, host: str = "127.0.0.1", port: int = 8765):
        self.env_name, self.env_kwargs = env_name, dict(env_kwargs or {})
        make(env_name, **self.env_kwargs).close()  # a bad name or argument fails here, before serving
        self.envs: dict[str, object] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.registry_lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.httpd.server_address[0]}:{self.port}"

    def start(self) -> "EnvServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="turnrl-env-server", daemon=True)
        self.thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join()
        self.httpd.server_close()
        with self.registry_lock:
            envs, self.envs = list(self.envs.values()), {}
        for env in envs:
            env.close()

    # ---- requests --------------------------------------------------------------------------------------------

    def handle(self, path: str, body: dict) -> dict:
        if path == "/open":
            env = make(self.env_name, **self.env_kwargs)
            try:
                names = getattr(env, "action_names", None)
                opened = {"name": getattr(env, "name", "") or self.env_name,
                          "action_names": None if names is None else list(names),
                          "free_text": bool(getattr(env, "free_text", False)),
                          "multi_attempt": bool(getattr(env, "multi_attempt", False)),
                          "system_prompt": env.system_prompt()}
            except Exception:
                env.close()  # not registered: nothing else would ever close it
                raise
            env_id = uuid.uuid4().hex
            with self.registry_lock:
                self.envs[env_id], self.locks[env_id] = env, threading.Lock()
            return {"id": env_id, **opened}
        env_id = body.get("id")
        with self.registry_lock:
            env, lock = self.envs.get(env_id), self.locks.get(env_id)
        if env is None:
            raise _Error(404, f"no open env with id {env_id!r}")
        with lock:  # one call at a time per env: an env is not thread-safe, different envs run in parallel
            if path == "/reset":
                obs, info = env.reset(seed=body.get("seed"), options=body.get("options"))
                return {"obs": obs, "info": jsonable(info)}
            if path == "/step":
                obs, reward, terminated, truncated, info = env.step(body.get("action"))
                return {"obs": obs, "reward": float(reward), "terminated": bool(terminated),
                        "truncated": bool(truncated), "info": jsonable(info)}
            if path == "/call":
                method = body.get("method")
                if method not in CALLS:
                    raise _Error(400, f"method must be one of {', '.join(CALLS)}, got {method!r}")
                return {"result": jsonable(getattr(env, method)())}
            if path == "/close":
                with self.registry_lock:
                    self.envs.pop(env_id, None)
                    self.locks.pop(env_id, None)
                env.close()
                return {}
        raise _Error(404, f"unknown endpoint {path}")

    def _handler(self):
        server = self

        class Handler(JSONHandler):  # keep-alive (one connection per client env), TCP_NODELAY
            _reply = JSONHandler.send_json

            def do_GET(self):
                if self.path == "/health":
                    with server.registry_lock:
                        n = len(server.envs)
                    self._reply(200, {"env": server.env_name, "open": n})
                else:
                    self._reply(404, {"error": f"unknown endpoint {self.path}"})

            def do_POST(self):
                try:
                    body = self.read_json()
                    if not isinstance(body, dict):
                        raise _Error(400, "the request body must be a JSON object")
                    self._reply(200, server.handle(self.path, body))
                except _Error as err:
                    self._reply(err.status, {"error": str(err)})
                except json.JSONDecodeError as err:
                    self._reply(400, {"error": f"invalid JSON: {err}"})
                except Exception as err:  # the env raised: the client reports it as that env's failure
                    self._reply(500, {"error": f"{type(err).__name__}: {err}"})

        return Handler
