"""Context policies: what the model sees at each turn of an episode, as token ids (`TurnContext`), rendered
with the tokenizer's own chat template (`ChatRenderer`). `turnrl.rollout` runs the episodes.

Context policies (`RolloutSettings.context`) decide what the model sees at each turn:

* ``full`` (RAGEN, UFO): the whole history. Each episode is one growing token sequence: the model's
  tokens are appended exactly as sampled (loss mask 1, with their logprobs); everything else (system
  prompt, observations, chat-template glue) is tokenised once when it is appended (loss mask 0).
* ``window`` (VAGEN): the last `context_window` turns (observation + reply) and the newest observation (k = 0: that
  observation alone, a fresh conversation every turn, as each role of a multi-agent chain sees it).
  The prompt is assembled from the same once-tokenised pieces as under ``full`` (the sampled reply ids
  and the continuation glue), only the window's first observation is rendered afresh as the opening
  user message.
* ``summary`` (ERA's self-summary): the system prompt plus one user message holding the model's own
  reflection and plan from its previous reply (the text of its ``<think>`` block) and the newest
  observation; the context length stays bounded whatever the number of turns.

Under ``window`` and ``summary`` a turn's prompt is not a prefix of the next one, so an episode cannot be
one training sequence: each turn is its own training sample (`RolloutSettings.turn_rows`, ERA/SkyRL's
turn-as-sample training), holding the exact prompt ids the engine was given followed by the exact
sampled ids. ``full`` can be trained either way. Nothing already given to the engine is re-tokenised,
so the trainer sees the very ids the engine produced.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from turnrl.trajectory import EpisodeBuilder

if TYPE_CHECKING:
    from turnrl.rollout import RolloutSettings

_USER_SLOT, _ASSISTANT_SLOT = "\x00USER\x00", "\x00ASSISTANT\x00"

CONTEXTS = ("full", "window", "summary")
# Appended to the system prompt under the `summary` policy (it creates one if the env has none).
SUMMARY_INSTRUCTION = ("Earlier turns are not shown again: each turn you see only your own reflection from your "
                       "previous reply and the newest observation. Inside <think>, say what you have learned "
                       "so far and your plan for the next steps.")


def summary_message(reflection: str, answer: str, observation: str) -> str:
    """The user message of every turn after the first under the `summary` context policy."""
    return (f"Your reflection and plan from your previous reply:\n{reflection or '(none)'}\n"
            f"Your previous answer: {answer or '(none)'}\n\n"
            f"Current observation:\n{observation}")


def reflection_of(reply: str, tokenizer, max_tokens: int) -> tuple[str, str]:
    """(reflection, answer) of a reply `<think>reflection</think><answer>answer</answer>`, tolerant of
    unclosed tags: the reflection is the text after `<think>` up to `</think>` or `<answer>`. With a
    tokenizer, each is cut to `max_tokens` tokens so the next prompt's length stays bounded (a served
    model's reply, which has no tokenizer here, is already bounded by its max_tokens)."""
    text = reply
    if "<think>" in text:
        text = text.split("<think>", 1)[1]
    reflection = re.split(r"</think>|<answer>", text, maxsplit=1)[0].strip()
    answer = ""
    if "<answer>" in reply:
        answer = reply.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    if tokenizer is None:
        return reflection, answer
    ids = tokenizer(reflection, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        reflection = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        answer = tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)
    return reflection, answer


class ChatRenderer:
    """Turns observations into token ids with the tokenizer's own chat template.

    The glue between an assistant reply and the next user message is found once, by rendering a
    conversation with placeholder contents and cutting the text around them. That works for any
    template that renders earlier messages the same way whether or not more follow (ChatML, Llama 3,
    SmolLM2, Qwen2.5); other templates are refused with a clear error rather than silently mis-masked.
    """

    def __init__(self, tokenizer, *, system_prompt: str | None, response_prefix: str = ""):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.prefix = response_prefix
        self.eos_text = tokenizer.eos_token
        base = self._messages(_USER_SLOT) + [{"role": "assistant", "content": _ASSISTANT_SLOT}]
        closed = tokenizer.apply_chat_template(base, tokenize=False)
        extended = tokenizer.apply_chat_template(base + [{"role": "user", "content": _USER_SLOT}],
                                                 tokenize=False, add_generation_prompt=True)
        if not extended.startswith(closed) or _ASSISTANT_SLOT not in closed:
            raise ValueError("this chat template re-renders earlier turns when a turn is added; "
                             "turnrl needs an append-only template for exact multi-turn token ids")
        after_reply = closed[closed.rindex(_ASSISTANT_SLOT) + len(_ASSISTANT_SLOT):]
        # If the template closes a reply with the eos token, the model samples it itself; we only add
        # what comes after it (usually "\n").
        self._after_eos = after_reply[len(self.eos_text):] if after_reply.startswith(self.eos_text) else after_reply
        self._closes_with_eos = after_reply.startswith(self.eos_text)
        self._before_obs, self._after_obs = extended[len(closed):].split(_USER_SLOT)

    def _messages(self, first_user: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": first_user}]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, observation: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(self._messages(observation), tokenize=False,
                                                  add_generation_prompt=True)
        return self.encode(text + self.prefix)

    def continuation_ids(self, observation: str, *, reply_ended: bool) -> list[int]:
        """Ids that close the model's reply and open the next turn with `observation`."""
        close = "" if (reply_ended or not self._closes_with_eos) else self.eos_text
        return self.encode(close + self._after_eos + self._before_obs + observation + self._after_obs + self.prefix)


class TurnContext:
    """One episode's prompts under a context policy, and its training record (`builder`).

    `prompt` is what the engine is given this turn. After the reply, `add_reply` records it; after the
    env step, `next_prompt(obs)` builds the next turn's prompt and `commit` makes it current (the caller
    checks it against the context budget in between).
    """

    def __init__(self, renderer: ChatRenderer, settings: RolloutSettings, first_obs: str):
        self.renderer, self.settings = renderer, settings
        self.prompt = renderer.prompt_ids(first_obs)
        self.row_starts: list[int] | None = [] if settings.turn_rows else None
        self.builder = EpisodeBuilder([] if settings.turn_rows else list(self.prompt))
        self.builder.transcript.append(("user", first_obs))
        # window: per turn, its observation, the ids that open it in-line (None for turn 0), its reply ids
        self._obs: list[str] = [first_obs]
        self._openings: dict[int, list[int]] = {0: self.prompt}
        self._inline: list[list[int] | None] = [None]
        self._replies: list[list[int]] = []
        self._reply_text = ""
        self._pending: list[int] | None = None  # full, one sequence: the continuation ids to append

    def add_reply(self, ids, logprobs, text: str) -> None:
        b = self.builder
        if self.row_starts is not None:
            self.row_starts.append(len(b.ids))
            b.add_context(self.prompt)
        b.add_model(ids, logprobs)
        b.transcript.append(("assistant", text))
        self._replies.append(list(ids))
        self._reply_text = text

    def next_prompt(self, obs: str, *, reply_ended: bool) -> list[int]:
        """The prompt of the next turn, whose newest observation is `obs` (not yet committed)."""
        r, policy = self.renderer, self.settings.context
        if policy == "summary":
            reflection, answer = reflection_of(self._reply_text, r.tokenizer, self.settings.max_new_tokens)
            self._pending = None
            return r.prompt_ids(summary_message(reflection, answer, obs))
        cont = r.continuation_ids(obs, reply_ended=reply_ended)
        self._pending = cont
        if policy == "full":
            return self.prompt + self._replies[-1] + cont
        # window: the last k completed turns, then the newest observation
        turn = len(self._replies)  # index of the turn being opened
        first = max(0, turn - self.settings.context_window)
        if first == turn:  # k = 0: every turn a fresh conversation with the newest observation alone
            return r.prompt_ids(obs)
        if first not in self._openings:
            self._openings[first] = r.prompt_ids(self._obs[first])
        ids = list(self._openings[first])
        for t in range(first, turn):
            if t > first:
                ids += self._inline[t]
            ids += self._replies[t]
        return ids + cont

    def commit(self, obs: str, prompt: list[int]) -> None:
        if self.row_starts is None:  # full, one sequence: the prompt is the sequence so far
            self.builder.add_context(self._pending)
        self._obs.append(obs)
        self._inline.append(self._pending)
        self.prompt = prompt

