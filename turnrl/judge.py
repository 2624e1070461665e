"""LLM-judge rewards: an OpenAI-compatible chat model scores the played episodes (`judge.url`).

For tasks without a programmatic verifier (open-ended answers, dialogue, style), or to add a judgement of
*how* an episode went to the env's reward. Two modes:

- `group` (default): the episodes of one group (same start state) go to the judge in one request, to be scored
  against each other, as RULER does (OpenPipe ART, "RULER: Relative Universal LLM-Elicited Rewards", 2025).
  GRPO-style estimators only use differences inside a group, which is what a judge ranks best.
- `single`: one request per episode, scored on its own (an LLM-as-a-judge reward as in Zheng et al. 2023,
  arXiv 2306.05685).

The judge sees each episode's transcript (observations and replies; `judge.max_chars` per episode, the middle
cut) and `judge.rubric`, and answers JSON: {"scores": [s_1, ..., s_n]} (group) or {"score": s} (single), each in
[0, 1]. `weight * score` is added to the episode's last turn reward (`judge.env_reward=false`: it replaces the
env's rewards and the format penalties). A reply that does not parse is asked again (`judge.retries`); a request
that still fails (or a server error after the client's retries) leaves its episodes out of the update, as an env
failure does, and is counted (`judge/failed_requests`); a rollout whose every request failed on the server stops
the run (the judge is down; resume when it is back). The judge runs in the trainer after every rollout, before
reward shaping and the group filter (which then ranks groups by the judged returns), whichever engine and
workers played it. Held-out evaluation stays the env's own success.
"""

from __future__ import annotations

import dataclasses
import json
import re
from concurrent.futures import ThreadPoolExecutor

from turnrl.config import JudgeConfig
from turnrl.engines.base import SamplingParams
from turnrl.engines.openai import OpenAIEngine, ServerError
from turnrl.trajectory import Trajectory

DEFAULT_RUBRIC = ("A good trajectory achieves the task's goal, follows the required answer format and wastes no "
                  "turns; a trajectory that makes progress beats one that does not.")
_JSON_OBJECT = re.compile(r"\{[^{}]*\}", re.DOTALL)


@dataclasses.dataclass
class JudgeStats:
    """One or more judge calls: the scores given, requests that failed, requests sent (`+` adds calls up)."""

    scores: list[float] = dataclasses.field(default_factory=list)
    failed: int = 0
    requests: int = 0

    def __add__(self, other: "JudgeStats") -> "JudgeStats":
        return JudgeStats(self.scores + other.scores, self.failed + other.failed, self.requests + other.requests)

    def metrics(self) -> dict[str, float | None]:
        """The judge/* keys of metrics.jsonl (docs/metrics.md)."""
        return {"judge/mean_score": sum(self.scores) / len(self.scores) if self.scores else None,
                "judge/failed_requests": float(self.failed), "judge/requests": float(self.requests)}


def render_episode(t: Trajectory, max_chars: int) -> str:
    """An episode's transcript as judge input: `[environment]` and `[agent]` blocks, at most `max_chars` (the
    middle is cut, since the task is at the start and the outcome at the end)."""
    names = {"user": "environment", "assistant": "agent"}
    text = "\n".join(f"[{names.get(role, role)}]\n{content}" for role, content in t.transcript)
    if len(text) > max_chars:
        half = max_chars // 2
        text = f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"
    return text


def judge_messages(episodes: list[Trajectory], cfg: JudgeConfig) -> list[dict]:
    """The chat request that asks the judge to score `episodes` (one: single mode; a group: relative scores)."""
    rubric = cfg.rubric or DEFAULT_RUBRIC
    if cfg.mode == "single":  # one episode per request
        system = (f"You evaluate one trajectory of an AI agent acting in an environment. {rubric}\nScore it "
                  "between 0 (fails completely) and 1 (ideal). Reply with JSON only: {\"score\": <number>}")
        body = render_episode(episodes[0], cfg.max_chars)
    else:
        n = len(episodes)
        system = (f"You evaluate {n} trajectories of an AI agent, all starting from the same task. {rubric}\n"
                  "Score each between 0 (fails completely) and 1 (ideal), comparing them with each other: a "
                  "better trajectory gets a higher score. Reply with JSON only: {\"scores\": [<score of "
                  f"trajectory 1>, ..., <score of trajectory {n}>]}} with exactly {n} numbers.")
        body = "\n\n".join(f"<trajectory {i + 1}>\n{render_episode(t, cfg.max_chars)}\n</trajectory {i + 1}>"
                           for i, t in enumerate(episodes))
    return [{"role": "system", "content": system}, {"role": "user", "content": body}]


def parse_scores(reply: str, n: int, single: bool) -> list[float] | None:
    """The scores of a judge's reply: the last JSON object in it with `score` (single) or `scores` (n numbers),
    every one in [0, 1]; None when there is no such object."""
    key = "score" if single else "scores"
    for candidate in reversed(_JSON_OBJECT.findall(reply or "")):
        try:
            value = json.loads(candidate).get(key)
        except (json.JSONDecodeError, AttributeError):
            continue
        values = [value] if single else value
        if (isinstance(values, list) and len(values) == n
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values)):
            return [float(v) for v in values]
    return None


def with_judge_reward(t: Trajectory, score: float, cfg: JudgeConfig) -> Trajectory:
    """The episode with `weight * score` added to its last turn's reward (`env_reward=false`: its only reward)."""
    rewards = list(t.turn_rewards) if cfg.env_reward else [0.0] * len(t.turn_rewards)
    if not rewards:
        return t
    rewards[-1] += cfg.weight * score
    return dataclasses.replace(t, turn_rewards=tuple(rewards))


class Judge:
    """Scores episodes with the chat model at `cfg.url` (turnrl.engines.openai: the same client, retries and
    concurrency as `turnrl eval --engine openai`)."""

    def __init__(self, cfg: JudgeConfig):
        self.cfg = cfg
        # requests run on the judge's own threads (below); without a model name the server is asked for its only
        # model, with one it is asked whether it serves it: either way an unreachable judge fails here
        self.engine = OpenAIEngine(cfg.url, cfg.model or None, timeout=cfg.timeout, max_retries=2, concurrency=1)
        if cfg.model and cfg.model not in (served := self.engine.served_models()):
            raise ServerError(f"the judge server {cfg.url} does not serve {cfg.model!r} (it serves: "
                              f"{', '.join(served[:5]) or 'nothing'}); set judge.model")
        self.params = SamplingParams(max_new_tokens=cfg.max_tokens, temperature=0.0, greedy=True)

    def _ask(self, episodes: list[Trajectory]) -> tuple[list[float] | None, str]:
        """(the scores, or None when the request failed; the server's error, if that was why)."""
        messages = judge_messages(episodes, self.cfg)
        try:
            for _ in range(1 + self.cfg.retries):
                reply = self.engine.chat([messages], self.params)[0].text
                scores = parse_scores(reply, len(episodes), self.cfg.mode == "single")
                if scores is not None:
                    return scores, ""
        except ServerError as err:  # unreachable or refusing after the client's retries: this request failed
            return None, str(err)
        return None, ""

    def __call__(self, trajs: list[Trajectory]) -> tuple[list[Trajectory], JudgeStats]:
        """The episodes with judge rewards, in order, without those whose request failed (they are left out of
        the update, like episodes whose env failed), and what happened.
        Episodes without a turn are not sent (nothing to judge) and come back unchanged. ServerError when every
        request failed because of the server (the judge is down)."""
        judged = [i for i, t in enumerate(trajs) if t.num_turns > 0]
        if self.cfg.mode == "single":
            batches = [[i] for i in judged]
        else:
            groups: dict[int, list[int]] = {}
            for i in judged:
                groups.setdefault(trajs[i].group_id, []).append(i)
            batches = list(groups.values())
        with ThreadPoolExecutor(max_workers=max(1, min(self.cfg.concurrency, len(batches)))) as pool:
            asked = list(pool.map(lambda batch: self._ask([trajs[i] for i in batch]), batches))
        answers, errors = [a for a, _ in asked], [e for _, e in asked if e]
        if batches and all(a is None for a in answers) and errors:
            raise ServerError(f"the judge failed every request of this rollout: {errors[-1]}")
        out, dropped, scores = list(trajs), set(), []
        for batch, batch_scores in zip(batches, answers):
            if batch_scores is None:
                dropped.update(batch)
                continue
            for i, score in zip(batch, batch_scores):
                out[i] = with_judge_reward(trajs[i], score, self.cfg)
                scores.append(score)
        stats = JudgeStats(scores, sum(a is None for a in answers), len(batches))
        return [t for i, t in enumerate(out) if i not in dropped], stats
