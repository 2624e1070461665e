"""Name -> environment factory registry, with `package.module:Class` escape hatch.

Configs refer to environments by name; a typo should fail loudly with a suggestion, and
users should be able to train their own env without editing turnrl (pass an import path).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from typing import Any, Callable

from .base import Env

ENVS: dict[str, Callable[..., Env]] = {}
# Names `make` resolves that cannot be built without arguments (`remote` needs its server's url), so they stay out
# of `list_envs()`, whose every env tests and tools build with its defaults.
ADAPTERS: dict[str, Callable[..., Env]] = {}


class UnknownEnvError(ValueError):
    """Raised when an environment name (or import path) cannot be resolved."""


def register(
    name: str,
    factory: type[Env] | Callable[..., Env],
    *,
    overwrite: bool = False,
    **default_kwargs: Any,
) -> None:
    """Register `factory` under `name`; `default_kwargs` are used unless `make` overrides them."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"environment name must be a non-empty str, got {name!r}")
    if ":" in name:
        # ':' is reserved for import paths, so a registered name could never be reached.
        raise ValueError(f"environment name {name!r} must not contain ':'")
    if not callable(factory):
        raise TypeError(f"factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in ENVS and not overwrite:
        raise ValueError(f"environment '{name}' is already registered; pass overwrite=True to replace it")
    _check_kwargs(name, factory, default_kwargs)
    ENVS[name] = functools.partial(factory, **default_kwargs) if default_kwargs else factory


def list_envs() -> list[str]:
    """Sorted registered names."""
    return sorted(ENVS)


def make(name: str, **kwargs: Any) -> Env:
    """Instantiate a registered env (kwargs override registered defaults) or `pkg.mod:Class`."""
    factory = _resolve(name)
    _check_kwargs(name, factory, kwargs)
    return factory(**kwargs)


def env_summary(name: str) -> str:
    """First line of the environment class docstring ('' if it has none)."""
    target: Any = _resolve(name)
    while isinstance(target, functools.partial):
        target = target.func
    doc = inspect.getdoc(target) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def render_docs() -> str:
    """docs/envs.md, built from the docstrings of every registered env (a test keeps the file in sync).

    Regenerate with
    python -c "from turnrl.envs.registry import render_docs; print(render_docs(), end='')" > docs/envs.md
    """
    from .docs import render_envs_page

    return render_envs_page(ENVS)


# ---------------------------------------------------------------------- internals


def _resolve(name: str) -> Callable[..., Env]:
    if not isinstance(name, str):
        raise TypeError(f"environment name must be a str, got {type(name).__name__}")
    if name in ENVS:
        return ENVS[name]
    if name in ADAPTERS:
        return ADAPTERS[name]
    if ":" in name:
        return _import_factory(name)
    known = list_envs() + sorted(ADAPTERS)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UnknownEnvError(f"unknown environment '{name}'{hint} (known: {', '.join(known)})")


def _import_factory(path: str) -> Callable[..., Env]:
    module_name, _, attr_path = path.partition(":")
    if not module_name or not attr_path:
        raise UnknownEnvError(f"invalid environment path '{path}'; expected 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownEnvError(f"cannot import module '{module_name}' for environment '{path}': {exc}") from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise UnknownEnvError(f"module '{module_name}' has no attribute '{attr_path}' (environment '{path}')") from exc
    if not callable(target):
        raise UnknownEnvError(f"environment '{path}' is not a class or factory (got {type(target).__name__})")
    return target


def _check_kwargs(name: str, factory: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Turn an unknown keyword into a ValueError that lists what the env does accept.

    Checking the signature up front (instead of catching TypeError from the call) avoids
    masking genuine TypeErrors raised inside the constructor.
    """
    if not kwargs:
        return
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = [p.name for p in params if p.kind in named]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(
            f"environment '{name}' does not accept argument(s) {', '.join(repr(k) for k in unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
