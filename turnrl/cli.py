"""Command line: `turnrl train | eval | export | serve | play | envs`.

`turnrl train` builds its flags from the config dataclasses (tyro), so every field can be overridden,
e.g. `turnrl train --preset quickstart --algo.clip-high 0.3 --rollout.n-groups 8`.
Bad input exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from pathlib import Path

USAGE = """usage: turnrl <command> [options]

commands:
  train   train an agent:   turnrl train [--preset NAME] [--out DIR] [--iterations N] [--resume DIR] [field overrides]
  eval    evaluate a run or model:   turnrl eval RUN_DIR_OR_MODEL [--env NAME] [--episodes N] [--k K]
          or a served model:   turnrl eval [RUN_DIR] --engine openai --base-url URL [--model NAME] --env NAME
  serve   serve a run as an OpenAI-compatible chat endpoint:   turnrl serve RUN_DIR [--host H] [--port N]
  export  write a run's model as a plain Hugging Face directory (LoRA merged):   turnrl export RUN_DIR --merged OUT
  report  runs' evaluations, training curves and episodes as one HTML page:   turnrl report RUN_DIR [RUN_DIR ...]
  play    play an environment yourself in the terminal:   turnrl play ENV [--seed S]
  envs    list the registered environments
  demos   write an env's solver episodes as chat JSONL for SFT:   turnrl demos ENV --out FILE [--episodes N]
  env-server  serve an environment over HTTP for --env.name remote:   turnrl env-server ENV [--port N] [--kwargs JSON]

`turnrl <command> --help` shows the options of a command."""


from turnrl.cli_common import UsageError
from turnrl.cli_common import env_kwargs as _env_kwargs
from turnrl.cli_envs import cmd_demos, cmd_env_server, cmd_envs, cmd_play


def _fail(message: str) -> int:
    print(f"turnrl: error: {message}", file=sys.stderr)
    return 2


def cmd_train(argv: list[str]) -> int:
    import tyro

    from turnrl.config import TrainConfig
    from turnrl.presets import PRESETS, get_preset
    from turnrl.train import train

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--resume", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.resume:
        run_dir = Path(known.resume)
        if not (run_dir / "config.json").exists():
            raise UsageError(f"cannot resume {str(run_dir)!r}: no config.json there (not a turnrl run directory)")
        base = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        if known.preset:
            base = get_preset(known.preset)
        base.out = str(run_dir)
    else:
        base = get_preset(known.preset or "quickstart")
    if "--env.kwargs" in rest:  # `--env.kwargs K V ...` replaces the preset's dict (whose keys tyro would fix)
        base.env.kwargs = {}
    # A preset's window size (the grid presets' 0) goes with its window context: `--rollout.context full` alone
    # must not be refused for a window size it no longer uses. (Read here, not consumed: tyro parses `rest`.)
    context = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    context.add_argument("--rollout.context", dest="context")
    context.add_argument("--rollout.context-window", "--rollout.context_window", dest="window")
    try:
        named = context.parse_known_args(rest)[0]
    except argparse.ArgumentError:  # a flag without its value: tyro's one-line error says so below
        named = argparse.Namespace(context=None, window=None)
    if named.context not in (None, "window") and named.window is None:
        base.rollout.context_window = type(base.rollout).context_window
    description = (f"Train an agent. --preset NAME picks the starting config (known: {', '.join(PRESETS)}; "
                   "default quickstart); --resume DIR continues a run from its newest checkpoint.")
    cfg = _parse_config(TrainConfig, base, rest, description)
    if known.resume:
        cfg.out = str(Path(known.resume))
    evals = train(cfg, resume=bool(known.resume))
    _print_evals(evals, Path(cfg.out))
    return 0


def _parse_config(cls, base, args: list[str], description: str):
    """tyro parsing, with its multi-line error panels folded into one line (exit status 2)."""
    import io
    import re
    from contextlib import redirect_stderr, redirect_stdout

    import tyro

    captured = io.StringIO()
    try:
        with redirect_stderr(captured), redirect_stdout(captured):
            return tyro.cli(cls, default=base, args=args, prog="turnrl train", description=description)
    except SystemExit as exit_:
        text = captured.getvalue()
        if exit_.code in (0, None):  # --help
            print(text, end="")
            raise
        lines = [re.sub(r"[\u2500-\u257f│─╭╮╰╯]", " ", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("For full helptext")]
        message = re.sub(r"-{3,}", " ", " ".join(lines)).split("Argument helptext")[0]
        raise UsageError(" ".join(message.split()) or "invalid arguments") from None


def _print_evals(evals: dict, run_dir: Path) -> None:
    print(f"\nHeld-out evaluation ({run_dir / 'eval.json'}):")
    points = ("untrained", "after_sft", "after_rl")
    # "<point>@<env>": the same point on the training env (eval.train_env)
    names = [n for n in evals if n in points] + [n for n in evals if n.split("@")[0] in points and "@" in n]
    width = max([10] + [len(n) for n in names])
    print(f"  {'point':<{width}} {'success':>13} {'greedy':>13} {'return':>8} {'pass@k':>8}")
    for name in names:
        e = evals[name]
        success = _with_stderr(e["success_rate"], e.get("success_stderr"))
        greedy = _with_stderr(e.get("greedy_success_rate"), e.get("greedy_success_stderr"))
        print(f"  {name:<{width}} {success:>13} {greedy:>13} {e['mean_return']:>8.3f} {e['pass_at_k']:>8.3f}"
              f"   (T={e['temperature']}, {e['episodes']} seeds x {e['k']})")
    if "after_rl" in evals and "after_sft" in evals:
        from turnrl.evaluate import paired_stderr

        after, before = evals["after_rl"], evals["after_sft"]
        gain = after["success_rate"] - before["success_rate"]
        paired = paired_stderr(after.get("state_success") or [], before.get("state_success") or [])
        errors = [e.get("success_stderr") for e in (after, before)]
        if paired is not None:  # both evaluations played the same start states
            spread = f" ± {paired:.3f} (paired over the {len(after['state_success'])} start states)"
        else:  # an older eval.json: the error of independent measurements, which usually overstates it
            spread = "" if None in errors else f" ± {math.hypot(*errors):.3f}"
        print(f"  RL gain (after_rl - after_sft success): {gain:+.3f}{spread}")


def _with_stderr(rate: float | None, stderr: float | None) -> str:
    """A success rate and its standard error over start states ("0.863±0.021"; "-" when not measured)."""
    if rate is None:
        return "-"
    return f"{rate:.3f}" + ("" if stderr is None else f"±{stderr:.3f}")


def run_model(run_dir: Path):
    """(the run's config, its final model directory or else its newest checkpoint's model)."""
    from turnrl.checkpoint import run_model_dir
    from turnrl.config import TrainConfig

    cfg = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    model_dir = run_model_dir(run_dir)
    if model_dir is None:
        raise UsageError(f"run {str(run_dir)!r} has no final model and no checkpoint yet")
    return cfg, str(model_dir)


def cmd_export(argv: list[str]) -> int:
    from turnrl.checkpoint import is_run_dir
    from turnrl.models import export_merged
    from turnrl.prepare import build_policy

    p = argparse.ArgumentParser(prog="turnrl export", description="Write a run's final model (or newest checkpoint) "
                                "as an ordinary Hugging Face model directory, LoRA adapters merged into the weights, "
                                "loadable by plain transformers and by vLLM.")
    p.add_argument("run", help="a turnrl run directory")
    p.add_argument("--merged", required=True, metavar="OUT", help="output directory")
    args = p.parse_args(argv)
    run_dir, out = Path(args.run), Path(args.merged)
    if not is_run_dir(run_dir):
        raise UsageError(f"{str(run_dir)!r} is not a turnrl run directory (no config.json with final/ or checkpoints/)")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"output directory {str(out)!r} exists and is not empty")
    cfg, model_dir = run_model(run_dir)
    cfg.model.device = "cpu"  # merging and writing need no accelerator, wherever the run trained
    policy = build_policy(cfg, model_dir)
    export_merged(policy, out)
    kind = "LoRA adapters merged" if cfg.model.lora_rank else "full model"
    print(f"exported {model_dir} ({kind}) to {out}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    from turnrl.checkpoint import is_run_dir
    from turnrl.config import EngineConfig, EnvConfig, ModelConfig, TrainConfig
    from turnrl.evaluate import evaluate
    from turnrl.prepare import build_policy, check_env_config

    p = argparse.ArgumentParser(prog="turnrl eval", description="Evaluate a training run (its final model), a model, "
                                "or a model served by an OpenAI-compatible server (--engine openai) on held-out seeds.")
    p.add_argument("target", nargs="?", default=None,
                   help="a turnrl run directory or a model (directory or hub id); with --engine openai, optional: "
                        "a run directory whose env and rollout settings to use")
    p.add_argument("--env", default=None, help="environment (default: the run's evaluation env)")
    p.add_argument("--env-kwargs", default=None, metavar="JSON", help="the env's constructor arguments as a JSON "
                   "object (default: the run's env.kwargs), e.g. --env remote --env-kwargs '{\"url\": \"http://H:P\"}'")
    p.add_argument("--episodes", type=int, default=None, help="held-out start states (seeds 0..N-1)")
    p.add_argument("--k", type=int, default=None, help="samples per start state (pass@k)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--greedy", action=argparse.BooleanOptionalAction, default=None, help="also report greedy success")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (hf and vllm engines)")
    p.add_argument("--device", default=None, help="where the hf engine runs the model: cpu, cuda, cuda:N, auto "
                   "(default: the run's model.device, else cpu)")
    p.add_argument("--max-turns", type=int, default=None, help="model replies per episode")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens per reply")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="reply format <think>..</think><answer>..</answer> (--no-think: <answer>..</answer>)")
    p.add_argument("--env-threads", type=int, default=None,
                   help="env calls run concurrently in this many threads (envs that wait: web, sandbox); 0 = not")
    p.add_argument("--max-live-episodes", type=int, default=None,
                   help="episodes played at once (each holds a KV cache; bounds memory, not the draws); 0 = all")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--workers", type=int, default=0,
                   help="Ray rollout workers that play the episodes, the same ones (pip install 'turnrl[ray]'; "
                        "docs/distributed.md); 0 = this process")
    p.add_argument("--address", default="",
                   help="with --workers: the Ray cluster to run them on ('auto', 'host:6379'); default: a local Ray "
                        "instance started and stopped by the command")
    served = p.add_argument_group("served models (--engine openai; evaluation only: a chat server returns text, "
                                  "not the token ids training needs)")
    served.add_argument("--engine", choices=("hf", "vllm", "openai"), default=None,
                        help="hf: turnrl's decode loop; vllm: vLLM (pip install 'turnrl[vllm]'); openai: a served "
                             "model (default: the run's engine.name, else hf)")
    served.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000/v1")
    served.add_argument("--model", default=None, help="served model name (default: the only one the server lists)")
    served.add_argument("--api-key", default=None, help="default: $OPENAI_API_KEY, or none for local servers")
    served.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    served.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    served.add_argument("--retries", type=int, default=3, help="retries per request (connection errors, 429, 5xx)")
    args = p.parse_args(argv)

    target = Path(args.target) if args.target else None
    if target is not None and is_run_dir(target):
        cfg, model_name = run_model(target)
    elif args.engine == "openai" and target is not None:
        raise UsageError(f"with --engine openai the target must be a turnrl run directory (for its settings), "
                         f"got {args.target!r}; name the served model with --model")
    else:
        if args.env is None:
            raise UsageError("--env is required when evaluating a model rather than a run directory")
        if target is None and args.engine != "openai":
            raise UsageError("give a run directory or a model to evaluate (or --engine openai --base-url URL)")
        cfg = TrainConfig(model=ModelConfig(name=args.target or "served"), env=EnvConfig(name=args.env))
        model_name = None
    if args.env:
        cfg.env.name, cfg.env.eval_name = args.env, None
    if args.device is not None:
        cfg.model.device = args.device
    if args.env_kwargs is not None:
        cfg.env.kwargs = _env_kwargs(args.env_kwargs, "--env-kwargs")
    for field_, value in (("max_turns", args.max_turns), ("max_new_tokens", args.max_new_tokens), ("think", args.think),
                          ("max_live_episodes", args.max_live_episodes), ("env_threads", args.env_threads)):
        if value is not None:
            setattr(cfg.rollout, field_, value)
    cfg.rollout.__post_init__()
    if args.engine in ("hf", "vllm") and args.engine != cfg.engine.name:
        cfg.engine = EngineConfig(name=args.engine)
    check_env_config(cfg)
    if args.engine == "openai":
        if args.workers or args.address:
            raise UsageError("--workers plays episodes with the model's weights in Ray workers; with --engine openai "
                             "the server plays them: remove --workers and --address (the server decides its own parallelism)")
        result, served_model = _eval_served(cfg, args)
        payload = {"env": cfg.env.eval_name or cfg.env.name, "model": served_model, "engine": "openai",
                   "base_url": args.base_url, **result.to_dict()}
    else:
        policy = build_policy(cfg, model_name)
        with _eval_pool(cfg, args.workers, args.address, model_name, policy) as pool:
            result, _ = evaluate(policy, cfg, episodes=args.episodes, k=args.k, temperature=args.temperature,
                                 greedy=args.greedy, seed=args.seed, pool=pool,
                                 progress="eval" if sys.stderr.isatty() else None)
        payload = {"env": cfg.env.eval_name or cfg.env.name, "model": model_name or args.target, **result.to_dict()}
    for key in ("state_success", "greedy_state_success"):  # per-state lists pair a run's evaluations, not this one
        payload.pop(key, None)
    print(json.dumps(payload, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2))
    return 0


@contextlib.contextmanager
def _eval_pool(cfg, workers: int, address: str, model_name: str | None, policy):
    """Ray rollout workers holding `policy` for `turnrl eval --workers N [--address A]` (None for 0), closed
    afterwards."""
    from turnrl.config import DistributedConfig
    from turnrl.prepare import check_engine

    if workers < 0:
        raise UsageError(f"--workers must be >= 0, got {workers}")
    if workers == 0:
        if address:
            raise UsageError("--address names the Ray cluster for --workers: add --workers N or remove it")
        yield None
        return
    cfg = dataclasses.replace(cfg, distributed=DistributedConfig(workers=workers, address=address))  # validated
    check_engine(cfg)
    from turnrl.distributed import RolloutPool

    pool = RolloutPool(cfg, model_name)
    try:
        pool.sync(policy.lm)
        yield pool
    finally:
        pool.close()


def _eval_served(cfg, args):
    from turnrl.engines.openai import OpenAIEngine
    from turnrl.served import evaluate_served

    if not args.base_url:
        raise UsageError("--engine openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    if args.concurrency < 1 or args.timeout <= 0 or args.retries < 0:
        raise UsageError("--concurrency must be >= 1, --timeout > 0 and --retries >= 0")
    engine = OpenAIEngine(args.base_url, args.model, api_key=args.api_key, timeout=args.timeout,
                          max_retries=args.retries, concurrency=args.concurrency)
    result, _ = evaluate_served(engine, cfg, episodes=args.episodes, k=args.k, temperature=args.temperature,
                                greedy=args.greedy)
    return result, engine.model


def cmd_serve(argv: list[str]) -> int:
    from turnrl.checkpoint import is_run_dir
    from turnrl.serve import AgentServer
    from turnrl.prepare import build_policy

    p = argparse.ArgumentParser(prog="turnrl serve", description="Serve a run's final model (or newest checkpoint) "
                                "as an OpenAI-compatible chat-completions endpoint (/v1/chat/completions, /v1/models). "
                                "Replies start with the response prefix the agent was trained with.")
    p.add_argument("run", help="a turnrl run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    p.add_argument("--model-name", default=None, help="model name clients use (default: the run directory's name)")
    p.add_argument("--max-batch", type=int, default=32, help="requests generated together at most")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="where the model runs: cpu, cuda, cuda:N, auto (default: the run's "
                   "model.device)")
    args = p.parse_args(argv)
    run_dir = Path(args.run)
    if not is_run_dir(run_dir):
        raise UsageError(f"{str(run_dir)!r} is not a turnrl run directory (no config.json with final/ or checkpoints/)")
    if args.max_batch < 1 or not 0 <= args.port < 65536:
        raise UsageError("--max-batch must be >= 1 and --port in [0, 65535]")
    cfg, model_dir = run_model(run_dir)
    if args.device is not None:
        cfg.model.device = args.device
    policy = build_policy(cfg, model_dir)
    try:
        server = AgentServer(policy, model_name=args.model_name or run_dir.resolve().name,
                             response_prefix="<think>" if cfg.rollout.think else "<answer>", host=args.host,
                             port=args.port, max_batch=args.max_batch,
                             default_max_tokens=cfg.rollout.max_new_tokens, seed=args.seed)
    except OSError as err:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {err.strerror}") from err
    print(f"turnrl: serving {model_dir} as {server.model_name!r} on {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()
    return 0


def cmd_report(argv: list[str]) -> int:
    from turnrl.report import ReportError, write_report

    p = argparse.ArgumentParser(prog="turnrl report", description="Write a run's held-out evaluations, training "
                                "curves (metrics.jsonl), sample episodes and config as one self-contained HTML page; "
                                "several runs go on one page with their curves overlaid. Needs matplotlib: "
                                "pip install 'turnrl[report]'.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="turnrl run directories (also while they train)")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/report.html; required for several runs)")
    p.add_argument("--keys", nargs="+", default=None, metavar="KEY",
                   help="more metric keys to plot, one panel each; shell patterns work, e.g. 'perf/*' 'train/*'")
    args = p.parse_args(argv)
    try:
        out, panels = write_report([Path(r) for r in args.runs], Path(args.out) if args.out else None, args.keys)
    except ReportError as err:
        raise UsageError(str(err)) from err
    print(f"wrote {out} ({len(panels)} panels)")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "serve": cmd_serve, "report": cmd_report,
            "play": cmd_play, "envs": cmd_envs, "env-server": cmd_env_server,
            "demos": cmd_demos}


def main(argv: list[str] | None = None) -> int:
    """The `turnrl` command. Without `argv` (the console script, `python -m turnrl.cli`) it owns the process;
    a Python caller passes `argv` and gets its signal handlers back unchanged, also after an interrupt."""
    owns_process = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        return _fail(f"unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else "") +
                     f" (commands: {', '.join(COMMANDS)})")
    from turnrl.config import ConfigError
    from turnrl.engines.openai import ServerError
    from turnrl.engines.vllm import VLLMUnavailable
    from turnrl.faults import EnvFailureError, Interrupted, WorkerLostError
    from turnrl.models import ModelLoadError

    try:
        return COMMANDS[command](rest)
    except (ConfigError, ModelLoadError, UsageError, ServerError, VLLMUnavailable) as err:
        return _fail(str(err))
    except ValueError as err:  # unknown env names and bad env arguments from the registry
        from turnrl.envs import UnknownEnvError
        if isinstance(err, UnknownEnvError) or "environment" in str(err):
            return _fail(str(err))
        raise
    except (EnvFailureError, FloatingPointError, WorkerLostError) as err:  # the run stopped; last checkpoint intact
        print(f"turnrl: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # SIGINT, or SIGTERM during training (turnrl.faults.Interrupted)
        import signal

        # Already stopping: a further SIGINT/SIGTERM must not kill the exit path (uncaught, it would end
        # the process by the signal instead of our exit code).
        import threading

        if owns_process and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)
        print("\nturnrl: interrupted", file=sys.stderr)
        return err.exit_code if isinstance(err, Interrupted) else 130
    except SystemExit as exit_:  # --help of a subcommand
        return exit_.code if isinstance(exit_.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
