"""Tool-calling envs (turnrl.envs.tools): JSON function calls checked against the tools' signatures."""
import json
import random

import pytest

from turnrl.envs import ToolEnv, ToolError, check_env, make, tool

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima"}


class Capitals(ToolEnv):
    """A user's tool env: look the capital up, then answer."""

    instruction = "Name the capital of the country."

    def new_task(self, rng: random.Random) -> str:
        self.country = rng.choice(sorted(CAPITALS))
        self.looked_up = False
        return f"What is the capital of {self.country}?"

    @tool
    def lookup(self, country: str, verbose: bool = False) -> str:
        """Look a country's capital up."""
        if country not in CAPITALS:
            raise ToolError(f"no country named {country!r}")
        self.looked_up = self.looked_up or country == self.country
        return f"The capital of {country} is {CAPITALS[country]}." if verbose else CAPITALS[country]

    @tool
    def broken(self) -> str:
        """A tool with a bug."""
        raise RuntimeError("bug in the env")

    def check_answer(self, value: str) -> bool:
        return value.strip().lower() == CAPITALS[self.country].lower()

    def expert_call(self) -> dict:
        if not self.looked_up:
            return {"name": "lookup", "arguments": {"country": self.country}}
        return {"name": "answer", "arguments": {"value": CAPITALS[self.country]}}


def call(name, **arguments) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def test_tools_come_from_marked_methods_with_their_signatures():
    env = Capitals(max_calls=3)
    assert list(env.tools()) == ["broken", "lookup", "answer"]
    lookup = next(s for s in env.tool_specs() if s["name"] == "lookup")
    assert lookup == {"name": "lookup", "description": "Look a country's capital up.",
                      "parameters": {"type": "object", "properties": {"country": {"type": "string"},
                                                                      "verbose": {"type": "boolean"}},
                                     "required": ["country"]}}
    prompt = env.system_prompt()
    assert prompt.startswith("Name the capital of the country.") and json.dumps(lookup) in prompt


def test_calls_results_errors_and_the_answer():
    env = Capitals(max_calls=3)
    obs, _ = env.reset(seed=0)
    assert obs == f"What is the capital of {env.country}?"
    for bad, problem in [("lookup France", "not a JSON object"), ('["lookup"]', 'expected {"name"'),
                         (call("search", q="x"), "unknown tool 'search'"),
                         (call("lookup"), "wrong arguments for lookup"),
                         (call("lookup", country="France", extra=1), "wrong arguments for lookup"),
                         (json.dumps({"name": "lookup", "arguments": [1]}), '"arguments" must be an object'),
                         ("x" * 5000, "at most 2000 characters")]:
        obs, reward, term, trunc, info = env.step(bad)
        assert problem in obs and (reward, term, trunc, info["action_valid"]) == (0.0, False, False, False)
    assert info["calls"] == 0  # invalid calls are not counted
    obs, _, _, _, info = env.step(call("lookup", country="Atlantis"))
    assert obs == "Error: no country named 'Atlantis'" and info["action_valid"] and not info["action_effective"]
    obs, *_ = env.step(call("lookup", country="Peru", verbose=True))
    assert obs == "The capital of Peru is Lima."
    obs, reward, term, trunc, info = env.step(call("answer", value=CAPITALS[env.country]))
    assert (obs, reward, term, trunc, info["success"], info["calls"]) == ("Correct.", 1.0, True, False, True, 3)


def test_the_call_budget_and_a_wrong_answer_end_the_episode():
    env = Capitals(max_calls=2)
    env.reset(seed=1)
    env.step(call("lookup", country="Kenya"))
    obs, reward, term, trunc, _ = env.step(call("lookup", country="Kenya"))
    assert obs.endswith("No calls left (2 used).") and (reward, term, trunc) == (0.0, False, True)
    env.reset(seed=1)
    obs, reward, term, trunc, info = env.step(call("answer", value="Atlantis City"))
    assert (obs, reward, term, trunc, info["success"]) == ("Incorrect.", 0.0, False, True, False)


def test_a_bug_in_a_tool_is_not_hidden_from_the_rollout():
    env = Capitals()
    env.reset(seed=0)
    with pytest.raises(RuntimeError, match="bug in the env"):
        env.step(call("broken"))


def test_check_env_and_the_solver():
    class Solvable(Capitals):  # without the broken tool, for the fuzzing of check_env
        broken = None

    check_env(Solvable())
    check_env(make("tool_math", difficulty=2))
    env = make("tool_math")
    for seed in range(50):
        env.reset(seed=seed)
        first = json.loads(env.expert_action())
        assert first["name"] == "calculator"  # the solver uses the tool, then answers with its result
        result, *_ = env.step(json.dumps(first))
        second = json.loads(env.expert_action())
        assert second == {"name": "answer", "arguments": {"value": result}}
        _, reward, term, _, info = env.step(json.dumps(second))
        assert term and info["success"] and reward == 1.0


def test_the_calculator_is_exact_and_refuses_what_it_cannot_compute():
    env = make("tool_math")
    env.reset(seed=0)
    assert env.calculator("7 / 2 + 1") == "9/2"
    for bad in ("2 ** 10", "__import__('os')", "1 / 0", "9" * 40):
        with pytest.raises(ToolError):
            env.calculator(bad)
    with pytest.raises(ValueError, match="difficulty"):
        make("tool_math", difficulty=9)


def test_a_training_run_on_tool_calls(tmp_path):
    from test_train import tiny_config
    from turnrl.train import train

    cfg = tiny_config(tmp_path / "run", iterations=1)
    cfg.env.name, cfg.env.kwargs = "tool_math", {"difficulty": 1}
    cfg.rollout.max_new_tokens = 40
    train(cfg, log=lambda *_: None)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    transcript = samples[0]["episodes"][0]["transcript"]
    assert transcript[0][1].startswith("What is ")


def test_the_example_in_docs_envs_md_works():
    from pathlib import Path

    from turnrl.envs import ENVS

    text = (Path(__file__).resolve().parents[1] / "docs" / "envs.md").read_text()
    section = text[text.index("## Tool-calling environments"):]
    code = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python"))]
    try:
        exec(compile(code, "docs/envs.md", "exec"), {})
        env = make("capitals")
        check_env(env)
        env.reset(seed=0)
        assert env.step(call("lookup", country="Mars"))[0] == "Error: no country named 'Mars'"
        _, reward, term, _, _ = env.step(env.expert_action())
        assert reward == 1.0 and term
    finally:
        ENVS.pop("capitals", None)
