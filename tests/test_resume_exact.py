"""Exact resume after SIGKILL, and run-to-run determinism (docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import tiny_config, weights
from turnrl.checkpoint import MetricsLog, list_checkpoints
from turnrl.config import AlgoConfig
from turnrl.train import train

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMING_PREFIXES = ("perf/", "time/")


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in records]


def small_config(out, **algo):
    cfg = tiny_config(out, iterations=4, threads=1)
    cfg.save_every = 2
    cfg.keep_checkpoints = 2
    # enough SFT for valid replies half the time, so returns vary and every update has a signal
    cfg.sft.episodes, cfg.sft.steps, cfg.sft.lr = 64, 30, 1e-2
    cfg.optim.lr = 1e-4
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 2, 1, False
    if algo:
        cfg.algo = AlgoConfig(**algo)
    return cfg


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}


def kill_during_update(cfg, cfg_file: Path, kill_at_update: int) -> None:
    """Runs `cfg` in a child process that SIGKILLs itself at its `kill_at_update`-th update (tests/crash_driver.py)."""
    cfg_file.write_text(cfg.to_json())
    proc = subprocess.run([sys.executable, str(HERE / "crash_driver.py"), str(cfg_file), str(kill_at_update)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def resume_to_the_end(out: str) -> None:
    resumed = subprocess.run([sys.executable, "-m", "turnrl.cli", "train", "--resume", out], env=child_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr


def assert_same_run(straight, killed) -> list[dict]:
    """Same iterations, same non-timing metrics and same final weights; returns the straight run's metrics."""
    a = MetricsLog(Path(straight.out) / "metrics.jsonl").read()
    b = MetricsLog(Path(killed.out) / "metrics.jsonl").read()
    assert [r["iteration"] for r in b] == list(range(straight.iterations))
    assert without_timing(a) == without_timing(b)
    samples = [MetricsLog(Path(run.out) / "samples.jsonl").read() for run in (straight, killed)]
    assert samples[0] == samples[1] and len(samples[0]) == straight.iterations  # same episodes, none twice
    wa, wb = weights(Path(straight.out) / "final"), weights(Path(killed.out) / "final")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    return a


@pytest.mark.parametrize("algo", [
    {},  # GRPO + StarPO-S std filter
    # value head, KL to a frozen reference, DAPO dynamic sampling with extra seed rounds, two epochs x 2 mini-batches
    dict(estimator="gae", filter="dynamic", kl_coef=0.05, epochs=2, minibatches=2),
], ids=["grpo-std", "gae-kl-dynamic"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, algo):
    straight = small_config(tmp_path / "straight", **algo)
    train(straight, log=lambda *_: None)

    killed = small_config(tmp_path / "killed", **algo)
    # killed in the middle of iteration 2 (after its update, before its metrics line), one iteration past ckpt-000002
    kill_during_update(killed, tmp_path / "killed.json", 3)
    assert [p.name for p in list_checkpoints(killed.out)][-1] == "ckpt-000002"
    assert not (Path(killed.out) / "final").exists()

    resume_to_the_end(killed.out)
    a = assert_same_run(straight, killed)
    # the iterations after the kill really learned something (not a vacuous comparison of skipped updates)
    assert all(r["train/skipped_update"] == 0 and r["train/adv_abs_mean"] > 0 for r in a[2:])
    if algo:
        assert all(r["loss/kl"] is not None for r in a[2:])
        va = torch.load(Path(straight.out) / "final" / "value_head.pt")
        vb = torch.load(Path(killed.out) / "final" / "value_head.pt")
        assert all(torch.equal(va[k], vb[k]) for k in va)
    ea = json.loads((Path(straight.out) / "eval.json").read_text())
    eb = json.loads((Path(killed.out) / "eval.json").read_text())
    assert ea == eb


def test_same_seed_same_config_same_metrics(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = small_config(tmp_path / name)
        cfg.iterations = 3
        train(cfg, log=lambda *_: None)
        runs.append(MetricsLog(Path(cfg.out) / "metrics.jsonl").read())
    assert len(runs[0]) == 3
    assert without_timing(runs[0]) == without_timing(runs[1])
    # the timing keys really are the only ones left out
    assert {k for r in runs[0] for k in r if k.startswith(TIMING_PREFIXES)} == {
        "perf/rollout_seconds", "perf/env_seconds", "perf/update_seconds", "perf/iteration_seconds",
        "perf/gen_tokens_per_second", "perf/tokens_per_second", "time/elapsed_seconds"}
