"""Achieved FLOP/s of the training update vs. a large matmul's FLOP/s, same run, same threads, same dtype.

The update is `turnrl.update.ppo_update` (GRPO, one optimizer step) on a synthetic multi-turn batch shaped
like a Sokoban rollout: `--groups` groups of `--group-size` episodes; each group shares a first prompt,
then every episode has `--turns` turns of model reply + env reply (random token ids, random rewards).
Its FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` (every matmul and attention kernel
actually executed, forward and backward, so work saved by the shared-prompt forward is not counted), then
the update is timed without the counter. torch's counter has no formula for the CPU flash-attention kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward; it counts only the CUDA ones), so without
`CPU_ATTENTION` below their work (a quarter to a third of the update's time) would count as zero FLOPs. The
peak is a square matmul (`--matmul-size`) in the update's dtype (bf16 when the model trains under bf16
autocast, else fp32).

How far the update could get on these kernels: every counted call (matmuls and attention, with the shapes,
strides and dtypes the update ran) is recorded and replayed alone on fresh inputs. Their time alone gives the
ceiling, the ratio the update would reach if everything else it does (element-wise work, casts, copies,
Python) took no time; the rest of the update's time is that other work.

The peer on the same batch: TRL's `GRPOTrainer` loss (`_compute_loss`, loss_type "grpo": per-sequence mean
of per-token losses, as turnrl's `seq-mean-token-mean`) on the same model (LoRA r=16 on the same layers through
TRL's `peft_config`), same dtype, then backward and one AdamW step. TRL takes an episode as a left-padded prompt
(the first prompt) and a right-padded completion (everything after it) whose env tokens `tool_mask` leaves out of
the loss, as for its multi-turn tool calls; it runs the whole padded sequence of every episode. Its FLOPs are
counted and its update timed the same way; the script prints its ratio and the update time TRL / turnrl. Skipped
when trl is not installed (`pip install 'turnrl[bench]'`) or with `--no-peer`.

Rows: SmolLM2-135M + LoRA r=16 under bf16 autocast (as the smollm2 presets train) and the tiny model in
fp32. The last line is turnrl's smallest achieved / peak ratio (the issue's goal: >= 0.40).

    python benchmarks/update_flops.py [--models smollm2-135m-instruct tiny] [--threads 2] [--no-peer]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from turnrl.config import AlgoConfig, OptimConfig
from turnrl.models import LoraSpec, load_policy
from turnrl.trajectory import Trajectory
from turnrl.update import ppo_update


def synthetic_batch(vocab: int, args, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    trajs = []
    for g in range(args.groups):
        prompt = [rng.randrange(vocab) for _ in range(args.prompt_tokens)]
        for _ in range(args.group_size):
            ids, mask, spans = list(prompt), [0] * len(prompt), []
            for turn in range(args.turns):
                n = rng.randint(args.reply_tokens // 2, args.reply_tokens)
                spans.append((len(ids), len(ids) + n))
                ids += [rng.randrange(vocab) for _ in range(n)]
                mask += [1] * n
                if turn < args.turns - 1:
                    ids += [rng.randrange(vocab) for _ in range(args.env_tokens)]
                    mask += [0] * args.env_tokens
            logprobs = [-rng.uniform(0.5, 3.0) if m else 0.0 for m in mask]
            trajs.append(Trajectory(ids=tuple(ids), loss_mask=tuple(mask), logprobs=tuple(logprobs),
                                    turn_spans=tuple(spans), turn_rewards=tuple(rng.random() for _ in spans),
                                    terminated=True, truncated=False, success=False, env_name="synthetic", seed=g,
                                    group_id=g, num_actions=len(spans), valid_turns=len(spans), end_reason="env"))
    return trajs


def _causal_share(query, key, is_causal: bool) -> float:
    """Share of the (query, key) pairs that a causal CPU flash kernel computes: it skips the key blocks after each
    query block's last position (top-left aligned, as SDPA's `is_causal`), so count only the lower triangle.
    With an explicit mask the kernel computes every pair, masked or not."""
    if not is_causal:
        return 1.0
    s_q, s_k = query[-2], key[-2]
    pairs = sum(min(i + 1, s_k) for i in range(s_q))
    return pairs / (s_q * s_k)


def _cpu_flash(query, key, value, dropout_p=0.0, is_causal=False, *args, out_shape=None, **kwargs) -> int:
    return int(flop_counter.sdpa_flop_count(query, key, value) * _causal_share(query, key, is_causal))


def _cpu_flash_backward(grad_out, query, key, value, out, logsumexp, dropout_p=0.0, is_causal=False, *args,
                        out_shape=None, **kwargs) -> int:
    return int(flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)
               * _causal_share(query, key, is_causal))


# torch's own formulas for its other SDPA kernels (forward: q @ k^T and p @ v; backward: those recomputed plus the
# three gradient products), applied to the CPU flash kernels the update runs.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


class KernelLog(TorchDispatchMode):
    """Records every call of the ops the FLOP count covers (`flop_counter.flop_registry` and `CPU_ATTENTION`):
    the op, its tensor arguments as (shape, stride, dtype), its other arguments as they were."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.counted = set(flop_counter.flop_registry) | set(CPU_ATTENTION)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in self.counted:
            spec = lambda x: ("tensor", tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor) else x
            self.calls.append((func, [spec(a) for a in args], {k: spec(v) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _materialise(x):
    """A tensor with the recorded shape, strides and dtype, of standard normal values. (The values matter a little:
    the same calls took ~20% less time on inputs of one constant, so the replay uses values like the update's.)"""
    if not (isinstance(x, tuple) and x[:1] == ("tensor",)):
        return x
    _, shape, stride, dtype = x
    size = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    flat = torch.rand(size) > 0.5 if dtype == torch.bool else torch.randn(size, dtype=dtype)
    return flat.as_strided(shape, stride)


def replay_seconds(calls) -> tuple[float, float]:
    """(matmul seconds, attention seconds) of the recorded calls run alone, one after another on fresh inputs
    (their creation not timed). One pass: sampling the inputs of a SmolLM2 update's ~7,000 calls takes half a
    minute, and two passes of them differed by ~1% here."""
    spent = {"matmul": 0.0, "attention": 0.0}
    for func, args, kwargs in calls:
        args, kwargs = [_materialise(a) for a in args], {k: _materialise(v) for k, v in kwargs.items()}
        t0 = time.perf_counter()
        func(*args, **kwargs)
        spent["attention" if func.overloadpacket in CPU_ATTENTION else "matmul"] += time.perf_counter() - t0
    return spent["matmul"], spent["attention"]


def matmul_flops(size: int, dtype: torch.dtype, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * size ** 3 * n / (time.perf_counter() - t0)


# The adapter of the SmolLM2 row, on turnrl's side and (as a peft LoraConfig) on TRL's.
LORA = LoraSpec(rank=16, alpha=32.0)


def trl_inputs(trajs: list[Trajectory], pad: int, advantages: torch.Tensor) -> dict:
    """The batch as TRL's GRPO loss takes it: each episode's first prompt (the tokens before its first model token)
    left-padded, the rest right-padded as the completion, `tool_mask` 1 on its model tokens only."""
    starts = [next(i for i, m in enumerate(t.loss_mask) if m) for t in trajs]
    width_p, width_c = max(starts), max(len(t.ids) - p for t, p in zip(trajs, starts))
    prompt_ids = torch.full((len(trajs), width_p), pad)
    completion_ids = torch.full((len(trajs), width_c), pad)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_mask, tool_mask = torch.zeros_like(completion_ids), torch.zeros_like(completion_ids)
    for i, (t, p) in enumerate(zip(trajs, starts)):
        n = len(t.ids) - p
        prompt_ids[i, width_p - p:], prompt_mask[i, width_p - p:] = torch.tensor(t.ids[:p]), 1
        completion_ids[i, :n], completion_mask[i, :n] = torch.tensor(t.ids[p:]), 1
        tool_mask[i, :n] = torch.tensor(t.loss_mask[p:])
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "tool_mask": tool_mask, "advantages": advantages,
            "num_items_in_batch": tool_mask.sum()}


def trl_update(name: str, trajs: list[Trajectory], args, lora: bool, bf16: bool):
    """(TRL's GRPO update as a function with no arguments, its trainer) for `name` on `trajs` (module docstring).
    None when trl is not installed."""
    import tempfile
    import warnings

    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return None
    from peft import LoraConfig

    policy = load_policy(name, seed=0)
    advantages = torch.randn(len(trajs), generator=torch.Generator().manual_seed(0))
    inputs = trl_inputs(trajs, policy.pad_token_id, advantages)
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = GRPOConfig(output_dir=out, per_device_train_batch_size=len(trajs), num_generations=args.group_size,
                            max_completion_length=inputs["completion_ids"].shape[1], learning_rate=1e-5, beta=0.0,
                            num_iterations=1, loss_type="grpo", use_cpu=True, bf16=bf16, gradient_checkpointing=False,
                            report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
        peft_config = LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=LORA.dropout,
                                 target_modules=list(LORA.targets), task_type="CAUSAL_LM") if lora else None
        trainer = GRPOTrainer(model=policy.lm, processing_class=policy.tokenizer, args=config,
                              reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              train_dataset=Dataset.from_list([{"prompt": "-"}] * len(trajs)), peft_config=peft_config)
    trainer.current_gradient_accumulation_steps = 1  # set by its training loop, which this does not run
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def update():
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return update, trainer


def counted_and_timed(update, repeats: int) -> tuple[FlopCounterMode, float, list]:
    """(the FLOP counter of one call of `update`, the fastest of `repeats` timed calls, the counted kernel calls
    of the counted call), after one untimed warm-up call."""
    update()
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter, KernelLog() as log:
        update()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        update()
        times.append(time.perf_counter() - t0)
    return counter, min(times), log.calls


def measure(name: str, args) -> float:
    lora = name != "tiny"
    bf16 = lora  # as the presets train: SmolLM2 with LoRA under bf16 autocast, the tiny model in fp32
    policy = load_policy(name, seed=0, lora=LORA if lora else None)
    trajs = synthetic_batch(len(policy.tokenizer), args)
    algo = AlgoConfig(estimator="grpo", filter="none", loss_agg="seq-mean-token-mean", entropy_coef=0.0)
    optim = OptimConfig(lr=1e-5, warmup_steps=0, bf16=bf16, micro_batch_tokens=args.micro_batch_tokens)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)

    def update():
        return ppo_update(policy, optimizer, scheduler, trajs, algo=algo, optim=optim, temperature=1.0)

    counter, seconds, calls = counted_and_timed(update, args.repeats)
    flops = counter.get_total_flops()
    counts = counter.get_flop_counts()["Global"]
    attention = sum(v for k, v in counts.items() if "attention" in str(k))
    achieved = flops / seconds
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak = matmul_flops(args.matmul_size, dtype)
    tokens = sum(len(t.ids) for t in trajs)
    mm_s, attn_s = replay_seconds(calls)
    print(f"{name}{' + LoRA, bf16 autocast' if lora else ', fp32'}: {len(trajs)} episodes, {tokens} tokens, "
          f"{flops / 1e12:.2f} TFLOP executed per update ({attention / flops:.0%} attention) in {seconds:.2f} s "
          f"= {achieved / 1e9:.1f} GFLOP/s | {args.matmul_size}^2 {str(dtype).split('.')[-1]} matmul "
          f"{peak / 1e9:.1f} GFLOP/s | ratio {achieved / peak:.2f}", flush=True)
    print(f"  its {len(calls)} counted kernel calls replayed alone: matmuls {mm_s:.2f} s + attention "
          f"{attn_s:.2f} s of the update's {seconds:.2f} s ({(mm_s + attn_s) / seconds:.0%}); ceiling with "
          f"all other work free: {flops / (mm_s + attn_s) / peak:.2f} of the matmul peak", flush=True)
    if args.peer:
        del policy, optimizer, scheduler, update
        peer = trl_update(name, trajs, args, lora, bf16)
        if peer is None:
            print("  peer: trl is not installed (pip install 'turnrl[bench]'), skipped", flush=True)
        else:
            p_counter, p_seconds, _ = counted_and_timed(peer[0], args.repeats)
            p_flops = p_counter.get_total_flops()
            print(f"  peer, TRL GRPOTrainer's loss + backward + AdamW step on the same batch: {p_flops / 1e12:.2f} "
                  f"TFLOP in {p_seconds:.2f} s = {p_flops / p_seconds / 1e9:.1f} GFLOP/s, ratio "
                  f"{p_flops / p_seconds / peak:.2f} | update time TRL / turnrl {p_seconds / seconds:.2f}", flush=True)
    return achieved / peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "tiny"])
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--reply-tokens", type=int, default=24)
    p.add_argument("--env-tokens", type=int, default=48)
    p.add_argument("--micro-batch-tokens", type=int, default=4096)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip TRL's update on the same batch")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ratios = {name: measure(name, args) for name in args.models}
    detail = ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
    print(f"ratio achieved/peak FLOP/s: {min(ratios.values()):.2f}  ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
