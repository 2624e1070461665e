"""Countdown (RAGEN / TinyZero): reach the target with an arithmetic expression over given numbers.

Expressions are read by our own recursive-descent parser and evaluated with exact fractions;
nothing the model writes ever reaches `eval`.
"""

from __future__ import annotations

import contextlib
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Iterator, NamedTuple, Union

from .base import Env, StepResult, quote_action
from .solvers import countdown_solve

MAX_EXPRESSION_CHARS = 200
MAX_NESTING = 32  # parentheses / unary minus depth, far below Python's recursion limit
MAX_LITERAL_DIGITS = 10
MAX_MAGNITUDE = 10**9  # |value| and denominators of every intermediate result
MAX_GENERATION_ATTEMPTS = 10_000

_TOKEN = re.compile(r"\s*(?:([0-9]+)|(.))", re.DOTALL)
_OPERATOR_ALIASES = {"×": "*", "÷": "/"}
_TRAILING_RESULT = re.compile(r"=\s*-?[0-9]+\s*$")

# A parsed expression: an int literal, ("neg", node) or (op, left, right).
Node = Union[int, tuple]


class ExpressionError(ValueError):
    """The text is not an expression of our grammar (the answer is malformed)."""


class EvaluationError(ValueError):
    """A well-formed expression has no value within limits (division by zero, too large)."""


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := '-' unary | primary ; primary := INT | '(' expr ')'"""

    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, int]] = []  # (token, position)
        pos = 0
        while pos < len(text):
            match = _TOKEN.match(text, pos)
            number, symbol = match.groups()
            at = match.start(1) if number else match.start(2)
            if number:
                if len(number) > MAX_LITERAL_DIGITS:
                    raise ExpressionError(f"number at position {at} has more than {MAX_LITERAL_DIGITS} digits")
                self.tokens.append((number, at))
            else:
                symbol = _OPERATOR_ALIASES.get(symbol, symbol)
                if symbol not in "+-*/()":
                    raise ExpressionError(f"unexpected character {quote_action(symbol)!r} at position {at}")
                self.tokens.append((symbol, at))
            pos = match.end()
        self.i = 0
        self.depth = 0

    def parse(self) -> Node:
        if not self.tokens:
            raise ExpressionError("empty expression")
        node = self._expr()
        if self.i < len(self.tokens):
            token, at = self.tokens[self.i]
            raise ExpressionError(f"unexpected {token!r} at position {at}")
        return node

    def _peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def _take(self) -> str:
        token = self.tokens[self.i][0]
        self.i += 1
        return token

    def _expr(self) -> Node:
        node = self._term()
        while self._peek() in ("+", "-"):
            op = self._take()
            node = (op, node, self._term())
        return node

    def _term(self) -> Node:
        node = self._unary()
        while self._peek() in ("*", "/"):
            op = self._take()
            node = (op, node, self._unary())
        return node

    def _unary(self) -> Node:
        if self._peek() == "-":
            self._take()
            with self._nested():
                return ("neg", self._unary())
        return self._primary()

    def _primary(self) -> Node:
        token = self._peek()
        if token is None:
            raise ExpressionError("expression ends too early")
        if token == "(":
            self._take()
            with self._nested():
                node = self._expr()
            if self._peek() != ")":
                raise ExpressionError("missing ')'")
            self._take()
            return node
        if token.isdigit():
            return int(self._take())
        raise ExpressionError(f"unexpected {token!r} at position {self.tokens[self.i][1]}")

    @contextlib.contextmanager
    def _nested(self) -> Iterator[None]:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ExpressionError(f"nested more than {MAX_NESTING} levels deep")
        try:
            yield
        finally:
            self.depth -= 1


def parse_expression(text: str, max_chars: int = MAX_EXPRESSION_CHARS) -> Node:
    """Parse an arithmetic expression (ints, + - * /, parentheses, unary minus) into a tree.

    `×` and `÷` are read as `*` and `/`; one trailing `= <integer>` (a stated result) is
    ignored. Raises `ExpressionError` for anything else, for text longer than `max_chars`,
    for literals over 10 digits and for nesting deeper than 32 levels.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise ExpressionError(f"longer than {max_chars} characters")
    body = _TRAILING_RESULT.sub("", text, count=1)
    if "=" in body:
        raise ExpressionError("only one trailing '= <number>' is allowed")
    return _Parser(body.strip()).parse()


def evaluate(node: Node) -> Fraction:
    """Exact value of a parsed expression; raises `EvaluationError` on /0 or values beyond 1e9."""
    if isinstance(node, int):
        value = Fraction(node)
    elif node[0] == "neg":
        value = -evaluate(node[1])
    else:
        op, left, right = node
        a, b = evaluate(left), evaluate(right)
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        elif op == "*":
            value = a * b
        elif b == 0:
            raise EvaluationError("division by zero")
        else:
            value = a / b
    if abs(value) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise EvaluationError(f"an intermediate value exceeds {MAX_MAGNITUDE:.0e} in magnitude")
    return value


def literals(node: Node) -> list[int]:
    """The integer literals of a parsed expression, left to right."""
    if isinstance(node, int):
        return [node]
    return [n for child in node[1:] for n in literals(child)]


class Puzzle(NamedTuple):
    target: int
    numbers: tuple[int, ...]


def generate_puzzle(rng: random.Random, min_numbers: int, max_numbers: int, max_number: int,
                    max_target: int, ops: str) -> Puzzle:
    """Draw numbers, combine them in a random expression, and use its value as the target.

    Subtraction keeps results non-negative and division must be exact, as in the
    Countdown game; the target must be an integer in [1, max_target]. The building
    expression is itself a solution, so every puzzle is solvable.
    """
    for _ in range(MAX_GENERATION_ATTEMPTS):
        numbers = [rng.randint(1, max_number) for _ in range(rng.randint(min_numbers, max_numbers))]
        values = list(numbers)
        while len(values) > 1:
            a = values.pop(rng.randrange(len(values)))
            b = values.pop(rng.randrange(len(values)))
            op = rng.choice(ops)
            if op == "+":
                values.append(a + b)
            elif op == "*":
                values.append(a * b)
            elif op == "-":
                values.append(abs(a - b))
            elif b != 0 and a % b == 0:
                values.append(a // b)
            elif a != 0 and b % a == 0:
                values.append(b // a)
            else:
                values.append(a + b)  # no exact division: fall back to a sum
        if 1 <= values[0] <= max_target:
            return Puzzle(values[0], tuple(numbers))
    raise RuntimeError("could not generate a Countdown puzzle; raise max_target or max_number")


class CountdownEnv(Env):
    """Countdown: write an arithmetic expression over the given numbers that equals the target.

    RAGEN's `countdown` task (TinyZero's Countdown-Tasks-3to4), generated procedurally: no
    download, and every puzzle is solvable because the target is built from a random
    expression over the numbers. The answer is free text (`free_text = True`): the rollout
    passes the whole `<answer>` content as one action.

    Observation:
        "Target: 24, nums: [3, 4, 6, 1]". After the answer, the render adds
        "Your answer: <expression> = <value> (correct | wrong value | wrong numbers | undefined)".
    Actions:
        One arithmetic expression: non-negative integer literals, `+ - * /` (also `×`, `÷`),
        parentheses and unary minus; an optional trailing "= <integer>" is ignored. At most
        `max_chars` (200) characters, literals of at most 10 digits, nesting at most 32
        deep. Parsed by our own recursive-descent parser (no `eval`) with exact fractions.
        Anything else is invalid: `action_valid` False, reward 0, the episode continues.
    Rewards:
        1.0 if the expression uses each given number exactly once and equals the target;
        `format_score` (0.1) if it uses each number exactly once but its value is wrong or
        undefined (division by zero, an intermediate beyond 1e9); 0.0 if the numbers used
        differ from the given ones. `info["success"]` is True only for reward 1.0.
    Episode end:
        Terminated after the first well-formed expression (single step, as in RAGEN).
    Arguments:
        min_numbers, max_numbers: how many numbers (3, 4). max_number: numbers are drawn
        from 1..max_number (99). max_target: targets lie in 1..max_target (100).
        ops: operators the generator may use ("+-*/"; "+-" gives RAGEN's easier
        plus/minus-only subset). format_score: reward for well-formed wrong answers (0.1).
        max_chars: longest accepted expression (200).
        `reset(options={"target": 24, "numbers": [3, 4, 6, 1]})` plays a given puzzle.
    """

    name = "countdown"
    free_text = True

    def __init__(self, min_numbers: int = 3, max_numbers: int = 4, max_number: int = 99, max_target: int = 100,
                 ops: str = "+-*/", format_score: float = 0.1, max_chars: int = MAX_EXPRESSION_CHARS) -> None:
        if not 2 <= min_numbers <= max_numbers <= 6:
            raise ValueError(f"need 2 <= min_numbers <= max_numbers <= 6, got {min_numbers}, {max_numbers}")
        if max_number < 1 or max_target < 1:
            raise ValueError(f"max_number and max_target must be >= 1, got {max_number}, {max_target}")
        if not ops or set(ops) - set("+-*/"):
            raise ValueError(f"ops must be a non-empty subset of '+-*/', got {ops!r}")
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.min_numbers, self.max_numbers = min_numbers, max_numbers
        self.max_number, self.max_target = max_number, max_target
        self.ops, self.format_score, self.max_chars = ops, float(format_score), max_chars
        self._puzzle: Puzzle | None = None
        self._answer: str | None = None  # verdict line once answered
        self._success = False

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        options = dict(options or {})
        target, numbers = options.pop("target", None), options.pop("numbers", None)
        if options:
            raise ValueError(f"unknown reset option(s) {sorted(options)}; supported: target, numbers")
        rng = random.Random(self._next_episode_seed(seed))
        if (target is None) != (numbers is None):
            raise ValueError("reset options 'target' and 'numbers' go together")
        if target is not None:
            self._puzzle = Puzzle(int(target), tuple(int(n) for n in numbers))
        else:
            self._puzzle = generate_puzzle(rng, self.min_numbers, self.max_numbers, self.max_number,
                                           self.max_target, self.ops)
        self._answer, self._success = None, False
        return self.render(), {"target": self._puzzle.target, "numbers": list(self._puzzle.numbers)}

    def step(self, action: str) -> StepResult:
        puzzle = self._require_reset()
        if self._answer is not None:
            return self._after_done_step(True, False, self._success)
        try:
            tree = parse_expression(action, self.max_chars)
        except ExpressionError as err:
            message = (f"Invalid expression '{quote_action(action) if isinstance(action, str) else repr(action)}': "
                       f"{err}. Answer with an arithmetic expression such as (3 + 4) * 2 - 1.")
            info = {"success": False, "action_valid": False, "action_effective": False}
            return StepResult(message + "\n" + self.render(), 0.0, False, False, info)

        used_ok = Counter(literals(tree)) == Counter(puzzle.numbers)
        try:
            value: Fraction | None = evaluate(tree)
        except EvaluationError:
            value = None
        success = used_ok and value == puzzle.target
        if success:
            reward, verdict = 1.0, "correct"
        elif used_ok:
            reward, verdict = self.format_score, "wrong value" if value is not None else "undefined"
        else:
            reward, verdict = 0.0, "wrong numbers"
        shown = "undefined" if value is None else str(value)
        self._answer = f"Your answer: {quote_action(action.strip(), 60)} = {shown} ({verdict})"
        self._success = success
        info = {"success": success, "action_valid": True, "action_effective": True, "verdict": verdict}
        return StepResult(self.render(), reward, True, False, info)

    def render(self) -> str:
        puzzle = self._require_reset()
        text = f"Target: {puzzle.target}, nums: {list(puzzle.numbers)}"
        return text if self._answer is None else f"{text}\n{self._answer}"

    def system_prompt(self) -> str:
        return (
            "You are solving the Countdown puzzle. Combine the given numbers with +, -, *, / and "
            "parentheses so that the expression equals the target. Use every number exactly once.\n"
            f"Reward: 1 for a correct expression, {self.format_score:g} if you use the numbers correctly "
            "but the value is wrong, 0 otherwise. You have one answer.\n"
            "Answer with the expression only inside <answer>...</answer>; for example, for "
            "Target: 24, nums: [2, 3, 4] answer <answer>2 * 3 * 4</answer>."
        )

    def expert_action(self) -> str:
        puzzle = self._require_reset()
        solution = countdown_solve(tuple(puzzle.numbers), puzzle.target, "+-*/")
        # Unreachable for generated puzzles; a plain sum still earns the format score.
        return solution if solution is not None else " + ".join(map(str, puzzle.numbers))

    def _require_reset(self) -> Puzzle:
        if self._puzzle is None:
            raise RuntimeError("call reset() before using the environment")
        return self._puzzle
