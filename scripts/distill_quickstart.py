"""On-policy distillation of the quickstart agent into a student, next to RL alone on that student.

The teacher is a finished quickstart run (tiny model, 128 hidden x 4 layers, 80 iterations; `make train` writes
runs/quickstart, or this script trains it when --teacher is missing). Each student is the quickstart recipe (same
SFT warm start, same seeds) for fewer iterations (`--iterations`), on the same model or a smaller one (`--hidden`
x `--layers`), trained with:

- `rl`: the quickstart's StarPO-S (GRPO + reward-std filter), the task reward alone;
- `rl+distill`: the same, plus the per-token reverse-KL advantage from the teacher (distill.coef 1);
- `distill`: the teacher's signal alone (distill.task_reward=false, algo.filter=none: every episode is used).

Prints each student's held-out success after SFT and after RL (sampled at T=1 and greedy), the teacher's, and the
mean `distill/reverse_kl` of the first and last 5 iterations (docs/algorithms.md, "On-policy distillation").

    python scripts/distill_quickstart.py [--teacher runs/quickstart] [--out runs/distill] [--iterations 30]
        [--hidden 128 --layers 4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from turnrl.checkpoint import is_run_dir
from turnrl.config import DistillConfig
from turnrl.presets import get_preset
from turnrl.train import train

MODES = ("rl", "rl+distill", "distill")


def student(mode: str, args) -> "object":
    cfg = get_preset("quickstart")
    cfg.model.tiny_hidden, cfg.model.tiny_layers, cfg.model.tiny_ff = args.hidden, args.layers, 4 * args.hidden
    cfg.iterations, cfg.out, cfg.progress = args.iterations, str(Path(args.out) / mode), False
    if mode != "rl":
        cfg.distill = DistillConfig(teacher=args.teacher, task_reward=mode == "rl+distill")
    if mode == "distill":
        cfg.algo.filter = "none"
    cfg.__post_init__()
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="runs/quickstart")
    ap.add_argument("--out", default="runs/distill")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = ap.parse_args()
    if not is_run_dir(Path(args.teacher)):
        print(f"training the teacher (quickstart preset) in {args.teacher}")
        cfg = get_preset("quickstart")
        cfg.out, cfg.progress = args.teacher, False
        train(cfg, log=lambda *_: None)
    teacher = json.loads((Path(args.teacher) / "eval.json").read_text())["after_rl"]
    rows = []
    for mode in args.modes:
        cfg = student(mode, args)
        if Path(cfg.out).exists():
            raise SystemExit(f"{cfg.out} exists: remove it or pass another --out")
        train(cfg, log=print)
        evals = json.loads((Path(cfg.out) / "eval.json").read_text())
        records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
        kl = [r["distill/reverse_kl"] for r in records if r.get("distill/reverse_kl") is not None]
        seconds = sum(r["perf/iteration_seconds"] for r in records)
        rows.append((mode, evals["after_sft"], evals["after_rl"], kl, seconds))
    print(f"\nteacher {args.teacher}: success {teacher['success_rate']:.3f}, greedy {teacher['greedy_success_rate']:.3f}")
    print(f"students: tiny {args.hidden} hidden x {args.layers} layers, {args.iterations} iterations, "
          "held-out success (T=1 / greedy)")
    print(f"{'mode':<12} {'after SFT':>15} {'after RL':>15} {'reverse KL first 5 -> last 5':>30} {'RL seconds':>11}")
    for mode, sft, rl, kl, seconds in rows:
        trend = f"{sum(kl[:5]) / 5:.3f} -> {sum(kl[-5:]) / 5:.3f}" if len(kl) >= 5 else "-"
        print(f"{mode:<12} {sft['success_rate']:>7.3f} / {sft['greedy_success_rate']:.3f} "
              f"{rl['success_rate']:>7.3f} / {rl['greedy_success_rate']:.3f} {trend:>30} {seconds:>11.0f}")


if __name__ == "__main__":
    main()
