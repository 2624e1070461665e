"""Collapse diagnostics of a rollout batch: do the model's replies still depend on what it was shown?

RAGEN-2 (arXiv 2604.06268) separates two things that policy entropy mixes: the diversity of the replies to one
input, H(Z|X), and how much the replies depend on the input, the mutual information I(X;Z). Its "template
collapse" is a policy whose replies stay varied but no longer depend on the prompt (the same reasoning for
every state): entropy looks healthy, the mutual information falls. It estimates both from a cross
log-probability matrix: every sampled reply scored, teacher-forced, under every prompt of the batch.

Here Z is the whole first reply of an episode as sampled (RAGEN-2 takes the reasoning between the think tags
only; with `rollout.think` off there is no reasoning, and the answer is what must depend on the state) and X
its first prompt (system prompt, first observation, response prefix). `train` logs the `collapse/*` keys every
`diag.mi_every` iterations (docs/metrics.md), computed before the update, so under the policy that sampled.
"""

from __future__ import annotations

import math

import torch

from turnrl.attention import gqa_attention
from turnrl.trajectory import Trajectory


def mutual_information(logp: torch.Tensor, source: torch.Tensor) -> dict[str, float]:
    """Template-collapse statistics from a cross log-probability matrix (RAGEN-2, arXiv 2604.06268, section 3).

    `logp[i, j]` = log p(z_i | x_j): reply i, sampled for prompt `source[i]`, scored under each of the batch's N
    distinct prompts; the prompts are taken as uniformly likely (the batch's empirical distribution). Returns
    (all in nats, per reply):

    - ``conditional_entropy``: H(Z|X) ~ -mean_i logp[i, source[i]]
    - ``mi``: I(X;Z) ~ mean_i (logp[i, source[i]] - log (1/N) sum_j p(z_i | x_j)); at most log N, 0 when the
      replies do not depend on the prompt (a reply is as likely under every prompt)
    - ``mi_max``: log N, the largest possible ``mi``
    - ``retrieval_accuracy``: fraction of replies whose most likely prompt is their own (chance: 1/N)
    """
    if logp.dim() != 2 or logp.shape[0] != source.shape[0]:
        raise ValueError(f"logp must be (replies, prompts) with one source per reply, got {tuple(logp.shape)} "
                         f"and {tuple(source.shape)}")
    n = logp.shape[1]
    logp = logp.double()
    own = logp.gather(1, source[:, None]).squeeze(1)
    marginal = torch.logsumexp(logp, dim=1) - math.log(n)
    return {
        "conditional_entropy": float(-own.mean()),
        "mi": float((own - marginal).mean()),
        "mi_max": math.log(n),
        "retrieval_accuracy": float((logp.argmax(dim=1) == source).double().mean()),
    }


def first_replies(trajs: list[Trajectory], max_replies: int
                  ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[int]]:
    """(distinct first prompts, first replies, index of each reply's prompt) of the episodes that played a turn.

    At most `max_replies` replies, taken round-robin over the prompts in order of first appearance (the first
    reply of every prompt, then the second, ...), so that no random draw is spent and every prompt counts."""
    by_prompt: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for t in trajs:
        if t.failed or not t.turn_spans:
            continue
        start, end = t.turn_spans[0]
        row = 0 if t.row_starts is None else t.row_starts[0]
        by_prompt.setdefault(tuple(t.ids[row:start]), []).append(tuple(t.ids[start:end]))
    index: dict[tuple[int, ...], int] = {}  # prompt -> its column, in order of first use
    replies, source = [], []
    queues = list(by_prompt.items())
    for rank in range(max((len(q) for _, q in queues), default=0)):
        for prompt, queue in queues:
            if rank < len(queue) and len(replies) < max_replies:
                source.append(index.setdefault(prompt, len(index)))
                replies.append(queue[rank])
    return list(index), replies, source


@torch.no_grad()
def cross_logprobs(policy, prompts: list[tuple[int, ...]], replies: list[tuple[int, ...]], *,
                   micro_batch_tokens: int, bf16: bool, temperature: float = 1.0,
                   shared_prefix: bool = True) -> torch.Tensor:
    """(len(replies), len(prompts)): log p(reply_i | prompt_j) under `policy`, teacher-forced and summed over the
    reply's tokens at the sampling `temperature`. Runs like the update's forward (turnrl.update): each prompt
    once per micro-batch with `shared_prefix`, the vocabulary head only at reply positions."""
    from turnrl.batch import collate
    from turnrl.forward import model_token_logprobs, plan, sharable_head

    pairs = [Trajectory(ids=p + r, loss_mask=(0,) * len(p) + (1,) * len(r), logprobs=(0.0,) * (len(p) + len(r)),
                        turn_spans=((len(p), len(p) + len(r)),), turn_rewards=(0.0,), terminated=True,
                        truncated=False, success=False, env_name="", seed=0, group_id=j, num_actions=0,
                        valid_turns=0, end_reason="env")
             for r in replies for j, p in enumerate(prompts)]
    batch = collate(pairs, policy.pad_token_id, policy.device)
    rows = list(range(batch.size))
    head = sharable_head(policy.lm, batch, rows, enabled=shared_prefix)
    was_training = policy.training
    policy.eval()
    try:
        with gqa_attention(policy.lm):
            logps = model_token_logprobs(policy.lm, batch, plan(batch, rows, micro_batch_tokens, head), temperature,
                                         bf16, share=head is not None)
    finally:
        policy.train(was_training)
    return logps.double().sum(dim=1).view(len(replies), len(prompts))


def collapse_metrics(policy, trajs: list[Trajectory], *, max_replies: int, micro_batch_tokens: int, bf16: bool,
                     temperature: float, shared_prefix: bool = True) -> dict[str, float]:
    """The `collapse/*` metrics of a rollout batch (docs/metrics.md); empty when fewer than two distinct first
    prompts were played (the mutual information is then not defined)."""
    prompts, replies, source = first_replies(trajs, max_replies)
    if len(prompts) < 2:
        return {}
    logp = cross_logprobs(policy, prompts, replies, micro_batch_tokens=micro_batch_tokens, bf16=bf16,
                          temperature=temperature, shared_prefix=shared_prefix)
    stats = mutual_information(logp.cpu(), torch.tensor(source))  # a few numbers: on the host
    return {**{f"collapse/{k}": v for k, v in stats.items()}, "collapse/prompts": float(len(prompts)),
            "collapse/replies": float(len(replies))}
