"""TensorBoard and W&B mirrors of a run's metrics (turnrl.trackers), read back from what they wrote."""
import json
import shutil
import struct
import sys

import pytest

from test_train import tiny_config
from turnrl import cli
from turnrl.config import ConfigError, TrackConfig
from turnrl.trackers import scalars
from turnrl.train import train

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402


@pytest.fixture(autouse=True)
def wandb_offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network: the run stays in <out>/wandb
    monkeypatch.setenv("WANDB_SILENT", "true")


def tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()  # applies TensorBoard's purge of the steps a resumed writer replaces
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def text_events(directory, tag) -> list[tuple[int, str]]:
    acc = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")]


def wandb_records(path):
    """The records of a .wandb file (a LevelDB-style log of 32 KiB blocks of checksummed chunks; the wandb
    package ships the protobuf schema but no reader)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(buf)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # keys with '/' are stored as their parts


def wandb_run(run_dir):
    """(history rows, summary, config) of the W&B offline runs in a run directory, in the order written."""
    history, summary, config = [], {}, {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
            elif kind == "summary":
                summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
            elif kind == "run":
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    return history, summary, config


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_scalars_keep_finite_numbers_and_flatten():
    record = {"iteration": 3, "a": 1, "b": 0.5, "c": None, "d": float("nan"), "e": True, "f": "x",
              "qa": {"succ@1": 0.25}}
    assert scalars(record) == {"a": 1.0, "b": 0.5, "qa/succ@1": 0.25}
    assert scalars({"iteration": 2}, "heldout/p/") == {"heldout/p/iteration": 2.0}


def test_tensorboard_and_wandb_get_every_metric_and_evaluation(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run)
    cfg.track = TrackConfig(to=("tensorboard", "wandb"), project="turnrl-test", name="tiny")
    evals = train(cfg, log=lambda *_: None)
    records = metrics(run)
    assert [r["iteration"] for r in records] == [0, 1]

    board = tensorboard_scalars(run / "tensorboard")
    expected = {}
    for record in records:
        for key, value in scalars(record).items():
            expected.setdefault(key, []).append((record["iteration"], value))
    assert set(board) == set(expected)
    for key, points in expected.items():
        assert [s for s, _ in board[key]] == [s for s, _ in points], key
        assert [v for _, v in board[key]] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-6), key
    heldout = tensorboard_scalars(run / "tensorboard" / "heldout")
    for point, step in (("untrained", 0), ("after_sft", 0), ("after_rl", cfg.iterations)):
        for key, value in scalars(evals[point]).items():
            assert heldout[f"heldout/{point}/{key}"] == [(step, pytest.approx(value, abs=1e-6))]

    texts = text_events(run / "tensorboard", "samples")
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [step for step, _ in texts] == [0, 1]
    for (_, text), line in zip(texts, samples):
        for e in line["episodes"]:
            assert f"seed {e['seed']}, group_id {e['group_id']}, success {e['success']}" in text
            assert e["transcript"][0][1].splitlines()[0] in text
            for reward, reply in zip(e["turn_rewards"], e["replies"]):  # each reply's reward and advantage
                note = f"reward {reward:+.3f}" + ("" if reply["advantage"] is None else
                                                  f", advantage {reply['advantage']:+.3f}")
                assert f"  ({note})" in text

    history, summary, config = wandb_run(run)
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    tables = [row for row in rows if "samples/_type" in row]  # a table's fields are stored as samples/<field>
    assert [row["iteration"] for row in tables] == [0, 1]
    assert all(row["samples/_type"] == "table-file" and row["samples/nrows"] == cfg.samples_per_iteration
               for row in tables)
    rows = [row for row in rows if "samples/_type" not in row]
    assert rows == [{**scalars(r), "iteration": r["iteration"]} for r in records]
    for point in ("untrained", "after_sft", "after_rl"):
        for key, value in scalars(evals[point]).items():
            assert summary[f"heldout/{point}/{key}"] == pytest.approx(value)
    assert config["rollout"]["group_size"] == cfg.rollout.group_size and config["iterations"] == cfg.iterations
    run_id = (run / "wandb_id").read_text().strip()
    assert {p.name for p in run.glob("wandb/offline-run-*/run-*.wandb")} == {f"run-{run_id}.wandb"}


def test_a_resumed_run_replaces_the_replayed_iterations_and_continues_the_wandb_run(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run)
    cfg.track = TrackConfig(to=("tensorboard", "wandb"))
    train(cfg, log=lambda *_: None)
    run_id = (run / "wandb_id").read_text()
    # as if the run had crashed after logging iteration 1 but before its checkpoint
    shutil.rmtree(run / "checkpoints" / "ckpt-000002")
    shutil.rmtree(run / "final")
    train(cfg, resume=True, log=lambda *_: None)
    records = metrics(run)
    assert [r["iteration"] for r in records] == [0, 1]
    board = tensorboard_scalars(run / "tensorboard")
    # one point per iteration: the resumed writer purged the iteration it played again
    assert [s for s, _ in board["rollout/mean_reward"]] == [0, 1]
    assert [v for _, v in board["loss/entropy"]] == pytest.approx([r["loss/entropy"] for r in records], rel=1e-6)
    assert (run / "wandb_id").read_text() == run_id
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))  # one per process that opened the run
    assert len(files) == 2 and {p.name for p in files} == {f"run-{run_id.strip()}.wandb"}
    history, _summary, _config = wandb_run(run)
    metric_rows = [row for row in history if "samples/_type" not in row]
    assert [row["iteration"] for row in metric_rows] == [0, 1, 1]  # W&B keeps both; plotted against `iteration`


def test_a_failing_tracker_is_turned_off_and_training_goes_on(tmp_path, monkeypatch):
    from turnrl import trackers

    calls = []

    def broken(self, values, step, writer=None):
        calls.append(step)
        raise OSError("No space left on device")

    monkeypatch.setattr(trackers._TensorBoard, "log", broken)
    messages = []
    cfg = tiny_config(tmp_path / "run")
    cfg.track = TrackConfig(to=("tensorboard",))
    train(cfg, log=messages.append)
    assert calls == [0]  # the first failure turns it off
    assert [m for m in messages if m.startswith("[track]")] == [
        "[track] tensorboard failed and is turned off for the rest of the run (OSError: No space left on device); "
        "metrics.jsonl is complete"]
    assert [r["iteration"] for r in metrics(tmp_path / "run")] == [0, 1]


@pytest.mark.parametrize("missing", ["tensorboard", "wandb"])
def test_a_missing_tracker_package_is_a_one_line_error_before_any_compute(tmp_path, monkeypatch, capsys, missing):
    module = "torch.utils.tensorboard" if missing == "tensorboard" else "wandb"
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    out = tmp_path / "run"
    code = cli.main(["train", "--iterations", "1", "--out", str(out), "--no-progress", "--track.to", missing])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"track.to includes '{missing}'" in err and "pip install 'turnrl[track]'" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_a_refused_wandb_login_names_offline_mode(tmp_path, monkeypatch):
    def refuse(**_kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    cfg = tiny_config(tmp_path / "run")
    cfg.track = TrackConfig(to=("wandb",))
    with pytest.raises(ConfigError, match="WANDB_MODE=offline"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_track_config_validation():
    with pytest.raises(ConfigError, match="twice"):
        TrackConfig(to=("wandb", "wandb"))
    with pytest.raises(ConfigError, match="does not include 'wandb'"):
        TrackConfig(to=("tensorboard",), project="mine")
    assert TrackConfig(to=["tensorboard"]).to == ("tensorboard",)  # a list from config.json
    with pytest.raises(ConfigError, match="samples_every must be >= 1"):
        TrackConfig(to=("tensorboard",), samples_every=0)
    with pytest.raises(ConfigError, match="track.to names none"):
        TrackConfig(samples_every=5)


def test_the_trackers_get_every_nth_iterations_samples_and_the_last(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, iterations=5)
    cfg.track = TrackConfig(to=("tensorboard",), samples_every=2)
    train(cfg, log=lambda *_: None)
    assert [step for step, _ in text_events(run / "tensorboard", "samples")] == [0, 2, 4]
    cfg = tiny_config(tmp_path / "run2", iterations=5)
    cfg.track = TrackConfig(to=("tensorboard",), samples_every=3)
    train(cfg, log=lambda *_: None)
    assert [step for step, _ in text_events(tmp_path / "run2" / "tensorboard", "samples")] == [0, 3, 4]  # 4: last
    assert len((tmp_path / "run2" / "samples.jsonl").read_text().splitlines()) == 5  # the file keeps them all
