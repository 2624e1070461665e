"""Re-measures the table behind `turnrl.attention._fp32_attention` on this machine: forward + backward of one
attention call in bf16 and in fp32 (torch's CPU flash kernel, an explicit causal mask, as the update runs it), for
a grid of head layouts and lengths, next to what the rule decides. The rule's thresholds were measured with torch
2.13 on a 2-core AMX CPU (docs/performance.md, "Short attention in fp32"); another torch or CPU may move them.
A row marked "<-- rule loses" is one where the rule's choice was more than 10% slower than the other precision.

    .venv/bin/python scripts/attention_precision.py [--threads 2] [--tokens 8192]
"""
import argparse
import time

import torch

from turnrl.attention import _fp32_attention

# (query heads, key/value heads, head width): the tiny model, SmolLM2-135M, a 14-over-2 grouping, 128-wide heads
LAYOUTS = ((4, 4, 32), (9, 3, 64), (14, 2, 64), (4, 4, 128))
LENGTHS = (64, 128, 192, 256, 384, 512, 768)


def seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def forward_backward(rows: int, kv_heads: int, groups: int, length: int, width: int, dtype: torch.dtype) -> float:
    """Median seconds of SDPA forward + backward with each key/value head's `groups` query heads stacked along the
    query axis (as `turnrl.attention._stacked` runs grouped-query attention) over `length` keys."""
    q = torch.randn(rows, kv_heads, groups * length, width, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(rows, kv_heads, length, width, dtype=dtype, requires_grad=True) for _ in range(2))
    causal = torch.ones(length, length, dtype=torch.bool).tril().repeat(groups, 1)
    mask = torch.zeros(rows, 1, groups * length, length, dtype=dtype).masked_fill_(~causal, float("-inf"))
    return seconds(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192, help="positions per call (rows x length)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; bf16 / fp32 time of forward + backward "
          "(above 1: fp32 is faster)")
    for heads, kv_heads, width in LAYOUTS:
        groups = heads // kv_heads
        cells = []
        for length in LENGTHS:
            rows = max(1, args.tokens // length)
            bf16 = forward_backward(rows, kv_heads, groups, length, width, torch.bfloat16)
            fp32 = forward_backward(rows, kv_heads, groups, length, width, torch.float32)
            query = torch.empty(1, kv_heads, groups * length, width)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                rule = "fp32" if _fp32_attention(query, groups * length, length) else "bf16"
            loses = (rule == "fp32" and fp32 > 1.1 * bf16) or (rule == "bf16" and bf16 > 1.1 * fp32)
            cells.append(f"L={length}: {bf16 / fp32:.2f} -> {rule}{' <-- rule loses' if loses else ''}")
        print(f"{heads} x {width} over {kv_heads} key/value heads: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
