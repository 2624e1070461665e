"""Fault handling shared by the trainer and the rollout: stop signals, env call timeouts, env failures.

docs/reliability.md lists each guarantee with the test that proves it.
"""

from __future__ import annotations

import signal
import threading
import traceback
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT or SIGTERM). `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """SIGINT and SIGTERM, handled alike while training runs in the main thread.

    Inside `deferred()` (the RL loop) the first signal is only recorded: the trainer finishes the current (or
    next) iteration, writes a checkpoint and raises `Interrupted`. Outside it, or on a second signal, the
    handler raises `Interrupted` at once; nothing is corrupted because checkpoints are renamed into
    place and a torn metrics line is dropped on resume. In another thread (signal handlers can only be
    installed in the main one) the handlers are left as they are.
    """

    def __init__(self):
        self.requested: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        if self._deferring and self.requested is None:
            self.requested = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


class EnvTimeout(Exception):
    """An env call ran past `rollout.env_timeout` seconds."""


@contextmanager
def time_limit(seconds: float):
    """Raises EnvTimeout in the block after `seconds` (0 = no limit).

    Written by hand on SIGALRM / setitimer because env code is arbitrary Python that cannot be asked to
    stop: a thread-based timeout could not interrupt it (threads cannot be killed) and a process per env
    would cost a fork and pickling per step. SIGALRM interrupts pure-Python code in the main thread;
    a hang inside a C call that ignores signals is not interrupted (documented in docs/reliability.md).
    Outside the main thread, or without SIGALRM (Windows), the block runs without a limit.
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(_signum, _frame):
        raise EnvTimeout(f"env call exceeded rollout.env_timeout={seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def format_error(err: BaseException) -> str:
    return "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()


class EnvFailureError(RuntimeError):
    """Too many env episodes failed in one iteration (`rollout.max_env_error_rate`); the message names
    the env, the seed and the traceback of the first failure."""


class WorkerLostError(RuntimeError):
    """A Ray rollout worker's process died (killed, out of memory, crashed) during a rollout or a weight push
    (turnrl.distributed); the run stops and its last checkpoint is intact."""
