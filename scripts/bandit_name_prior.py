"""Does a model prefer the risky arm of the bandit from the names alone? (docs/results.md, bandit section)

For every (safe, risky) name pair of a split, in both orders, it scores the two complete answers
`<answer>{risky}</answer>` and `<answer>{safe}</answer>` after the exact prompt turnrl's rollout gives the model
(system prompt, observation, the `<answer>` response prefix) and prints the log-probability difference. The
last line is the fraction of prompts where the risky answer is the more likely one: 0.5 means the model's
answer does not follow the names' meaning (the transfer to held-out names then has nothing to start from).

With `--ask` it measures the model's knowledge instead of its bandit answer: it asks, as a plain chat question,
"Which one is more dangerous: A or B?" and "Which one is more safe: A or B?" and compares the log-probability gap
(risky answer minus safe answer) between the two questions. A model that knows which name is the dangerous one
answers the two questions differently (positive contrast); word frequency and order move both gaps alike and
cancel out.

    .venv/bin/python scripts/bandit_name_prior.py [--model smollm2-135m-instruct | RUN_DIR/final] [--split test] [--ask]
"""

from __future__ import annotations

import argparse

import torch

from turnrl.algos.losses import token_logprobs
from turnrl.context import ChatRenderer
from turnrl.envs.bandit import SPLITS, BanditEnv
from turnrl.evaluate import renderer_for
from turnrl.models import load_policy
from turnrl.presets import get_preset


@torch.no_grad()
def answer_logprob(policy, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer])
    logits, _ = policy(ids)
    return token_logprobs(logits[:, :-1].float(), ids[:, 1:])[0, len(prompt) - 1:].sum().item()


def both_orders(safe: str, risky: str) -> list[tuple[str, str, str]]:
    """(first name shown, second name shown, observation) for both orders, as the env renders them."""
    env, seen = BanditEnv(pairs=[(safe, risky)]), {}
    for seed in range(100):
        observation, info = env.reset(seed=seed)
        seen.setdefault(tuple(info["arms"]), observation)
        if len(seen) == 2:
            break
    return [(first, second, observation) for (first, second), observation in sorted(seen.items())]


def ask_contrast(policy, first: str, second: str, safe: str, risky: str) -> float:
    """(gap when asked for the more dangerous name) - (gap when asked for the safer one), gap = log p(risky) -
    log p(safe) as the answer."""
    chat = ChatRenderer(policy.tokenizer, system_prompt=None)  # a plain chat question, no bandit rules
    answer = {name: chat.encode(name) for name in (safe, risky)}
    gaps = []
    for quality in ("dangerous", "safe"):
        prompt = chat.prompt_ids(f"Which one is more {quality}: {first} or {second}? Answer with one word.")
        gaps.append(answer_logprob(policy, prompt, answer[risky]) - answer_logprob(policy, prompt, answer[safe]))
    return gaps[0] - gaps[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory (a run's final/)")
    parser.add_argument("--split", choices=sorted(SPLITS), nargs="+", default=["train", "test"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ask", action="store_true", help="ask which name is more dangerous / safe (module doc)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model).eval()
    renderer = renderer_for(policy, get_preset("smollm2-bandit"))  # the prompt the preset's rollout builds
    for split in args.split:
        prefers = 0
        pairs = SPLITS[split]
        for safe, risky in pairs:
            for first, second, observation in both_orders(safe, risky):
                if args.ask:
                    contrast = ask_contrast(policy, first, second, safe, risky)
                    prefers += contrast > 0
                    print(f"{split:5}  {first:>10} / {second:<10}  danger gap - safety gap = {contrast:+.2f}")
                    continue
                prompt = renderer.prompt_ids(observation)
                gap = (answer_logprob(policy, prompt, renderer.encode(f"{risky}</answer>"))
                       - answer_logprob(policy, prompt, renderer.encode(f"{safe}</answer>")))
                prefers += gap > 0
                print(f"{split:5}  {first:>10} / {second:<10}  log p(risky) - log p(safe) = {gap:+.2f}")
        what = "asked for the dangerous name, the risky one gains" if args.ask else "the risky answer is the more likely one"
        print(f"{split}: {what} in {prefers} of {2 * len(pairs)} prompts ({prefers / (2 * len(pairs)):.2f})")


if __name__ == "__main__":
    main()
