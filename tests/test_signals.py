"""SIGTERM behaves like Ctrl-C (finish the iteration, checkpoint, exit); a second signal exits at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_interrupt import SMALL
from turnrl.checkpoint import MetricsLog, list_checkpoints
from turnrl.models import load_policy

ROOT = Path(__file__).resolve().parents[1]


def start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "turnrl.cli", "train", "--preset", "quickstart", "--out", str(out),
           "--iterations", "100000", *SMALL, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def wait_for_iterations(proc, metrics: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(MetricsLog(metrics).read()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach {n} iterations: {proc.poll()}")


def assert_run_dir_intact(out: Path) -> int:
    """Every listed checkpoint loads fully; returns the newest one's iteration."""
    ckpts = list_checkpoints(out)
    assert ckpts
    for ckpt in ckpts:
        state = json.loads((ckpt / "state.json").read_text())
        torch.load(ckpt / "trainer.pt", weights_only=False)
        load_policy(str(ckpt / "model"))
    MetricsLog(out / "metrics.jsonl").read()
    return state["iteration"]


def resume_and_finish(out: Path, iterations: int) -> None:
    proc = subprocess.run([sys.executable, "-m", "turnrl.cli", "train", "--resume", str(out),
                           "--iterations", str(iterations)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [r["iteration"] for r in MetricsLog(out / "metrics.jsonl").read()] == list(range(iterations))


def test_sigterm_finishes_the_iteration_checkpoints_and_exits(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    try:
        wait_for_iterations(proc, out / "metrics.jsonl", 2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "saved checkpoint at iteration" in stdout + stderr
    logged = len(MetricsLog(out / "metrics.jsonl").read())
    # the iteration that was running when the signal came was finished, logged and checkpointed
    assert assert_run_dir_intact(out) == logged
    resume_and_finish(out, logged + 1)


def test_second_signal_exits_at_once_without_corrupting_anything(tmp_path):
    out = tmp_path / "run"
    # bigger batches: an iteration lasts long enough for both signals to land inside it
    proc = start(out, "--rollout.n-groups", "8", "--rollout.max-new-tokens", "24")
    try:
        wait_for_iterations(proc, out / "metrics.jsonl", 1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    # 130: the second signal (SIGINT) stopped it; 143: the first one's checkpoint was done before it came;
    # -SIGINT: under load the second signal can land after the handlers were restored (interpreter teardown),
    # where Python's default handler ends the process by SIGINT: still at once, and nothing may be corrupted.
    assert proc.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT), stderr
    done = assert_run_dir_intact(out)
    assert len(MetricsLog(out / "metrics.jsonl").read()) >= done
    resume_and_finish(out, done + 1)


def test_signal_handlers_are_restored_after_training(tmp_path):
    from test_train import tiny_config
    from turnrl.train import train

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cfg = tiny_config(tmp_path / "run", iterations=1)
    cfg.sft.episodes = 0
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 1, 1, False
    train(cfg, log=lambda *_: None)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("where", ["model", "trainer", "prune"])
def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, where):
    import turnrl.checkpoint as ckpt_module
    from turnrl.checkpoint import remove_stale_temps, save_checkpoint

    policy = load_policy("tiny")
    gens = {"rollout": torch.Generator()}
    save_checkpoint(tmp_path, 1, policy, None, None, {"phase": "rl", "iteration": 1}, gens, keep=1)

    def killed(*_a, **_k):
        raise KeyboardInterrupt  # a signal arriving at this very point

    if where == "model":
        monkeypatch.setattr(policy, "save", killed)
    elif where == "trainer":
        monkeypatch.setattr(ckpt_module.torch, "save", killed)
    else:
        monkeypatch.setattr(ckpt_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, policy, None, None, {"phase": "rl", "iteration": 2}, gens, keep=1)
    monkeypatch.undo()
    expected = ["ckpt-000002"] if where == "prune" else ["ckpt-000001"]  # the new one was complete when pruning began
    assert [p.name for p in list_checkpoints(tmp_path)] == expected
    assert assert_run_dir_intact(tmp_path) == int(expected[0][-1])
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == expected


def test_a_signal_between_two_iterations_still_checkpoints_every_finished_one(tmp_path, monkeypatch):
    """SIGINT landing in the gap between two iterations (here: while the loop fetches the next one) is deferred like
    one inside an iteration: the run finishes an iteration, checkpoints it and stops, so every logged iteration is
    in the checkpoint (with per-iteration deferral it stopped at once, and the resume redid the logged iterations)."""
    import turnrl.train as train_module
    from test_train import tiny_config
    from turnrl.faults import Interrupted

    real_tqdm = train_module.tqdm

    def signalling_tqdm(iterable, **kwargs):
        bar = real_tqdm(iterable, **kwargs)

        class Bar:
            def __iter__(self):
                for i in bar:
                    if i == 2:  # iterations 0 and 1 are done and logged; none is checkpointed (save_every)
                        os.kill(os.getpid(), signal.SIGINT)
                    yield i

            def __getattr__(self, name):
                return getattr(bar, name)
        return Bar()

    monkeypatch.setattr(train_module, "tqdm", signalling_tqdm)
    cfg = tiny_config(tmp_path / "run", iterations=10)
    cfg.sft.episodes = 0
    cfg.save_every = 1000
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 1, 1, False
    with pytest.raises(Interrupted):
        train_module.train(cfg, log=lambda *_: None)
    logged = len(MetricsLog(tmp_path / "run" / "metrics.jsonl").read())
    assert logged == 3
    assert assert_run_dir_intact(tmp_path / "run") == logged
