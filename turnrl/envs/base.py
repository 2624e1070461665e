"""Base class, step-result type and a conformance checker for turnrl text environments.

An environment speaks text: `reset` returns a text observation, `step` takes ONE action
string (the rollout splits multi-action answers itself, except for free-text envs, which get
the whole answer) and returns a gymnasium-shaped 5-tuple. Environments must never raise on model output, because a policy under training
produces arbitrary strings; bad actions are reported back in the observation instead.
"""

from __future__ import annotations

import math
import numbers
import random
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import numpy as np

INFO_KEYS = ("success", "action_valid", "action_effective")
MAX_QUOTED_CHARS = 30


class StepResult(NamedTuple):
    """What `Env.step` returns; a plain 5-tuple works too."""

    obs: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict


def quote_action(action: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """Shorten and escape an action for an error message.

    Escaping non-printable characters keeps the message on one line (the observation
    promises "message line, newline, render"), and the length limit stops a runaway
    generation from being echoed back into the next prompt.
    """
    head = action[:limit]
    escaped = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in head)
    return escaped + ("..." if len(action) > limit else "")


class Env(ABC):
    """Text environment: text observation in, action text out (gymnasium-shaped)."""

    name: ClassVar[str] = ""  # registry name
    action_names: ClassVar[tuple[str, ...] | None] = None  # finite vocabulary, or None for free text
    # Free-text envs (Countdown expressions, math answers) take the WHOLE `<answer>` content as one
    # action: the rollout must not split it on "||" (an expression or answer may contain it), and
    # `available_actions()` returns []. Envs with a parsed but open-ended action syntax (Sudoku's
    # "R,C,N") keep free_text False so several actions per turn still work.
    free_text: ClassVar[bool] = False
    # The keys of `reset(options=...)` this env understands (role_chain: "attack", "attack_target"); the trainer
    # passes options only to envs that declare them (attack.pool, turnrl.attacks).
    reset_options: ClassVar[tuple[str, ...]] = ()
    # Every turn is another attempt at one answer after feedback (UFO's multi-turn QA: math_qa, reasoning_gym): the
    # evaluation then reports Succ@k (qa.succ@k in eval.json), which means nothing for games or tool calls.
    multi_attempt: ClassVar[bool] = False

    @abstractmethod
    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        """Start a new episode; the same seed must give the same episode."""

    @abstractmethod
    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """Apply one action: (obs, reward, terminated, truncated, info)."""

    @abstractmethod
    def system_prompt(self) -> str:
        """Rules of the game, symbol legend and the answer-format hint."""

    @abstractmethod
    def expert_action(self) -> str:
        """The solver's best next action from the current state."""

    def render(self) -> str:
        """Current state as text (the observation without messages)."""
        return ""

    def close(self) -> None:
        """Release resources; text environments usually hold none."""

    def available_actions(self) -> list[str]:
        """Valid action names in the current state ([] for free-text envs)."""
        return list(self.action_names) if self.action_names is not None else []

    # ------------------------------------------------------------------ helpers
    # Protected helpers so every built-in env handles seeds and bad input the same way.

    def _next_episode_seed(self, seed: int | None) -> int:
        """Seed for the next episode, drawn from the env's own seed stream.

        An explicit seed restarts the stream (so `reset(seed=s)` is reproducible and the
        following `reset()` calls are too); without one we fall back to OS entropy, like
        gymnasium. The global `random` state is never touched.
        """
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
                raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
            self._seed_stream = random.Random(int(seed))
        elif getattr(self, "_seed_stream", None) is None:
            self._seed_stream = random.Random()
        return self._seed_stream.getrandbits(63)

    def _match_action(self, action: Any) -> str | None:
        """Canonical action name for `action` (case-insensitive, stripped), else None."""
        if not isinstance(action, str):
            return None
        key = action.strip().lower()
        for candidate in self.available_actions():
            if candidate.lower() == key:
                return candidate
        return None

    def _invalid_step(self, action: Any, success: bool = False) -> StepResult:
        """Observation for an unknown action: state and step budget are left untouched."""
        shown = quote_action(action if isinstance(action, str) else repr(action))
        valid = ", ".join(self.available_actions())
        message = f"Invalid action '{shown}'. Valid actions: {valid}."
        info = {"success": success, "action_valid": False, "action_effective": False}
        return StepResult(message + "\n" + self.render(), 0.0, False, False, info)

    def _after_done_step(self, terminated: bool, truncated: bool, success: bool) -> StepResult:
        """Stepping a finished episode is a no-op rather than an error (rollouts may overshoot)."""
        info = {"success": success, "action_valid": False, "action_effective": False}
        return StepResult(self.render(), 0.0, terminated, truncated, info)


def has_solver(env: Env) -> bool:
    """Whether the env's expert answers after `reset(seed=0)`: textarena games without a turnrl solver raise
    NotImplementedError from `expert_action` (they train and evaluate, but give no demonstrations)."""
    env.reset(seed=0)
    try:
        env.expert_action()
    except NotImplementedError:
        return False
    return True


# ---------------------------------------------------------------------- check_env

_FIXED_GARBAGE = (
    "", " ", "   \t\n ", "x" * 10_000, "<answer><answer>", "<answer>", "</answer>",
    "<answer>Up</answer>", "<think>unclosed", "0", "1", "-1", "3.14", "1e309", "nan",
    "\x00\x01\x02", "\x1b[31mred\x1b[0m", "\r\n", "\u202e\u200b\u2028", "🙂🔥", "Ｕｐ",
    "Up Up", "Up || Down", "None", "{}", "[]", "'", '"', "\\",
)


def _random_garbage(rng: random.Random, n: int) -> list[str]:
    """Random unicode strings, including surrogates and control characters."""
    out = []
    for _ in range(n):
        length = rng.randrange(0, 40)
        out.append("".join(chr(rng.randrange(0x110000)) for _ in range(length)))
    return out


def _vocabulary(env: Env) -> list[str]:
    vocab = env.available_actions() if hasattr(env, "available_actions") else []
    if not vocab and env.action_names:
        vocab = list(env.action_names)
    return list(vocab)


def _check_reset(env: Env, seed: int | None) -> tuple[str, dict]:
    out = env.reset(seed=seed)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"reset() must return (obs, info), got {type(out).__name__}: {out!r:.200}")
    obs, info = out
    if not isinstance(obs, str):
        raise TypeError(f"reset() obs must be str, got {type(obs).__name__}")
    if not isinstance(info, dict):
        raise TypeError(f"reset() info must be dict, got {type(info).__name__}")
    return obs, info


def _check_step(out: Any, action: str) -> StepResult:
    where = f"step({quote_action(action)!r})"
    if not (isinstance(out, tuple) and len(out) == 5):
        raise TypeError(f"{where} must return a 5-tuple, got {type(out).__name__}")
    obs, reward, terminated, truncated, info = out
    if not isinstance(obs, str):
        raise TypeError(f"{where}: obs must be str, got {type(obs).__name__}")
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise TypeError(f"{where}: reward must be a finite float, got {reward!r}")
    for flag_name, flag in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{where}: {flag_name} must be bool, got {type(flag).__name__}")
    if not isinstance(info, dict):
        raise TypeError(f"{where}: info must be dict, got {type(info).__name__}")
    for key in INFO_KEYS:
        if key not in info:
            raise AssertionError(f"{where}: info is missing key {key!r} (has {sorted(info)})")
        if not isinstance(info[key], (bool, np.bool_)):
            raise TypeError(f"{where}: info[{key!r}] must be bool, got {type(info[key]).__name__}")
    return StepResult(obs, float(reward), bool(terminated), bool(truncated), info)


def _signature(result: StepResult) -> tuple:
    # repr() makes infos holding arrays comparable without elementwise-truth surprises.
    return (result.obs, result.reward, result.terminated, result.truncated, repr(result.info))


_FREE_TEXT_TRIES = ("??", "0", "42", "1 + 2", "", "x" * 300)


def _random_action(env: Env, rng: random.Random) -> str:
    """A random action for replay tests: mostly valid names, sometimes junk (or expert/junk for free text)."""
    vocab = _vocabulary(env)
    if vocab:
        return rng.choice(vocab) if rng.random() < 0.85 else "??"
    if rng.random() < 0.3:
        return env.expert_action()
    return rng.choice(_FREE_TEXT_TRIES)


def _rollout(env: Env, seed: int, actions: list[str] | None, length: int = 25):
    """Play `actions` (or random choices, recorded) after reset(seed); return trace."""
    obs, _ = _check_reset(env, seed)
    rng = random.Random(seed)
    played, trace = [], [obs]
    for i in range(length if actions is None else len(actions)):
        # Bad actions are mixed in now and then: they must not perturb the replay.
        action = actions[i] if actions is not None else _random_action(env, rng)
        result = _check_step(env.step(action), action)
        played.append(action)
        trace.append(_signature(result))
        if actions is None and (result.terminated or result.truncated):
            break
    return played, trace


def _check_garbage(env: Env, seed: int, garbage: list[str]) -> None:
    """Garbage never raises; a rejected action leaves the state alone and does not end the episode.

    With a finite vocabulary, anything outside it must be rejected. A free-text env may accept
    garbage as a (wrong) answer, which can end the episode: then we reset and carry on.
    """
    _check_reset(env, seed)
    vocab_lower = {v.lower() for v in _vocabulary(env)}
    for text in garbage:
        before = env.render()
        result = _check_step(env.step(text), text)
        outside = text.strip().lower() not in vocab_lower
        if vocab_lower and outside:
            assert not result.info["action_valid"], f"garbage {quote_action(text)!r} was accepted"
        if not result.info["action_valid"]:
            assert env.render() == before, f"invalid action {quote_action(text)!r} changed the state"
            assert not (result.terminated or result.truncated), "an invalid action ended the episode"
        elif result.terminated or result.truncated:
            _check_reset(env, seed)


def check_env(env: Env, seeds: tuple[int, ...] = (0, 1, 2), n_garbage: int = 50) -> None:
    """Check that `env` follows the turnrl text-environment contract.

    Raises AssertionError / TypeError with a readable message on the first violation.
    Free-text envs (`free_text = True`) must list no actions; their random play mixes expert
    answers with junk, and they may accept garbage as a wrong answer.
    """
    for method in ("reset", "step", "system_prompt", "expert_action", "render", "available_actions"):
        if not callable(getattr(env, method, None)):
            raise TypeError(f"{type(env).__name__} has no method {method}()")
    free_text = getattr(env, "free_text", False)
    if not isinstance(free_text, bool):
        raise TypeError(f"free_text must be a bool class attribute, got {type(free_text).__name__}")
    prompt = env.system_prompt()
    if not isinstance(prompt, str) or not prompt.strip():
        raise AssertionError("system_prompt() must return a non-empty str")

    garbage = list(_FIXED_GARBAGE) + _random_garbage(random.Random(12345), n_garbage)
    for seed in seeds:
        # Determinism: same seed -> same first observation and same trajectory.
        first, _ = _check_reset(env, seed)
        again, _ = _check_reset(env, seed)
        assert first == again, f"reset(seed={seed}) gave different observations:\n{first}\n---\n{again}"
        if free_text:
            assert env.available_actions() == [], "a free-text env must return [] from available_actions()"
            assert env.action_names is None, "a free-text env must have action_names = None"
        actions, trace = _rollout(env, seed, None)
        _, replay = _rollout(env, seed, actions)
        for i, (a, b) in enumerate(zip(trace, replay)):
            assert a == b, f"seed {seed}: replaying {actions[:i]} diverged at step {i}: {a!r:.300} != {b!r:.300}"

        _check_garbage(env, seed, garbage)

        # Every action name is accepted in any case and with surrounding whitespace.
        for name in _vocabulary(env):
            for variant in (name.upper(), name.lower(), f"  {name.swapcase()}\n"):
                _check_reset(env, seed)
                result = _check_step(env.step(variant), variant)
                assert result.info["action_valid"], f"action {variant!r} (for {name!r}) was rejected"

        # The expert finishes the episode; stepping afterwards is a harmless no-op.
        _check_reset(env, seed)
        final = None
        for _ in range(10_000):
            action = env.expert_action()
            if not isinstance(action, str):
                raise TypeError(f"expert_action() must return str, got {type(action).__name__}")
            final = _check_step(env.step(action), action)
            assert final.info["action_valid"], f"expert action {action!r} was rejected"
            if final.terminated or final.truncated:
                break
        else:
            raise AssertionError(f"seed {seed}: expert did not finish an episode within 10000 steps")
        for text in [*_vocabulary(env)[:1], "", "<answer>", env.expert_action()]:
            after = _check_step(env.step(text), text)
            assert (after.terminated, after.truncated) == (final.terminated, final.truncated), (
                "step after the episode ended changed terminated/truncated"
            )
            assert not after.info["action_valid"], "step after the episode ended must be invalid"
            assert after.reward == 0.0, "step after the episode ended must give reward 0.0"
