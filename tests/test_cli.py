import json
import os
import subprocess
import sys

import pytest

from turnrl.cli import main

SMALL = ["--model.tiny-hidden", "32", "--model.tiny-layers", "1", "--model.tiny-heads", "2", "--model.tiny-ff", "64",
         "--rollout.n-groups", "2", "--rollout.group-size", "2", "--rollout.max-turns", "2",
         "--rollout.max-new-tokens", "6", "--sft.episodes", "8", "--sft.steps", "2", "--sft.batch-size", "4",
         "--eval.episodes", "4", "--eval.k", "2", "--iterations", "1", "--no-progress"]


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "quikstart"], "did you mean 'quickstart'"),
    (["train", "--env.name", "sokobn"], "did you mean 'sokoban'"),
    (["train", "--algo.filter-keep", "1.5"], "filter_keep"),
    (["train", "--model.name", "/no/such/model"], "not found"),
    (["eval", "/no/such/dir", "--env", "sokoban"], "not found"),
    (["eval", "/no/such/dir"], "--env is required"),
    (["train", "--resume", "/no/such/run"], "cannot resume"),
    (["play", "nope"], "unknown environment"),
    (["play", "sokoban", "--kwargs", '{"dim": -1}'], "dim must be >= 4"),
    (["env-server", "sokoban", "--kwargs", '{"nope": 1}'], "does not accept argument(s) 'nope'"),
    (["frobnicate"], "unknown command"),
    (["train", "--rollout.context", "full", "--rollout.context-window", "1"], "context_window=1"),
])
def test_bad_input_exits_2_with_one_line(args, message, capsys, tmp_path):
    code, _out, err = run(args + (["--out", str(tmp_path / "r")] if args[0] == "train" and "--resume" not in args else []), capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_invalid_field_value_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "turnrl.cli", "train", "--rollout.n-groups", "many"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "100"})
    assert proc.returncode == 2
    assert "n-groups" in proc.stderr or "n_groups" in proc.stderr


def test_context_override_drops_the_presets_window(tmp_path, capsys):
    """The grid presets show the newest observation alone (window 0): `--rollout.context full` alone switches to the
    whole history instead of being refused for a window size it no longer uses."""
    code, _out, err = run(["train", "--rollout.context", "full", "--out", str(tmp_path / "r")] + SMALL, capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())["rollout"]
    assert (config["context"], config["context_window"]) == ("full", 2)


def test_unwritable_output_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _out, err = run(["train", "--out", str(blocker / "sub")] + SMALL, capsys)
    assert code == 2 and "not writable" in err


def test_envs_lists_builtins(capsys):
    code, out, _ = run(["envs"], capsys)
    assert code == 0
    for name in ("bandit", "bandit_test", "frozen_lake", "sokoban"):
        assert name in out


def test_train_then_eval_reproduces(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, _ = run(["train", "--preset", "quickstart", "--out", str(out_dir)] + SMALL, capsys)
    assert code == 0
    assert "after_rl" in out and "untrained" in out and "after_sft" in out
    saved = json.loads((out_dir / "eval.json").read_text())["after_rl"]
    code, out, _ = run(["eval", str(out_dir)], capsys)
    assert code == 0
    result = json.loads(out)
    # same weights, same held-out seeds, same sampling seed: the same number
    assert result["success_rate"] == pytest.approx(saved["success_rate"])
    assert result["mean_return"] == pytest.approx(saved["mean_return"])
    code, out, _ = run(["eval", str(out_dir), "--env-threads", "4"], capsys)
    assert code == 0 and json.loads(out) == result  # env calls in threads: the same episodes
    code, _, err = run(["eval", str(out_dir), "--env-threads", "-1"], capsys)
    assert code == 2 and "env_threads must be >= 0" in err


def test_play_reads_actions_from_stdin():
    proc = subprocess.run([sys.executable, "-m", "turnrl.cli", "play", "bandit", "--seed", "1"],
                          input="Dragon || Phoenix\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "points" in proc.stdout or "Invalid" in proc.stdout


def test_hub_id_offline_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = run(["eval", "nobody-xyz/not-a-model", "--env", "bandit", "--episodes", "1"], capsys)
    assert code == 2 and "could not load model 'nobody-xyz/not-a-model'" in err


def test_an_interrupt_leaves_a_python_callers_signal_handlers_alone(monkeypatch, capsys):
    """Called with argv (from Python), main returns 130 on Ctrl-C and keeps the caller's handlers: only the
    console script, which owns its process, ignores further signals while it exits."""
    import signal

    from turnrl import cli

    def interrupted(_rest):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert cli.main(["train"]) == 130
    assert {s: signal.getsignal(s) for s in before} == before
    assert "interrupted" in capsys.readouterr().err


def test_env_kwargs_replace_a_presets_kwargs_and_dotted_ones_edit_them(monkeypatch):
    import turnrl.train

    seen = []
    monkeypatch.setattr(turnrl.train, "train", lambda cfg, resume: seen.append(cfg) or {})
    # math-tiny's env.kwargs has keys; a whole new dict (another env's arguments) replaces them
    assert main(["train", "--preset", "math-tiny", "--env.name", "reasoning_gym", "--env.kwargs", "task",
                 "leg_counting", "max_animals", "3"]) == 0
    assert seen[-1].env.kwargs == {"task": "leg_counting", "max_animals": 3}
    assert main(["train", "--preset", "math-tiny", "--env.kwargs.difficulty", "2"]) == 0  # one key edited
    assert seen[-1].env.kwargs == {"difficulty": 2, "kind": "arithmetic", "repetition_penalty": 0.5}


def test_the_summary_prints_success_with_its_standard_error_and_the_gains(capsys, tmp_path):
    from turnrl.cli import _print_evals

    point = {"mean_return": 0.5, "pass_at_k": 0.9, "temperature": 1.0, "episodes": 128, "k": 4}
    evals = {"untrained": {**point, "success_rate": 0.0, "success_stderr": 0.0, "greedy_success_rate": None},
             "after_sft": {**point, "success_rate": 0.787, "success_stderr": 0.03, "greedy_success_rate": 0.914,
                           "greedy_success_stderr": 0.025},
             "after_rl": {**point, "success_rate": 0.863, "success_stderr": 0.04}}
    _print_evals(evals, tmp_path)
    out = capsys.readouterr().out
    assert "0.787±0.030   0.914±0.025" in out and "0.863±0.040" in out
    assert "RL gain (after_rl - after_sft success): +0.076 ± 0.050" in out  # no per-state lists: as if independent
    evals["after_sft"]["state_success"], evals["after_rl"]["state_success"] = [0.5, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]
    evals["after_sft"]["success_rate"], evals["after_rl"]["success_rate"] = 0.625, 0.75
    _print_evals(evals, tmp_path)
    assert "RL gain (after_rl - after_sft success): +0.125 ± 0.125 (paired over the 4 start states)" in \
        capsys.readouterr().out
