"""From trajectories to the update's tensors: one right-padded row per training row (a whole episode, or one turn
with turn-as-sample), its loss mask and sampling logprobs, and length-sorted micro-batches of rows.

Token position t of the shifted tensors predicts ids[t + 1]; every per-token tensor here is `(B, L-1)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turnrl.shared_prefix import prompt_ids, prompt_lengths
from turnrl.trajectory import Trajectory


@dataclass
class Batch:
    input_ids: torch.Tensor   # (B, L) right-padded
    attention: torch.Tensor   # (B, L)
    targets: torch.Tensor     # (B, L-1) = input_ids[:, 1:]
    mask: torch.Tensor        # (B, L-1) float, 1 where the target is a model token
    old_logprobs: torch.Tensor  # (B, L-1) sampling logprobs (0 off-mask)
    lengths: list[int]
    # Row r holds training row `rows[r]` = (trajectory index, turn index or -1 for a whole episode,
    # [start, end) of that turn's reply in the row's own coordinates; (0, 0) for a whole episode).
    rows: list[tuple[int, int, int, int]] | None = None
    num_episodes: int = 0
    seq_tokens: torch.Tensor | None = None  # (B,) model tokens of each row's episode (seq-mean-token-mean)
    prompt_len: list[int] | None = None  # tokens of each row's first prompt (turnrl.shared_prefix)
    prompt_id: list[int] | None = None   # equal for rows whose first prompts are identical

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def episode_of(self) -> list[int]:
        return [r[0] for r in self.rows] if self.rows is not None else list(range(self.size))

    @property
    def turn_rows(self) -> bool:
        return self.rows is not None and any(r[1] >= 0 for r in self.rows)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device


def collate(trajs: list[Trajectory], pad_id: int, device: torch.device | None = None) -> Batch:
    """One row per training row of each trajectory: the whole episode, or each turn (turn-as-sample). Built on the
    host row by row, then each tensor moved to `device` (the model's) at once."""
    rows, pieces = [], []
    for index, t in enumerate(trajs):
        if t.row_starts is None:
            rows.append((index, -1, 0, 0))
            pieces.append((t, 0, len(t.ids)))
        else:
            for turn, ((start, end), row_start) in enumerate(zip(t.turn_spans, t.row_starts)):
                rows.append((index, turn, start - row_start, end - row_start))
                pieces.append((t, row_start, end))
    if not pieces:
        raise ValueError("no training rows: every trajectory is turn-as-sample with zero turns")
    lengths = [end - start for _, start, end in pieces]
    width = max(max(lengths), 2)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pieces), width), dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.float32)
    logp = torch.zeros((len(pieces), width), dtype=torch.float32)
    for row, (t, start, end) in enumerate(pieces):
        n = end - start
        ids[row, :n] = torch.tensor(t.ids[start:end], dtype=torch.long)
        attn[row, :n] = 1
        mask[row, :n] = torch.tensor(t.loss_mask[start:end], dtype=torch.float32)
        logp[row, :n] = torch.tensor(t.logprobs[start:end], dtype=torch.float32)
    if device is not None:  # the identity on the host
        ids, attn, mask, logp = (x.to(device) for x in (ids, attn, mask, logp))
    shifted = mask[:, 1:]
    seq_tokens = episode_tokens(shifted, [r[0] for r in rows], len(trajs))
    row_ids = [t.ids[start:end] for t, start, end in pieces]
    prompt_len = prompt_lengths(row_ids, [t.loss_mask[start:end] for t, start, end in pieces])
    return Batch(ids, attn, ids[:, 1:], shifted, logp[:, 1:], lengths, rows, len(trajs), seq_tokens,
                 prompt_len, prompt_ids(row_ids, prompt_len))


def episode_tokens(mask: torch.Tensor, episode_of: list[int], num_episodes: int) -> torch.Tensor:
    """(B,) the model tokens of each row's whole episode under `mask` (B, L-1) (`Batch.seq_tokens`)."""
    index = torch.tensor(episode_of, device=mask.device)
    return torch.zeros(num_episodes, device=mask.device).index_add_(0, index, mask.sum(1).float())[index]


def micro_batches(lengths: list[int], rows: list[int], token_budget: int) -> list[list[int]]:
    """Groups rows of similar length so each micro-batch holds at most `token_budget` padded tokens."""
    rows = sorted(rows, key=lambda r: lengths[r])
    out, current, longest = [], [], 0
    for r in rows:
        longest_if_added = max(longest, lengths[r])
        if current and longest_if_added * (len(current) + 1) > token_budget:
            out.append(current)
            current, longest_if_added = [], lengths[r]
        current.append(r)
        longest = longest_if_added
    if current:
        out.append(current)
    return out
