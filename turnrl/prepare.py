"""Everything a training run sets up before its first RL iteration: checks that fail fast (ConfigError, exit 2 on
the CLI) before any compute is spent, the policy and its optimizer, the SFT warm start from solver demonstrations,
and the frozen KL reference. `turnrl.train` runs the loop on what these build."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from turnrl.checkpoint import check_free_space, checkpoint_bytes, is_run_dir, run_model_dir, save_model_atomic
from turnrl.config import SFT_SEED_BASE, ConfigError, TrainConfig
from turnrl.devcheck import simulation_active
from turnrl.envs import RemoteEnvError, has_solver, make
from turnrl.evaluate import renderer_for, settings_for
from turnrl.models import LoraSpec, ModelLoadError, TinyModelSpec, count_parameters, load_policy
from turnrl.reference import Reference, reference_of, saved_adapter_weights
from turnrl.sft import make_demonstrations, sft


def check_output_dir(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {out!r} is not writable: {err.strerror}") from err
    return path


def check_model_fits(policy, cfg: TrainConfig, run_dir: Path) -> None:
    """Fails before the first rollout (ConfigError) when the context budget exceeds the model's positions
    or the disk cannot hold a checkpoint (with room for the KL reference and the final model)."""
    # Most HF decoder configs name their positional limit max_position_embeddings (GPT-2 maps n_positions
    # onto it); a config without it sets no limit we can check.
    limit = getattr(policy.lm.config, "max_position_embeddings", None)
    if limit is not None and cfg.rollout.max_context_tokens > limit:
        raise ConfigError(f"rollout.max_context_tokens={cfg.rollout.max_context_tokens} exceeds the model's "
                          f"{limit} positions: set rollout.max_context_tokens <= {limit}")
    copies = 1 + (cfg.algo.kl_coef > 0)  # a checkpoint (+ the reference model, written once)
    needed = int(1.2 * (checkpoint_bytes(policy) + (copies - 1) * checkpoint_bytes(policy, optimizer=False)))
    try:
        check_free_space(run_dir, needed)
    except OSError as err:
        raise ConfigError(f"not enough disk space for checkpoints: {err.strerror}") from err
    check_device_memory(policy, cfg)


def device_memory(device: torch.device) -> int | None:
    """Total memory of an accelerator in bytes; None for the host (or a device whose size torch does not report)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def memory_floor(policy, cfg: TrainConfig, total: int) -> tuple[int, dict[str, int]]:
    """(bytes, their parts) that training needs on the policy's device before a single activation, in the phase
    that needs more: the weights, the trainable parameters' AdamW moments (fp32, kept through rollouts), their
    gradients (during updates), a full KL reference copy, and vLLM's share of a `total`-byte GPU it shares (during
    rollouts; during updates too unless it sleeps)."""
    params = list(policy.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    parts = {"weights": weights, "AdamW moments": 8 * trainable}
    if cfg.algo.kl_coef > 0 and not policy.is_lora:
        parts["KL reference"] = weights
    resident = sum(parts.values())
    parts["gradients"] = 4 * trainable
    # an in-process vLLM engine takes its share of the first GPU (its workers' engines are elsewhere)
    shares = cfg.engine.name == "vllm" and cfg.distributed.workers == 0 and (policy.device.index or 0) == 0
    vllm = int(cfg.engine.vllm_gpu_memory_utilization * total) if shares else 0
    if vllm:
        parts["vLLM"] = vllm
    update = resident + parts["gradients"] + (0 if cfg.engine.vllm_sleep else vllm)
    return max(update, resident + vllm), parts


def check_device_memory(policy, cfg: TrainConfig) -> None:
    """Fails before the first rollout (ConfigError) when the policy's accelerator cannot hold even what training
    keeps there besides activations (`memory_floor`): an out-of-memory error that would come later, for sure.
    Activations come on top, so passing this is no promise."""
    total = device_memory(policy.device)
    if total is None:
        return
    need, parts = memory_floor(policy, cfg, total)
    if need > total:
        gib = 2 ** 30
        shown = ", ".join(f"{name} {size / gib:.1f}" for name, size in parts.items())
        raise ConfigError(f"model.device={cfg.model.device!r} has {total / gib:.1f} GiB, but training needs at least "
                          f"{need / gib:.1f} GiB there before any activation ({shown} GiB): train LoRA adapters "
                          "(model.lora_rank), lower engine.vllm_gpu_memory_utilization or keep engine.vllm_sleep on, "
                          "or use a larger GPU")


def check_engine(cfg: TrainConfig) -> None:
    """Fails early (ConfigError) when the vllm engine or Ray rollout workers are chosen but not installed."""
    import importlib.util

    if cfg.engine.name == "vllm" and importlib.util.find_spec("vllm") is None:
        from turnrl.engines.vllm import INSTALL_HINT

        raise ConfigError(f"engine.name='vllm': {INSTALL_HINT}")
    if cfg.distributed.workers and importlib.util.find_spec("ray") is None:
        from turnrl.distributed import INSTALL_HINT

        raise ConfigError(INSTALL_HINT)


def check_env_config(cfg: TrainConfig) -> None:
    """Fails early (ConfigError) on an unknown env, bad env arguments or an env server that does not answer."""
    envs = {(cfg.env.name, True), (cfg.env.eval_name or cfg.env.name, True)}
    if cfg.sft.env and cfg.sft.episodes > 0:
        envs.add((cfg.sft.env, False))
    for name, with_kwargs in envs:
        kwargs = cfg.env.kwargs if with_kwargs else {}
        demos = cfg.sft.episodes > 0 and name == (cfg.sft.env or cfg.env.name) and with_kwargs == (not cfg.sft.env)
        try:
            env = make(name, **kwargs)
        except (ValueError, TypeError, RemoteEnvError) as err:
            raise ConfigError(str(err)) from err
        try:
            solver = not demos or has_solver(env)  # the demonstrations' env: does its expert answer?
        except (ValueError, TypeError, RemoteEnvError) as err:  # its reset or expert failed: say why, in one line
            raise ConfigError(f"env {name!r} could not play a demonstration: {err}") from err
        finally:
            env.close()
        if not solver:
            raise ConfigError(f"sft.episodes needs solver demonstrations, and env {name!r} has no solver "
                              "(its expert_action raises NotImplementedError): set --sft.episodes 0, or sft.env")
        takes = set(getattr(env, "reset_options", ()))
        if cfg.attack.pool and name == cfg.env.name and not {"attack", "attack_target"} <= takes:
            raise ConfigError(f"attack.pool injects attacks through reset options 'attack' and 'attack_target', which "
                              f"env {name!r} does not take (Env.reset_options): use an env that does (role_chain)")


def build_policy(cfg: TrainConfig, name: str | None = None, *, value_head: bool | None = None):
    """The policy `cfg.model` names (or the saved model `name`), with a value head if the estimator needs one
    (`value_head` overrides: rollout workers sample only)."""
    m = cfg.model
    spec = TinyModelSpec(hidden_size=m.tiny_hidden, num_layers=m.tiny_layers, num_heads=m.tiny_heads,
                         intermediate_size=m.tiny_ff)
    lora = LoraSpec(m.lora_rank, m.lora_alpha, m.lora_dropout, m.lora_targets) if m.lora_rank else None
    value_head = cfg.algo.needs_critic if value_head is None else value_head
    device = policy_device(cfg)
    policy = load_policy(name or m.name, value_head=value_head, seed=cfg.seed, tiny=spec,
                         gguf_file=None if name else m.gguf_file, lora=lora,
                         gradient_checkpointing=m.gradient_checkpointing)
    return placed(policy, device)


def placed(policy, device: torch.device):
    """The policy moved to `device` (loaded models start on the host)."""
    if device.type == "cpu":
        return policy
    policy.to(device)
    if hasattr(policy.lm, "tie_weights"):  # a move that made new Parameters (turnrl.devcheck's) must not untie them
        policy.lm.tie_weights()
    return policy


def policy_device(cfg: TrainConfig) -> torch.device:
    """The device of `model.device` (ConfigError when it is not one, or has no hardware here)."""
    name = cfg.model.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"model.device={name!r} is not a device: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r}, but torch sees no CUDA device (torch.cuda.is_available() is "
                          "False): install a CUDA build of torch, or use model.device=cpu (turnrl eval / serve: --device cpu)")
    if device.type == "meta" and not simulation_active():
        raise ConfigError("model.device='meta' is the simulated device of turnrl.devcheck (tests only)")
    if device.type not in ("cpu", "cuda", "meta"):
        raise ConfigError(f"model.device={name!r}: turnrl trains on cpu or cuda")
    return device


def rl_optimizer(policy, cfg: TrainConfig):
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    warmup = cfg.optim.warmup_steps
    total = max(1, cfg.iterations * cfg.algo.epochs * cfg.algo.minibatches)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.optim.lr_schedule == "cosine":
            # Settling at a small lr makes the final policy a stable one rather than one mid-oscillation.
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def reference_model(run_dir: Path, policy, cfg: TrainConfig, iteration: int, log=print) -> Reference:
    """The frozen KL reference: the policy at the start of RL (after any SFT warm start), kept in
    `run_dir/reference`.

    It is written once when RL starts and read back on resume; a copy of the resumed policy would be
    a different reference and the resumed run would optimise a different objective. A full model is saved
    whole; a LoRA policy saves its adapter only (a few MB) and the reference shares the policy's base in memory.
    """
    path = run_dir / "reference"
    if path.is_dir():
        if policy.is_lora:
            return Reference.frozen_adapters(policy.lm, saved_adapter_weights(policy.lm, path))
        return Reference(build_policy(cfg, str(path)).lm.eval().requires_grad_(False))
    if iteration > 0:
        if policy.is_lora:  # a run started before LoRA references were saved: its reference was the base model
            log(f"[resume] {path} is missing: the KL reference is the base model with adapters off, as when "
                "this run started")
            return Reference(policy.lm, policy.lm.disable_adapter)
        raise ConfigError(f"cannot resume {run_dir}: algo.kl_coef > 0 but the reference model {path} is missing")
    ref = reference_of(policy)  # the policy is still the RL starting point
    save_model_atomic(policy, path)
    return ref


def teacher_model(cfg: TrainConfig, policy, log=print) -> Reference:
    """The frozen teacher of on-policy distillation (`distill.teacher`): a run directory's final model (or newest
    checkpoint), or any model `load_policy` loads. It scores the student's token ids, so it must have the same
    tokenizer (ModelLoadError otherwise)."""
    name = cfg.distill.teacher
    path = Path(name)
    if is_run_dir(path):
        model_dir = run_model_dir(path)
        if model_dir is None:
            raise ModelLoadError(f"distill.teacher: run {name!r} has no final model and no checkpoint yet")
        name = str(model_dir)
    teacher = placed(load_policy(name), policy.device)
    if teacher.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise ModelLoadError(f"distill.teacher {cfg.distill.teacher!r} has another tokenizer than the policy "
                             f"{cfg.model.name!r}: distillation scores the student's token ids under the teacher, so "
                             "both must share one tokenizer")
    lm = teacher.lm.eval().requires_grad_(False)
    log(f"[distill] teacher {name} ({count_parameters(lm) / 1e6:.1f}M parameters)")
    return Reference(lm)


def run_sft(policy, cfg: TrainConfig, log) -> list[float]:
    """Solver demonstrations on SFT seeds (disjoint from eval and RL seeds), then behaviour cloning."""
    renderer, settings = renderer_for(policy, cfg), settings_for(cfg)
    seeds = [SFT_SEED_BASE + cfg.seed * 10_000_000 + i for i in range(cfg.sft.episodes)]
    t0 = time.perf_counter()
    # A separate demonstration env (sft.env) gets no env.kwargs: they are the training env's constructor arguments.
    env_name, kwargs = (cfg.sft.env, {}) if cfg.sft.env else (cfg.env.name, cfg.env.kwargs)
    demos = make_demonstrations(lambda: make(env_name, **kwargs), renderer, seeds, settings, cfg.sft.epsilon,
                                seed=cfg.seed)
    solved = sum(d.success for d in demos) / len(demos)
    log(f"[sft] {len(demos)} demonstrations on {env_name} (epsilon {cfg.sft.epsilon}, {solved:.2f} solved) in "
        f"{time.perf_counter() - t0:.1f}s")
    bar = tqdm(total=cfg.sft.steps, desc="SFT", disable=not cfg.progress, dynamic_ncols=True)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    losses = sft(policy, demos, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size, lr=cfg.sft.lr,
                 micro_batch_tokens=cfg.optim.micro_batch_tokens, seed=cfg.seed, bf16=cfg.sft.bf16,
                 shared_prefix=cfg.optim.shared_prefix, on_step=on_step)
    bar.close()
    log(f"[sft] {cfg.sft.steps} steps, final loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
    if not all(math.isfinite(x) for x in losses):
        raise FloatingPointError("SFT loss became non-finite")
    return losses
