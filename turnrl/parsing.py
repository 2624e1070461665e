"""Parse model replies of the form ``<think>…</think><answer>A || B</answer>``.

Never raises: any text (empty, endless, nested or unclosed tags, control characters) yields a
`ParsedReply` whose `ok` flag says whether the format was followed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ACTION_SEP = "||"
_THINK_ANSWER = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>", re.DOTALL)
_ANSWER = re.compile(r"^\s*<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class ParsedReply:
    ok: bool                  # the reply followed the format and held at least one action
    actions: tuple[str, ...]  # at most max_actions, stripped, empty ones dropped
    think: str
    dropped: int              # actions beyond max_actions that were ignored


def parse_reply(text: str, *, think: bool = True, max_actions: int = 1, split: bool = True,
                strict: bool = False) -> ParsedReply:
    """Extracts the actions of a reply.

    With `think=True` the reply must open with `<think>…</think>` followed by `<answer>…</answer>`
    (RAGEN's format); with `think=False` it must open with `<answer>…</answer>`. The first match wins;
    text after the answer is ignored, or with `strict` makes the reply invalid (only whitespace may
    follow `</answer>`: RAGEN's prompt asks for "no extra text" but its parser ignores it). The answer
    is split on "||" and the first `max_actions` non-empty actions are kept. With `split=False` (free-text envs: expressions, math answers) the whole answer
    is one action.
    """
    match = (_THINK_ANSWER if think else _ANSWER).match(text)
    if match is None:
        return ParsedReply(False, (), "", 0)
    reasoning = match.group(1) if think else ""
    answer = match.group(2) if think else match.group(1)
    if strict and text[match.end():].strip():
        return ParsedReply(False, (), reasoning, 0)
    if "<answer>" in answer or "<think>" in answer:  # nested tags: not a well-formed answer
        return ParsedReply(False, (), reasoning, 0)
    if not split:
        whole = answer.strip()
        return ParsedReply(bool(whole), (whole,) if whole else (), reasoning.strip(), 0)
    actions = [a.strip() for a in answer.split(ACTION_SEP)]
    actions = [a for a in actions if a]
    kept = tuple(actions[:max_actions])
    return ParsedReply(bool(kept), kept, reasoning.strip(), len(actions) - len(kept))


def format_reply(actions: list[str] | tuple[str, ...], *, think: bool = True, reasoning: str = "") -> str:
    """The canonical reply text for a list of actions (used to write demonstrations)."""
    answer = " || ".join(actions)
    body = f"<answer>{answer}</answer>"
    return f"<think>{reasoning}</think>{body}" if think else body
