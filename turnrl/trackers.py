"""Experiment trackers: a run's metrics mirrored to TensorBoard and/or Weights & Biases (`track.to`).

metrics.jsonl and eval.json stay the record (docs/metrics.md); a tracker gets a copy of every finite number in
them: each iteration's metrics at step = iteration, and each held-out evaluation point of eval.json as
`heldout/<point>/<key>` (TensorBoard: scalars of the run `heldout`, at step 0 before RL and `iterations` after
it; W&B: the run's summary); and samples.jsonl's episodes (TensorBoard: text `samples`; W&B: a table
`samples`). Both are optional extras (`pip install 'turnrl[track]'`), imported only when chosen, and a missing
one fails before any compute.

A resumed run continues the same tracker run: TensorBoard purges the iteration metrics from the resumed
iteration on (a crash may have logged iterations past the checkpoint, which are played again), and W&B reopens
the run whose id is kept in `<run>/wandb_id`, plotting against the `iteration` key so re-played iterations are
not dropped as out-of-order steps. A tracker that raises while logging (a full disk, a dead W&B service) is reported once and
turned off; training and metrics.jsonl go on.
"""
from __future__ import annotations

import importlib
import math
import secrets
from pathlib import Path

from turnrl.checkpoint import atomic_write_text
from turnrl.config import ConfigError, TrainConfig

def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record (nested dicts flattened with '/'); `iteration` is the step, not a
    metric. Booleans, strings and nulls are left out."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
              and not (prefix == "" and key == "iteration")):
            out[prefix + key] = float(value)
    return out


def _installed(tracker: str, module: str):
    """The tracker's module, imported now, or the ConfigError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"track.to includes {tracker!r}, which is not installed: pip install 'turnrl[track]' "
                          f"(or {tracker}) ({err})") from None


class _TensorBoard:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resumed_at: int | None):
        SummaryWriter = _installed("tensorboard", "torch.utils.tensorboard").SummaryWriter  # noqa: N806 - a class
        # Held-out points go to a run of their own (tensorboard/heldout), never purged: a resume measures again
        # only what it has not measured (after_rl), while it replays every iteration after its checkpoint.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resumed_at)
        self.heldout = SummaryWriter(log_dir=str(run_dir / "tensorboard" / "heldout"))
        if resumed_at is None:
            self.writer.add_text("config", "```\n" + cfg.to_json() + "\n```", 0)

    def log(self, values: dict[str, float], step: int, writer=None) -> None:
        writer = writer or self.writer
        for key, value in values.items():
            writer.add_scalar(key, value, step)
        writer.flush()

    def log_eval(self, values: dict[str, float], step: int) -> None:
        self.log(values, step, self.heldout)

    def log_samples(self, episodes: list[dict], step: int) -> None:
        self.writer.add_text("samples", "\n\n".join(_markdown(e) for e in episodes), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()
        self.heldout.close()


class _WandB:
    def __init__(self, cfg: TrainConfig, run_dir: Path, resumed_at: int | None):
        self.wandb = wandb = _installed("wandb", "wandb")
        id_file = run_dir / "wandb_id"
        resuming = resumed_at is not None and id_file.exists()
        run_id = id_file.read_text().strip() if resuming else secrets.token_hex(6)  # W&B ids: letters and digits
        atomic_write_text(id_file, run_id + "\n")
        try:
            self.run = wandb.init(project=cfg.track.project, name=cfg.track.name or run_dir.resolve().name,
                                  id=run_id, resume="allow", dir=str(run_dir), config=cfg.to_dict())
        except Exception as err:  # wandb raises its own error types (no API key, no network, bad project)
            raise ConfigError(f"wandb could not start a run ({type(err).__name__}: {str(err).strip()}); log in "
                              "with `wandb login`, or set WANDB_MODE=offline to keep the run in the run "
                              "directory and `wandb sync` it later") from None
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "iteration": step})

    def log_eval(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update(values)

    def log_samples(self, episodes: list[dict], step: int) -> None:
        table = self.wandb.Table(columns=["iteration", *SAMPLE_COLUMNS, "transcript"])
        for e in episodes:
            table.add_data(step, *(e[c] for c in SAMPLE_COLUMNS), _transcript_text(e))
        self.run.log({"samples": table, "iteration": step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _WandB}
SAMPLE_COLUMNS = ("seed", "group_id", "success", "reward", "turns", "end_reason")


def _transcript_text(episode: dict) -> str:
    """The transcript, each reply followed by its turn's reward and the advantage the update gave it (samples.jsonl's
    `turn_rewards` and `replies`; no advantage for episodes the filter dropped, or in evaluation samples)."""
    rewards, replies = episode.get("turn_rewards") or [], episode.get("replies") or []
    lines, turn = [], 0
    for role, text in episode["transcript"]:
        line = f"[{role}] {text}"
        if role == "assistant":
            notes = [f"reward {rewards[turn]:+.3f}"] if turn < len(rewards) else []
            advantage = replies[turn].get("advantage") if turn < len(replies) else None
            if advantage is not None:
                notes.append(f"advantage {advantage:+.3f}")
            line += f"  ({', '.join(notes)})" if notes else ""
            turn += 1
        lines.append(line)
    return "\n".join(lines)


def _markdown(episode: dict) -> str:
    """One samples.jsonl episode as TensorBoard markdown: a header line, then the transcript as a code block."""
    head = ", ".join(f"{c} {episode[c]}" for c in SAMPLE_COLUMNS)
    body = _transcript_text(episode).replace("```", "'''")
    return f"**{head}**\n\n```\n{body}\n```"


class Trackers:
    """The trackers of `cfg.track.to`, opened at once (a missing package or a refused W&B login is a
    ConfigError before any compute). `resumed_at`: the iteration a resumed run continues from, else None."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resumed_at: int | None, log=print):
        self.log_message = log
        self.samples_every, self.last_iteration = cfg.track.samples_every, cfg.iterations - 1
        self.active: dict[str, object] = {}
        try:
            for name in dict.fromkeys(cfg.track.to):
                self.active[name] = _BACKENDS[name](cfg, Path(run_dir), resumed_at)
        except BaseException:
            self.close(failed=True)
            raise

    def iteration(self, record: dict) -> None:
        """One metrics.jsonl record, at step = its iteration."""
        self._each("log", scalars(record), record["iteration"])

    def samples(self, iteration: int, episodes: list[dict]) -> None:
        """One samples.jsonl line's episodes (TensorBoard: text `samples`; W&B: a table `samples`), for every
        `track.samples_every`-th iteration and the last: a W&B table per iteration would make one artifact each."""
        if episodes and (iteration % self.samples_every == 0 or iteration == self.last_iteration):
            self._each("log_samples", episodes, iteration)

    def evaluation(self, point: str, result: dict, step: int) -> None:
        """One eval.json entry (`point`: its key, e.g. after_rl), measured at RL iteration `step`."""
        self._each("log_eval", scalars(result, f"heldout/{point}/"), step)

    def _each(self, method: str, values, step: int) -> None:
        for name, backend in list(self.active.items()):
            try:
                getattr(backend, method)(values, step)
            except Exception as err:  # metrics.jsonl holds everything: the run goes on without this tracker
                self.log_message(f"[track] {name} failed and is turned off for the rest of the run "
                                 f"({type(err).__name__}: {err}); metrics.jsonl is complete")
                self._close_one(name, failed=True)

    def _close_one(self, name: str, failed: bool) -> None:
        backend = self.active.pop(name)
        try:
            backend.close(failed)
        except Exception as err:
            self.log_message(f"[track] closing {name} failed ({type(err).__name__}: {err})")

    def close(self, failed: bool = False) -> None:
        for name in list(self.active):
            self._close_one(name, failed)
