"""Env calls in threads (rollout.env_threads, turnrl.env_threads): concurrent, bounded, timed out, same episodes."""

import threading

import pytest

from scripted import ScriptedEngine
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.env_threads import run_concurrently
from turnrl.envs.frozen_lake import FrozenLakeEnv
from turnrl.faults import EnvTimeout
from turnrl.rollout import RolloutSettings, run_episodes

REPLIES = ["Right</answer><|im_end|>", "oops<|im_end|>", "Down</answer><|im_end|>", "Left</answer><|im_end|>"]


def test_results_come_back_in_order_with_their_errors():
    def fail():
        raise ZeroDivisionError("boom")

    out = run_concurrently([lambda: 1, fail, lambda: "three"], threads=2, timeout=0)
    assert [r for r, _, _ in out] == [1, None, "three"]
    assert [type(e).__name__ if e else None for _, e, _ in out] == [None, "ZeroDivisionError", None]
    assert all(seconds >= 0 for _, _, seconds in out)


def test_at_most_threads_calls_run_at_once_and_that_many_do():
    lock, state = threading.Lock(), {"now": 0, "max": 0}
    barrier = threading.Barrier(3, timeout=10)  # passes only if 3 calls are in flight together

    def call():
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        barrier.wait()
        with lock:
            state["now"] -= 1
        return True

    out = run_concurrently([call] * 9, threads=3, timeout=0)
    assert all(r is True for r, _, _ in out) and state["max"] == 3


def test_a_call_past_the_timeout_is_abandoned_and_the_others_finish():
    release = threading.Event()
    try:
        out = run_concurrently([lambda: release.wait(60), lambda: "ok", lambda: "also"], threads=2, timeout=0.2)
        assert isinstance(out[0][1], EnvTimeout) and out[0][0] is None and out[0][2] == 0.2
        assert [r for r, _, _ in out[1:]] == ["ok", "also"]
    finally:
        release.set()  # lets the abandoned daemon thread end


class BarrierLake(FrozenLakeEnv):
    """Every step waits until `parties` steps are in flight at once: only concurrent env calls get past it."""

    barrier: threading.Barrier | None = None
    reset_barrier: threading.Barrier | None = None
    closed = 0
    hang: threading.Event | None = None  # steps of seed 12 wait for it
    reset_hang: threading.Event | None = None  # resets of seed 13 wait for it

    def __init__(self):
        super().__init__(slippery=False)

    def step(self, action):
        if self.hang is not None and self.seed_ == 12:
            self.hang.wait(60)
        if self.barrier is not None:
            self.barrier.wait()
        return super().step(action)

    def reset(self, *, seed=None, options=None):
        self.seed_ = seed
        if self.reset_hang is not None and seed == 13:
            self.reset_hang.wait(60)
        if self.reset_barrier is not None:
            self.reset_barrier.wait()
        return super().reset(seed=seed, options=options)

    def close(self):
        type(self).closed += 1
        super().close()


def play(tok, threads, timeout=0.0, max_live=0):
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False,
                               env_timeout=timeout, env_threads=threads, max_live=max_live)
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    return run_episodes(ScriptedEngine(tok, REPLIES), renderer, BarrierLake, [11, 12, 13], 2, settings,
                        SamplingParams(max_new_tokens=16), env_name="barrier")


def fields(trajs):
    return [(t.ids, t.loss_mask, t.turn_rewards, t.end_reason, t.transcript, t.error) for t in trajs]


@pytest.fixture
def lake():
    yield BarrierLake
    BarrierLake.barrier, BarrierLake.reset_barrier, BarrierLake.closed = None, None, 0
    BarrierLake.hang, BarrierLake.reset_hang = None, None


def test_threaded_env_steps_play_the_same_episodes(tiny_tokenizer, lake):
    one_by_one = play(tiny_tokenizer, threads=0)
    assert fields(play(tiny_tokenizer, threads=4)) == fields(one_by_one)
    # groups started as others end (the scripted engine's replies follow its calls, so compare like with like)
    assert fields(play(tiny_tokenizer, threads=4, max_live=2)) == fields(play(tiny_tokenizer, threads=0, max_live=2))
    assert not any(t.failed for t in one_by_one) and {t.end_reason for t in one_by_one} - {"turn_budget"}


def test_the_steps_of_a_turn_really_run_together(tiny_tokenizer, lake):
    """The first turn's six steps meet at a barrier of six: in threads they pass it, one by one they cannot."""
    lake.barrier = threading.Barrier(6, timeout=5)
    assert all(t.num_turns >= 1 and not t.failed for t in play(tiny_tokenizer, threads=6)[:6])
    lake.barrier = threading.Barrier(6, timeout=0.2)
    assert all("BrokenBarrierError" in t.error for t in play(tiny_tokenizer, threads=0))


def test_the_resets_of_the_groups_that_start_together_run_together(tiny_tokenizer, lake):
    lake.reset_barrier = threading.Barrier(6, timeout=5)
    assert not any(t.failed for t in play(tiny_tokenizer, threads=6))
    lake.reset_barrier, lake.closed = threading.Barrier(6, timeout=0.2), 0
    trajs = play(tiny_tokenizer, threads=0)
    assert all(t.failed and "reset raised" in t.error and "BrokenBarrierError" in t.error for t in trajs)
    assert lake.closed == 6  # an env whose reset failed is still closed


@pytest.mark.parametrize("event, seed, during", [("hang", 12, "step"), ("reset_hang", 13, "reset")])
def test_a_hung_call_in_a_thread_loses_its_episodes_and_abandons_their_envs(tiny_tokenizer, lake, event, seed, during):
    setattr(lake, event, threading.Event())
    try:
        trajs = play(tiny_tokenizer, threads=4, timeout=0.3)
    finally:
        getattr(lake, event).set()
    failed = [t for t in trajs if t.failed]
    assert [t.seed for t in failed] == [seed, seed]
    assert all(f"{during} raised" in t.error and "exceeded rollout.env_timeout=0.3s" in t.error for t in failed)
    assert all(not t.failed for t in trajs if t.seed != seed)
    assert lake.closed == 4  # the two hung envs were abandoned, not closed under their running call
