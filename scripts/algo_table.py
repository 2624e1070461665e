"""Algorithm comparison on the quickstart Sokoban setting; writes docs/results.md.

    .venv/bin/python scripts/algo_table.py                        # 3 seeds x 5 algorithms (make results)
    .venv/bin/python scripts/algo_table.py --seeds 0 --iterations 2 --write /tmp/r.md   # smoke run

For each seed, one SFT warm start (preset `quickstart-sokoban`, RL iterations 0) is shared by every
algorithm of that seed, so all of them start from the same policy; then each algorithm trains
`--iterations` RL iterations from it through `turnrl.train` (the same code path as `turnrl train`) and
is evaluated on the held-out start states (seeds 0..127 x 4 samples at T=1, plus greedy).
Finished runs (an eval.json holding `after_rl`) are reused, so an interrupted table continues where it
stopped; an unfinished run is started again from its beginning.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import time
from pathlib import Path

from turnrl.presets import get_preset
from turnrl.train import train

# name -> AlgoConfig fields; everything else is the preset's (lr 1e-4, cosine, clip 0.2/0.28, no KL).
ALGOS: dict[str, dict] = {
    "StarPO (GRPO)": dict(estimator="grpo", filter="none"),
    "StarPO-S (GRPO + top-50% std filter)": dict(estimator="grpo", filter="std", filter_keep=0.5, drop_zero_std=True),
    "PPO (token-level GAE, value head)": dict(estimator="gae", filter="none"),
    "Turn-level GAE (ERA, value head)": dict(estimator="turn_gae", filter="none"),
    "GiGPO (episode + anchor-state groups)": dict(estimator="gigpo", filter="none"),
}


def _slug(name: str) -> str:
    return name.split(" (")[0].lower().replace(" ", "-").replace("(", "").replace(")", "")


def _finished(run_dir: Path, key: str) -> dict | None:
    path = run_dir / "eval.json"
    if path.exists():
        evals = json.loads(path.read_text())
        if key in evals:
            return evals
    return None


def _run(cfg, key: str, only_finished: bool = False) -> tuple[dict | None, float]:
    run_dir = Path(cfg.out)
    done = _finished(run_dir, key)
    if done is not None and (run_dir / "final").exists():
        wall = run_dir / "wall.json"
        return done, json.loads(wall.read_text())["seconds"] if wall.exists() else float("nan")
    if only_finished:
        return None, float("nan")
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    evals = train(cfg)
    seconds = time.perf_counter() - t0
    (run_dir / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return evals, seconds


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); 0 for a single value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def fmt(xs: list[float]) -> str:
    m, se = mean_se(xs)
    return f"{m:.3f} ± {se:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=None, help="RL iterations per run (default: the preset's)")
    ap.add_argument("--root", default="runs/algo-table", help="directory of the runs")
    ap.add_argument("--write", default="docs/results.md", help="markdown file to write the table to")
    ap.add_argument("--algos", nargs="*", default=None, help="subset of algorithm slugs (default: all)")
    ap.add_argument("--only-finished", action="store_true",
                    help="train nothing: write the table from the runs that have finished")
    args = ap.parse_args()

    base = get_preset("quickstart-sokoban")
    iterations = args.iterations if args.iterations is not None else base.iterations
    root = Path(args.root)
    algos = {n: a for n, a in ALGOS.items() if not args.algos or _slug(n) in args.algos}
    rows: dict[str, dict[str, list[float]]] = {n: {"s": [], "g": [], "t": []} for n in ["SFT start", *algos]}
    for seed in args.seeds:
        sft_cfg = dataclasses.replace(base, seed=seed, iterations=0, out=str(root / f"sft-seed{seed}"), progress=False)
        print(f"== seed {seed}: SFT warm start -> {sft_cfg.out}", flush=True)
        evals, _ = _run(sft_cfg, "after_rl", args.only_finished)
        if evals is None:
            continue
        rows["SFT start"]["s"].append(evals["after_sft"]["success_rate"])
        rows["SFT start"]["g"].append(evals["after_sft"]["greedy_success_rate"])
        start_model = str(root / f"sft-seed{seed}" / "final")
        for name, fields in algos.items():
            cfg = dataclasses.replace(
                base, seed=seed, iterations=iterations, out=str(root / f"{_slug(name)}-seed{seed}"), progress=False,
                model=dataclasses.replace(base.model, name=start_model),
                sft=dataclasses.replace(base.sft, episodes=0),
                algo=dataclasses.replace(base.algo, **{**_RESET, **fields}),
            )
            print(f"== seed {seed}: {name} -> {cfg.out}", flush=True)
            evals, seconds = _run(cfg, "after_rl", args.only_finished)
            if evals is None:
                continue
            rows[name]["s"].append(evals["after_rl"]["success_rate"])
            rows[name]["g"].append(evals["after_rl"]["greedy_success_rate"])
            rows[name]["t"].append(seconds)
            print(f"   after_rl success {rows[name]['s'][-1]:.3f}, greedy {rows[name]['g'][-1]:.3f} "
                  f"({seconds / 60:.1f} min)", flush=True)

    lines = [
        "## Algorithm comparison on the quickstart Sokoban setting (CPU)",
        "",
        f"Held-out success on Sokoban 6×6 / 1 box (at most 10 actions), start states 0–127, after "
        f"{iterations} RL iterations of {base.rollout.n_groups} groups × {base.rollout.group_size} episodes "
        f"from a shared SFT warm start "
        f"(preset `quickstart-sokoban`: ~1M-parameter tiny model, no system prompt, one action per turn, "
        f"{'the newest grid alone in each prompt' if base.rollout.context == 'window' and not base.rollout.context_window else 'context ' + base.rollout.context}, "
        f"{base.sft.steps} SFT steps, lr 1e-4 cosine, clip 0.2/0.28, no KL). Mean ± standard error over the runs finished for seeds {', '.join(map(str, args.seeds))} "
        "(the `seeds` column; ± 0.000 with a single seed means no spread measured) "
        "(each seed has its own SFT start, model init and rollout seeds). `success` samples "
        f"{base.eval.k} episodes per "
        "start state at T=1; `greedy` is one episode at temperature 0.",
        "",
        "| algorithm | seeds | success (T=1) | greedy success | minutes per run |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        if not r["s"]:
            lines.append(f"| {name} | 0 | not run yet | | |")
            continue
        minutes = fmt([t / 60 for t in r["t"]]) if r["t"] else "–"
        lines.append(f"| {name} | {len(r['s'])} | {fmt(r['s'])} | {fmt(r['g'])} | {minutes} |")
    lines += [
        "",
        f"Reproduce: `make results` (= `.venv/bin/python scripts/algo_table.py`); runs land in `{root}/`. "
        f"Machine: {platform.processor() or platform.machine()}, {_cpus()} CPU cores, no GPU, torch CPU. "
        "Minutes include each run's held-out evaluations and vary with machine load.",
        "",
    ]
    out = Path(args.write)
    preamble, extra = _keep_other_sections(out)
    out.write_text(preamble + "\n".join(lines) + extra)
    print("\n".join(lines))


# Algorithm fields not listed for a row fall back to AlgoConfig defaults that fit every estimator.
_RESET = dict(filter_keep=0.25, drop_zero_std=False)


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _keep_other_sections(path: Path) -> tuple[str, str]:
    """Keeps what this script does not write: the file's preamble (title and intro) and its other sections."""
    if not path.exists():
        return "# Results\n\n", ""
    text = path.read_text()
    marker = "\n## "
    parts = text.split(marker)
    kept = [p for p in parts[1:] if not p.startswith("Algorithm comparison")]
    return parts[0].rstrip("\n") + "\n\n", "".join(marker + p for p in kept)


if __name__ == "__main__":
    main()
