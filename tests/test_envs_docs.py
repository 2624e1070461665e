"""docs/envs.md is generated from the env docstrings: it must match, and every env must be documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from turnrl.envs import ENVS, list_envs
from turnrl.envs.docs import REQUIRED_SECTIONS, env_class, parse_docstring, render_envs_page
from turnrl.envs.registry import render_docs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "envs.md"
REGENERATE = "python -c \"from turnrl.envs.registry import render_docs; print(render_docs(), end='')\" > docs/envs.md"


def test_docs_file_matches_the_docstrings():
    assert DOCS.read_text(encoding="utf-8") == render_docs(), f"docs/envs.md is stale; regenerate it: {REGENERATE}"


@pytest.mark.parametrize("name", list_envs())
def test_every_env_is_documented(name):
    target = env_class(ENVS[name])
    summary, _, sections = parse_docstring(inspect.getdoc(target) or "")
    assert summary, f"{name}: the env class needs a one-line summary"
    missing = [s for s in REQUIRED_SECTIONS if not sections.get(s)]
    assert not missing, f"{name}: docstring lacks section(s) {missing}"
    page = render_docs()
    assert f"| `{name}` |" in page
    assert any(line.startswith("### ") and name in line[4:].split(" / ") for line in page.splitlines())


def test_page_keeps_the_bring_your_own_env_example():
    page = render_docs()
    assert "class GuessParityEnv(Env):" in page and "mypkg.envs:GuessParityEnv" in page
    assert page.index("## Built-in environments") < page.index("## Your own environment")


def test_parse_docstring_and_grouping():
    doc = """Summary line.

    A description.

    Observation:
        Two
        lines.
    Actions:
        Up.
    """
    summary, description, sections = parse_docstring(doc)
    assert (summary, description, sections) == ("Summary line.", "A description.",
                                                 {"Observation": "Two\nlines.", "Actions": "Up."})
    page = render_envs_page({"a": ENVS["sokoban"], "b": ENVS["sokoban_8x8"]})
    assert "### a / b" in page and "| `b` | `SokobanEnv` | `dim=8`, `num_boxes=2` |" in page
