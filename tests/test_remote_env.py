"""Envs served over HTTP (`turnrl env-server`, env `remote`): the env contract over the wire, the same training run
as in-process, failures that lose only their episode, and one-line errors. Servers bind 127.0.0.1 on a free port
and are stopped by each test."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faulty_envs import FlakyLake
from scripted import ScriptedEngine
from test_train import tiny_config, weights
from turnrl.cli import main
from turnrl.context import ChatRenderer
from turnrl.engines import SamplingParams
from turnrl.env_server import EnvServer
from turnrl.envs import RemoteEnvError, check_env, make
from turnrl.rollout import RolloutSettings, run_episodes
from turnrl.train import train


@pytest.fixture
def serve():
    servers = []

    def start(name, **kwargs):
        servers.append(EnvServer(name, kwargs, port=0).start())
        return servers[-1].url
    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("name", ["sokoban", "countdown", "math_qa"])
def test_a_served_env_passes_the_env_contract(serve, name):
    """check_env over HTTP: determinism per seed, replay, ~80 garbage replies (control characters, lone
    surrogates, 10,000 characters), case-insensitive actions, the solver to the end; free text for countdown."""
    env = make("remote", url=serve(name))
    local = make(name)
    assert (env.name, env.action_names, env.free_text, env.multi_attempt) == (
        local.name, local.action_names, local.free_text, local.multi_attempt)
    assert env.system_prompt() == local.system_prompt()
    check_env(env)
    env.close()


def test_training_on_a_served_env_is_the_in_process_run(serve, tmp_path):
    """SFT demonstrations (the served solver), rollouts and evaluations through `remote`: the same metrics, eval
    results and weights as the same run on the env in-process."""
    url = serve("frozen_lake_det")
    local = tiny_config(tmp_path / "local")
    remote = tiny_config(tmp_path / "remote")
    remote.env.name, remote.env.kwargs = "remote", {"url": url}
    train(local, log=lambda *_: None)
    train(remote, log=lambda *_: None)

    def records(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(("perf/", "time/"))} for line in lines]
    assert records("remote") == records("local")
    evals = [json.loads((tmp_path / run / "eval.json").read_text()) for run in ("local", "remote")]
    assert evals[0] == evals[1]
    a, b = weights(tmp_path / "local" / "final"), weights(tmp_path / "remote" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def play(tok, make_env):
    engine = ScriptedEngine(tok, ["Right</answer><|im_end|>"])
    settings = RolloutSettings(max_turns=3, max_actions_per_turn=1, max_new_tokens=16, think=False)
    renderer = ChatRenderer(tok, system_prompt=None, response_prefix="<answer>")
    return run_episodes(engine, renderer, make_env, [100, 101, 102], 2, settings, SamplingParams(max_new_tokens=16),
                        env_name="flaky")


def test_an_env_raising_on_the_server_loses_only_its_episode(serve, tiny_tokenizer):
    url = serve("faulty_envs:FlakyLake", mode="step", every=3)  # the server runs in this process:
    FlakyLake.counter = iter(range(10_000))  # every third instance it opens from now on raises in step()
    trajs = play(tiny_tokenizer, lambda: make("remote", url=url))
    failed = [i for i, t in enumerate(trajs) if t.failed]
    assert failed == [2, 5]
    for i in failed:
        assert "RemoteEnvError" in trajs[i].error and "ZeroDivisionError: step exploded" in trajs[i].error
    FlakyLake.counter = iter(range(10_000))
    local = play(tiny_tokenizer, lambda: FlakyLake(mode="step", every=3))
    assert [t.failed for t in local] == [t.failed for t in trajs]
    for t, u in zip(trajs, local):
        if not t.failed:
            assert (t.ids, t.turn_rewards, t.success) == (u.ids, u.turn_rewards, u.success)


def test_server_errors_name_the_cause_and_a_dropped_connection_is_reopened(serve):
    env = make("remote", url=serve("frozen_lake_det"))
    first = env.reset(seed=3)
    env._conn.sock.shutdown(socket.SHUT_RDWR)  # the kept-alive connection is gone before the next call
    assert env.reset(seed=3) == first
    with pytest.raises(RemoteEnvError, match="method must be one of"):
        env._call("__init__")
    env.close()
    with pytest.raises(RemoteEnvError, match="no open env with id"):
        env._post("/step", {"id": "nope", "action": "Up"})
    env.close()


def test_bad_remote_settings_exit_2_with_one_line(serve, tmp_path, capsys):
    dead = EnvServer("frozen_lake_det", port=0)
    dead_url = dead.url
    dead.close()  # nothing listens there any more
    for kwargs, message in (([], "needs its server's address"),
                            (["url", dead_url], "Connection refused"),
                            (["url", "ftp://x"], "url must look like http://HOST:PORT")):
        code = main(["train", "--env.name", "remote", "--out", str(tmp_path / "run"), "--no-progress"]
                    + (["--env.kwargs", *kwargs] if kwargs else []))
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_the_env_server_command_serves_until_interrupted(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-m", "turnrl.cli", "env-server", "faulty_envs:FlakyLake", "--port", "0",
                             "--kwargs", '{"mode": "step", "every": 1000}'], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert "serving env 'faulty_envs:FlakyLake' on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        remote = make("remote", url=url)
        obs, _ = remote.reset(seed=0)
        assert obs == FlakyLake(mode="step", every=1000).reset(seed=0)[0]
        remote.close()
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    bad = subprocess.run([sys.executable, "-m", "turnrl.cli", "env-server", "sokoban", "--kwargs", "[1]"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "--kwargs must be a JSON object" in bad.stderr


def test_turnrl_eval_plays_a_served_env_given_by_env_kwargs(serve, tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", iterations=1)
    train(cfg, log=lambda *_: None)
    url = serve("frozen_lake_det")
    results = []
    for args in (["--env", "frozen_lake_det"], ["--env", "remote", "--env-kwargs", json.dumps({"url": url})]):
        out = tmp_path / f"eval{len(results)}.json"
        assert main(["eval", str(tmp_path / "run"), "--episodes", "6", "--k", "2", "--out", str(out), *args]) == 0
        results.append({k: v for k, v in json.loads(out.read_text()).items() if k != "env"})
    capsys.readouterr()
    assert results[0] == results[1] and results[0]["episodes"] == 6
    assert main(["eval", str(tmp_path / "run"), "--env", "remote", "--env-kwargs", "[]"]) == 2
    assert "--env-kwargs must be a JSON object" in capsys.readouterr().err
