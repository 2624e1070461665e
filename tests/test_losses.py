"""Hand-computed tests for turnrl.algos.losses."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.algos.losses import (
    aggregate,
    entropy_from_logits,
    gspo_loss,
    kl_penalty,
    ppo_clip_loss,
    token_logprobs,
    token_logprobs_entropy,
    value_loss,
)
import turnrl.algos.losses as losses_module

T = torch.tensor


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- ppo_clip_loss
def test_ppo_clip_loss_hand_computed():
    # clip range [0.8, 1.28]
    # t0: A= 1, rho=1.5  -> max(-1.5, -1.28) = -1.28  clipped, grad 0
    # t1: A=-1, rho=0.5  -> max( 0.5,  0.8 ) =  0.8   clipped, grad 0
    # t2: A= 2, rho=1.1  -> -2.2 (inside range),  d/dlogp = -A*rho = -2.2
    # t3: A= 1, rho=1.25 -> -1.25 inside with clip_high .28 (a symmetric .2 clip would give -1.2), grad -1.25
    # t4: masked, old logprob -inf (garbage) -> 0 and no nan
    ratios = [1.5, 0.5, 1.1, 1.25]
    old = T([[-1.0, -1.0, -1.0, -1.0, -math.inf]])
    new = T([[-1.0 + math.log(r) for r in ratios] + [-2.0]], requires_grad=True)
    adv = T([[1.0, -1.0, 2.0, 1.0, 5.0]])
    mask = T([[1, 1, 1, 1, 0]])
    loss, stats = ppo_clip_loss(new, old, adv, mask)
    close(loss, [[-1.28, 0.8, -2.2, -1.25, 0.0]])
    assert stats["clip_frac"] == pytest.approx(0.5)  # t0, t1 of 4 tokens
    # approx_kl = mean(old - new) = -(ln1.5 + ln0.5 + ln1.1 + ln1.25)/4 = -0.0307717/4
    assert stats["approx_kl"] == pytest.approx(-0.0076929, abs=1e-6)
    loss.sum().backward()
    close(new.grad, [[0.0, 0.0, -2.2, -1.25, 0.0]])


def test_ppo_symmetric_clip_differs():
    # rho = 1.25, A = 1 with clip_high = 0.2 -> clipped at 1.2
    loss, stats = ppo_clip_loss(T([[math.log(1.25)]]), T([[0.0]]), T([[1.0]]), T([[1]]), clip_high=0.2)
    close(loss, [[-1.2]])
    assert stats["clip_frac"] == 1.0


def test_ppo_dual_clip():
    # c = 3
    # t0: A=-1, rho=5 -> max(5, 1.28) = 5 -> min(5, 3) = 3 (dual bound active)
    # t1: A=-1, rho=2 -> 2 < 3 unchanged
    # t2: A=+1, rho=5 -> max(-5, -1.28) = -1.28 (PPO clip active; dual only for A < 0)
    lp = T([[math.log(5.0), math.log(2.0), math.log(5.0)]])
    loss, stats = ppo_clip_loss(lp, torch.zeros(1, 3), T([[-1.0, -1.0, 1.0]]), torch.ones(1, 3), dual_clip=3.0)
    close(loss, [[3.0, 2.0, -1.28]])
    assert stats["dual_clip_frac"] == pytest.approx(1 / 3)
    assert stats["clip_frac"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        ppo_clip_loss(lp, torch.zeros(1, 3), T([[-1.0, -1.0, 1.0]]), torch.ones(1, 3), dual_clip=1.0)


# ----------------------------------------------------------------------------- aggregate
LOSS = T([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
MASK = T([[1, 1, 0], [1, 0, 0], [0, 0, 0]])


def test_aggregate_hand_computed():
    # masked tokens: 1, 2 | 4 | (row 2 empty); 3 tokens, 2 non-empty rows
    close(aggregate(LOSS, MASK, "token-mean"), 7 / 3)
    close(aggregate(LOSS, MASK, "seq-mean-token-mean"), (1.5 + 4.0) / 2)
    close(aggregate(LOSS, MASK, "seq-mean-token-sum"), (3.0 + 4.0) / 2)
    # caller-supplied totals (empty row counted by the caller)
    close(aggregate(LOSS, MASK, "seq-mean-token-mean", num_seqs=3), 5.5 / 3)
    close(aggregate(LOSS, MASK, "token-mean", num_tokens=7), 1.0)
    close(aggregate(LOSS, torch.zeros(3, 3), "token-mean"), 0.0)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(LOSS, MASK, "mean")


@settings(max_examples=60, deadline=None)
@given(data=st.data(), mode=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]))
def test_aggregate_micro_batches_sum_to_full_batch(data, mode):
    b = data.draw(st.integers(1, 8))
    t = data.draw(st.integers(1, 6))
    vals = data.draw(st.lists(st.floats(-10, 10), min_size=b * t, max_size=b * t))
    bits = data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    perm = data.draw(st.permutations(list(range(b))))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(b - 1, 1)), max_size=b))) - {b})
    loss_full = T(vals, dtype=torch.float64).view(b, t).requires_grad_()
    mask = T(bits).view(b, t)
    full = aggregate(loss_full, mask, mode)
    (g_full,) = torch.autograd.grad(full, loss_full)

    loss_micro = loss_full.detach().clone().requires_grad_()
    num_tokens = int(mask.sum())
    num_seqs = int((mask.sum(-1) > 0).sum())
    total = loss_micro.new_zeros(())
    bounds = [0, *cuts, b]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = perm[lo:hi]
        total = total + aggregate(loss_micro[rows], mask[rows], mode, num_seqs=num_seqs, num_tokens=num_tokens)
    (g_micro,) = torch.autograd.grad(total, loss_micro)
    torch.testing.assert_close(total, full.detach(), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g_micro, g_full, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- kl / entropy / logprobs
def test_kl_penalty_estimators():
    lp, ref = T([-1.0, -2.0]), T([-2.0, -1.0])
    close(kl_penalty(lp, ref, "k1"), [1.0, -1.0])
    close(kl_penalty(lp, ref, "k2"), [0.5, 0.5])
    # d = ref - lp = [-1, 1]: e^-1 + 1 - 1 = 0.3678794, e^1 - 1 - 1 = 0.7182818
    close(kl_penalty(lp, ref), [0.3678794, 0.7182818])
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(lp, ref, "k4")


def test_entropy_from_logits():
    logits = T([[0.0, 0.0, 0.0, 0.0],                       # uniform over 4: ln 4 = 1.3862944
                [1000.0, 1000.0, -math.inf, -math.inf],     # uniform over 2 (huge logits): ln 2
                [0.0, math.log(3.0), -math.inf, -math.inf]])  # p = [.25, .75]: .25 ln4 + .75 ln(4/3)
    h = entropy_from_logits(logits)
    close(h, [1.3862944, 0.6931472, 0.25 * math.log(4) + 0.75 * math.log(4 / 3)])
    assert entropy_from_logits(logits.view(3, 1, 4)).shape == (3, 1)


def test_token_logprobs_hand_computed():
    # row 0: t0 logits [0,0,0] target 2 -> ln(1/3); t1 [0, ln3, 0] target 1 -> ln(3/5)
    # temperature 2: t1 becomes [0, ln3/2, 0] -> sqrt3/(2+sqrt3) = 0.4641016; t0 unchanged
    logits = T([[[0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0]]], requires_grad=True)
    tgt = T([[2, 1]])
    lp = token_logprobs(logits, tgt)
    close(lp, [[math.log(1 / 3), math.log(0.6)]])
    close(token_logprobs(logits, tgt, temperature=2.0), [[math.log(1 / 3), math.log(0.4641016)]])
    # d log p_target / d logits = onehot - softmax: t0 -> [-1/3, -1/3, 2/3]; t1 -> [-.2, .4, -.2]
    lp.sum().backward()
    close(logits.grad, [[[-1 / 3, -1 / 3, 2 / 3], [-0.2, 0.4, -0.2]]])
    out = token_logprobs(logits.detach().bfloat16(), tgt)
    assert out.dtype == torch.float32
    close(out, [[math.log(1 / 3), math.log(0.6)]], tol=2e-2)


@pytest.mark.parametrize("block", [1 << 19, 7])  # one block, and blocks of 7 // V rows (here: 1 row)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_entropy_matches_the_reference_functions(monkeypatch, block, temperature):
    """The fused pass gives log_softmax at the targets and entropy_from_logits, and their gradients (any weighting
    of the two outputs), including logits of -inf (p = 0) and blocks that split the rows."""
    monkeypatch.setattr(losses_module, "_BLOCK_ELEMENTS", block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(13, 6, generator=gen, dtype=torch.float64) * 3
    x[3, 4] = -math.inf
    x[5, :4] = -math.inf
    tgt = torch.randint(0, 6, (13,), generator=gen)
    tgt[3], tgt[5] = 0, 5  # finite targets (a -inf target has logprob -inf in both)
    w_lp, w_h = torch.randn(13, generator=gen, dtype=torch.float64), torch.randn(13, generator=gen, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    lp, h = token_logprobs_entropy(a, tgt, temperature=temperature)
    ref_lp = torch.log_softmax(b / temperature, -1).gather(-1, tgt[:, None]).squeeze(-1)
    ref_h = entropy_from_logits(b / temperature)
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(h, ref_h)
    (lp * w_lp + h * w_h).sum().backward()
    (ref_lp * w_lp + ref_h * w_h).sum().backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad)
    # only the logprob in the loss (the entropy output unused), and entropy=False
    for entropy in (True, False):
        a.grad = b.grad = None
        lp, h = token_logprobs_entropy(a, tgt, temperature=temperature, entropy=entropy)
        assert (h is None) == (not entropy)
        (lp * w_lp).sum().backward()
        (torch.log_softmax(b / temperature, -1).gather(-1, tgt[:, None]).squeeze(-1) * w_lp).sum().backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_token_logprobs_entropy_half_inputs_and_errors():
    logits = T([[0.0, 0.0, 0.0], [0.0, math.log(3.0), 0.0]]).bfloat16().requires_grad_()
    lp, h = token_logprobs_entropy(logits, T([2, 1]))
    assert lp.dtype == h.dtype == torch.float32
    close(lp, [math.log(1 / 3), math.log(0.6)], tol=2e-2)  # bf16 logits: ln 3 is stored as 1.1016
    close(h, [math.log(3), -(0.2 * math.log(0.2) * 2 + 0.6 * math.log(0.6))], tol=2e-2)
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    close(logits.grad.float(), [[-1 / 3, -1 / 3, 2 / 3], [-0.2, 0.4, -0.2]], tol=1e-2)
    with pytest.raises(ValueError, match="expected logits"):
        token_logprobs_entropy(logits[None], T([[2, 1]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs_entropy(logits, T([2, 1]), temperature=0.0)


# ----------------------------------------------------------------------------- value loss
def test_value_loss_hand_computed():
    # clip 0.2, old = 0.5
    # t0: v=1.0, R=2: unclipped 1, clipped v=0.7 -> 1.69 -> 0.5*1.69 = 0.845 (grad 0: clamp saturated)
    # t1: v=0.0, R=0: unclipped 0, clipped v=0.3 -> 0.09 -> 0.045 (grad 0)
    # t2: v=0.6, R=2: both 1.96 -> 0.98, grad = (0.6 - 2) = -1.4
    # t3: masked -> 0
    v = T([[1.0, 0.0, 0.6, 3.0]], requires_grad=True)
    old, ret, mask = T([[0.5, 0.5, 0.5, 0.5]]), T([[2.0, 0.0, 2.0, 9.0]]), T([[1, 1, 1, 0]])
    loss = value_loss(v, old, ret, mask)
    close(loss, [[0.845, 0.045, 0.98, 0.0]])
    loss.sum().backward()
    close(v.grad, [[0.0, 0.0, -1.4, 0.0]])
    # no clipping: 0.5*(v-R)^2 = [0.5, 0, 0.98, 0]
    close(value_loss(v, old, ret, mask, clip=None), [[0.5, 0.0, 0.98, 0.0]])


# ----------------------------------------------------------------------------- GSPO
def test_gspo_loss_hand_computed():
    # clip range [0.9, 1.15]
    # row 0: log-ratios [0.1, 0.3] (3rd masked) -> mean 0.2, s = e^0.2 = 1.2214028, A = 1
    #        -> max(-1.2214, -1.15) = -1.15 (clipped, no gradient)
    # row 1: log-ratios [0, 0.03, -0.06] -> mean -0.01, s = e^-0.01 = 0.9900498, A = -2
    #        -> 2 * 0.9900498 = 1.9800997 (inside range)
    old = torch.zeros(2, 3)
    new = T([[0.1, 0.3, 5.0], [0.0, 0.03, -0.06]], requires_grad=True)
    mask = T([[1, 1, 0], [1, 1, 1]])
    loss, stats = gspo_loss(new, old, T([1.0, -2.0]), mask, clip_low=0.1, clip_high=0.15)
    s1 = 1.9800997
    close(loss, [[-1.15, -1.15, 0.0], [s1, s1, s1]])
    assert stats["clip_frac"] == pytest.approx(0.5)
    total = aggregate(loss, mask, "seq-mean-token-mean")
    close(total, (-1.15 + s1) / 2)
    # d/dlogp_t of row 1 = -A * s / |y| = 2 * 0.9900498 / 3 = 0.6600332, halved by the seq mean
    total.backward()
    close(new.grad, [[0.0, 0.0, 0.0], [0.3300166] * 3])
