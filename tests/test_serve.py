"""`turnrl serve` + `turnrl eval --engine openai`: a real server on loopback and the real `openai` client.

The greedy episodes played through the server are the same, reply for reply, as `turnrl eval`'s
token-level rollouts of the same run; sampled success agrees within sampling noise.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")

from turnrl.cli import main, run_model  # noqa: E402
from turnrl.engines import HFEngine, SamplingParams  # noqa: E402
from turnrl.engines.openai import OpenAIEngine, ServerError  # noqa: E402
from turnrl.envs import make  # noqa: E402
from turnrl.evaluate import renderer_for, settings_for  # noqa: E402
from turnrl.rollout import run_episodes  # noqa: E402
from turnrl.serve import AgentServer  # noqa: E402
from turnrl.served import run_chat_episodes  # noqa: E402
from turnrl.prepare import build_policy, run_sft  # noqa: E402
from test_train import tiny_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a tiny model warm-started on FrozenLake demonstrations (plays legal moves,
    sometimes wins), written without the RL loop to keep the test fast."""
    run = tmp_path_factory.mktemp("serve") / "run"
    cfg = tiny_config(run, iterations=0)
    cfg.rollout.max_turns = 4
    cfg.sft.episodes, cfg.sft.steps, cfg.sft.batch_size, cfg.sft.lr = 128, 60, 16, 3e-3
    run.mkdir(parents=True)
    policy = build_policy(cfg)
    run_sft(policy, cfg, log=lambda *_: None)
    (run / "config.json").write_text(cfg.to_json())
    policy.save(run / "final")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_greedy_episodes_through_the_server_match_token_level_rollouts(run_dir):
    cfg, model_dir = run_model(run_dir)
    policy = build_policy(cfg, model_dir)
    seeds = list(range(12))
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, greedy=True)
    make_env = lambda: make(cfg.env.name)  # noqa: E731
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id)
    local = run_episodes(engine, renderer_for(policy, cfg), make_env, seeds, 1, settings_for(cfg), params)
    server = AgentServer(policy, model_name="agent", response_prefix="<answer>", port=0).start()
    try:
        served = run_chat_episodes(OpenAIEngine(server.url, concurrency=4), make_env, seeds, 1, cfg, params)
    finally:
        server.stop()
    assert any(t.success for t in local)  # the agent plays real moves and wins some, so the comparison means something
    for t, e in zip(local, served):
        assert [text for _role, text in t.transcript] == [m["content"] for m in e.messages]
        assert (t.success, t.total_reward, t.num_turns) == (e.success, e.total_reward, e.num_turns)


def test_turnrl_serve_then_eval_engine_openai_matches_turnrl_eval(run_dir, tmp_path):
    """`turnrl serve` in a subprocess, `turnrl eval --engine openai` against it, `turnrl eval` locally."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "turnrl.cli", "serve", str(run_dir), "--port", "0",
                             "--model-name", "agent"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stderr.read()
        url = line.split(" on ")[1].split()[0]
        common = ["--episodes", "16", "--k", "2", "--greedy"]
        assert main(["eval", str(run_dir), "--engine", "openai", "--base-url", url, "--out",
                     str(tmp_path / "served.json"), *common]) == 0
        # the official client, straight: the agent's reply opens with its trained response prefix
        import openai
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["agent"]
        reply = client.chat.completions.create(model="agent", temperature=0, max_tokens=8,
                                               messages=[{"role": "user", "content": make(
                                                   "frozen_lake_det").reset(seed=0)[0]}])
        assert reply.choices[0].message.content.startswith("<answer>")
        assert reply.usage.completion_tokens >= 1
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert main(["eval", str(run_dir), "--out", str(tmp_path / "local.json"), *common]) == 0
    served = json.loads((tmp_path / "served.json").read_text())
    local = json.loads((tmp_path / "local.json").read_text())
    assert served["engine"] == "openai" and served["model"] == "agent"
    assert served["greedy_success_rate"] == local["greedy_success_rate"]
    p = (served["success_rate"] + local["success_rate"]) / 2
    n = 16 * 2
    assert abs(served["success_rate"] - local["success_rate"]) <= 4 * math.sqrt(2 * max(p * (1 - p), 0.05) / n)


def test_server_down_is_a_one_line_error(capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    code = main(["eval", "--engine", "openai", "--base-url", url, "--model", "m", "--env", "bandit",
                 "--episodes", "1", "--retries", "0", "--timeout", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "cannot reach" in err and url in err
    with pytest.raises(ServerError, match="cannot reach"):
        OpenAIEngine(url, max_retries=0, timeout=5)  # no --model: asks the server, which is down


@pytest.mark.parametrize("args, message", [
    (["eval", "--engine", "openai", "--env", "bandit"], "--base-url"),
    (["eval", "some-model", "--engine", "openai", "--base-url", "http://127.0.0.1:1/v1", "--env", "bandit"],
     "run directory"),
    (["serve", "not-a-run"], "not a turnrl run directory"),
])
def test_bad_serve_and_eval_arguments_exit_2(args, message, capsys):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_server_rejects_bad_requests_with_openai_errors(run_dir):
    import openai

    cfg, model_dir = run_model(run_dir)
    server = AgentServer(build_policy(cfg, model_dir), model_name="agent", port=0).start()
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="n=1"):
            client.chat.completions.create(model="agent", n=2, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="exceeds the model's context"):
            client.chat.completions.create(model="agent", max_tokens=10_000, messages=[{"role": "user", "content": "hi"}])
        ok = client.chat.completions.create(model="agent", temperature=0.7, max_tokens=4,
                                            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
        assert ok.choices[0].finish_reason in ("stop", "length") and ok.usage.completion_tokens <= 4
    finally:
        server.stop()
