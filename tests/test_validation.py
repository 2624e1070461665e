"""Bad configuration and a bad output location fail at once: exit status 2, one line naming the field."""

import json
import shutil
from collections import namedtuple

import pytest

from test_interrupt import SMALL
from turnrl.cli import main
from turnrl.config import ConfigError, TrainConfig
from turnrl.presets import quickstart


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("args, names", [
    (["--algo.clip-hihg", "0.3"], ["--algo.clip-hihg", "--algo.clip-high"]),           # unknown field: did-you-mean
    (["--rollout.temperature", "hot"], ["--rollout.temperature"]),                     # wrong type
    (["--optim.lr", "-1"], ["optim.lr must be > 0"]),                                   # out of range
    (["--rollout.max-env-error-rate", "1.5"], ["rollout.max_env_error_rate must be in [0, 1)"]),
    (["--rollout.env-timeout", "-2"], ["rollout.env_timeout must be >= 0"]),
    (["--rollout.max-live-episodes", "-1"], ["rollout.max_live_episodes must be >= 0"]),
    (["--optim.max-bad-updates", "0"], ["optim.max_bad_updates must be >= 1"]),
    (["--keep-checkpoints", "0"], ["keep_checkpoints must be >= 1"]),
    (["--algo.kl-estimator", "k1"], ["algo.kl_estimator is only used when algo.kl_coef > 0"]),  # no-op combination
    (["--algo.filter", "none", "--algo.dynamic-max-rounds", "5"], ["only used by algo.filter='dynamic'"]),
    (["--rollout.max-context-tokens", "4096"], ["rollout.max_context_tokens=4096 exceeds the model's 2048 positions"]),
])
def test_bad_field_exits_2_with_one_line_naming_it(args, names, capsys, tmp_path):
    code, err = run(["train", "--out", str(tmp_path / "run"), "--iterations", "1"] + SMALL + args, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("section, key, value, message", [
    ("rollout", "n_grups", 3, "unknown config field 'rollout.n_grups'; did you mean 'rollout.n_groups'?"),
    ("rollout", "n_groups", "many", "rollout.n_groups must be of type int, got 'many'"),
    ("algo", "filter", "stdd", "algo.filter must be one of 'std', 'none', 'dynamic', got 'stdd'"),
    ("eval", "greedy", 1, "eval.greedy must be of type bool, got 1"),
    (None, "iterations", "5", "iterations must be of type int, got '5'"),
    (None, "algo", 3, "config field 'algo' must be an object"),
])
def test_a_bad_config_json_is_refused_naming_the_field(section, key, value, message, tmp_path, capsys):
    data = quickstart().to_dict()
    (data[section] if section else data)[key] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("?", r"\?")):
        TrainConfig.from_dict(data)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(data))
    code, err = run(["train", "--resume", str(run_dir)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_config_json_round_trips():
    cfg = quickstart()
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_a_full_disk_is_found_before_the_first_rollout(tmp_path, capsys, monkeypatch):
    import turnrl.rollout

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 50_000, 50_000))
    monkeypatch.setattr(turnrl.rollout, "run_episodes", lambda *a, **k: pytest.fail("a rollout ran"))
    code, err = run(["train", "--out", str(tmp_path / "run"), "--iterations", "1"] + SMALL, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not enough disk space for checkpoints" in err and "MB free but a checkpoint needs about" in err
    assert not (tmp_path / "run" / "eval.json").exists()


def test_a_disk_that_fills_up_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The space check before each save fails before writing: the previous checkpoint stays the newest."""
    from test_train import tiny_config
    from turnrl.checkpoint import list_checkpoints
    from turnrl.train import train

    cfg = tiny_config(tmp_path / "run", iterations=3)
    cfg.sft.episodes = 0
    cfg.eval.episodes, cfg.eval.k, cfg.eval.greedy = 1, 1, False
    real = shutil.disk_usage
    saves = []
    Usage = namedtuple("Usage", "total used free")

    def filling(path):
        if str(path).endswith("checkpoints"):
            saves.append(path)
            if len(saves) > 2:  # ckpt-000000 and ckpt-000001 fit, then the disk is full
                return Usage(10**9, 10**9, 0)
        return real(path)
    monkeypatch.setattr(shutil, "disk_usage", filling)
    with pytest.raises(OSError, match="a checkpoint needs about"):
        train(cfg, log=lambda *_: None)
    assert [p.name for p in list_checkpoints(cfg.out)] == ["ckpt-000000", "ckpt-000001"]
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "run" / "checkpoints").iterdir())
