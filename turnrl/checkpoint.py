"""Atomic checkpoints and the run directory's append-only metrics log.

A checkpoint is written into a temporary directory and renamed into place, so a crash while saving
leaves the previous checkpoint intact; only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

CKPT_PREFIX = "ckpt-"


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


def save_checkpoint(run_dir: Path, step: int, policy, optimizer, scheduler, state: dict,
                    generators: dict[str, torch.Generator], keep: int, ahead: tuple | None = None) -> Path:
    """Saves model, optimizer, scheduler, RNG states and `state` (phase, iteration) atomically; `ahead`: the next
    iteration's (seeds, trajectories), already played with earlier weights (distributed.overlap)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    # a save that cannot fit fails before writing anything (a full disk mid-save would fail anyway, later)
    check_free_space(root, int(1.1 * checkpoint_bytes(policy, optimizer=optimizer is not None)))
    final = root / f"{CKPT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CKPT_PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    policy.save(tmp / "model")
    # host copies: a checkpoint of a GPU run loads anywhere (optimizer.load_state_dict moves them to the params)
    torch.save({"optimizer": to_host(optimizer.state_dict()) if optimizer else None,
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": rng_state(generators)}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if ahead is not None:
        torch.save({"seeds": ahead[0], "trajectories": ahead[1]}, tmp / "ahead.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        # renamed out of the listing first, so a kill during the delete never leaves a half checkpoint listed
        doomed = old.with_name(f".tmp-delete-{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def save_model_atomic(policy, directory: Path) -> Path:
    """Writes `policy` to `directory` through a temporary sibling and a rename (never a half-written model)."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    policy.save(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def checkpoint_bytes(policy, *, optimizer: bool = True) -> int:
    """Estimated size of one checkpoint: the weights as stored (a LoRA policy stores only its trainable
    adapter and value head, not the base), plus AdamW's two moments per trainable parameter (fp32) when the
    optimizer is saved. Tokenizer and JSON files are small and covered by the margin the caller adds."""
    params = [p for p in policy.parameters() if p.requires_grad or not getattr(policy, "is_lora", False)]
    total = sum(p.numel() * p.element_size() for p in params)
    if optimizer:
        total += sum(2 * p.numel() * 4 for p in params if p.requires_grad)
    return total


def check_free_space(path: Path, needed: int) -> None:
    """Raises OSError (ENOSPC) when the file system holding `path` has less than `needed` bytes free."""
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{path} has {free / 1e6:.1f} MB free but a checkpoint needs about "
                                    f"{needed / 1e6:.1f} MB; free some space or choose another output directory")


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Deletes temporary directories a killed save left behind (they are never read); returns them."""
    run_dir = Path(run_dir)
    stale = [p for root in (run_dir, run_dir / "checkpoints") if root.is_dir()
             for p in root.iterdir() if p.name.startswith(".tmp-") and p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / "state.json").exists())


def load_ahead(ckpt: Path) -> tuple[list[int], list] | None:
    """The (seeds, trajectories) a checkpoint saved as played ahead (`save_checkpoint`'s `ahead`), or None."""
    path = Path(ckpt) / "ahead.pt"
    if not path.exists():
        return None
    saved = torch.load(path, weights_only=False)  # our own trajectories (frozen dataclasses), written above
    return saved["seeds"], saved["trajectories"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def is_run_dir(path: Path) -> bool:
    """A turnrl run directory: its config.json with a final model or checkpoints."""
    path = Path(path)
    return (path / "config.json").exists() and ((path / "final").is_dir() or (path / "checkpoints").is_dir())


def run_model_dir(run_dir: Path) -> Path | None:
    """A run's final model directory, else its newest checkpoint's model, else None."""
    final = Path(run_dir) / "final"
    if final.is_dir():
        return final
    ckpt = latest_checkpoint(run_dir)
    return None if ckpt is None else ckpt / "model"


def atomic_write_text(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file renamed into place: a reader (or a crash) never sees half
    a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def to_host(obj):
    """`obj` (dicts, lists, tuples of tensors and plain values) with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed and fsynced per record."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash: drop it
                break
        return records

    def truncate_to(self, records: list[dict]) -> None:
        """Rewrites the log with `records` (drops a torn tail or iterations after the resumed checkpoint)."""
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in records))

    def append(self, record: dict) -> None:
        """Appends one line. NaN/inf become null (strict JSON; actor/skipped_steps says why)."""
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
