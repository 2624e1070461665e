"""Runs `train(cfg)` in a child process and kills it with SIGKILL in the middle of an iteration.

Usage: python crash_driver.py CONFIG_JSON KILL_AT_UPDATE
The process sends itself SIGKILL right after the update phase of the KILL_AT_UPDATE-th (1-based) RL
iteration, when the weights in memory have moved past the last checkpoint, after writing a torn half line to
metrics.jsonl and samples.jsonl
(what a crash in the middle of an append leaves behind).
"""

import json
import os
import signal
import sys
from pathlib import Path

import turnrl.train as train_module
from turnrl.config import TrainConfig


def main() -> None:
    cfg = TrainConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))
    kill_at = int(sys.argv[2])
    real = train_module.update_metrics
    calls = []

    def update_metrics(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == kill_at:
            for name in ("metrics.jsonl", "samples.jsonl"):
                with open(Path(cfg.out) / name, "a") as f:
                    f.write('{"iteration": 99, "rollout/succ')
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    train_module.update_metrics = update_metrics
    train_module.train(cfg, log=lambda *_: None)


if __name__ == "__main__":
    main()
