"""turnrl: multi-turn reinforcement learning for LLM agents.

    import turnrl
    cfg = turnrl.presets["quickstart"]()
    evals = turnrl.train(cfg)

Heavy modules (torch, transformers) are imported on first use, not at `import turnrl`.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# Intel MKL (torch's CPU BLAS) may pick kernels by the memory alignment of each tensor, so the same float32
# matmul can round differently from one call to the next; a resumed run then differs from an uninterrupted one
# in the last bits (measured on an AMD EPYC VM, 2026-12-04: tests/test_resume_exact.py failed without this and
# passed with it). MKL's own switch (Conditional Numerical Reproducibility) makes results independent of
# alignment while keeping the fastest instruction set. Set before MKL's first call; a user's setting wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

_LAZY = {
    "train": ("turnrl.train", "train"),
    "evaluate": ("turnrl.evaluate", "evaluate"),
    "load_policy": ("turnrl.models", "load_policy"),
    "TrainConfig": ("turnrl.config", "TrainConfig"),
    "presets": ("turnrl.config", "PRESETS"),
    "get_preset": ("turnrl.config", "get_preset"),
    "envs": ("turnrl.envs", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'turnrl' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


__all__ = list(_LAZY)
