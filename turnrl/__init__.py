"""turnrl: multi-turn reinforcement learning for LLM agents.

    import turnrl
    cfg = turnrl.presets["quickstart"]()
    evals = turnrl.train(cfg)

Heavy modules (torch, transformers) are imported on first use, not at `import turnrl`.
"""

from __future__ import annotations

__version__ = "0.1.0"

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
