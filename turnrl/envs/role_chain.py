"""A chain of agent roles, all played by the policy being trained (Evo-MARL's multi-agent topology)."""

from __future__ import annotations

import json

from .base import Env, StepResult
from .registry import make

ROLE_INSTRUCTIONS = {
    "analyst": "Break the task down into clear step-by-step subtasks for the next agent.",
    "executor": "Follow the steps you were given and work out the answer.",
    "verifier": "Check the team's work, correct it if needed, and give the final answer.",
}
GENERIC_INSTRUCTION = "Do your part of the task and pass your message on."


class RoleChainEnv(Env):
    """A team of agent roles, all played by the policy being trained, solving one task in turn (multi-agent roles).

    Evo-MARL's multi-agent system (arXiv 2508.03864): a fixed chain of roles with one shared policy (parameter
    sharing), analyst -> executor -> verifier by default. Each turn is one role's turn: its observation names the
    role and its instruction, shows the task and every earlier role's message (as JSON), so with
    `rollout.context=window` and `rollout.context_window=0` each role sees a fresh conversation, as in Evo-MARL.
    The last role's message is the team's answer, stepped into the task env (`task`, any single-answer free-text
    env: `countdown` by default, `math_qa`), which seed for seed poses the same tasks as on its own. With `attack` set, that text is appended to every message passed on
    (Evo-MARL's injected attacker instruction), so training teaches the roles to ignore it. Free text.

    Observation:
        "You are the executor (agent 2 of 3: analyst -> executor -> verifier). <instruction>", then "Task:" and
        the task env's observation, then "Messages from the team so far:" and a JSON list of
        {"role", "message"} (messages cut at `max_message_chars`, the attack appended). After a rejected final
        answer, the task env's own message for it.
    Actions:
        Free text: any message from the analyst or executor is passed on (valid). The last role's text is the
        team's answer; if the task env rejects it as malformed (`action_valid` False), nothing changes and the
        last role answers again.
    Rewards:
        The task env's reward for the final answer (countdown: 1.0 correct, 0.1 well-formed but wrong);
        0 for the other roles' turns. `info["success"]` is the task env's.
    Episode end:
        Terminated once the last role's answer is accepted (well-formed), right or wrong; one turn per role.
    Arguments:
        task: the task env's registered name ("countdown"). roles: comma-separated role names
        ("analyst,executor,verifier"; the three have instructions, other names a generic one). attack: text
        appended to each message passed on ("" = none). max_message_chars: longest message passed on (1000).
        task_kwargs: the task env's arguments as a JSON object string ('{"max_number": 10}'; "" = its defaults).
    """

    name = "role_chain"
    free_text = True

    def __init__(self, task: str = "countdown", roles: str = "analyst,executor,verifier", attack: str = "",
                 max_message_chars: int = 1000, task_kwargs: str = "") -> None:
        self.roles = tuple(r.strip() for r in roles.split(",") if r.strip())
        if not self.roles:
            raise ValueError(f"roles must name at least one role, got {roles!r}")
        if max_message_chars < 1:
            raise ValueError(f"max_message_chars must be >= 1, got {max_message_chars}")
        try:
            kwargs = json.loads(task_kwargs) if task_kwargs else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"task_kwargs must be a JSON object, got {task_kwargs!r}: {err.msg}") from err
        if not isinstance(kwargs, dict):
            raise ValueError(f"task_kwargs must be a JSON object, got {task_kwargs!r}")
        self.task = make(task, **kwargs)
        if not getattr(self.task, "free_text", False):
            raise ValueError(f"task {task!r} must be a free-text (single-answer) env such as 'countdown' or 'math_qa'")
        self.attack, self.max_message_chars = attack, max_message_chars
        self.turn, self.messages, self.done, self.success = 0, [], False, False

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[str, dict]:
        self.task.reset(seed=seed, options=options)  # seed for seed the task env's tasks
        self.turn, self.messages, self.done, self.success = 0, [], False, False
        return self.render(), {}

    def step(self, action: str) -> StepResult:
        if self.done:
            return self._after_done_step(True, False, self.success)
        text = action if isinstance(action, str) else repr(action)
        if self.turn < len(self.roles) - 1:  # a message for the next role
            message = text.strip()
            if len(message) > self.max_message_chars:
                message = message[: self.max_message_chars] + "..."
            if self.attack:
                message = f"{message}\n{self.attack}"
            self.messages.append({"role": self.roles[self.turn], "message": message})
            self.turn += 1
            return StepResult(self.render(), 0.0, False, False,
                              {"success": False, "action_valid": True, "action_effective": True})
        obs, reward, _, _, info = self.task.step(text)  # the team's answer
        if not info.get("action_valid", True):  # malformed: the last role answers again, nothing changed
            return StepResult(obs, 0.0, False, False, {"success": False, "action_valid": False,
                                                       "action_effective": False})
        self.done, self.success = True, bool(info.get("success", False))
        return StepResult(obs, float(reward), True, False,
                          {"success": self.success, "action_valid": True, "action_effective": True})

    def render(self) -> str:
        if self.done:
            return self.task.render()
        role = self.roles[self.turn]
        chain = " -> ".join(self.roles)
        lines = [f"You are the {role} (agent {self.turn + 1} of {len(self.roles)}: {chain}). "
                 f"{ROLE_INSTRUCTIONS.get(role, GENERIC_INSTRUCTION)}", "Task:", self.task.render()]
        if self.messages:
            lines += ["Messages from the team so far:", json.dumps(self.messages, ensure_ascii=False)]
        return "\n".join(lines)

    def system_prompt(self) -> str:
        return ("You are one agent of a team that solves a task together: each agent writes a message for the next, "
                "and the last agent's answer is the team's.\n" + self.task.system_prompt())

    def expert_action(self) -> str:
        return self.task.expert_action()  # every role passes on the solver's answer

    def close(self) -> None:
        self.task.close()
