"""`turnrl demos`: the solver's episodes as chat JSONL; every record replays on the env to the same observations,
rewards and outcome."""

import json

import pytest

from turnrl.cli import main
from turnrl.config import EVAL_SEED_LIMIT, SFT_SEED_BASE
from turnrl.demos import demo_records
from turnrl.envs import make
from turnrl.parsing import parse_reply


def replay(env_name, record, *, think=False):
    """Plays the record's assistant replies on a fresh env from its seed: (the user messages it sees, the return,
    the final success)."""
    env = make(env_name)
    obs, _ = env.reset(seed=record["seed"])
    users, total, success = [obs], 0.0, False
    for message in record["messages"]:
        if message["role"] != "assistant":
            continue
        parsed = parse_reply(message["content"], think=think, max_actions=10, split=not env.free_text, strict=True)
        assert parsed.ok, message["content"]
        done = False
        for action in parsed.actions:
            obs, reward, terminated, truncated, info = env.step(action)
            total, success, done = total + reward, bool(info["success"]), terminated or truncated
            if done:
                break
        if not done:
            users.append(obs)
    return users, total, success


@pytest.mark.parametrize("env_name, actions_per_turn, think", [("sokoban", 1, False), ("frozen_lake_det", 2, True),
                                                                ("countdown", 1, False)])
def test_demonstrations_replay_to_their_recorded_outcome(env_name, actions_per_turn, think):
    records = list(demo_records(env_name, 12, max_turns=10, max_actions_per_turn=actions_per_turn, think=think))
    assert [r["seed"] for r in records] == list(range(SFT_SEED_BASE, SFT_SEED_BASE + 12))
    assert min(r["seed"] for r in records) >= EVAL_SEED_LIMIT  # never a held-out start state
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert roles[1:] == ["user", "assistant"] * r["turns"]
        assert r["messages"][0]["content"] == make(env_name).system_prompt()
        users, total, success = replay(env_name, r, think=think)
        assert users == [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert total == pytest.approx(r["return"]) and success == r["success"]
    assert all(r["success"] for r in records)  # the expert solves these envs
    if actions_per_turn == 2:
        assert any(" || " in m["content"] for r in records for m in r["messages"] if m["role"] == "assistant")


def test_noisy_demonstrations_are_reproducible_and_sometimes_fail():
    noisy = list(demo_records("frozen_lake_det", 40, epsilon=0.5, system_prompt=False))
    assert noisy == list(demo_records("frozen_lake_det", 40, epsilon=0.5, system_prompt=False))
    assert all(r["messages"][0]["role"] == "user" for r in noisy)
    assert 0 < sum(r["success"] for r in noisy) < 40
    for r in noisy:
        _, total, success = replay("frozen_lake_det", r)
        assert total == pytest.approx(r["return"]) and success == r["success"]


def test_the_demos_command_writes_jsonl_a_chat_template_accepts(tmp_path, capsys, tiny_tokenizer):
    out = tmp_path / "demos.jsonl"
    assert main(["demos", "sokoban", "--out", str(out), "--episodes", "5", "--first-seed", "7"]) == 0
    assert "wrote 5 episodes of 'sokoban'" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seed"] for r in records] == [7, 8, 9, 10, 11]
    text = tiny_tokenizer.apply_chat_template(records[0]["messages"], tokenize=False)
    assert records[0]["messages"][-1]["content"] in text
    assert not out.with_name("demos.jsonl.tmp").exists()
    for args, message in ((["--episodes", "0"], "must be >= 1"), (["--kwargs", "{"], "not valid JSON"),
                          (["--out", str(tmp_path / "no" / "x.jsonl")], "its directory does not exist"),
                          (["--kwargs", '{"dim": -1}'], "dim must be >= 4"), (["--kwargs", '{"nope": 1}'], "nope")):
        assert main(["demos", "sokoban", "--out", str(tmp_path / "x.jsonl"), *args]) == 2
        assert message in capsys.readouterr().err
