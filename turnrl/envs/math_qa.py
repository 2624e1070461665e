"""Procedural math questions (arithmetic and word problems) for the UFO multi-turn QA env.

Offline and unlimited: every seed gives a question with an exact integer (or, at the top level,
fraction) answer, so training and held-out evaluation never need a download.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Callable

from .qa import DEFAULT_FEEDBACK, DEFAULT_INSTRUCTION, MAX_ANSWER_CHARS, MultiTurnQAEnv, QAItem

MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5
KINDS = ("mixed", "arithmetic", "word")

_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena")
_ITEMS = ("apple", "book", "marble", "pencil", "sticker", "cookie", "shell", "card", "stamp", "coin")


# ---------------------------------------------------------------------- arithmetic


def _operand_limit(difficulty: int) -> int:
    return (20, 20, 50, 100, 1000)[difficulty - 1]


def _expression(rng: random.Random, leaves: int, ops: str, limit: int, top: bool = True) -> tuple[str, int]:
    """A random expression tree over integers in 1..limit with an integer value.

    Division is made exact by choosing the dividend as a multiple of the divisor; products use
    small factors so values stay readable. Sub-expressions are parenthesised.
    """
    if leaves == 1:
        value = rng.randint(1, limit)
        return str(value), value
    left_leaves = rng.randint(1, leaves - 1)
    op = rng.choice(ops)
    if op == "/":
        divisor_text, divisor = _expression(rng, leaves - left_leaves, "+-" if leaves > 2 else "+", 12, False)
        if divisor == 0:
            divisor_text, divisor = "1", 1
        quotient = rng.randint(1, max(2, limit // max(1, abs(divisor))))
        dividend = quotient * divisor
        text = f"{dividend} / {_paren(divisor_text)}"
        return (text if top else f"({text})"), dividend // divisor
    small = 12 if op == "*" else limit
    left_text, left = _expression(rng, left_leaves, ops, small, False)
    right_text, right = _expression(rng, leaves - left_leaves, ops, small, False)
    value = {"+": left + right, "-": left - right, "*": left * right}[op]
    text = f"{left_text} {op} {right_text}"
    return (text if top else f"({text})"), value


def _paren(text: str) -> str:
    return text if text.lstrip("-").isdigit() or text.startswith("(") else f"({text})"


def arithmetic_problem(rng: random.Random, difficulty: int) -> QAItem:
    """Level 1: a ± b; 2: three terms with *; 3: four terms, parentheses; 4: with exact division;
    5: five terms up to 1000, answers may be negative."""
    leaves, ops = {1: (2, "+-"), 2: (3, "+-*"), 3: (4, "+-*"), 4: (4, "+-*/"), 5: (5, "+-*/")}[difficulty]
    limit = _operand_limit(difficulty)
    while True:
        text, value = _expression(rng, leaves, ops, limit)
        if difficulty >= 5 or value >= 0:
            return QAItem(f"What is {text}?", str(value))


# ---------------------------------------------------------------------- word problems

_Template = Callable[[random.Random, str, str], QAItem]


def _w_more(rng, name, item):
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return QAItem(f"{name} has {a} {item}s and finds {b} more. How many {item}s does {name} have now?", str(a + b))


def _w_give(rng, name, item):
    a = rng.randint(5, 30)
    b = rng.randint(1, a - 1)
    return QAItem(f"{name} has {a} {item}s and gives {b} of them to a friend. How many {item}s are left?", str(a - b))


def _w_cost(rng, name, item):
    n, p = rng.randint(2, 12), rng.randint(2, 15)
    return QAItem(f"{name} buys {n} {item}s at {p} dollars each. How many dollars does {name} spend?", str(n * p))


def _w_share(rng, name, item):
    k, each = rng.randint(2, 9), rng.randint(2, 12)
    return QAItem(f"{name} shares {k * each} {item}s equally among {k} friends. How many {item}s does each "
                  "friend get?", str(each))


def _w_change(rng, name, item):
    n, p = rng.randint(2, 9), rng.randint(2, 11)
    bill = next(b for b in (20, 50, 100, 200) if b >= n * p)
    return QAItem(f"{name} buys {n} {item}s at {p} dollars each and pays with a {bill}-dollar bill. How many "
                  f"dollars of change does {name} get?", str(bill - n * p))


def _w_boxes(rng, name, item):
    boxes, per = rng.randint(3, 12), rng.randint(4, 25)
    sold = rng.randint(1, boxes * per - 1)
    return QAItem(f"A shop has {boxes} boxes with {per} {item}s in each box. It sells {sold} {item}s. How many "
                  f"{item}s does the shop have left?", str(boxes * per - sold))


def _w_reading(rng, name, item):
    p, d, q, e = rng.randint(5, 30), rng.randint(2, 7), rng.randint(5, 30), rng.randint(2, 7)
    total = p * d + q * e + rng.randint(10, 200)
    return QAItem(f"A book has {total} pages. {name} reads {p} pages a day for {d} days, then {q} pages a day for "
                  f"{e} days. How many pages are left to read?", str(total - p * d - q * e))


def _w_savings(rng, name, item):
    start, weekly, weeks = rng.randint(10, 100), rng.randint(5, 40), rng.randint(3, 12)
    spent = rng.randint(1, start + weekly * weeks - 1)
    return QAItem(f"{name} has {start} dollars and saves {weekly} dollars every week for {weeks} weeks, then spends "
                  f"{spent} dollars on a {item}. How many dollars does {name} have now?",
                  str(start + weekly * weeks - spent))


def _w_discount(rng, name, item):
    pct = rng.choice((10, 20, 25, 50, 75))
    price = rng.randint(2, 40) * (100 // _gcd(100, pct))
    return QAItem(f"A {item} costs {price} dollars. The price is reduced by {pct}%. What is the new price in "
                  "dollars?", str(price * (100 - pct) // 100))


def _w_fraction(rng, name, item):
    b, d = rng.randint(2, 8), rng.randint(2, 8)
    a, c = rng.randint(1, b - 1), rng.randint(1, d - 1)
    total = Fraction(a, b) + Fraction(c, d)
    return QAItem(f"{name} eats {a}/{b} of a pie and then {c}/{d} of another pie of the same size. How many pies "
                  f"did {name} eat in total? Give the answer as a fraction or a decimal.", str(total))


def _w_speed(rng, name, item):
    speed, hours, back = rng.randint(20, 90), rng.randint(2, 6), rng.randint(2, 6)
    other = rng.randint(20, 90)
    return QAItem(f"{name} drives {hours} hours at {speed} km per hour, then {back} hours at {other} km per hour. "
                  f"How many kilometres does {name} drive in total?",
                  str(speed * hours + other * back))


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# Each level has at least two templates; a question at level d uses the templates of level d.
WORD_TEMPLATES: dict[int, tuple[_Template, ...]] = {
    1: (_w_more, _w_give),
    2: (_w_cost, _w_share),
    3: (_w_change, _w_boxes),
    4: (_w_reading, _w_savings, _w_speed),
    5: (_w_discount, _w_fraction),
}


def word_problem(rng: random.Random, difficulty: int) -> QAItem:
    template = rng.choice(WORD_TEMPLATES[difficulty])
    return template(rng, rng.choice(_NAMES), rng.choice(_ITEMS))


def generate_problem(rng: random.Random, difficulty: int = 1, kind: str = "mixed") -> QAItem:
    """One question of the given difficulty (1-5) and kind ("mixed", "arithmetic", "word")."""
    if not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be in {MIN_DIFFICULTY}..{MAX_DIFFICULTY}, got {difficulty}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "mixed":
        kind = rng.choice(("arithmetic", "word"))
    return arithmetic_problem(rng, difficulty) if kind == "arithmetic" else word_problem(rng, difficulty)


class MathQAEnv(MultiTurnQAEnv):
    """Multi-turn math with unary feedback (UFO): answer, hear "Incorrect. Please think again.", retry.

    Questions are generated procedurally (offline, any number of seeds): arithmetic
    expressions and templated word problems with a difficulty knob. Same answer checking,
    rewards and episode rules as `math_qa_jsonl` (StaticQAEnv), which reads your own data.

    Observation:
        The question, e.g. "What is 7 + 12?" or "Ana buys 3 books at 4 dollars each. How many
        dollars does Ana spend?". After a wrong answer the observation is ONLY the feedback line
        (default "Incorrect. Please think again.").
    Actions:
        The final answer as free text (at most `max_answer_chars`, 200). Matching ignores
        case and whitespace, a `\\boxed{}`, `$` and a trailing period, thousands commas in
        numbers, and compares numbers exactly: "3.0" = "3", "1/2" = "0.5". An empty or
        overlong answer is invalid: reward 0, it does not count as an attempt.
    Rewards:
        A correct answer at attempt t (0-based) pays `gamma`^t (0.5^t). Wrong answers pay 0.
        On the final step (correct answer or last attempt) the repetition penalty
        `repetition_penalty` * (1 - E / T) is subtracted, where T is the number of valid answers
        and E the number of distinct normalised answers among them (UFO, λ = 0.5).
    Episode end:
        Terminated (success) at the first correct answer; truncated after `max_attempts` (5)
        wrong answers.
    Arguments:
        difficulty: 1-5 (1). Arithmetic: 1 a ± b (operands up to 20); 2 three terms with *;
        3 four terms with parentheses (up to 50); 4 adds exact division (up to 100); 5 five
        terms up to 1000, negative answers. Word problems: 1 add/take away; 2 price x
        quantity, fair sharing; 3 change from a bill, boxes sold; 4 two-phase reading,
        saving, travel; 5 percent discounts, fraction sums (fraction answers).
        kind: "mixed" (default: arithmetic or word with equal odds), "arithmetic", "word".
        max_attempts (5), gamma (0.5), repetition_penalty (0.5), feedback, max_answer_chars (200),
        instruction (the first line of the system prompt).
    """

    name = "math_qa"

    def __init__(self, difficulty: int = 1, kind: str = "mixed", max_attempts: int = 5, gamma: float = 0.5,
                 repetition_penalty: float = 0.5, feedback: str = DEFAULT_FEEDBACK,
                 max_answer_chars: int = MAX_ANSWER_CHARS, instruction: str = DEFAULT_INSTRUCTION) -> None:
        super().__init__(max_attempts, gamma, repetition_penalty, feedback, max_answer_chars, instruction)
        generate_problem(random.Random(0), difficulty, kind)  # validate the arguments now
        self.difficulty, self.kind = difficulty, kind

    def sample_item(self, rng: random.Random) -> QAItem:
        return generate_problem(rng, self.difficulty, self.kind)
