from hypothesis import given
from hypothesis import strategies as st

from turnrl.parsing import format_reply, parse_reply


def test_think_and_answer():
    r = parse_reply("<think>go right</think><answer>Right || Up</answer>", think=True, max_actions=5)
    assert r.ok and r.actions == ("Right", "Up") and r.think == "go right" and r.dropped == 0


def test_max_actions_drops_extra():
    r = parse_reply("<answer>Up || Up || Left</answer>", think=False, max_actions=2)
    assert r.actions == ("Up", "Up") and r.dropped == 1


def test_missing_think_fails_in_think_mode():
    assert not parse_reply("<answer>Up</answer>", think=True).ok
    assert parse_reply("<answer>Up</answer>", think=False).ok


def test_malformed_replies():
    for text in ["", "Up", "<answer>Up", "<answer></answer>", "<answer> || </answer>",
                 "<answer><answer>Up</answer></answer>", "<think><answer>Up</answer>", "\x00\x01"]:
        r = parse_reply(text, think=False)
        assert not r.ok, text
        assert r.actions == ()


def test_strict_rejects_text_after_the_answer_only():
    for text in ["<answer>Up</answer> and then some", "<answer>Up</answer></answer>", "<answer>Up</answer>.",
                 "<think>x</think><answer>Up</answer>Right"]:
        think = text.startswith("<think>")
        assert parse_reply(text, think=think).ok, text  # RAGEN's parser: trailing text ignored
        strict = parse_reply(text, think=think, strict=True)
        assert not strict.ok and strict.actions == (), text
    for text in ["<answer>Up</answer>", "  <answer>Up</answer> \n\t"]:
        assert parse_reply(text, think=False, strict=True).actions == ("Up",), text


def test_format_reply_roundtrip():
    text = format_reply(["Up", "Left"], think=True)
    assert parse_reply(text, think=True, max_actions=2).actions == ("Up", "Left")


@given(st.text())
def test_any_text_never_raises(text):
    for think in (True, False):
        r = parse_reply(text, think=think, max_actions=3)
        assert len(r.actions) <= 3
