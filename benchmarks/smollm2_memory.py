"""Peak memory of one SmolLM2-135M LoRA training iteration (issue 7: it must stay under 8 GiB).

Runs one RL iteration of a SmolLM2 preset (no SFT, the smallest evaluation) in a fresh subprocess per
setting, because the peak resident set size (ru_maxrss) is a per-process high-water mark, and prints
the peak of each setting and their ratio (gradient checkpointing off / on).

    make real-model
    python benchmarks/smollm2_memory.py [--preset smollm2-frozenlake] [--threads 2]
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

LIMIT_GIB = 8.0


def one_iteration(preset: str, checkpointing: bool, threads: int) -> dict:
    from turnrl.config import get_preset
    from turnrl.train import train

    cfg = get_preset(preset)
    cfg.model.gradient_checkpointing = checkpointing
    cfg.sft.episodes, cfg.iterations, cfg.threads, cfg.progress = 0, 1, threads, False
    cfg.eval.episodes, cfg.eval.greedy = 1, False
    with tempfile.TemporaryDirectory() as out:
        cfg.out = out
        t0 = time.perf_counter()
        train(cfg, log=lambda *_: None)
        seconds = time.perf_counter() - t0
        record = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    return {"preset": preset, "gradient_checkpointing": checkpointing, "peak_rss_gib": round(peak, 2),
            "iteration_seconds": round(record["perf/iteration_seconds"], 1), "run_seconds": round(seconds, 1),
            "train_tokens": record.get("train/tokens")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="smollm2-bandit")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_iteration(args.preset, args.child == "on", args.threads)))
        return 0
    results = []
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--threads", str(args.threads),
                              "--child", setting], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]))
    off, on = results
    print(f"peak RSS: {off['peak_rss_gib']:.2f} GiB without gradient checkpointing, {on['peak_rss_gib']:.2f} GiB "
          f"with; ratio off/on {off['peak_rss_gib'] / on['peak_rss_gib']:.2f}; limit {LIMIT_GIB} GiB: "
          f"{'OK' if max(off['peak_rss_gib'], on['peak_rss_gib']) < LIMIT_GIB else 'EXCEEDED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
