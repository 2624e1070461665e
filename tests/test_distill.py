"""On-policy distillation (distill.*, turnrl.algos.reverse_kl_advantages): the per-token advantage by hand, what it
adds to the update's targets, that it moves a student toward its teacher, and the config's checks."""

import copy
import json

import pytest
import torch

from turnrl.algos import reverse_kl_advantages
from turnrl.batch import collate
from turnrl.cli import main
from turnrl.config import AlgoConfig, ConfigError, DistillConfig, ModelConfig, OptimConfig, SFTConfig
from turnrl.models import load_policy
from turnrl.reference import Reference
from turnrl.train import train
from turnrl.update import prepare_targets
from tests.test_train import tiny_config
from tests.test_update_shared_prefix import SPEC, grouped_batch


def test_reverse_kl_advantage_by_hand():
    student = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.1, -9.0]])
    teacher = torch.tensor([[-0.5, -2.5, -3.0], [-0.5, -2.1, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = reverse_kl_advantages(student, teacher, mask, coef=2.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 0.0], [0.0, -4.0, 18.0]]))
    assert not adv.requires_grad  # a target: no gradient flows into the teacher


def targets_for(policy, trajs, teacher, distill=None, **algo):
    batch = collate(trajs, policy.pad_token_id)
    return batch, prepare_targets(policy, batch, trajs, algo=AlgoConfig(filter="none", **algo), optim=OptimConfig(),
                                  temperature=1.0, teacher=teacher, distill=distill)


def full_logprobs(lm, batch):
    with torch.no_grad():
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention).logits
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.targets[..., None])[..., 0] * batch.mask


def test_a_teacher_equal_to_the_student_adds_nothing():
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5, noise=0.0)  # exact sampling logprobs
    teacher = Reference(copy.deepcopy(policy.lm).eval().requires_grad_(False))
    _, plain = targets_for(policy, trajs, None)
    _, same = targets_for(policy, trajs, teacher)
    torch.testing.assert_close(same.credit.advantages, plain.credit.advantages, atol=1e-5, rtol=0)
    assert abs(same.stats["distill/reverse_kl"]) < 1e-5
    _, alone = targets_for(policy, trajs, teacher, DistillConfig(teacher="t", task_reward=False))
    assert alone.credit.advantages.abs().max() < 1e-5
    assert plain.credit.advantages.abs().max() > 0.1


@pytest.mark.parametrize("correction", ["off", "tis"])
def test_the_advantage_is_the_teacher_minus_the_student_logprob_on_model_tokens(correction):
    """Scored by a different model through the update's shared-prompt forward, against the sampling logprobs (or,
    with a mismatch correction, against the trainer's recomputed ones, which PPO's ratio then uses)."""
    policy = load_policy("tiny", seed=3, tiny=SPEC)
    trajs = grouped_batch(policy, seed=5, noise=0.3, head=4)
    teacher_lm = load_policy("tiny", seed=11, tiny=SPEC).lm.eval().requires_grad_(False)
    distill = DistillConfig(teacher="t", coef=0.5)
    batch, plain = targets_for(policy, trajs, None, mismatch_correction=correction)
    _, got = targets_for(policy, trajs, Reference(teacher_lm), distill, mismatch_correction=correction)
    teacher = full_logprobs(teacher_lm, batch)
    student = batch.old_logprobs if correction == "off" else full_logprobs(policy.lm, batch)
    expected = plain.credit.advantages + 0.5 * (teacher - student) * batch.mask
    torch.testing.assert_close(got.credit.advantages, expected, atol=1e-5, rtol=1e-5)
    n = batch.mask.sum()
    assert got.stats["distill/reverse_kl"] == pytest.approx(float(((student - teacher) * batch.mask).sum() / n),
                                                                   abs=1e-5)
    assert got.stats["distill/teacher_logprob"] == pytest.approx(float(teacher.sum() / n), abs=1e-5)


MODEL = ModelConfig(name="tiny", tiny_hidden=64, tiny_layers=2, tiny_heads=2, tiny_ff=128)


def test_distillation_alone_moves_the_student_toward_its_teacher(tmp_path):
    """A teacher SFT-trained on clean solver demos; a student briefly SFT-trained on noisy ones, then 16 iterations
    of distillation without task reward: the reverse KL on the student's own fresh samples falls (measured ~2.2 ->
    ~0.45 over two seeds) and the teacher likes the student's tokens more."""
    teacher = tiny_config(tmp_path / "teacher", model=MODEL, iterations=0,
                          sft=SFTConfig(episodes=256, epsilon=0.0, steps=200, batch_size=16, lr=3e-3))
    train(teacher, log=lambda *_: None)
    cfg = tiny_config(tmp_path / "student", model=MODEL, iterations=16,
                      sft=SFTConfig(episodes=256, epsilon=0.5, steps=30, batch_size=16, lr=3e-3),
                      algo=AlgoConfig(filter="none", entropy_coef=0.0),
                      distill=DistillConfig(teacher=str(tmp_path / "teacher"), task_reward=False))
    cfg.optim.lr, cfg.rollout.n_groups, cfg.rollout.group_size = 3e-3, 16, 4
    train(cfg, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["distill/reverse_kl"] for r in records]
    teacher_lp = [r["distill/teacher_logprob"] for r in records]
    assert sum(kl[-3:]) < 0.4 * sum(kl[:3]), kl
    assert sum(teacher_lp[-3:]) / 3 > sum(teacher_lp[:3]) / 3 + 1.0, teacher_lp


def test_distill_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="on-policy distillation, which is off"):
        DistillConfig(coef=2.0)
    with pytest.raises(ConfigError, match="distill.coef must be > 0"):
        DistillConfig(teacher="x", coef=0.0)
    distill = DistillConfig(teacher="x", task_reward=False)
    with pytest.raises(ConfigError, match="algo.loss='gspo'"):
        tiny_config(tmp_path, algo=AlgoConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4),
                    distill=DistillConfig(teacher="x")).__post_init__()
    with pytest.raises(ConfigError, match="value head would learn returns nobody uses"):
        tiny_config(tmp_path, algo=AlgoConfig(estimator="gae", filter="none"), distill=distill).__post_init__()
    with pytest.raises(ConfigError, match="set algo.filter='none'"):
        tiny_config(tmp_path, distill=distill).__post_init__()


def test_a_teacher_with_another_tokenizer_or_none_at_all_exits_2(tmp_path, capsys):
    teacher = load_policy("tiny", seed=1, tiny=SPEC)
    teacher.tokenizer.add_tokens(["<extra_token>"])
    teacher.save(tmp_path / "other")
    base = ["train", "--model.tiny-hidden", "32", "--model.tiny-layers", "2", "--model.tiny-heads", "2",
            "--model.tiny-ff", "64", "--no-progress", "--iterations", "1"]
    for where, message in ((tmp_path / "other", "has another tokenizer than the policy"),
                           (tmp_path / "missing", "not found")):
        code = main(base + ["--out", str(tmp_path / "run"), "--distill.teacher", str(where)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any rollout
