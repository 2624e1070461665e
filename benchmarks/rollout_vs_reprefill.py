"""5-turn Sokoban rollouts: turnrl's engine vs. RAGEN's strategy (re-render and re-prefill the history every turn).

Both sides play the same episodes (same env seeds, group size, turns, sampling temperature, max new
tokens, model and threads) through the same env and reply parser; only generation differs:

- turnrl: `run_episodes` with `HFEngine` (each episode's KV cache kept across turns, a group's shared
  first prompt prefilled once, one preallocated KV buffer per batch, finished rows dropped).
- peer (RAGEN's strategy, whose rollout re-renders the whole chat and calls the generator on it every
  turn): per turn, the whole conversation of every active episode is re-rendered with the chat template,
  tokenised, left-padded into one batch and passed to Hugging Face `generate` (sampling, top_k off).

The measure is generated tokens per second (model tokens only). Untrained models write long, mostly
invalid replies, so both sides play the full number of turns. Both sides first play one warm-up turn, then
each plays the same episodes `--repeats` times, the two sides in turn (so that a slow spell of this shared
machine hits both alike), and keeps its fastest run; every run is printed. Each repeat draws the same samples
(same seeds), so the runs do the same work. The last line is the ratio
peer seconds per generated token / turnrl seconds per generated token (the smallest over the models run).

    python benchmarks/rollout_vs_reprefill.py [--models tiny smollm2-135m-instruct] [--threads 2] [--repeats 3]
        [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

from turnrl.context import ChatRenderer
from turnrl.engines import HFEngine, SamplingParams
from turnrl.engines.hf import bf16_weights
from turnrl.envs import make
from turnrl.models import load_policy
from turnrl.parsing import parse_reply
from turnrl.rollout import RolloutSettings, act, run_episodes

ENV, ENV_KWARGS = "sokoban", {"dim": 6, "num_boxes": 1}


def precision(lm, dtype: str):
    """The peer computes in the precision turnrl's engine uses (HFEngine's bf16: autocast with bf16 weights)."""
    return bf16_weights(lm) if dtype == "bfloat16" else contextlib.nullcontext()


def turnrl_rollout(policy, renderer, seeds, args) -> tuple[int, float]:
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      batch_size=len(seeds) * args.group_size, generator=torch.Generator().manual_seed(0),
                      dtype=args.dtype)
    settings = RolloutSettings(max_turns=args.turns, max_new_tokens=args.max_new_tokens, max_context_tokens=4096,
                               think=False)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    t0 = time.perf_counter()
    trajs = run_episodes(engine, renderer, lambda: make(ENV, **ENV_KWARGS), seeds, args.group_size, settings, params,
                         env_name=ENV)
    return sum(sum(t.loss_mask) for t in trajs), time.perf_counter() - t0


def reprefill_rollout(policy, renderer, seeds, args) -> tuple[int, float]:
    """RAGEN's strategy: every turn, the whole history is re-rendered and re-prefilled by `generate`."""
    tok, lm = policy.tokenizer, policy.lm
    lm.eval()
    torch.manual_seed(0)
    episodes = []
    for seed in seeds:
        for _ in range(args.group_size):
            env = make(ENV, **ENV_KWARGS)
            obs, _ = env.reset(seed=seed)
            episodes.append({"env": env, "messages": renderer._messages(obs), "done": False})
    generated = 0
    t0 = time.perf_counter()
    for _turn in range(args.turns):
        active = [e for e in episodes if not e["done"]]
        if not active:
            break
        texts = [tok.apply_chat_template(e["messages"], tokenize=False, add_generation_prompt=True) + renderer.prefix
                 for e in active]
        rows = [renderer.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), policy.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            attn[i, width - len(r):] = 1
        with torch.inference_mode(), precision(lm, args.dtype):
            out = lm.generate(input_ids=ids, attention_mask=attn, do_sample=True, temperature=args.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                              eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id)
        for e, row in zip(active, out[:, width:].tolist()):
            reply = row[: row.index(policy.eos_token_id) + 1] if policy.eos_token_id in row else row
            generated += len(reply)
            text = renderer.prefix + tok.decode(reply, skip_special_tokens=True)
            parsed = parse_reply(text, think=False, max_actions=1)
            obs, _r, terminated, truncated, *_ = act(e["env"], parsed.actions, parsed.ok)
            e["messages"] = e["messages"] + [{"role": "assistant", "content": text}, {"role": "user", "content": obs}]
            e["done"] = terminated or truncated
    return generated, time.perf_counter() - t0


def fastest(runs: list[tuple[int, float]]) -> tuple[int, float]:
    """The (tokens, seconds) run that took the least time."""
    return min(runs, key=lambda run: run[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2-135m-instruct"])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; the fastest counts")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="both sides: fp32, or bf16 autocast with bf16 weights (turnrl's engine.hf_dtype)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ratios = {}
    for name in args.models:
        policy = load_policy(name, seed=0)
        env = make(ENV, **ENV_KWARGS)
        renderer = ChatRenderer(policy.tokenizer, system_prompt=env.system_prompt(), response_prefix="<answer>")
        seeds = list(range(args.groups))
        warm_up = argparse.Namespace(**{**vars(args), "turns": 1})
        turnrl_rollout(policy, renderer, seeds[:1], warm_up)
        reprefill_rollout(policy, renderer, seeds[:1], warm_up)
        ours_runs, peer_runs = [], []
        for _ in range(args.repeats):  # interleaved; each side keeps its fastest run
            ours_runs.append(turnrl_rollout(policy, renderer, seeds, args))
            peer_runs.append(reprefill_rollout(policy, renderer, seeds, args))
        (ours_tokens, ours_s), (peer_tokens, peer_s) = fastest(ours_runs), fastest(peer_runs)
        ours, peer = ours_tokens / ours_s, peer_tokens / peer_s
        ratios[name] = ours / peer
        print(f"{name}: {len(seeds) * args.group_size} episodes x {args.turns} turns, {args.threads} threads, "
              f"{args.dtype} | "
              f"turnrl {ours_tokens} tokens in {ours_s:.1f} s = {ours:.1f} tok/s | "
              f"re-prefill (HF generate) {peer_tokens} tokens in {peer_s:.1f} s = {peer:.1f} tok/s | "
              f"ratio {ratios[name]:.2f} | all runs (s): turnrl {', '.join(f'{r[1]:.1f}' for r in ours_runs)}, "
              f"re-prefill {', '.join(f'{r[1]:.1f}' for r in peer_runs)}", flush=True)
    detail = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    print(f"ratio peer/turnrl (seconds per generated token): {min(ratios.values()):.2f}  ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
