"""The environment commands of `turnrl` (turnrl.cli): `envs`, `play`, `demos` and `env-server`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from turnrl.cli_common import UsageError, made_env
from turnrl.cli_common import env_kwargs as _env_kwargs


def cmd_env_server(argv: list[str]) -> int:
    from turnrl.env_server import EnvServer

    p = argparse.ArgumentParser(prog="turnrl env-server", description="Serve an environment over HTTP for "
                                "`--env.name remote --env.kwargs url http://HOST:PORT` (docs/envs.md, 'Remote "
                                "environments'). Each client env gets its own instance.")
    p.add_argument("env", help="an env name (turnrl envs) or mypkg.module:EnvClass")
    p.add_argument("--kwargs", default="{}", help="the env's constructor arguments as a JSON object")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; no auth, no TLS)")
    p.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    args = p.parse_args(argv)
    kwargs = _env_kwargs(args.kwargs)
    if not 0 <= args.port < 65536:
        raise UsageError("--port must be in [0, 65535]")
    made_env(args.env, kwargs).close()  # a bad name or argument fails now, not at a client's first /open
    try:
        server = EnvServer(args.env, kwargs, host=args.host, port=args.port)
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from err
    print(f"turnrl: serving env {args.env!r} on {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: not an error
        print("turnrl: env server stopped", file=sys.stderr)
    finally:
        server.close()
    return 0


def cmd_demos(argv: list[str]) -> int:
    from turnrl.config import SFT_SEED_BASE
    from turnrl.demos import demo_records, write_demos

    p = argparse.ArgumentParser(prog="turnrl demos", description="Write the env's solver episodes as chat "
                                "conversations (JSONL, one {\"messages\": [...]} per episode) for SFT with any tool.")
    p.add_argument("env", help="an env name (turnrl envs) or mypkg.module:EnvClass")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--kwargs", default="{}", help="env constructor arguments as JSON")
    p.add_argument("--first-seed", type=int, default=SFT_SEED_BASE, help="seed of the first episode (default: "
                   "turnrl's SFT range, disjoint from its held-out evaluation seeds)")
    p.add_argument("--max-turns", type=int, default=10)
    p.add_argument("--actions-per-turn", type=int, default=1, help="expert actions per reply ('A || B')")
    p.add_argument("--think", action="store_true", help="replies start with an empty <think></think>")
    p.add_argument("--epsilon", type=float, default=0.0, help="probability of a random action instead of the expert's")
    p.add_argument("--no-system-prompt", action="store_true", help="start at the first observation (no system message)")
    args = p.parse_args(argv)
    if args.episodes < 1 or args.max_turns < 1 or args.actions_per_turn < 1 or not 0 <= args.epsilon <= 1:
        raise UsageError("--episodes, --max-turns and --actions-per-turn must be >= 1 and --epsilon in [0, 1]")
    if not Path(args.out).resolve().parent.is_dir():
        raise UsageError(f"--out {args.out!r}: its directory does not exist")
    from turnrl.envs import has_solver

    kwargs = _env_kwargs(args.kwargs)
    env = made_env(args.env, kwargs)
    try:
        solved = has_solver(env)
    finally:
        env.close()
    if not solved:
        raise UsageError(f"env {args.env!r} has no solver (its expert_action raises NotImplementedError): it has no "
                         "demonstrations to write")
    records = demo_records(args.env, args.episodes, env_kwargs=kwargs, first_seed=args.first_seed,
                           max_turns=args.max_turns, max_actions_per_turn=args.actions_per_turn, think=args.think,
                           epsilon=args.epsilon, system_prompt=not args.no_system_prompt)
    stats = write_demos(Path(args.out), records)
    print(f"wrote {stats['episodes']} episodes of {args.env!r} to {args.out} (solved {stats['success_rate']:.3f}, "
          f"{stats['mean_turns']:.1f} turns on average)")
    return 0


def cmd_play(argv: list[str]) -> int:
    from turnrl.parsing import ACTION_SEP

    p = argparse.ArgumentParser(prog="turnrl play", description="Play an environment in the terminal. "
                                "Type an action (or several separated by '||'); Ctrl-D quits.")
    p.add_argument("env")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kwargs", default="{}", help="env constructor arguments as JSON")
    args = p.parse_args(argv)
    env = made_env(args.env, _env_kwargs(args.kwargs))
    print(env.system_prompt(), "\n")
    obs, _ = env.reset(seed=args.seed)
    total = 0.0
    while True:
        print(obs)
        choices = env.available_actions()
        hint = ("free text" if not choices else ", ".join(choices) if len(choices) <= 8
                else f"{len(choices)} actions, e.g. {choices[0]}")
        try:
            line = input(f"actions [{hint}]> ")
        except EOFError:
            print()
            break
        done = False
        actions = [line.strip()] if env.free_text else [a.strip() for a in line.split(ACTION_SEP) if a.strip()]
        for action in actions:
            obs, reward, terminated, truncated, info = env.step(action)
            total += reward
            print(f"reward {reward:+.2f}  (total {total:+.2f})")
            if terminated or truncated:
                print(obs)
                print(f"episode over: {'success' if info.get('success') else 'failure'}, return {total:+.2f}")
                done = True
                break
        if done:
            break
    env.close()
    return 0


def cmd_envs(argv: list[str]) -> int:
    from turnrl.envs import env_summary, list_envs

    argparse.ArgumentParser(prog="turnrl envs", description="List the registered environments.").parse_args(argv)
    names = list_envs()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {env_summary(name)}")
    print(f"\n{'remote':<{width}}  {env_summary('remote')} (--env.kwargs url http://HOST:PORT)")
    return 0
