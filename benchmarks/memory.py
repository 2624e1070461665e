"""Peak memory of one RL iteration: SmolLM2-135M + LoRA (goal < 8 GiB) and the tiny model (goal < 1.5 GiB).

Each setting runs one RL iteration of a preset (no SFT, the smallest evaluation, no group filter so the
update always runs on the whole batch, every turn's prompt the whole history) in a fresh subprocess,
because the peak resident set size (ru_maxrss) is a per-process high-water mark. SmolLM2 runs with and
without gradient checkpointing (`--model.gradient-checkpointing`). Prints one JSON line per setting and
last the smallest goal / peak ratio (>= 1 means every setting is within its goal).

    make real-model
    python benchmarks/memory.py [--threads 2] [--skip-smollm2]
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

# (preset, gradient checkpointing, goal in GiB)
SETTINGS = {
    "tiny": ("quickstart-sokoban", False, 1.5),
    "smollm2": ("smollm2-frozenlake", False, 8.0),
    "smollm2-checkpointing": ("smollm2-frozenlake", True, 8.0),
}


def one_iteration(preset: str, checkpointing: bool, threads: int) -> dict:
    from turnrl.presets import get_preset
    from turnrl.train import train

    cfg = get_preset(preset)
    cfg.model.gradient_checkpointing = checkpointing
    cfg.sft.episodes, cfg.iterations, cfg.threads, cfg.progress = 0, 1, threads, False
    cfg.eval.episodes, cfg.eval.greedy = 1, False
    cfg.algo.filter, cfg.algo.drop_zero_std = "none", False  # every episode reaches the update, which must run
    # Every turn sees the whole history (the tiny presets show the newest grid alone since 2026-12-07): the longest
    # sequences a multi-turn update trains on, the row's load since it was first measured.
    cfg.rollout.context, cfg.rollout.context_window = "full", 2
    with tempfile.TemporaryDirectory() as out:
        cfg.out = out
        t0 = time.perf_counter()
        train(cfg, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        record = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    return {"preset": preset, "model": cfg.model.name, "gradient_checkpointing": checkpointing,
            "micro_batch_tokens": cfg.optim.micro_batch_tokens, "peak_rss_gib": round(peak, 3),
            "iteration_seconds": round(record["perf/iteration_seconds"], 1), "run_seconds": round(seconds, 1),
            "train_tokens": record.get("train/tokens")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-smollm2", action="store_true", help="tiny model only (no `make real-model` needed)")
    p.add_argument("--child", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        preset, checkpointing, _goal = SETTINGS[args.child]
        print(json.dumps(one_iteration(preset, checkpointing, args.threads)))
        return 0
    ratios = {}
    for name, (_preset, _ckpt, goal) in SETTINGS.items():
        if args.skip_smollm2 and name.startswith("smollm2"):
            continue
        out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--child", name],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: the child process failed (exit {out.returncode})")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["goal_gib"] = goal
        ratios[name] = goal / result["peak_rss_gib"]
        print(json.dumps(result), flush=True)
    detail = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    print(f"ratio goal/peak RSS (>= 1 meets the goal): {min(ratios.values()):.2f}  ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
