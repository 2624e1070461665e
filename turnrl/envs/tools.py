"""Tool-calling environments: the model acts by calling the env's tools, one JSON call per turn, and ends the
episode by calling `answer`.

A call is the function-calling JSON of OpenAI / Hermes / Qwen chat models, `{"name": ..., "arguments": {...}}`,
inside the reply's `<answer>...</answer>`; the tool's result is the next observation. Write an env by
subclassing `ToolEnv`: mark tool methods with `@tool` (their signature and docstring become the tool list in the
system prompt, and arguments are checked against the signature), and implement `new_task`, `check_answer` and
`expert_call`. A tool signals a bad input by raising `ToolError` (the model sees the message); any other exception
is a bug in the env and fails the episode (turnrl.rollout's env-error handling).
"""

from __future__ import annotations

import inspect
import json
import random
from abc import abstractmethod
from typing import Any, Callable

from .base import Env, StepResult, quote_action
from .countdown import EvaluationError, ExpressionError, evaluate, parse_expression
from .math_qa import MAX_DIFFICULTY, MIN_DIFFICULTY, arithmetic_problem
from .qa import answers_match

MAX_CALL_CHARS = 2000
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


class ToolError(ValueError):
    """Raised by a tool for bad arguments: the model sees `Error: <message>`."""


def tool(method: Callable) -> Callable:
    """Marks a `ToolEnv` method as a tool the model can call."""
    method._turnrl_tool = True
    return method


class ToolEnv(Env):
    """Base class: a task solved by calling tools (JSON function calls), ended by calling `answer`."""

    free_text = True

    def __init__(self, max_calls: int = 8) -> None:
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        self.max_calls = max_calls
        self._task: str | None = None
        self._calls = 0
        self._done = self._success = False

    # ------------------------------------------------------------------ what a subclass defines

    @abstractmethod
    def new_task(self, rng: random.Random) -> str:
        """Sets up a new episode's task with the episode's own RNG and returns its description."""

    @abstractmethod
    def check_answer(self, value: str) -> bool:
        """Whether the value given to `answer` solves the task."""

    @abstractmethod
    def expert_call(self) -> dict:
        """The solver's next call, {"name": ..., "arguments": {...}}."""

    instruction = "Solve the task by calling tools."

    # ------------------------------------------------------------------ tools

    @tool
    def answer(self, value: str) -> str:
        """Submit the final answer; this ends the episode."""
        return value

    def tools(self) -> dict[str, Callable]:
        """The tools by name (bound methods marked with `@tool`), `answer` last."""
        found = {name: getattr(self, name) for name in dir(type(self))
                 if getattr(getattr(type(self), name), "_turnrl_tool", False) and name != "answer"}
        return {**dict(sorted(found.items())), "answer": self.answer}

    def tool_specs(self) -> list[dict]:
        """Each tool as a function-calling spec: name, description (docstring's first line), JSON-schema parameters."""
        specs = []
        for name, method in self.tools().items():
            hints = inspect.get_annotations(method, eval_str=True)
            params = {p: {"type": _JSON_TYPES.get(hints.get(p), "string")}
                      for p in inspect.signature(method).parameters}
            required = [p.name for p in inspect.signature(method).parameters.values() if p.default is p.empty]
            doc = (inspect.getdoc(method) or "").strip().splitlines()
            specs.append({"name": name, "description": doc[0] if doc else "",
                          "parameters": {"type": "object", "properties": params, "required": required}})
        return specs

    # ------------------------------------------------------------------ gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self._task = self.new_task(random.Random(self._next_episode_seed(seed)))
        self._calls = 0
        self._done = self._success = False
        return self._task, {"max_calls": self.max_calls}

    def step(self, action: str) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            return self._after_done_step(self._success, not self._success, self._success)
        call, problem = self._parse_call(action)
        if problem is not None:
            return self._bad_call(action, problem)
        name, arguments = call
        method = self.tools()[name]
        try:
            bound = inspect.signature(method).bind(**arguments)
        except TypeError as err:
            return self._bad_call(action, f"wrong arguments for {name}: {err}")
        self._calls += 1
        if name == "answer":
            self._done, self._success = True, bool(self.check_answer(str(bound.arguments["value"])))
            status = "Correct." if self._success else "Incorrect."
            info = {"success": self._success, "action_valid": True, "action_effective": True, "calls": self._calls}
            return StepResult(status, 1.0 if self._success else 0.0, self._success, not self._success, info)
        try:
            result, effective = str(method(*bound.args, **bound.kwargs)), True
        except ToolError as err:
            result, effective = f"Error: {err}", False
        info = {"success": False, "action_valid": True, "action_effective": effective, "calls": self._calls}
        if self._calls >= self.max_calls:  # the call budget is spent without an answer
            self._done = True
            return StepResult(f"{result}\nNo calls left ({self.max_calls} used).", 0.0, False, True, info)
        return StepResult(result, 0.0, False, False, info)

    def _parse_call(self, action: Any) -> tuple[tuple[str, dict] | None, str | None]:
        if not isinstance(action, str) or not action.strip():
            return None, "empty call"
        if len(action) > MAX_CALL_CHARS:
            return None, f"a call has at most {MAX_CALL_CHARS} characters"
        try:
            call = json.loads(action)
        except (ValueError, RecursionError):
            return None, "not a JSON object"
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None, 'expected {"name": ..., "arguments": {...}}'
        arguments = call.get("arguments", {})
        if not isinstance(arguments, dict):
            return None, '"arguments" must be an object'
        if call["name"] not in self.tools():
            return None, f"unknown tool {quote_action(call['name'])!r}; tools: {', '.join(self.tools())}"
        return (call["name"], arguments), None

    def _bad_call(self, action: Any, problem: str) -> StepResult:
        shown = quote_action(action if isinstance(action, str) else repr(action))
        info = {"success": False, "action_valid": False, "action_effective": False, "calls": self._calls}
        return StepResult(f"Invalid call '{shown}': {problem}.", 0.0, False, False, info)

    def render(self) -> str:
        return self._task or ""

    def system_prompt(self) -> str:
        tools = "\n".join(json.dumps(spec) for spec in self.tool_specs())
        return (f"{self.instruction}\nTools:\n{tools}\nCall one tool per reply, as JSON inside the answer tags, "
                'e.g. <answer>{"name": "answer", "arguments": {"value": "42"}}</answer>. The tool\'s result comes '
                f"back as the next message. Calling answer ends the episode; you have at most {self.max_calls} "
                "calls.")

    def expert_action(self) -> str:
        return json.dumps(self.expert_call())


class CalculatorMathEnv(ToolEnv):
    """Arithmetic questions answered with a calculator tool: call it, read the result, submit the answer.

    Observation:
        The question, e.g. "What is (317 - 45) * 12 + 980 / 14?", then each tool call's result (the
        calculator's value, or "Error: ..."), "Correct."/"Incorrect." after the answer.
    Actions:
        One tool call per reply as JSON inside <answer>: {"name": "calculator", "arguments": {"expression":
        "12 * (3 + 4)"}} (integers, + - * /, parentheses; exact fractions) or {"name": "answer", "arguments":
        {"value": "84"}}. Malformed JSON, an unknown tool or wrong arguments is an invalid action (reward 0,
        not counted as a call).
    Rewards:
        1.0 for a correct answer (compared like math_qa: numbers exactly, "84.0" = "84"), 0 otherwise.
    Episode end:
        Terminated (success) or truncated (wrong answer) when `answer` is called; truncated after `max_calls`
        (8) calls without one.
    Arguments:
        difficulty: 1-5 (5) as math_qa's arithmetic (5: five terms up to 1000, exact division, negative
        answers: hard by heart, one calculator call with a tool). max_calls (8).
    """

    name = "tool_math"
    instruction = "Answer the arithmetic question by calling tools. The calculator computes exactly."

    def __init__(self, difficulty: int = 5, max_calls: int = 8) -> None:
        super().__init__(max_calls)
        if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be in {MIN_DIFFICULTY}..{MAX_DIFFICULTY}, got {difficulty}")
        self.difficulty = difficulty
        self._answer = self._expression = ""
        self._computed = False

    def new_task(self, rng: random.Random) -> str:
        item = arithmetic_problem(rng, self.difficulty)
        self._answer, self._computed = item.answer, False
        self._expression = item.question.removeprefix("What is ").removesuffix("?")
        return item.question

    @tool
    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression (integers, + - * /, parentheses) exactly."""
        try:
            value = evaluate(parse_expression(expression))
        except (ExpressionError, EvaluationError) as err:
            raise ToolError(str(err)) from None
        self._computed = self._computed or expression.strip() == self._expression
        return str(value)

    def check_answer(self, value: str) -> bool:
        return answers_match(value, self._answer)

    def expert_call(self) -> dict:
        if not self._computed:
            return {"name": "calculator", "arguments": {"expression": self._expression}}
        return {"name": "answer", "arguments": {"value": self._answer}}
