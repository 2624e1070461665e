"""Engine choice (engine.name hf|vllm) and the GPU presets that use the vLLM engine: no GPU, no vLLM needed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from turnrl.cli import main
from turnrl.config import ConfigError, EngineConfig, ModelConfig, RolloutConfig, TrainConfig
from turnrl.presets import get_preset

GPU_PRESETS = ("ragen-sokoban-0.5b", "ragen-frozenlake-0.5b", "ragen-bandit-0.5b", "ufo-math-3b")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_presets_build_valid_vllm_configs(name):
    cfg = get_preset(name)
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))  # what a run's config.json reads back as
    assert again == cfg
    assert cfg.engine.name == "vllm" and cfg.engine.vllm_gpu_memory_utilization == 0.5
    assert cfg.model.name.startswith("Qwen/Qwen2.5-")
    # RAGEN v1 / UFO: 8 groups x 16, top-25% reward-std filter, PPO + GAE, clip 0.2/0.28, lr 1e-6, 200 iterations
    assert (cfg.rollout.n_groups, cfg.rollout.group_size) == (8, 16)
    assert (cfg.algo.filter, cfg.algo.filter_keep, cfg.algo.estimator) == ("std", 0.25, "gae")
    assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.optim.lr, cfg.iterations) == (0.2, 0.28, 1e-6, 200)
    assert cfg.rollout.top_p == 1.0 and cfg.eval.temperature == 0.5


def test_gpu_preset_specifics():
    bandit, lake, ufo = get_preset("ragen-bandit-0.5b"), get_preset("ragen-frozenlake-0.5b"), get_preset("ufo-math-3b")
    assert (bandit.env.name, bandit.env.eval_name, bandit.rollout.max_turns) == ("bandit", "bandit_test", 1)
    assert lake.env.name == "frozen_lake" and lake.rollout.max_actions_per_turn == 5
    assert ufo.model.name == "Qwen/Qwen2.5-3B-Instruct" and ufo.rollout.max_context_tokens == 8192
    assert ufo.env.kwargs["hf_dataset"] == "metamathqa" and ufo.algo.kl_coef == 0.001


def test_engine_config_rejects_settings_that_would_do_nothing():
    with pytest.raises(ConfigError, match="vllm_sleep configures the vllm engine"):
        EngineConfig(name="hf", vllm_sleep=False)
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        EngineConfig(name="vllm", vllm_gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="top_p=1.0"):
        TrainConfig(rollout=RolloutConfig(top_p=0.9), engine=EngineConfig(name="vllm"))
    with pytest.raises(ConfigError, match="lora_rank"):
        TrainConfig(engine=EngineConfig(name="vllm", vllm_weight_sync="lora"))
    TrainConfig(model=ModelConfig(lora_rank=8), engine=EngineConfig(name="vllm", vllm_weight_sync="lora"))
    with pytest.raises(ConfigError, match="unknown config field 'engine.nam'"):
        TrainConfig.from_dict({"engine": {"nam": "vllm"}})
    with pytest.raises(ConfigError, match="hf_dtype configures the hf engine"):
        EngineConfig(name="vllm", hf_dtype="bfloat16")


def test_hf_dtype_reaches_the_engine():
    """`--engine.hf-dtype bfloat16` builds the rollout/eval HF engine in bf16; the default is exact fp32."""
    import torch

    from turnrl.evaluate import engine_for
    from turnrl.models import load_policy

    policy = load_policy("tiny", seed=0)
    for dtype in ("float32", "bfloat16"):
        cfg = TrainConfig(engine=EngineConfig(hf_dtype=dtype))
        assert engine_for(policy, cfg, torch.Generator()).dtype == dtype
    assert EngineConfig().hf_dtype == "float32"
    from turnrl.cli import _parse_config

    cfg = _parse_config(TrainConfig, get_preset("bandit-tiny"), ["--engine.hf-dtype", "bfloat16"], "")
    assert cfg.engine.hf_dtype == "bfloat16"
    assert TrainConfig.from_dict(json.loads(cfg.to_json())).engine.hf_dtype == "bfloat16"  # config.json round trip


def test_hf_merge_lora_reaches_the_engine():
    """`engine.hf_merge_lora`: auto merges a LoRA policy's adapters for sampling unless gradient checkpointing asks
    for low memory; on/off force it; the vllm engine refuses the field."""
    import torch

    from turnrl.evaluate import engine_for
    from turnrl.models import load_policy

    policy = load_policy("tiny", seed=0)
    for merge, checkpointing, expected in [("auto", False, True), ("auto", True, False), ("on", True, True),
                                           ("off", False, False)]:
        cfg = TrainConfig(model=ModelConfig(gradient_checkpointing=checkpointing),
                          engine=EngineConfig(hf_merge_lora=merge))
        assert engine_for(policy, cfg, torch.Generator()).merge_lora is expected, (merge, checkpointing)
    with pytest.raises(ConfigError, match="hf_merge_lora configures the hf engine"):
        EngineConfig(name="vllm", hf_merge_lora="off")


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vLLM is missing")
def test_vllm_engine_without_vllm_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "--preset", "bandit-tiny", "--engine.name", "vllm", "--out", str(tmp_path / "r"),
                 "--iterations", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "vllm" in err and "pip install" in err
    code = main(["eval", "--engine", "vllm", "tiny", "--env", "bandit", "--episodes", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "vllm" in err and len(err.splitlines()) == 1


def test_training_with_the_bf16_hf_engine(tmp_path):
    """A run whose rollouts and evaluation sample with engine.hf_dtype=bfloat16 trains, evaluates and logs a
    sampler/trainer logprob gap of bf16 size (docs/engines.md), and leaves fp32 weights behind."""
    import math

    import torch

    from test_train import tiny_config
    from turnrl.models import load_policy
    from turnrl.train import train

    cfg = tiny_config(tmp_path / "run", engine=EngineConfig(hf_dtype="bfloat16"), iterations=1)
    evals = train(cfg, log=lambda *_: None)
    assert evals
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["actor/logprob_mismatch"] for r in records if r.get("actor/logprob_mismatch") is not None]
    # bf16 rounding against this fp32 trainer (measured 2.6e-4; an fp32 engine gives ~2e-7)
    assert gaps and all(math.isfinite(g) and 1e-5 < g < 0.1 for g in gaps)
    assert all(p.dtype == torch.float32 for p in load_policy(str(tmp_path / "run" / "final")).lm.parameters())


def test_training_with_the_bf16_hf_engine_and_the_mismatch_correction(tmp_path):
    """The bf16 engine is a real sampler/trainer gap on a CPU: with algo.mismatch_correction='tis' the run
    recomputes the old logprobs and logs the documented mismatch/* metrics, ratios of bf16 size around 1."""
    import re

    from test_train import DOCS, tiny_config
    from turnrl.config import AlgoConfig
    from turnrl.train import train

    algo = AlgoConfig(estimator="grpo", filter="std", filter_keep=0.5, mismatch_correction="tis")
    cfg = tiny_config(tmp_path / "run", engine=EngineConfig(hf_dtype="bfloat16"), algo=algo, iterations=2)
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    updated = [r for r in records if r["train/skipped_update"] == 0.0]
    assert updated
    for r in updated:
        assert 1e-5 < r["actor/logprob_mismatch"] < 0.1
        assert r["mismatch/ratio_min"] < 1 < r["mismatch/ratio_max"] < 2 and abs(r["mismatch/ratio_mean"] - 1) < 0.05
        assert 0 < r["mismatch/k3_kl"] < 1e-2 and r["mismatch/affected_frac"] == 0.0
    documented = set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(), flags=re.M))
    assert set().union(*(r.keys() for r in records)) <= documented
