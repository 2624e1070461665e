import torch

from turnrl.algos.losses import token_logprobs
from turnrl.context import ChatRenderer
from turnrl.envs import make
from turnrl.lm_parts import lm_parts
from turnrl.models import load_policy
from turnrl.rollout import RolloutSettings
from turnrl.sft import make_demonstrations, sft
from turnrl.batch import collate


def test_sft_loss_is_the_mean_nll_of_the_demonstrated_tokens():
    """The first step's loss (before any update) equals the mean negative log-likelihood of the model tokens of
    the demonstrations under a plain full forward: the head running only at those positions changes nothing."""
    policy = load_policy("tiny", seed=0)
    env = make("frozen_lake_det")
    renderer = ChatRenderer(policy.tokenizer, system_prompt=env.system_prompt(), response_prefix="<answer>")
    settings = RolloutSettings(max_turns=3, max_new_tokens=16, max_context_tokens=2048, think=False)
    demos = make_demonstrations(lambda: make("frozen_lake_det"), renderer, list(range(6)), settings, epsilon=0.3)
    batch = collate(demos, policy.pad_token_id)
    with torch.no_grad():
        logits = policy.lm(input_ids=batch.input_ids, attention_mask=batch.attention).logits[:, :-1]
        nll = -(token_logprobs(logits.float(), batch.targets) * batch.mask).sum() / batch.mask.sum()
    losses = sft(policy, demos, steps=1, batch_size=len(demos), lr=1e-3, micro_batch_tokens=512)
    assert batch.mask.sum() > 0 and abs(losses[0] - nll.item()) < 1e-4


def test_sft_shares_the_prompt_head_with_the_same_losses(monkeypatch):
    """With shared_prefix the demonstrations' common prompt head runs once per micro-batch; the losses (and so
    the updates) equal the per-row forward's up to float rounding."""
    env = make("frozen_lake_det")
    losses, heads = {}, {}
    for shared in (True, False):
        policy = load_policy("tiny", seed=0)
        renderer = ChatRenderer(policy.tokenizer, system_prompt=env.system_prompt(), response_prefix="<answer>")
        settings = RolloutSettings(max_turns=3, max_new_tokens=16, max_context_tokens=2048, think=False)
        demos = make_demonstrations(lambda: make("frozen_lake_det"), renderer, list(range(8)), settings, epsilon=0.3)
        lm_parts(policy.lm)  # splitting the model probes it once: before counting
        calls = []
        decoder = policy.lm.get_decoder()
        real = decoder.forward
        monkeypatch.setattr(decoder, "forward", lambda *a, _real=real, **k: calls.append(
                            (k["input_ids"].shape[0], k.get("position_ids") is not None)) or _real(*a, **k))
        losses[shared] = sft(policy, demos, steps=3, batch_size=4, lr=1e-3, micro_batch_tokens=4096,
                             shared_prefix=shared)
        # forwards of a single row: the shared head (no positions given), the packed continuations (positions)
        heads[shared] = calls.count((1, False)), calls.count((1, True))
    assert heads[True] == (3, 3) and heads[False] == (0, 0)  # once per step (one micro-batch each)
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 1e-4
