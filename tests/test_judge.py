"""LLM-judge rewards (turnrl.judge): prompts, parsing, and the rewards a scripted judge server on loopback gives,
through the real OpenAI client, into the rollout's reward pipeline and a training run."""
import json
import re
import threading
from http.server import ThreadingHTTPServer

import pytest

from test_train import DOCS, tiny_config
from turnrl.config import ConfigError, JudgeConfig
from turnrl.engines.openai import ServerError
from turnrl.http_json import JSONHandler
from turnrl.judge import Judge, JudgeStats, judge_messages, parse_scores, render_episode, with_judge_reward
from turnrl.train import rollout_and_filter, train
from turnrl.trajectory import Trajectory

pytest.importorskip("openai")


def episode(group: int, replies: list[str], rewards: list[float] | None = None, seed: int = 0) -> Trajectory:
    transcript = []
    for i, reply in enumerate(replies):
        transcript += [("user", f"task {group} step {i}"), ("assistant", reply)]
    rewards = rewards if rewards is not None else [0.0] * len(replies)
    return Trajectory(ids=(1,), loss_mask=(1,), logprobs=(0.0,), turn_spans=((0, 1),) * len(replies),
                      turn_rewards=tuple(rewards), terminated=True, truncated=False, success=False, env_name="x",
                      seed=seed, group_id=group, num_actions=len(replies), valid_turns=len(replies), end_reason="env",
                      transcript=tuple(transcript))


def rule(text: str) -> float:
    """The scripted judge's opinion of one rendered episode: the share of its replies that say 'yes'."""
    replies = re.findall(r"\[agent\]\n(.*)", text)
    return sum("yes" in r for r in replies) / max(1, len(replies))


class JudgeServer:
    """An OpenAI-compatible chat server on loopback whose 'model' scores trajectories by `rule`. `garbage` replies
    to the first `garbage` requests of each prompt with text that holds no scores."""

    def __init__(self, garbage: int = 0, models=("judge-1",)):
        self.requests, self.garbage, self.models, self.seen, self.down = [], garbage, models, {}, False
        server = self

        class Handler(JSONHandler):
            def do_GET(self):
                self.send_json(200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                                                 "owned_by": "test"} for m in server.models]})

            def do_POST(self):
                body = self.read_json()
                if server.down:  # a kept-alive connection outlives shutdown(): drop it unanswered
                    self.close_connection = True
                    return
                server.requests.append(body)
                self.send_json(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                         "role": "assistant", "content": server.answer(body["messages"])}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, messages) -> str:
        system, user = messages[0]["content"], messages[1]["content"]
        key = user
        self.seen[key] = self.seen.get(key, 0) + 1
        if self.seen[key] <= self.garbage:
            return "I think the second one is best."
        if "Reply with JSON only: {\"score\"" in system:
            return f"Reasoning first. {{\"score\": {rule(user)}}}"
        parts = re.findall(r"<trajectory \d+>\n(.*?)\n</trajectory \d+>", user, flags=re.S)
        return "Scores: " + json.dumps({"scores": [rule(p) for p in parts]})

    def close(self):
        self.down = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def test_parse_scores_takes_the_last_valid_object():
    assert parse_scores('{"scores": [0.5, 1]} then {"scores": [0, 0.25]}', 2, False) == [0.0, 0.25]
    assert parse_scores('{"scores": [0, 0.25]} then {"scores": [2, 0]}', 2, False) == [0.0, 0.25]
    assert parse_scores('{"scores": [0.5]}', 2, False) is None  # wrong count
    assert parse_scores('{"scores": [true, 0.5]}', 2, False) is None
    assert parse_scores('{"scores": [-0.1, 0.5]}', 2, False) is None
    assert parse_scores("no json at all", 1, True) is None
    assert parse_scores('{"score": 0.75}', 1, True) == [0.75]
    assert parse_scores('{"score": "high"}', 1, True) is None


def test_render_cuts_the_middle_and_rewards_add_or_replace():
    t = episode(0, ["a" * 500, "yes"], rewards=[0.3, -0.1])
    text = render_episode(t, 200)
    assert text.startswith("[environment]\ntask 0 step 0") and text.endswith("[agent]\nyes")
    assert "characters cut" in text and len(text) < 260
    assert with_judge_reward(t, 0.5, JudgeConfig(url="u", weight=2.0)).turn_rewards == (0.3, -0.1 + 1.0)
    assert with_judge_reward(t, 0.5, JudgeConfig(url="u", env_reward=False)).turn_rewards == (0.0, 0.5)
    system = judge_messages([t, t], JudgeConfig(url="u", rubric="Be brief."))[0]["content"]
    assert "Be brief." in system and "exactly 2 numbers" in system


@pytest.mark.parametrize("mode", ["group", "single"])
def test_the_judges_scores_become_the_last_turn_rewards(server, mode):
    judge = Judge(JudgeConfig(url=server.url, mode=mode, weight=0.5))
    trajs = [episode(g, [f"{word} {i}" for i in range(turns)], rewards=[0.1] * turns, seed=g)
             for g, word, turns in [(0, "yes", 2), (0, "no", 1), (1, "yes", 1), (1, "no", 3), (1, "yes", 2)]]
    trajs[3] = episode(1, ["yes", "no", "no"], rewards=[0.0, 0.0, 1.0])
    out, stats = judge(trajs)
    expected = [rule(render_episode(t, 4000)) for t in trajs]
    assert expected == [1.0, 0.0, 1.0, 1 / 3, 1.0]
    for t, o, score in zip(trajs, out, expected):
        assert o.turn_rewards[:-1] == t.turn_rewards[:-1]
        assert o.turn_rewards[-1] == pytest.approx(t.turn_rewards[-1] + 0.5 * score)
    assert stats.scores == pytest.approx(expected) and stats.failed == 0
    # group mode: one request per group, every member in it; single: one per episode
    assert stats.requests == len(server.requests) == (2 if mode == "group" else 5)
    assert all(r["model"] == "judge-1" and r["temperature"] == 0.0 for r in server.requests)


def test_unparsable_replies_are_asked_again_then_their_episodes_are_left_out():
    flaky = JudgeServer(garbage=1)
    try:
        trajs = [episode(0, ["yes"]), episode(0, ["no"]), episode(1, ["yes"])]
        out, stats = Judge(JudgeConfig(url=flaky.url, retries=1))(trajs)
        assert [t.turn_rewards for t in out] == [(1.0,), (0.0,), (1.0,)] and stats.failed == 0
        assert len(flaky.requests) == 4  # two groups, each asked twice
        flaky.garbage = 10
        flaky.seen.clear()
        out, stats = Judge(JudgeConfig(url=flaky.url, retries=2))(trajs)
        assert out == [] and stats.failed == stats.requests == 2 and stats.scores == []
    finally:
        flaky.close()


def test_an_unreachable_judge_fails_at_the_start_and_a_dead_one_stops_the_rollout(server):
    with pytest.raises(ServerError, match="does not serve 'judge-2'"):
        Judge(JudgeConfig(url=server.url, model="judge-2"))
    judge = Judge(JudgeConfig(url=server.url, model="judge-1", timeout=2.0))
    server.close()
    with pytest.raises(ServerError, match="failed every request"):
        judge([episode(0, ["yes"])])
    with pytest.raises(ServerError, match="cannot reach"):
        Judge(JudgeConfig(url=server.url, timeout=2.0))


def test_the_filter_ranks_groups_by_judged_returns_and_training_gets_the_judged_rewards(server):
    cfg = tiny_config("unused")
    cfg.rollout.n_groups, cfg.algo.filter_keep = 4, 0.5
    cfg.judge = JudgeConfig(url=server.url, env_reward=False)
    # env rewards equal everywhere (no group varies); the judge separates the members of groups 1 and 3 only
    words = {0: ["no", "no"], 1: ["yes", "no"], 2: ["yes", "yes"], 3: ["no", "yes"]}
    played = [episode(g, [w], rewards=[1.0], seed=g) for g in range(4) for w in words[g]]
    _all, kept, metrics = rollout_and_filter(cfg, 0, lambda seeds: played, Judge(cfg.judge))
    assert sorted({t.group_id for t in kept}) == [1, 3]
    assert [t.turn_rewards for t in kept] == [(1.0,), (0.0,), (0.0,), (1.0,)]
    assert metrics["judge/mean_score"] == pytest.approx(0.5) and metrics["judge/requests"] == 4.0
    assert _all == played  # rollout/* metrics describe the episodes as played


def test_a_training_run_with_a_judge_logs_documented_metrics(server, tmp_path):
    cfg = tiny_config(tmp_path / "run", iterations=1)
    cfg.judge = JudgeConfig(url=server.url, rubric="Say yes.")
    train(cfg, log=lambda *_: None)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["judge/requests"] == cfg.rollout.n_groups and record["judge/failed_requests"] == 0
    assert 0.0 <= record["judge/mean_score"] <= 1.0
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(), flags=re.M))
    assert {"judge/mean_score", "judge/failed_requests", "judge/requests", "perf/judge_seconds"} <= documented
    assert {"judge/mean_score", "judge/failed_requests", "judge/requests", "perf/judge_seconds"} <= set(record)
    assert all("Say yes." in r["messages"][0]["content"] for r in server.requests)


def test_judge_stats_add_up_and_config_is_checked():
    total = JudgeStats([1.0], 0, 1) + JudgeStats([0.0, 0.5], 1, 2)
    assert total.metrics() == {"judge/mean_score": 0.5, "judge/failed_requests": 1.0, "judge/requests": 3.0}
    assert JudgeStats().metrics()["judge/mean_score"] is None
    with pytest.raises(ConfigError, match="judge.rubric configures"):
        JudgeConfig(rubric="x")
    with pytest.raises(ConfigError, match="weight"):
        JudgeConfig(url="u", weight=0)


def test_a_rollout_whose_every_judgement_fails_trains_on_nothing_and_says_so():
    flaky = JudgeServer(garbage=100)
    try:
        cfg = tiny_config("unused")
        cfg.judge = JudgeConfig(url=flaky.url, retries=0)
        played = [episode(g, ["yes"], rewards=[1.0], seed=g) for g in range(4) for _ in range(2)]
        everything, kept, metrics = rollout_and_filter(cfg, 0, lambda seeds: played, Judge(cfg.judge))
        assert everything == played and kept == []
        assert metrics["judge/failed_requests"] == metrics["judge/requests"] == 4.0
        assert metrics["judge/mean_score"] is None
    finally:
        flaky.close()
