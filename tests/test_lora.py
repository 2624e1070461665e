"""LoRA via PEFT: trainable adapters only, the KL reference is the policy at the start of RL (sharing the base), adapter-only
checkpoints that load back on their own, gradient checkpointing, and `turnrl export --merged`."""

import json

import pytest
import torch

pytest.importorskip("peft")

from turnrl.cli import main  # noqa: E402
from turnrl.config import ConfigError, ModelConfig  # noqa: E402
from turnrl.models import LoraSpec, ModelLoadError, TinyModelSpec, load_policy  # noqa: E402
from turnrl.reference import reference_of  # noqa: E402
from turnrl.train import train  # noqa: E402
from test_train import tiny_config  # noqa: E402

SPEC = TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
IDS = torch.tensor([[256, 70, 71, 72, 73, 74]])


def lora_policy(**kw):
    return load_policy("tiny", seed=1, tiny=SPEC, lora=LoraSpec(rank=4, alpha=8.0), **kw)


def perturb_adapters(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.lm.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def logits(policy_or_lm, ids=IDS):
    with torch.no_grad():
        out = policy_or_lm(ids) if hasattr(policy_or_lm, "value_head") else policy_or_lm(input_ids=ids)
    return out[0] if isinstance(out, tuple) else out.logits


def test_only_adapters_train_and_start_as_the_base():
    base = load_policy("tiny", seed=1, tiny=SPEC)
    policy = lora_policy()
    trainable = [n for n, p in policy.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # 2 layers x 7 projections x (A: r x in + B: out x r)
    h, f, r = SPEC.hidden_size, SPEC.intermediate_size, 4
    per_layer = 4 * (r * h + h * r) + 2 * (r * h + f * r) + (r * f + h * r)
    assert sum(policy.lm.get_parameter(n).numel() for n in trainable) == SPEC.num_layers * per_layer
    assert torch.allclose(logits(policy), logits(base))  # lora_B starts at zero


def reference_logits(ref, ids=IDS):
    return ref(ids, at=torch.ones_like(ids, dtype=torch.bool))


def test_reference_of_fresh_adapters_is_the_base_with_adapters_off_without_a_copy():
    base = load_policy("tiny", seed=1, tiny=SPEC)
    policy = lora_policy()
    ref = reference_of(policy)
    assert ref.lm is policy.lm  # the same model in memory, not a second one
    perturb_adapters(policy)
    assert not torch.allclose(logits(policy), logits(base), atol=1e-4)
    assert torch.allclose(reference_logits(ref), logits(base)[0], atol=1e-6)
    # calling the reference leaves the adapters on and trainable
    assert torch.allclose(logits(policy), logits(policy))
    assert any(p.requires_grad for p in policy.lm.parameters())


def test_reference_after_adapter_training_is_the_policy_at_that_point():
    """After an SFT warm start the adapters are not zero: the reference is the policy then (base + a frozen copy
    of the adapter), not the base, and calling it leaves the live adapters, their gradients and bf16
    autocast's weight cache alone."""
    base = load_policy("tiny", seed=1, tiny=SPEC)
    policy = lora_policy()
    perturb_adapters(policy, seed=0)  # "SFT"
    start = logits(policy)
    ref = reference_of(policy)
    assert ref.lm is policy.lm
    perturb_adapters(policy, seed=1)  # "RL"
    now = logits(policy)
    assert not torch.allclose(now, start, atol=1e-4) and not torch.allclose(start, logits(base), atol=1e-4)
    assert torch.allclose(reference_logits(ref), start[0], atol=1e-6)
    assert torch.allclose(logits(policy), now)  # the live adapter is back
    policy.train()
    out, _ = policy(IDS)
    out.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in policy.lm.parameters() if p.requires_grad)
    # one bf16 autocast region holding policy and reference calls: each sees its own weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before, _ = policy(IDS)
        got = reference_logits(ref)
        after, _ = policy(IDS)
    assert torch.allclose(got.float(), start[0], atol=0.1) and not torch.allclose(got.float(), now[0], atol=0.1)
    assert torch.equal(before, after)


def test_lora_kl_reference_after_sft_is_saved_and_read_back_on_resume(tmp_path):
    """LoRA + SFT warm start + KL: the reference is the post-SFT policy (`reference/`, the adapter only), and a
    resumed run reads that back rather than copying the resumed policy or using the base."""
    from turnrl.prepare import reference_model

    run = tmp_path / "run"
    cfg = tiny_config(run, iterations=1)
    cfg.model.lora_rank, cfg.model.lora_alpha = 4, 8.0
    cfg.algo.kl_coef = 0.1
    cfg.sft.lr = 1e-2  # so that the SFT adapter is visibly away from zero
    train(cfg, log=lambda *_: None)
    assert (run / "reference" / "adapter_model.safetensors").exists()
    assert not (run / "reference" / "model.safetensors").exists()
    after_sft = load_policy(str(run / "reference"))
    assert torch.allclose(logits(after_sft), logits(load_policy(str(run / "checkpoints" / "ckpt-000000" / "model"))))
    base = load_policy("tiny", seed=cfg.seed, tiny=TinyModelSpec(32, 1, 2, 64))
    assert not torch.allclose(logits(after_sft), logits(base), atol=1e-4)
    final = load_policy(str(run / "final"))
    ref = reference_model(run, final, cfg, iteration=1)
    assert torch.allclose(reference_logits(ref), logits(after_sft)[0], atol=1e-6)
    assert not torch.allclose(logits(final), logits(after_sft), atol=1e-6)
    cfg.iterations = 2
    train(cfg, resume=True, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1] and all(r["loss/kl"] is not None for r in records)


def test_adapter_checkpoint_roundtrip_holds_no_base_weights(tmp_path):
    policy = lora_policy(value_head=True)
    perturb_adapters(policy)
    with torch.no_grad():
        policy.value_head.bias.fill_(0.25)
    policy.save(tmp_path / "m")
    assert (tmp_path / "m" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "m" / "model.safetensors").exists()
    assert json.loads((tmp_path / "m" / "turnrl_base.json").read_text())["name"] == "tiny"
    again = load_policy(str(tmp_path / "m"), value_head=True)
    assert again.is_lora
    assert torch.allclose(logits(again), logits(policy), atol=1e-6)
    assert torch.equal(again.value_head.bias, policy.value_head.bias)
    assert any(p.requires_grad for p in again.lm.parameters())  # loaded trainable, so a resume keeps learning


def test_checkpoint_size_estimate_counts_the_adapter_not_the_base(tmp_path):
    """The disk check before a run sizes a LoRA checkpoint by what `save` writes (the adapter), not the base."""
    from turnrl.checkpoint import checkpoint_bytes

    policy = lora_policy(value_head=True)
    full = load_policy("tiny", seed=1, tiny=SPEC, value_head=True)
    policy.save(tmp_path / "m")
    weights = sum(f.stat().st_size for f in (tmp_path / "m").iterdir() if f.suffix in (".safetensors", ".pt"))
    estimate = checkpoint_bytes(policy, optimizer=False)
    assert weights <= 1.1 * estimate + 4096 and estimate < checkpoint_bytes(full, optimizer=False) / 2


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for gc in (False, True):
        policy = lora_policy(gradient_checkpointing=gc)
        assert policy.lm.is_gradient_checkpointing == gc
        perturb_adapters(policy)
        policy.train()
        logits_, _ = policy(IDS)
        logits_.float().logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.lm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_lora_layers_skip_the_input_cast_with_the_same_logits_and_gradients(tmp_path):
    """peft's cast of each LoRA input to the adapter's fp32 is switched off (fresh adapters and loaded ones): under
    bf16 autocast it is an exact bf16 -> fp32 -> bf16 round trip, so logits and gradients are bit-identical."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    policy = lora_policy()
    perturb_adapters(policy)
    policy.save(tmp_path / "m")
    for p in (policy, load_policy(str(tmp_path / "m"))):
        layers = [m for m in p.lm.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(m.cast_input_dtype_enabled is False for m in layers)
    results = []
    for cast in (True, False):
        for m in policy.lm.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = cast
        policy.lm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = policy(IDS)
        out.float().logsumexp(-1).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in policy.lm.named_parameters() if p.requires_grad}))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


@pytest.mark.parametrize("bf16", [False, True])
def test_lora_linear_forward_gives_peft_outputs_and_gradients(bf16, tmp_path):
    """turnrl's LoRA Linear forward (the adapter's product added inside one addmm, the input cast once) is installed on
    fresh and loaded adapters and gives peft's own forward's logits and gradients: equal in fp32, within bf16
    rounding under autocast (peft rounds the product, its scaling and the sum separately). With the adapters
    disabled it runs peft's forward: the base model."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = load_policy("tiny", seed=1, tiny=SPEC)
    policy = lora_policy()
    perturb_adapters(policy)
    policy.save(tmp_path / "m")
    for p in (policy, load_policy(str(tmp_path / "m"))):
        layers = [m for m in p.lm.modules() if isinstance(m, LoraLinear)]
        assert len(layers) == 7 * SPEC.num_layers and all("forward" in vars(m) for m in layers)
    layers = [m for m in policy.lm.modules() if isinstance(m, LoraLinear)]
    results = []
    for ours in (True, False):
        saved = {m: vars(m).pop("forward") for m in layers} if not ours else {}
        policy.lm.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = policy(IDS)
        out.float().logsumexp(-1).sum().backward()
        results.append((out.float(), {n: p.grad.clone() for n, p in policy.lm.named_parameters() if p.requires_grad}))
        for m, forward in saved.items():
            m.forward = forward
    (a, grads_a), (b, grads_b) = results
    tol = dict(atol=3e-2, rtol=3e-2) if bf16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, **tol)
    assert (a - logits(base)).abs().max() > 0.5  # the adapters matter
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 2 * len(layers)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], **tol, msg=name)
    with policy.lm.disable_adapter():
        torch.testing.assert_close(logits(policy), logits(base))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_engine_samples_with_merged_adapters_and_leaves_the_parameters_alone(dtype, monkeypatch):
    """The fp32 HF engine samples with each adapter merged into a copy of its base weight (`merged_lora`; the bf16
    engine does not merge, since bf16 would round small adapter updates away): the completions' logprobs are the
    adapted policy's (the unmerged forward's, recomputed here; within bf16 rounding for the bf16 engine, not the
    base model's), and afterwards every parameter is bit-identical and no copy is left, also after an error inside
    the block."""
    import turnrl.engines.hf as hf
    from turnrl.engines import HFEngine, SamplingParams
    from turnrl.lora import merged_lora

    merges = []
    monkeypatch.setattr(hf, "merged_lora", lambda lm: merges.append(lm) or merged_lora(lm))
    policy = lora_policy()
    perturb_adapters(policy)
    before = {n: p.detach().clone() for n, p in policy.lm.named_parameters()}
    engine = HFEngine(policy.lm, eos_token_id=policy.eos_token_id, pad_token_id=policy.pad_token_id,
                      generator=torch.Generator().manual_seed(0), dtype=dtype)
    prompts = [IDS[0].tolist(), IDS[0, :4].tolist()]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0))
    assert len(merges) == (dtype == "float32")
    assert all(torch.equal(p, before[n]) for n, p in policy.lm.named_parameters())
    assert not any("_turnrl_merged" in vars(m) for m in policy.lm.modules())
    base = load_policy("tiny", seed=1, tiny=SPEC)
    far_from_base = 0.0
    for prompt, c in zip(prompts, out):
        ids = torch.tensor([prompt + list(c.ids)])
        with torch.no_grad():
            adapted, base_logits = logits(policy, ids)[0, :-1], logits(base, ids)[0, :-1]
        start = len(prompt) - 1
        expected = torch.log_softmax(adapted.float(), -1)[start:].gather(-1, ids[0, len(prompt):, None])[:, 0]
        got = torch.tensor(c.logprobs)
        torch.testing.assert_close(got, expected, atol=3e-2 if dtype == "bfloat16" else 1e-5, rtol=0)
        of_base = torch.log_softmax(base_logits.float(), -1)[start:].gather(-1, ids[0, len(prompt):, None])[:, 0]
        far_from_base = max(far_from_base, float((got - of_base).abs().max()))
    assert far_from_base > 0.1  # the adapters were applied
    unmerged = logits(policy)
    with pytest.raises(RuntimeError, match="inside"):
        with merged_lora(policy.lm):
            assert sum("_turnrl_merged" in vars(m) for m in policy.lm.modules()) == 7 * SPEC.num_layers
            torch.testing.assert_close(logits(policy), unmerged, atol=1e-5, rtol=1e-5)
            raise RuntimeError("an error inside the block")
    assert not any("_turnrl_merged" in vars(m) for m in policy.lm.modules())


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not module names"):
        load_policy("tiny", tiny=SPEC, lora=LoraSpec(rank=4, targets=("qkv",)))


def test_lora_settings_without_rank_are_an_error():
    with pytest.raises(ConfigError, match="lora_rank"):
        ModelConfig(lora_alpha=16.0)


def test_train_with_lora_and_kl_then_export_merged(tmp_path, capsys):
    """Two RL iterations with LoRA + KL: adapters change, the base does not; the export is a plain HF
    model whose logits equal the trained policy's."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    cfg = tiny_config(run, iterations=2)
    cfg.model.lora_rank, cfg.model.lora_alpha = 4, 8.0
    cfg.algo.kl_coef = 0.1
    cfg.sft.episodes = 0
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/kl"] is not None for r in records)
    trained = load_policy(str(run / "final"))
    start = load_policy(str(run / "checkpoints" / "ckpt-000000" / "model")) \
        if (run / "checkpoints" / "ckpt-000000").exists() else None
    base = load_policy("tiny", seed=cfg.seed, tiny=TinyModelSpec(32, 1, 2, 64))
    base_sd = {k: v for k, v in base.lm.state_dict().items()}
    for name, value in trained.lm.get_base_model().state_dict().items():
        if "lora_" not in name and name.replace(".base_layer", "") in base_sd:
            assert torch.equal(value, base_sd[name.replace(".base_layer", "")]), name
    assert not torch.allclose(logits(trained), logits(base), atol=1e-6)
    if start is not None:
        assert not torch.allclose(logits(trained), logits(start), atol=1e-6)

    out = tmp_path / "merged"
    assert main(["export", str(run), "--merged", str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert not (out / "adapter_config.json").exists()
    assert torch.allclose(logits(plain), logits(trained), atol=1e-5)
    capsys.readouterr()
    assert main(["export", str(run), "--merged", str(out)]) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err


def test_lora_run_resumes_from_its_adapter_checkpoint(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, iterations=1)
    cfg.model.lora_rank = 4
    cfg.sft.episodes = 0
    train(cfg, log=lambda *_: None)
    first = load_policy(str(run / "final"))
    cfg.iterations = 2
    train(cfg, resume=True, log=lambda *_: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1]
    second = load_policy(str(run / "final"))
    assert second.is_lora and not torch.allclose(logits(second), logits(first), atol=1e-6)
