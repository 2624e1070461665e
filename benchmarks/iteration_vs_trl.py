"""One RL iteration (generation + update) on single-turn bandit prompts: turnrl vs. TRL's GRPOTrainer on CPU.

Same model (the built-in tiny Llama, same seed), same prompts (the `bandit` env's first observation as a
user message), same group size, prompts per iteration, max new tokens, temperature, learning rate, fp32,
no KL term (no reference model), one optimizer step per iteration and no gradient checkpointing.
Each side runs in its own subprocess (peak RSS is a per-process high-water mark) for `--iterations`
iterations; the first is a warm-up and the mean of the others is reported.

- turnrl: `turnrl.train` (GRPO, no filter; generation with HFEngine, the update with the shared-prompt forward).
- TRL: `GRPOTrainer` (generation with Hugging Face `generate`, then its loss), timed from the start to the end
  of each optimizer step by a callback.

The last line is the ratio TRL seconds per iteration / turnrl seconds per iteration; the peak RSS of each
side is printed above it.

    pip install 'turnrl[bench]'
    python benchmarks/iteration_vs_trl.py [--groups 8] [--group-size 8] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

ENV = "bandit"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def run_turnrl(args) -> dict:
    from turnrl.config import AlgoConfig, EnvConfig, EvalConfig, ModelConfig, OptimConfig, RolloutConfig, SFTConfig, \
        TrainConfig
    from turnrl.train import train

    cfg = TrainConfig(
        model=ModelConfig(name="tiny"),
        env=EnvConfig(name=ENV, system_prompt=False),
        rollout=RolloutConfig(n_groups=args.groups, group_size=args.group_size, max_turns=1, max_actions_per_turn=1,
                              max_new_tokens=args.max_new_tokens, max_context_tokens=512, think=False,
                              temperature=1.0, gen_batch_size=args.groups * args.group_size),
        algo=AlgoConfig(estimator="grpo", filter="none", kl_coef=0.0, entropy_coef=0.0, epochs=1, minibatches=1),
        optim=OptimConfig(lr=args.lr, warmup_steps=0),
        sft=SFTConfig(episodes=0),
        eval=EvalConfig(episodes=1, k=1, greedy=False),
        iterations=args.iterations, threads=args.threads, progress=False, seed=0)
    with tempfile.TemporaryDirectory() as out:
        cfg.out = out
        train(cfg, log=lambda *_: None)
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    times = [r["perf/iteration_seconds"] for r in records[1:]]
    return {"side": "turnrl", "seconds_per_iteration": sum(times) / len(times), "peak_rss_mib": peak_rss_mib(),
            "rollout_seconds": sum(r["perf/rollout_seconds"] for r in records[1:]) / len(times),
            "update_seconds": sum(r["perf/update_seconds"] for r in records[1:]) / len(times),
            "tokens": records[-1].get("train/tokens")}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from turnrl.envs import make
    from turnrl.models import load_policy
    from turnrl.parsing import parse_reply
    from turnrl.rollout import act

    torch.set_num_threads(args.threads)
    policy = load_policy("tiny", seed=0)
    n_prompts = args.groups * args.iterations
    env = make(ENV)
    rows = [{"prompt": [{"role": "user", "content": env.reset(seed=s)[0]}], "seed": s} for s in range(n_prompts)]

    def reward(completions, seed, **_):
        out = []
        for completion, s in zip(completions, seed):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            e = make(ENV)
            e.reset(seed=s)
            parsed = parse_reply(text, think=False, max_actions=1)
            out.append(act(e, parsed.actions, parsed.ok)[1] + (0.0 if parsed.ok else -0.1))
        return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.groups * args.group_size,
            num_generations=args.group_size, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, num_iterations=1,
            max_steps=args.iterations, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, shuffle_dataset=False, seed=0)
        trainer = GRPOTrainer(model=policy.lm, processing_class=policy.tokenizer, reward_funcs=reward,
                              args=config, train_dataset=Dataset.from_list(rows), callbacks=[timer])
        trainer.train()
    times = timer.times[1:]
    return {"side": "trl", "seconds_per_iteration": sum(times) / len(times), "peak_rss_mib": peak_rss_mib()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=8, help="prompts per iteration")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--iterations", type=int, default=4, help="the first is a warm-up")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", choices=("turnrl", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps((run_turnrl if args.child == "turnrl" else run_trl)(args)))
        return 0
    results = {}
    for side in ("turnrl", "trl"):
        cmd = [sys.executable, __file__, "--child", side] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{side}: the child process failed (exit {out.returncode})")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[side]), flush=True)
    ours, peer = results["turnrl"], results["trl"]
    print(f"{args.groups} prompts x {args.group_size} samples, {args.max_new_tokens} new tokens, {args.threads} threads | "
          f"turnrl {ours['seconds_per_iteration']:.2f} s/iteration, peak {ours['peak_rss_mib']:.0f} MiB | "
          f"TRL GRPOTrainer {peer['seconds_per_iteration']:.2f} s/iteration, peak {peer['peak_rss_mib']:.0f} MiB | "
          f"memory turnrl/TRL {ours['peak_rss_mib'] / peer['peak_rss_mib']:.2f}")
    print(f"ratio peer/turnrl (seconds per iteration): {peer['seconds_per_iteration'] / ours['seconds_per_iteration']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
