"""Env calls run concurrently in threads (`rollout.env_threads`), each under a wall-clock limit.

For envs that wait rather than compute (a web request, a subprocess, a sandbox, a judge model): while one waits,
the others run. Python threads do not help envs that compute in Python (the GIL), which is why the default
stays one call after another in the main thread, where `rollout.env_timeout` can interrupt them (SIGALRM,
turnrl.faults.time_limit).

Written by hand rather than on `concurrent.futures`: an env call that outlives its limit cannot be stopped (threads
cannot be killed), and the executor's threads are joined when the interpreter exits, so one hung env would keep
the process from ever exiting. Here each call runs on a daemon thread of its own (at most `threads` at once); a
call past its limit is abandoned to its thread, reported as EnvTimeout, and its result ignored if it ever comes.
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import Callable

from turnrl.faults import EnvTimeout


def run_concurrently(calls: list[Callable[[], object]], threads: int, timeout: float
                     ) -> list[tuple[object, BaseException | None, float]]:
    """Runs `calls`, at most `threads` at once; for each, (result, exception or None, seconds it ran).

    A call still running `timeout` seconds (> 0) after it started gets (None, EnvTimeout, timeout) and is
    abandoned; 0 = no limit. Results come back in the order of `calls`."""
    out: list[tuple[object, BaseException | None, float] | None] = [None] * len(calls)
    finished = threading.Event()  # set by any call that ends
    boxes: dict[int, dict] = {}
    running: dict[int, float] = {}  # call index -> start time
    queue = list(range(len(calls)))[::-1]

    def start(i: int) -> None:
        box: dict = {}
        boxes[i] = box

        def target() -> None:
            begin = perf_counter()
            try:
                box["result"] = calls[i]()
            except BaseException as err:  # the env is user code: whatever it raises is its episode's error
                box["error"] = err
            box["seconds"] = perf_counter() - begin
            box["done"] = True
            finished.set()

        running[i] = perf_counter()
        threading.Thread(target=target, name=f"turnrl-env-{i}", daemon=True).start()

    while queue or running:
        while queue and len(running) < threads:
            start(queue.pop())
        finished.clear()
        now = perf_counter()
        for i in list(running):
            box = boxes[i]
            if box.get("done"):
                out[i] = (box.get("result"), box.get("error"), box["seconds"])
                del running[i]
            elif timeout > 0 and now - running[i] >= timeout:
                out[i] = (None, EnvTimeout(f"env call exceeded rollout.env_timeout={timeout}s (its thread is "
                                           "abandoned: threads cannot be stopped)"), timeout)
                del running[i]
        if running and not (queue and len(running) < threads):
            deadline = min(running.values()) + timeout - perf_counter() if timeout > 0 else None
            finished.wait(None if deadline is None else max(deadline, 0.0))
    return out  # type: ignore[return-value]
