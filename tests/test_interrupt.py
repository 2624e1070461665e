"""Ctrl-C keeps the last checkpoint and the metrics; --resume finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time

from turnrl.checkpoint import MetricsLog

SMALL = ["--model.tiny-hidden", "32", "--model.tiny-layers", "1", "--model.tiny-heads", "2", "--model.tiny-ff", "64",
         "--rollout.n-groups", "2", "--rollout.group-size", "2", "--rollout.max-turns", "2",
         "--rollout.max-new-tokens", "6", "--sft.episodes", "0", "--eval.episodes", "2", "--eval.k", "1",
         "--eval.no-greedy", "--save-every", "1000", "--no-progress", "--threads", "1"]


def test_sigint_saves_checkpoint_and_resume_completes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "turnrl.cli", "train", "--preset", "quickstart", "--out", str(out),
           "--iterations", "100000"] + SMALL
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or len(MetricsLog(metrics).read()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "saved checkpoint" in err or "saved checkpoint" in _
    done = len(MetricsLog(metrics).read())
    state = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("state.json").read_text())
    # every logged iteration is in the checkpoint (nothing finished is lost)
    assert state["iteration"] >= done - 1 and state["iteration"] <= done
    resumed = subprocess.run([sys.executable, "-m", "turnrl.cli", "train", "--resume", str(out),
                              "--iterations", str(state["iteration"] + 2)], capture_output=True, text=True,
                             timeout=300, env={**os.environ})
    assert resumed.returncode == 0, resumed.stderr
    records = MetricsLog(metrics).read()
    assert [r["iteration"] for r in records] == list(range(state["iteration"] + 2))
    assert "after_rl" in json.loads((out / "eval.json").read_text())
