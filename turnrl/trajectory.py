"""The training record of an episode: `Trajectory` (what rollouts produce and the update consumes), its
turn-as-sample form (`as_turn_rows`) and the builder that rollouts and SFT demonstrations fill."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Trajectory:
    """One finished episode, ready for training."""

    ids: tuple[int, ...]
    loss_mask: tuple[int, ...]           # 1 on tokens the model sampled, 0 elsewhere
    logprobs: tuple[float, ...]          # sampling logprob on model tokens, 0.0 elsewhere
    turn_spans: tuple[tuple[int, int], ...]  # [start, end) of each model reply in `ids`
    turn_rewards: tuple[float, ...]      # env reward of each turn plus the format penalty
    terminated: bool
    truncated: bool
    success: bool
    env_name: str
    seed: int
    group_id: int
    num_actions: int                     # valid actions executed
    valid_turns: int                     # turns whose reply parsed and held only valid actions
    end_reason: str                      # "env" | "turn_budget" | "context_budget" | "env_error"
    transcript: tuple[tuple[str, str], ...] = ()  # (role, text) for logs and the trajectory viewer
    error: str = ""                      # end_reason "env_error": env name, seed and traceback
    # Turn-as-sample episodes (RolloutSettings.turn_rows): turn k's training row is
    # ids[row_starts[k]:turn_spans[k][1]], the exact prompt the engine was given then the sampled reply;
    # the rows are packed back to back in `ids`. None: the whole of `ids` is one training row.
    row_starts: tuple[int, ...] | None = None
    # Wall time spent in this episode's env (construction, reset, steps, close): a timing, left out of comparisons.
    env_seconds: float = field(default=0.0, compare=False)
    # The env's own numbers (`info["metrics"]`, latest value per name), sorted by name: logged as env/<name>.
    env_metrics: tuple[tuple[str, float], ...] = ()

    @property
    def failed(self) -> bool:
        """The env raised or hung: the episode is lost and must not be trained on or scored."""
        return self.end_reason == "env_error"

    @property
    def total_reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_spans)

    def training_rows(self) -> list[tuple[int, int]]:
        """[start, end) in `ids` of each training row: one per turn (turn rows), else the whole episode."""
        if self.row_starts is None:
            return [(0, len(self.ids))]
        return [(start, end) for start, (_, end) in zip(self.row_starts, self.turn_spans)]

    def prompt_lengths(self) -> list[int]:
        """Number of prompt tokens the engine was given at each turn."""
        if self.row_starts is None:
            return [start for start, _ in self.turn_spans]
        return [start - row for row, (start, _) in zip(self.row_starts, self.turn_spans)]


def as_turn_rows(t: Trajectory) -> Trajectory:
    """A full-history episode recorded as one sequence, re-recorded as turn-as-sample rows: turn k's row is
    the sequence up to the end of reply k (its prompt is the history, loss mask 0 on earlier replies).
    This is exactly what `run_episodes` records with context "full" and `turn_rows=True`."""
    if t.row_starts is not None:
        return t
    ids, mask, logprobs, spans, starts = [], [], [], [], []
    for start, end in t.turn_spans:
        starts.append(len(ids))
        ids += t.ids[:end]
        mask += [0] * start + list(t.loss_mask[start:end])
        logprobs += [0.0] * start + list(t.logprobs[start:end])
        spans.append((starts[-1] + start, starts[-1] + end))
    return replace(t, ids=tuple(ids), loss_mask=tuple(mask), logprobs=tuple(logprobs), turn_spans=tuple(spans),
                   row_starts=tuple(starts))


@dataclass
class EpisodeBuilder:
    """Accumulates one episode's token ids, mask and logprobs; shared by rollouts and SFT demos."""

    ids: list[int]
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    transcript: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.mask = [0] * len(self.ids)
        self.logprobs = [0.0] * len(self.ids)

    def add_model(self, ids, logprobs) -> None:
        start = len(self.ids)
        self.ids.extend(ids)
        self.mask.extend([1] * len(ids))
        self.logprobs.extend(float(x) for x in logprobs)
        self.spans.append((start, len(self.ids)))

    def add_context(self, ids) -> None:
        self.ids.extend(ids)
        self.mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

