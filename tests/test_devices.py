"""Training with the model on a device (`model.device`), checked on a CPU machine by turnrl.devcheck's simulated
accelerator: every op checks CUDA's placement rules, so a host tensor that would meet a GPU tensor fails here."""
import json

import pytest
import torch

from test_train import tiny_config, weights
from turnrl.config import AlgoConfig, ConfigError, DiagConfig, DistillConfig, TrainConfig
from turnrl.devcheck import DeviceMismatch, simulated_accelerator
from turnrl.prepare import build_policy, policy_device
from turnrl.train import train


def run(out, device: str, **over) -> tuple[list[dict], dict]:
    cfg = tiny_config(out, **over)
    cfg.sft.bf16 = False  # bf16 autocast exists on CPU and CUDA, not on the simulated device: compare in fp32
    cfg.model.device = device
    if device == "meta":
        with simulated_accelerator():
            train(cfg, log=lambda *_: None)
    else:
        train(cfg, log=lambda *_: None)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "eval.json").read_text())


def close(a: dict, b: dict) -> list[str]:
    """Keys of two metrics records that differ beyond float noise (timings aside)."""
    assert a.keys() == b.keys()
    def differ(x, y):
        if x is None or y is None:
            return (x is None) != (y is None)
        return x != pytest.approx(y, rel=2e-3, abs=1e-5)
    return [k for k in a if not k.startswith(("perf/", "time/")) and differ(a[k], b[k])]


def test_the_simulated_device_enforces_cudas_rules():
    with simulated_accelerator():
        on_device = torch.ones(3).to("meta")
        assert on_device.device.type == "meta" and (on_device * 2).device.type == "meta"
        assert (on_device + torch.tensor(1.0)).tolist() == [2.0, 2.0, 2.0]  # 0-dim host tensors mix, as in CUDA
        with pytest.raises(DeviceMismatch, match="aten.add"):
            on_device + torch.ones(3)
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.rand(3, device="meta", generator=torch.Generator())
        assert on_device[[0, 2]].cpu().tolist() == [1.0, 1.0] and on_device.sum().item() == 3.0
        linear = torch.nn.Linear(3, 2).to("meta")
        with pytest.raises(DeviceMismatch, match="linear|addmm|mm"):
            linear(torch.ones(1, 3))
        out = linear(on_device[None])
        out.sum().backward()
        assert linear.weight.grad.device.type == "meta"


@pytest.mark.parametrize("over", [
    {},  # GRPO + StarPO-S filter, SFT, shared-prompt update, evaluations, checkpoints
    {"algo": AlgoConfig(estimator="gae", filter="none", kl_coef=0.01, mismatch_correction="tis")},
    {"algo": AlgoConfig(estimator="turn_gae", filter="dynamic", top_entropy_frac=0.5, off_policy_mask=0.1),
     "diag": DiagConfig(mi_every=1)},
])
def test_training_on_a_device_matches_the_cpu(tmp_path, over):
    on_cpu = run(tmp_path / "cpu", "cpu", **over)
    on_device = run(tmp_path / "device", "meta", **over)
    # the same training up to float noise (the device takes the non-CPU attention kernel of the shared prompt)
    assert [close(a, b) for a, b in zip(on_cpu[0], on_device[0])] == [[]] * len(on_cpu[0])
    assert on_cpu[1] == on_device[1]
    saved = weights(tmp_path / "device" / "final")  # saved from the device, loads on the host
    assert all(t.device.type == "cpu" for t in saved.values())


def test_turn_rows_lora_and_distillation_run_on_a_device(tmp_path):
    """(bf16 autocast, hf_dtype=bfloat16 and optim.bf16, does not exist on the simulated device: not checked here.)"""
    pytest.importorskip("peft")
    teacher = tmp_path / "teacher"
    run(teacher, "cpu", iterations=1)
    cfg_over = dict(iterations=1, algo=AlgoConfig(estimator="grpo", filter="none"),
                    distill=DistillConfig(teacher=str(teacher)))
    cfg = tiny_config(tmp_path / "run", **cfg_over)
    cfg.model.lora_rank = 4
    cfg.rollout.context, cfg.rollout.context_window = "window", 1
    cfg.model.device = "meta"
    with simulated_accelerator():
        train(cfg, log=lambda *_: None)
    assert (tmp_path / "run" / "final").exists()


def test_device_names_are_checked():
    cfg = TrainConfig()
    for name, message in [("gpu", "not a device"), ("meta", "simulated device"), ("mps", "trains on cpu or cuda")]:
        cfg.model.device = name
        with pytest.raises(ConfigError, match=message):
            policy_device(cfg)
    cfg.model.device = "auto"
    assert policy_device(cfg).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        cfg.model.device = "cuda"
        with pytest.raises(ConfigError, match="no CUDA device"):
            policy_device(cfg)
    cfg.model.device = "cpu"
    assert build_policy(cfg).device.type == "cpu"


def test_a_device_run_resumes_with_its_optimizer_and_reference_on_the_device(tmp_path):
    over = dict(iterations=1, algo=AlgoConfig(estimator="gae", filter="none", kl_coef=0.01))
    run(tmp_path / "cpu", "cpu", **{**over, "iterations": 2})
    run(tmp_path / "device", "meta", **over)
    cfg = tiny_config(tmp_path / "device", **{**over, "iterations": 2})
    cfg.sft.bf16, cfg.model.device = False, "meta"
    with simulated_accelerator():
        train(cfg, resume=True, log=lambda *_: None)  # the reference model and the optimizer state come back
    cpu = [json.loads(line) for line in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    device = [json.loads(line) for line in (tmp_path / "device" / "metrics.jsonl").read_text().splitlines()]
    assert [close(a, b) for a, b in zip(cpu, device)] == [[], []]


def test_eval_and_serve_take_a_device(tmp_path, capsys):
    from turnrl.cli import main

    run(tmp_path / "run", "cpu", iterations=0)
    assert main(["eval", str(tmp_path / "run"), "--episodes", "2", "--k", "1", "--device", "cpu"]) == 0
    for command in (["eval", str(tmp_path / "run"), "--episodes", "2"], ["serve", str(tmp_path / "run")]):
        capsys.readouterr()
        assert main(command + ["--device", "gpu"]) == 2
        assert "model.device='gpu' is not a device" in capsys.readouterr().err


def test_a_gpu_too_small_for_the_weights_and_optimizer_fails_before_any_compute(tmp_path, monkeypatch):
    import turnrl.prepare as prepare
    from turnrl.prepare import memory_floor

    cfg = tiny_config(tmp_path / "run")
    policy = build_policy(cfg)
    n = sum(p.numel() for p in policy.parameters())
    need, parts = memory_floor(policy, cfg, total=10**9)
    assert parts == {"weights": 4 * n, "AdamW moments": 8 * n, "gradients": 4 * n} and need == 16 * n
    cfg.algo.kl_coef = 0.01
    cfg.engine.name, cfg.engine.vllm_sleep = "vllm", True
    need, parts = memory_floor(policy, cfg, total=10**9)
    # rollouts: weights, moments, reference and vLLM's half of the GPU; updates: the same plus gradients, minus vLLM
    assert parts["KL reference"] == 4 * n and parts["vLLM"] == 5 * 10**8 and need == 16 * n + 5 * 10**8
    cfg.engine.vllm_sleep = False
    assert memory_floor(policy, cfg, total=10**9)[0] == 20 * n + 5 * 10**8

    cfg = tiny_config(tmp_path / "run")
    cfg.model.device = "meta"
    monkeypatch.setattr(prepare, "device_memory", lambda device: 15 * n)  # one byte per parameter short
    with simulated_accelerator(), pytest.raises(ConfigError, match=r"needs at least .* before any activation"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    monkeypatch.setattr(prepare, "device_memory", lambda device: 16 * n)
    with simulated_accelerator():
        prepare.check_device_memory(build_policy(cfg), cfg)  # fits: no error
