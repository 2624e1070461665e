"""The sampler/trainer gap of a real model on a CPU, and what each `algo.mismatch_correction` does with it.

SmolLM2-135M-Instruct + LoRA (`smollm2-frozenlake`) sampling with the bf16 HF engine (`engine.hf_dtype=bfloat16`)
and updating under bf16 autocast, a few iterations per mode from the same seed (so the first rollout is the same
in every run). Prints, per mode, the mean over iterations of the logged gap and correction metrics and of the
update's wall time (docs/algorithms.md, "Train/inference mismatch correction").

    python scripts/mismatch_correction.py [--iterations 3] [--out runs/mismatch] [--modes off tis geo-mask:0.98:1.02]

A mode is `off`, `tis`, `icepop` or `geo-mask`, optionally with its band as `:low:high` (tis: `:high`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from turnrl.config import EngineConfig
from turnrl.presets import get_preset
from turnrl.train import train

MODES = ("off", "tis", "icepop", "geo-mask", "geo-mask:0.98:1.02")
KEYS = ("actor/logprob_mismatch", "mismatch/ratio_min", "mismatch/ratio_max", "mismatch/k3_kl",
        "mismatch/affected_frac", "actor/clip_frac", "perf/update_seconds")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--out", default="runs/mismatch")
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    args = ap.parse_args()
    rows = {}
    for spec in args.modes:
        mode, *bounds = spec.split(":")
        cfg = get_preset("smollm2-frozenlake")
        cfg.engine = EngineConfig(hf_dtype="bfloat16")
        cfg.algo = dataclasses.replace(cfg.algo, mismatch_correction=mode,
                                       mismatch_low=float(bounds[0]) if len(bounds) == 2 else None,
                                       mismatch_high=float(bounds[-1]) if bounds else None)
        cfg.sft.episodes = 0  # the untrained policy: its replies are what the gap is measured on
        cfg.eval.episodes, cfg.eval.greedy = 2, False
        cfg.iterations, cfg.out, cfg.progress = args.iterations, str(Path(args.out) / spec.replace(":", "_")), False
        train(cfg, log=lambda *_: None)
        records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        rows[spec] = {k: statistics.mean(r[k] for r in records if r.get(k) is not None)
                      for k in KEYS if any(r.get(k) is not None for r in records)}
        print(spec, json.dumps(rows[spec]), flush=True)
    print("| mode | " + " | ".join(KEYS) + " |")
    for mode, row in rows.items():
        print(f"| {mode} | " + " | ".join(f"{row[k]:.4g}" if k in row else "-" for k in KEYS) + " |")


if __name__ == "__main__":
    main()
