"""Typed configuration: one dataclass per concern, nested in `TrainConfig` (named presets: turnrl.presets).

Every config validates itself in `__post_init__` and fails with a message that says what to change.
A setting that would silently do nothing is an error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

from turnrl.config_json import ConfigError, build, changed_fields  # noqa: F401 (ConfigError: imported from here)
from turnrl.config_json import check as _check
from turnrl.config_services import AttackConfig, JudgeConfig, TrackConfig

# Seed ranges never overlap: evaluation uses [0, TRAIN_SEED_BASE), RL rollouts and SFT demos use
# disjoint ranges above it, so no held-out episode is ever trained on.
EVAL_SEED_LIMIT = 1_000_000
TRAIN_SEED_BASE = 1_000_000
SFT_SEED_BASE = 500_000_000


# Modules that get LoRA adapters by default: attention and MLP projections of Llama-style models
# (the tiny model, SmolLM2, Qwen2.5). Same tuple as turnrl.models.DEFAULT_LORA_TARGETS.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



@dataclass
class ModelConfig:
    name: str = "tiny"  # "tiny" (built-in ~1M Llama, tokenizer built in code), a local model dir, or a hub id
    gguf_file: str | None = None  # GGUF file inside `name` (a directory), e.g. SmolLM2's
    tiny_hidden: int = 128  # tiny model: hidden size
    tiny_layers: int = 4  # tiny model: number of layers
    tiny_heads: int = 4  # tiny model: attention heads
    tiny_ff: int = 512  # tiny model: MLP width
    lora_rank: int = 0  # LoRA adapter rank (PEFT); 0 = full fine-tuning. With LoRA the KL reference (the policy at the start of RL) shares the base: adapters off, or a frozen copy of SFT-trained ones
    lora_alpha: float = 32.0  # LoRA scaling numerator (the update is scaled by alpha / rank)
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = LORA_TARGETS  # module names that get adapters (Llama/Qwen/SmolLM2 names by default)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: about half the peak memory
    device: str = "cpu"  # where the policy trains and the hf engine samples: cpu, cuda, cuda:N, or auto (cuda when available). The vllm engine has its own device

    def __post_init__(self):
        _check(bool(self.name), "model.name is empty: give 'tiny', a model directory or a hub id")
        _check(self.tiny_hidden % self.tiny_heads == 0, "model.tiny_hidden must be divisible by model.tiny_heads")
        self.lora_targets = tuple(self.lora_targets)  # a list after a JSON round trip
        _check(self.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        _check(self.lora_rank > 0 or (self.lora_alpha == 32.0 and self.lora_dropout == 0.0
                                      and self.lora_targets == LORA_TARGETS),
               "model.lora_alpha/lora_dropout/lora_targets configure LoRA, which is off: set model.lora_rank > 0 or remove them")
        _check(self.lora_alpha > 0, f"model.lora_alpha must be > 0, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(len(self.lora_targets) > 0, "model.lora_targets is empty: name at least one module, e.g. q_proj v_proj")


@dataclass
class EnvConfig:
    name: str = "sokoban"  # registered env name or 'package.module:Class'
    kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)  # constructor arguments of the env
    eval_name: str | None = None  # env used for held-out evaluation (default: same as name), e.g. bandit_test
    system_prompt: bool = True  # show the env's rules as a system message (tiny models may skip it)

    def __post_init__(self):
        _check(bool(self.name), "env.name is empty")


@dataclass
class RolloutConfig:
    n_groups: int = 8  # env groups per iteration (distinct start states)
    group_size: int = 16  # episodes per group (same seed, same start state)
    max_turns: int = 5  # model replies per episode
    max_actions_per_turn: int = 5  # actions kept from one '<answer>A || B</answer>'
    max_new_tokens: int = 100  # tokens the model may generate per turn
    max_context_tokens: int = 3600  # episode length limit; overflow truncates the episode
    temperature: float = 1.0  # sampling temperature during training rollouts
    top_p: float = 1.0  # nucleus sampling during rollouts
    think: bool = True  # reply format '<think>..</think><answer>..</answer>'; False: '<answer>..</answer>' only
    strict_format: bool = False  # text after '</answer>' makes the reply invalid (format penalty); default: ignored, as in RAGEN
    format_penalty: float = -0.1  # added to a turn whose reply does not parse or holds an invalid action
    gen_batch_size: int = 128  # episodes per generation batch
    max_live_episodes: int = 0  # episodes played at once (their envs and KV caches; bounds rollout/eval memory): whole groups start as others end; 0 = all. Not the draws: every episode samples from its own stream
    # -- context policy (turnrl/context.py) --
    context: Literal["full", "window", "summary"] = "full"  # full: whole history (RAGEN/UFO); window: last k turns (VAGEN); summary: own last reflection + newest observation (ERA)
    context_window: int = 2  # context=window: completed turns (observation + reply) kept in the prompt; 0 = the newest observation alone
    samples: Literal["auto", "episode", "turn"] = "auto"  # training samples: one per episode, or one per turn (ERA/SkyRL); auto: episode for full, turn otherwise
    # -- fault tolerance (docs/reliability.md) --
    env_timeout: float = 60.0  # seconds an env reset/step may take before its episode fails (0 = no limit; Unix main thread)
    max_env_error_rate: float = 0.1  # fraction of an iteration's episodes whose env may fail before the run stops
    env_threads: int = 0  # env resets, steps and closes run concurrently in this many threads, for envs that wait (web, subprocess, sandbox); 0 = one after another in the main thread. Not the trajectories (envs are independent); a call past env_timeout in a thread is abandoned with its env
    reuse_envs: bool = False  # keep env instances from one rollout or evaluation to the next (reset with each episode's seed) instead of building one per episode: for envs that are slow to build. Same trajectories for envs that pass check_env; an env that failed is never reused

    def __post_init__(self):
        _check(self.env_timeout >= 0, f"rollout.env_timeout must be >= 0 seconds (0 = no limit), got {self.env_timeout}")
        _check(self.env_threads >= 0, f"rollout.env_threads must be >= 0 (0 = main thread), got {self.env_threads}")
        _check(0 <= self.max_env_error_rate < 1,
               f"rollout.max_env_error_rate must be in [0, 1), got {self.max_env_error_rate}")
        for name in ("n_groups", "group_size", "max_turns", "max_actions_per_turn", "max_new_tokens", "gen_batch_size"):
            _check(getattr(self, name) >= 1, f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        _check(self.max_live_episodes >= 0,
               f"rollout.max_live_episodes must be >= 0 (0 = all episodes at once), got {self.max_live_episodes}")
        _check(self.temperature > 0, f"rollout.temperature must be > 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _check(self.max_context_tokens > self.max_new_tokens,
               "rollout.max_context_tokens must exceed rollout.max_new_tokens")
        _check(self.format_penalty <= 0, f"rollout.format_penalty is a penalty and must be <= 0, got {self.format_penalty}")
        _check(self.context_window >= 0, f"rollout.context_window must be >= 0, got {self.context_window}")
        _check(self.context == "window" or self.context_window == 2,
               f"rollout.context_window={self.context_window} is used only with rollout.context='window'")
        _check(not (self.context != "full" and self.samples == "episode"),
               f"rollout.samples='episode' cannot train rollout.context={self.context!r}: its prompts are not prefixes "
               "of one sequence; use rollout.samples='turn' (or 'auto')")
        _check(not (self.context == "summary" and not self.think),
               "rollout.context='summary' carries the model's <think> text between turns: it needs rollout.think=true")

    @property
    def turn_rows(self) -> bool:
        """One training row per turn (rollout.samples, resolved)."""
        return self.samples == "turn" or (self.samples == "auto" and self.context != "full")


# Estimator families (docs/algorithms.md, "Wiring in the trainer").
SEQUENCE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")  # one advantage per episode
TURN_ESTIMATORS = ("turn_gae", "gigpo", "rebn")  # one advantage per turn, broadcast over the turn's reply tokens
TOKEN_ESTIMATORS = ("gae", "bi_level_gae")  # one advantage per model token
CRITIC_ESTIMATORS = ("gae", "turn_gae", "bi_level_gae")  # train a value head
GROUP_ESTIMATORS = ("grpo", "rloo", "gigpo", "reinforce_pp")  # compare episodes of one group: group_size >= 2
GAMMA_ESTIMATORS = ("gae", "turn_gae", "bi_level_gae", "gigpo", "rebn")  # use algo.gamma
LAM_ESTIMATORS = ("gae", "turn_gae", "bi_level_gae")  # use algo.lam
# Dynamic sampling's extra rollout rounds draw seeds this far above the regular stream (see train.iteration_seeds).
DYNAMIC_SEED_OFFSET = 5_000_000

Estimator = Literal["grpo", "dr_grpo", "rloo", "gae", "turn_gae", "bi_level_gae", "gigpo", "reinforce_pp", "rebn"]


@dataclass
class AlgoConfig:
    estimator: Estimator = "grpo"  # advantage estimator (docs/algorithms.md); gae/turn_gae/bi_level_gae train a value head
    gamma: float = 1.0  # discount per decision: per model token (gae), per turn (turn_gae, bi_level_gae, gigpo, rebn)
    lam: float = 1.0  # GAE lambda (gae, turn_gae, bi_level_gae)
    token_gamma: float = 1.0  # bi_level_gae only: discount between tokens inside a turn (gamma is the turn discount)
    gigpo_omega: float = 1.0  # gigpo only: weight of the step-level (anchor state) advantage
    loss: Literal["ppo", "gspo"] = "ppo"  # ppo: token ratio clip; gspo: sequence ratio (use tiny clips, e.g. 3e-4/4e-4)
    filter: Literal["std", "none", "dynamic"] = "std"  # std: StarPO-S top groups by reward std; dynamic: DAPO resampling
    filter_keep: float = 0.25  # fraction of groups kept by the std filter
    drop_zero_std: bool = False  # also drop groups whose rewards are all equal (no learning signal)
    dynamic_max_rounds: int = 3  # filter=dynamic: at most this many rollout rounds per iteration (the first included)
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.28  # PPO ratio clip above 1 (clip-higher, DAPO)
    dual_clip: float | None = None  # dual-clip constant (> 1) for negative advantages; None = off (ppo loss only)
    kl_coef: float = 0.0  # KL penalty to a frozen reference (k-estimator below); 0 = off, no reference kept
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # KL estimator when kl_coef > 0
    entropy_coef: float = 0.001  # entropy bonus
    vf_coef: float = 0.5  # value loss weight (critic estimators only)
    value_clip: float = 0.2  # value clipping range (critic estimators only)
    critic_warmup: int = 0  # first N iterations train only the value head, the policy is not updated (ERA)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"  # loss aggregation
    epochs: int = 1  # passes over each batch
    minibatches: int = 1  # optimizer steps per epoch
    # sampler/trainer log-prob gap (bf16 or vLLM engines): off = PPO's old log-probs are the engine's; else the
    # trainer recomputes them (one more forward) and tis weights tokens by min(rho, high), icepop drops tokens with
    # rho outside [low, high], geo-mask drops rows whose geometric-mean rho is outside it (docs/algorithms.md)
    mismatch_correction: Literal["off", "tis", "icepop", "geo-mask"] = "off"
    mismatch_low: float | None = None  # lower bound of rho (icepop, geo-mask); None = 0.5 (icepop), 0.999 (geo-mask)
    mismatch_high: float | None = None  # upper bound (tis: the weight cap); None = 2.0 (tis), 5.0 (icepop), 1.001 (geo-mask)
    off_policy_mask: float | None = None  # DeepSeek-V3.2's off-policy sequence mask: negative-advantage tokens of rows whose mean log(pi_sampled / pi_current) exceeds this leave the policy loss; None = off
    top_entropy_frac: float = 1.0  # policy gradient only on this fraction of model tokens, those of highest entropy at the update's start (0.2 = "80/20", Wang et al. 2025; one more forward); 1 = all

    def __post_init__(self):
        est = self.estimator
        mode = self.mismatch_correction
        _check(mode != "off" or (self.mismatch_low is None and self.mismatch_high is None),
               "algo.mismatch_low/mismatch_high bound the mismatch correction, which is off: set "
               "algo.mismatch_correction or remove them")
        _check(mode != "tis" or self.mismatch_low is None,
               "algo.mismatch_low is not used by mismatch_correction='tis' (it only caps weights at mismatch_high): "
               "remove it")
        _check((self.mismatch_low is None or self.mismatch_low > 0) and (self.mismatch_high is None or self.mismatch_high > 0),
               "algo.mismatch_low and algo.mismatch_high must be > 0")
        if mode in ("icepop", "geo-mask"):
            from turnrl.algos.correction import bounds

            low, high = bounds(mode, self.mismatch_low, self.mismatch_high)
            _check(low <= 1 <= high, f"algo.mismatch_low <= 1 <= algo.mismatch_high is needed (a band around "
                   f"rho = 1, where sampler and trainer agree), got [{low}, {high}]")
        _check(0 < self.filter_keep <= 1, f"algo.filter_keep must be in (0, 1], got {self.filter_keep}")
        _check(not (self.filter == "std" and self.filter_keep == 1.0 and not self.drop_zero_std),
               "algo.filter='std' with filter_keep=1.0 keeps everything: set algo.filter='none' or lower filter_keep")
        _check(est in GAMMA_ESTIMATORS or self.gamma == 1.0,
               f"algo.gamma is only used by estimators {', '.join(GAMMA_ESTIMATORS)}, not {est!r}: "
               "remove it or pick one of those")
        _check(est in LAM_ESTIMATORS or self.lam == 1.0,
               f"algo.lam is only used by estimators {', '.join(LAM_ESTIMATORS)}, not {est!r}: "
               "remove it or pick one of those")
        _check(est == "bi_level_gae" or self.token_gamma == 1.0,
               f"algo.token_gamma is only used by estimator 'bi_level_gae', not {est!r}: remove it")
        _check(est == "gigpo" or self.gigpo_omega == 1.0,
               f"algo.gigpo_omega is only used by estimator 'gigpo', not {est!r}: remove it")
        _check(est in CRITIC_ESTIMATORS or (self.vf_coef == 0.5 and self.value_clip == 0.2),
               f"algo.vf_coef/value_clip configure the value head, which estimator {est!r} does not train: "
               f"remove them or use one of {', '.join(CRITIC_ESTIMATORS)}")
        _check(est in CRITIC_ESTIMATORS or self.critic_warmup == 0,
               f"algo.critic_warmup > 0 warms up a value head, which estimator {est!r} does not have: "
               f"set it to 0 or use one of {', '.join(CRITIC_ESTIMATORS)}")
        _check(self.critic_warmup >= 0, "algo.critic_warmup must be >= 0")
        _check(not (self.loss == "gspo" and est in TOKEN_ESTIMATORS),
               f"algo.loss='gspo' needs one advantage per sequence, but {est!r} gives one per token: "
               "use loss='ppo' or a sequence/turn-level estimator")
        _check(not (self.loss == "gspo" and self.dual_clip is not None),
               "algo.dual_clip applies to loss='ppo' only: remove it or use loss='ppo'")
        _check(self.off_policy_mask is None or self.off_policy_mask > 0,
               f"algo.off_policy_mask must be > 0 (or None = off), got {self.off_policy_mask}")
        _check(0 < self.top_entropy_frac <= 1, f"algo.top_entropy_frac must be in (0, 1], got {self.top_entropy_frac}")
        _check(self.loss != "gspo" or self.top_entropy_frac == 1.0,
               "algo.top_entropy_frac selects tokens for the per-token ratio of loss='ppo'; loss='gspo' takes one "
               "ratio per sequence: remove it or use loss='ppo'")
        _check(self.dynamic_max_rounds >= 1, "algo.dynamic_max_rounds must be >= 1")
        _check(self.filter == "dynamic" or self.dynamic_max_rounds == 3,
               "algo.dynamic_max_rounds is only used by algo.filter='dynamic': remove it or set filter='dynamic'")
        _check(self.clip_low > 0 and self.clip_high > 0, "algo.clip_low and algo.clip_high must be > 0")
        _check(self.dual_clip is None or self.dual_clip > 1, "algo.dual_clip must be > 1 (or None)")
        _check(self.kl_coef >= 0, "algo.kl_coef must be >= 0")
        _check(self.kl_coef > 0 or self.kl_estimator == "k3",
               "algo.kl_estimator is only used when algo.kl_coef > 0: remove it or set kl_coef")
        _check(self.epochs >= 1 and self.minibatches >= 1, "algo.epochs and algo.minibatches must be >= 1")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1 and 0 <= self.token_gamma <= 1,
               "algo.gamma, algo.lam and algo.token_gamma must be in [0, 1]")
        _check(self.gigpo_omega >= 0, "algo.gigpo_omega must be >= 0")

    @property
    def needs_critic(self) -> bool:
        return self.estimator in CRITIC_ESTIMATORS


@dataclass
class RewardConfig:
    """Reward shaping applied to each episode's turn rewards before filtering and advantages
    (turnrl.shaping.shape_rewards; order: dense->sparse switch, turn decay, repetition penalty)."""

    turn_decay: float = 1.0  # UFO: the reward of the turn in which an episode succeeds is scaled by turn_decay**t (t from 0); 1 = off
    repetition_penalty: float = 0.0  # UFO: lambda * (1 - distinct answers / replies) subtracted from the last turn; 0 = off
    dense_until: int = 0  # ERA: env rewards until this iteration, then only 1.0/0.0 success on the last turn; 0 = off

    def __post_init__(self):
        _check(0 < self.turn_decay <= 1, f"reward.turn_decay must be in (0, 1], got {self.turn_decay}")
        _check(self.repetition_penalty >= 0, f"reward.repetition_penalty must be >= 0, got {self.repetition_penalty}")
        _check(self.dense_until >= 0, f"reward.dense_until must be >= 0, got {self.dense_until}")

    @property
    def active(self) -> bool:
        return self.turn_decay != 1.0 or self.repetition_penalty > 0 or self.dense_until > 0


@dataclass
class OptimConfig:
    lr: float = 1e-6  # learning rate of RL updates (RAGEN actor default)
    warmup_steps: int = 10  # linear warm-up of the RL learning rate, in optimizer steps
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay to 10% at the last iteration
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    micro_batch_tokens: int = 4096  # padded tokens per forward/backward micro-batch (length-sorted, so little padding)
    bf16: bool = False  # bf16 autocast for training forwards (fp32 master weights)
    # a group's shared first prompt (and the head all prompts share) is run forward/backward once per micro-batch and
    # its keys/values reused (turnrl/shared_prefix.py; same gradients; critics and gradient checkpointing included,
    # docs/algorithms.md says where not); off: per row
    shared_prefix: bool = True
    # -- fault tolerance (docs/reliability.md) --
    max_bad_updates: int = 3  # stop after this many consecutive updates with NaN/inf advantages, loss or gradients

    def __post_init__(self):
        _check(self.max_bad_updates >= 1, f"optim.max_bad_updates must be >= 1, got {self.max_bad_updates}")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.micro_batch_tokens >= 64, "optim.micro_batch_tokens must be >= 64")
        _check(self.max_grad_norm > 0, "optim.max_grad_norm must be > 0")


@dataclass
class SFTConfig:
    episodes: int = 0  # solver demonstration episodes for the warm start; 0 = no SFT
    env: str | None = None  # env of the demonstrations (default: env.name, with env.kwargs), e.g. bandit_format
    epsilon: float = 0.0  # probability of a random action in a demonstration (noisy demos)
    steps: int = 500  # SFT optimizer steps
    batch_size: int = 64  # demonstrations per SFT step
    lr: float = 1e-3  # SFT peak learning rate (cosine decay to 10%)
    bf16: bool = True  # bf16 autocast for SFT forwards (about 2x faster on CPUs with bf16 support)

    def __post_init__(self):
        _check(self.episodes >= 0, "sft.episodes must be >= 0")
        _check(0 <= self.epsilon <= 1, f"sft.epsilon must be in [0, 1], got {self.epsilon}")
        _check(self.steps >= 1 and self.batch_size >= 1, "sft.steps and sft.batch_size must be >= 1")


@dataclass
class DiagConfig:
    # template-collapse diagnostics (turnrl/diagnostics.py, RAGEN-2): every N iterations, score each sampled first
    # reply under every first prompt of the batch and log the collapse/* metrics; 0 = off
    mi_every: int = 0
    mi_replies: int = 32  # replies scored (round-robin over the prompts); the cost is replies x prompts scorings

    def __post_init__(self):
        _check(self.mi_every >= 0, f"diag.mi_every must be >= 0 (0 = off), got {self.mi_every}")
        _check(self.mi_replies >= 2, f"diag.mi_replies must be >= 2, got {self.mi_replies}")


@dataclass
class EvalConfig:
    episodes: int = 128  # held-out start states per evaluation
    k: int = 4  # samples per start state (pass@k)
    temperature: float = 1.0  # sampling temperature of the evaluation
    greedy: bool = True  # also report greedy (temperature 0) success
    seed: int = 1234  # sampling seed of the evaluation (the env seeds are fixed: 0..episodes-1)
    # also evaluate on the training env (env.name) when env.eval_name differs: "<point>@<env>" entries in eval.json
    train_env: bool = False
    every: int = 0  # also evaluate after every N-th RL update, logged as eval/* keys in metrics.jsonl; 0 = off
    every_episodes: int = 0  # held-out start states of those evaluations; 0 = eval.episodes

    def __post_init__(self):
        _check(1 <= self.episodes < EVAL_SEED_LIMIT, f"eval.episodes must be in [1, {EVAL_SEED_LIMIT})")
        _check(self.every >= 0, f"eval.every must be >= 0 (0 = off), got {self.every}")
        _check(0 <= self.every_episodes < EVAL_SEED_LIMIT, f"eval.every_episodes must be in [0, {EVAL_SEED_LIMIT})")
        _check(self.k >= 1, "eval.k must be >= 1")
        _check(self.temperature > 0, "eval.temperature must be > 0 (use eval.greedy for temperature 0)")


ENGINE_VLLM_DEFAULTS = {"vllm_dtype": "auto", "vllm_weight_sync": "auto", "vllm_gpu_memory_utilization": 0.5,
                        "vllm_sleep": True, "vllm_enforce_eager": True, "vllm_cpu_kv_cache_gib": 1.0}


@dataclass
class EngineConfig:
    """The generation backend of training rollouts and evaluation (turnrl.engines)."""

    name: Literal["hf", "vllm"] = "hf"  # hf: turnrl's KV-cached decode loop on the policy itself; vllm: a vLLM copy of the policy, re-synced after every update (pip install 'turnrl[vllm]'; README, "vLLM engine")
    hf_dtype: Literal["float32", "bfloat16"] = "float32"  # hf: precision of rollouts and evaluation; bfloat16 = bf16 autocast with bf16 weight copies, ~1.3x faster SmolLM2 rollouts on CPU but logprobs off by bf16 rounding (docs/engines.md)
    hf_merge_lora: Literal["auto", "on", "off"] = "auto"  # hf in fp32, LoRA policies: sample with each adapter merged into a copy of its weight (~4% faster SmolLM2 rollouts; one more copy of the adapted weights in memory while generating); auto = on unless model.gradient_checkpointing asks for low memory
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # vllm: weights and activations; auto = bfloat16 on GPU, float32 on CPU
    vllm_weight_sync: Literal["auto", "full", "lora"] = "auto"  # vllm: full = merged weights after every update; lora = the adapter as a LoRARequest (LoRA policies); auto = lora for a LoRA policy on GPU, else full
    vllm_gpu_memory_utilization: float = 0.5  # vllm on GPU: fraction of GPU memory vLLM takes for weights + KV cache (RAGEN: 0.5)
    vllm_sleep: bool = True  # vllm on GPU: vLLM frees its GPU memory during each update (sleep mode) and wakes for the next rollout
    vllm_enforce_eager: bool = True  # vllm: no CUDA graphs / torch.compile (starts much faster; RAGEN runs eager too)
    vllm_cpu_kv_cache_gib: float = 1.0  # vllm on CPU: KV-cache memory in GiB (vLLM's own default takes ~16 GiB)

    def __post_init__(self):
        _check(self.name == "hf" or self.hf_dtype == "float32",
               f"engine.hf_dtype configures the hf engine, but engine.name is {self.name!r}: remove it "
               "(the vllm engine's precision is engine.vllm_dtype)")
        _check(self.name == "hf" or self.hf_merge_lora == "auto",
               f"engine.hf_merge_lora configures the hf engine, but engine.name is {self.name!r}: remove it "
               "(the vllm engine's LoRA handling is engine.vllm_weight_sync)")
        if self.name != "vllm":
            changed = [k for k, v in ENGINE_VLLM_DEFAULTS.items() if getattr(self, k) != v]
            _check(not changed, f"engine.{changed[0] if changed else ''} configures the vllm engine, which is off: "
                   "set engine.name='vllm' or remove it")
        _check(0 < self.vllm_gpu_memory_utilization <= 1,
               f"engine.vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        _check(self.vllm_cpu_kv_cache_gib > 0, f"engine.vllm_cpu_kv_cache_gib must be > 0, got {self.vllm_cpu_kv_cache_gib}")


@dataclass
class DistributedConfig:
    """Ray rollout workers (turnrl.distributed, docs/distributed.md): training rollouts and evaluations played by
    separate processes, each with its own copy of the policy and its own envs; the update stays in the trainer."""

    workers: int = 0  # rollout worker processes (pip install 'turnrl[ray]'); 0 = rollouts in the training process. The trajectories do not depend on it
    address: str = ""  # Ray cluster to join ("auto", "host:6379"); "" = start a local Ray instance for the run
    cpus_per_worker: float = 1.0  # CPUs Ray reserves per worker; a CPU worker runs that many torch threads (at least 1)
    gpus_per_worker: float = 0.0  # GPUs Ray gives each worker (fractions share one), where its vllm engine runs; needs engine.name='vllm'
    overlap: bool = False  # the workers play the next iteration's rollout while the trainer updates: one update of policy lag (off-policy by one step; pair with algo.mismatch_correction)

    def __post_init__(self):
        _check(self.workers >= 0, f"distributed.workers must be >= 0, got {self.workers}")
        _check(self.cpus_per_worker > 0, f"distributed.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        _check(self.gpus_per_worker >= 0, f"distributed.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        unused = [k for k, default in (("address", ""), ("cpus_per_worker", 1.0), ("gpus_per_worker", 0.0),
                                       ("overlap", False)) if getattr(self, k) != default]
        _check(self.workers > 0 or not unused, f"distributed.{unused[0] if unused else ''} configures Ray rollout "
               "workers, but distributed.workers=0 (rollouts in the training process): set distributed.workers or "
               "remove it")


@dataclass
class DistillConfig:
    """On-policy distillation (docs/algorithms.md): a frozen teacher scores every token the student samples and
    the per-token reverse KL enters the advantages (turnrl.algos.reverse_kl_advantages)."""

    teacher: str = ""  # teacher model: a turnrl run directory (its final model), a model directory, 'tiny', a known name or hub id; must share the policy's tokenizer. "" = off
    coef: float = 1.0  # weight of the per-token advantage log pi_teacher - log pi_student
    task_reward: bool = True  # keep the estimator's task advantages and add the distillation term; false = distillation alone (needs algo.filter='none')

    def __post_init__(self):
        _check(self.coef > 0, f"distill.coef must be > 0, got {self.coef}")
        _check(bool(self.teacher) or (self.coef == 1.0 and self.task_reward),
               "distill.coef and distill.task_reward configure on-policy distillation, which is off: set "
               "distill.teacher or remove them")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    iterations: int = 200  # RL iterations
    seed: int = 0  # seed of model init, sampling and the RL seed stream
    out: str = "runs/latest"  # run directory (config.json, metrics.jsonl, eval.json, checkpoints/, final/)
    save_every: int = 10  # checkpoint every N iterations (and at the end)
    keep_checkpoints: int = 2  # checkpoints kept on disk
    threads: int = 0  # torch threads; 0 = all cores
    progress: bool = True  # show a progress bar
    # rollout episodes per iteration written to samples.jsonl, and held-out ones per evaluation to
    # eval_samples.json (turnrl report); 0 = none
    samples_per_iteration: int = 2

    def __post_init__(self):
        _check(self.iterations >= 0, f"iterations must be >= 0, got {self.iterations}")
        _check(self.save_every >= 1 and self.keep_checkpoints >= 1, "save_every and keep_checkpoints must be >= 1")
        _check(self.threads >= 0, "threads must be >= 0")
        _check(self.samples_per_iteration >= 0, f"samples_per_iteration must be >= 0, got {self.samples_per_iteration}")
        kept = self.rollout.n_groups * self.algo.filter_keep if self.algo.filter == "std" else self.rollout.n_groups
        _check(kept >= 0.5, f"algo.filter_keep={self.algo.filter_keep} keeps no group of rollout.n_groups={self.rollout.n_groups}")
        _check(not (self.algo.estimator in GROUP_ESTIMATORS and self.rollout.group_size < 2),
               f"estimator {self.algo.estimator!r} compares episodes within a group: rollout.group_size must be >= 2")
        _check(not (self.algo.filter == "std" and self.rollout.group_size < 2),
               "algo.filter='std' ranks groups by reward std: rollout.group_size must be >= 2")
        _check(not (self.algo.filter == "dynamic" and self.rollout.group_size < 2),
               "algo.filter='dynamic' drops groups whose rewards are all equal, which a group of one always is: "
               "rollout.group_size must be >= 2")
        _check(not (self.algo.filter == "dynamic"
                    and self.iterations * self.rollout.n_groups * self.algo.dynamic_max_rounds > DYNAMIC_SEED_OFFSET),
               f"iterations x rollout.n_groups x algo.dynamic_max_rounds must be <= {DYNAMIC_SEED_OFFSET} "
               "(the dynamic-sampling seed range would overlap the regular one)")
        _check(self.algo.critic_warmup == 0 or self.algo.critic_warmup < self.iterations,
               f"algo.critic_warmup={self.algo.critic_warmup} >= iterations={self.iterations}: the policy would "
               "never be updated; lower critic_warmup or raise iterations")
        _check(self.engine.name != "vllm" or self.rollout.top_p == 1.0,
               "engine.name='vllm' reports logprobs under the top-p truncated distribution, which the trainer does "
               "not recompute: set rollout.top_p=1.0 with the vllm engine")
        _check(self.engine.vllm_weight_sync != "lora" or self.model.lora_rank > 0,
               "engine.vllm_weight_sync='lora' pushes LoRA adapters, but model.lora_rank=0: set model.lora_rank or "
               "use vllm_weight_sync='full'")
        _check(not self.distributed.overlap or self.algo.filter != "dynamic",
               "distributed.overlap plays one rollout round ahead, but algo.filter='dynamic' decides its extra "
               "rounds after the update has begun: use another filter or distributed.overlap=false")
        _check(not self.distributed.overlap or not self.diag.mi_every,
               "diag.mi_every scores a rollout under the policy that sampled it, which distributed.overlap has "
               "already updated: set diag.mi_every=0 or distributed.overlap=false")
        _check(self.distributed.gpus_per_worker == 0 or self.engine.name == "vllm",
               "distributed.gpus_per_worker places each worker's vllm engine on a GPU, but engine.name='hf' samples "
               "on the CPU: set engine.name='vllm' or distributed.gpus_per_worker=0")
        _check(self.reward.dense_until == 0 or self.reward.dense_until < self.iterations,
               f"reward.dense_until={self.reward.dense_until} >= iterations={self.iterations}: rewards never turn "
               "sparse; lower dense_until (0 = off) or raise iterations")

        if self.distill.teacher:
            _check(self.algo.loss != "gspo", "distill.teacher gives each token its own advantage, which algo.loss="
                   "'gspo' (one ratio per sequence) cannot use: set algo.loss='ppo'")
            _check(self.distill.task_reward or not self.algo.needs_critic,
                   f"distill.task_reward=false trains on distillation alone, so estimator {self.algo.estimator!r}'s "
                   "value head would learn returns nobody uses: use estimator 'grpo' or distill.task_reward=true")
            _check(self.distill.task_reward or self.algo.filter == "none",
                   f"distill.task_reward=false: every episode carries the distillation signal, but algo.filter="
                   f"{self.algo.filter!r} selects groups by task reward: set algo.filter='none'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        """Builds a config from JSON data (a run's config.json), checking every field's name and type."""
        return build(cls, data)


def diff_configs(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the fields that differ (used to refuse resuming with another config)."""
    return changed_fields(a.to_dict(), b.to_dict(), ignore)
