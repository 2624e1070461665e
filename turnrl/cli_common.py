"""What every `turnrl` subcommand module shares: the usage error (exit status 2, one line) and JSON env arguments."""

from __future__ import annotations

import json


class UsageError(ValueError):
    pass


def env_kwargs(text: str, flag: str = "--kwargs") -> dict:
    """An env's constructor arguments given as a JSON object on the command line."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{flag} is not valid JSON: {err.msg}") from err
    if not isinstance(kwargs, dict):
        raise UsageError(f"{flag} must be a JSON object, e.g. '{{\"dim\": 8}}'")
    return kwargs


def made_env(name: str, kwargs: dict):
    """`turnrl.envs.make(name, **kwargs)`, with an unknown env or bad arguments as a one-line usage error."""
    from turnrl.envs import make

    try:
        return make(name, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
