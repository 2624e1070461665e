"""A training curve as text: one metric of a run's metrics.jsonl, averaged over windows of iterations,
printed as a Markdown table with a bar per window (for README and docs/results.md, no plotting library).

    .venv/bin/python scripts/curve.py runs/smollm2-bandit                       # rollout/success_rate, windows of 10
    .venv/bin/python scripts/curve.py runs/quickstart --key rollout/mean_reward --every 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def windows(records: list[dict], key: str, every: int) -> list[tuple[int, int, float, float]]:
    """(first iteration, last iteration, mean, end of window elapsed seconds) per window of `every` iterations."""
    rows = [r for r in records if key in r]
    out = []
    for start in range(0, len(rows), every):
        chunk = rows[start:start + every]
        out.append((chunk[0]["iteration"], chunk[-1]["iteration"], sum(r[key] for r in chunk) / len(chunk),
                    chunk[-1].get("time/elapsed_seconds", float("nan"))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a turnrl run directory (holding metrics.jsonl)")
    parser.add_argument("--key", default="rollout/success_rate", help="a metric of docs/metrics.md")
    parser.add_argument("--every", type=int, default=10, help="iterations per window")
    args = parser.parse_args(argv)
    path = args.run / "metrics.jsonl"
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    if args.every < 1:
        print("error: --every must be >= 1", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = windows(records, args.key, args.every)
    if not rows:
        print(f"error: no record of {path} has {args.key!r}", file=sys.stderr)
        return 2
    top = max(max(abs(m) for _, _, m, _ in rows), 1e-12)
    print(f"| iterations | {args.key} (mean) | minutes of RL | |")
    print("|---|---|---|---|")
    for first, last, mean, elapsed in rows:
        bar = "█" * round(20 * max(mean, 0.0) / top)
        print(f"| {first}–{last} | {mean:.3f} | {elapsed / 60:.1f} | `{bar}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
