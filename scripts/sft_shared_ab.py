"""Interleaved A/B of SFT steps with and without the shared prompt head (optim.shared_prefix), on a preset's own
demonstrations: prints seconds per step and the losses of each arm, twice. docs/performance.md.

    .venv/bin/python scripts/sft_shared_ab.py smollm2-bandit [--steps 4] [--threads 2]
"""
import argparse
import time

import torch

from turnrl.config import SFT_SEED_BASE
from turnrl.envs import make
from turnrl.evaluate import renderer_for, settings_for
from turnrl.presets import get_preset
from turnrl.sft import make_demonstrations, sft
from turnrl.prepare import build_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = get_preset(args.preset)
    torch.set_num_threads(args.threads)
    demos = None
    for _rep in range(2):
        for shared in (True, False):
            policy = build_policy(cfg)
            if demos is None:
                seeds = [SFT_SEED_BASE + i for i in range(cfg.sft.episodes)]
                demos = make_demonstrations(lambda: make(cfg.env.name, **cfg.env.kwargs), renderer_for(policy, cfg),
                                            seeds, settings_for(cfg), cfg.sft.epsilon, seed=0)
            start = time.perf_counter()
            losses = sft(policy, demos, steps=args.steps, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr,
                         micro_batch_tokens=cfg.optim.micro_batch_tokens, bf16=cfg.sft.bf16, shared_prefix=shared)
            seconds = (time.perf_counter() - start) / args.steps
            print(f"shared_prefix={shared}: {seconds:.2f} s/step, losses {[round(x, 4) for x in losses]}", flush=True)


if __name__ == "__main__":
    main()
