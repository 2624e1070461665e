"""`turnrl report`: a run's evaluations, curves and config on one self-contained HTML page."""

import base64
import json
import re

import pytest

pytest.importorskip("matplotlib")

from turnrl.cli import main  # noqa: E402
from turnrl.config import TrainConfig  # noqa: E402
from turnrl.report import PANELS, curves, load_run, moving_average, panels_for, series  # noqa: E402


def fake_run(tmp_path, records, evals=None, torn=False, name="run"):
    run = tmp_path / name
    run.mkdir()
    (run / "config.json").write_text(TrainConfig(iterations=len(records)).to_json())
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + ('{"iteration": 99, "rollout/succ' if torn else ""))
    if evals is not None:
        (run / "eval.json").write_text(json.dumps(evals))
    return run


RECORDS = [{"iteration": i, "rollout/success_rate": i / 30, "rollout/pass_at_group": min(1.0, i / 15),
            "loss/entropy": 1.0 - i / 60, "actor/grad_norm": None if i == 3 else 0.5,  # null: a NaN step
            "loss/kl": None, "perf/rollout_seconds": 1.0, "perf/update_seconds": 2.0, "train/tokens": 100.0 + i}
           for i in range(30)]
EVALS = {"untrained": {"success_rate": 0.0, "greedy_success_rate": 0.0, "mean_return": -0.8, "pass_at_k": 0.0,
                       "k": 4, "episodes": 8, "temperature": 1.0, "valid_turn_rate": 0.0, "mean_turns": 8.0,
                       "env_errors": 0},
         "after_rl": {"success_rate": 0.625, "greedy_success_rate": 0.75, "mean_return": 0.5, "pass_at_k": 0.875,
                      "k": 4, "episodes": 8, "temperature": 1.0, "valid_turn_rate": 0.9, "mean_turns": 2.5,
                      "env_errors": 1}}


def test_series_skips_nulls_and_missing_keys_and_the_moving_average_is_trailing():
    xs, ys = series(RECORDS, "actor/grad_norm")
    assert 3 not in xs and len(xs) == 29 and set(ys) == {0.5}
    assert series(RECORDS, "loss/kl") == ([], [])
    assert series(RECORDS, "collapse/mi") == ([], [])
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0], 5) == [2.0]


def test_panels_are_those_with_data_plus_requested_keys():
    panels = dict(panels_for(RECORDS))
    assert panels["Rollout success"] == ["rollout/success_rate", "rollout/pass_at_group"]
    assert panels["Seconds per iteration"] == ["perf/rollout_seconds", "perf/update_seconds"]  # no iteration_seconds
    assert "KL to the reference" not in panels  # every value null: nothing to draw
    assert set(panels) <= {title for title, _ in PANELS}
    corrected = [dict(r, **{"mismatch/ratio_min": 0.8, "mismatch/ratio_mean": 1.0, "mismatch/ratio_max": 1.2,
                            "mismatch/affected_frac": 0.0}) for r in RECORDS]
    assert dict(panels_for(corrected))["Mismatch correction: token ratio pi_train / pi_rollout"] == [
        "mismatch/ratio_min", "mismatch/ratio_mean", "mismatch/ratio_max"]
    distilled = [dict(r, **{"distill/reverse_kl": 1.5}) for r in RECORDS]
    assert dict(panels_for(distilled))["On-policy distillation: KL(student || teacher) per token"] == [
        "distill/reverse_kl"]
    extra = panels_for(RECORDS, ["train/*", "perf/update_seconds"])
    assert extra[-2:] == [("train/tokens", ["train/tokens"]), ("perf/update_seconds", ["perf/update_seconds"])]


def test_turnrl_report_writes_one_self_contained_page(tmp_path, capsys):
    run = fake_run(tmp_path, RECORDS, EVALS, torn=True)  # a torn last line (a run killed mid-write) is dropped
    assert main(["report", str(run), "--keys", "train/tokens"]) == 0
    assert "5 panels" in capsys.readouterr().out  # success, entropy, grad norm, seconds + train/tokens
    page = (run / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "http" not in page.replace("<!doctype html>", "")  # nothing fetched from elsewhere
    assert "<th>after_rl</th><td>0.625</td><td>0.750</td><td>0.500</td><td>0.875</td>" in page
    assert "30 of 30 iterations logged" in page and "8 held-out start states × 4 samples" in page
    assert json.loads(run.joinpath("config.json").read_text())["env"]["name"] in page


def test_sample_episodes_are_shown_escaped_newest_first(tmp_path):
    run = fake_run(tmp_path, RECORDS[:3])
    episode = lambda i: {"seed": 7, "group_id": 0, "success": i == 2, "reward": 0.5 * i, "turns": 1,  # noqa: E731
                         "end_reason": "env", "transcript": [["user", f"room {i} <#>"], ["assistant", f"<answer>Up{i}"]]}
    (run / "samples.jsonl").write_text("".join(json.dumps({"iteration": i, "episodes": [episode(i)]}) + "\n"
                                               for i in range(3)))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    section = page[page.index("<h2>Sample episodes"):page.index("<h2>Config")]
    assert section.index("iteration 2") < section.index("iteration 1") < section.index("iteration 0")
    assert section.count("<details open>") == 1 and section.index("<details open><summary>iteration 2") >= 0
    assert "<div class=obs>room 2 &lt;#&gt;</div><div class=reply>&lt;answer&gt;Up2</div>" in section
    assert "seed 7 · success · reward 1.00 · 1 turns · ended by env" in section
    (run / "eval_samples.json").write_text(json.dumps({"untrained": [episode(0)], "after_rl": [episode(2)]}))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    held_out = page[page.index("<b>Held-out episodes</b>"):page.index("<h2>Training curves")]
    assert held_out.index("<summary>untrained") < held_out.index("<details open><summary>after_rl")
    assert "<div class=obs>room 2 &lt;#&gt;</div>" in held_out


def test_report_of_a_run_that_has_not_logged_yet(tmp_path):
    run = fake_run(tmp_path, [])
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "No iteration logged yet" in page and "No held-out evaluation yet" in page
    assert "No sample episodes logged" in page and "No held-out sample episodes" in page


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}"], "is not a turnrl run directory"),
    (["report", "{run}", "--keys", "rollout/sucess_rate"], "did you mean rollout/success_rate"),
    (["report", "{run}", "--out", "{tmp}/no/such/dir/r.html"], "does not exist"),
])
def test_bad_report_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    run = fake_run(tmp_path, RECORDS)
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_report_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["report", str(fake_run(tmp_path, RECORDS))]) == 2
    assert "pip install 'turnrl[report]'" in capsys.readouterr().err


def test_several_runs_share_one_page_with_their_curves_overlaid(tmp_path, capsys):
    a = fake_run(tmp_path, RECORDS, EVALS, name="grpo")
    b = fake_run(tmp_path, [{**r, "rollout/success_rate": 1 - r["rollout/success_rate"]} for r in RECORDS[:10]],
                 name="ppo")
    runs = [load_run(a), load_run(b)]
    drawn = curves(runs, ["rollout/success_rate", "rollout/pass_at_group"])
    assert [(label, color, style) for label, _x, _y, color, style in drawn] == [
        ("grpo: rollout/success_rate", "C0", "-"), ("grpo: rollout/pass_at_group", "C0", "--"),
        ("ppo: rollout/success_rate", "C1", "-"), ("ppo: rollout/pass_at_group", "C1", "--")]
    assert drawn[2][2] == [1 - r["rollout/success_rate"] for r in RECORDS[:10]]
    assert [label for label, *_ in curves(runs, ["loss/entropy"])] == ["grpo", "ppo"]  # one key: the run names
    assert [label for label, *_ in curves(runs[:1], ["loss/entropy"])] == ["loss/entropy"]

    assert main(["report", str(a), str(b)]) == 2  # which file? say so
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "compare.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<h3>grpo</h3>" in page and "<h3>ppo</h3>" in page
    assert "grpo: model" in page and "10 of 10 iterations logged" in page
    assert not (a / "report.html").exists()


def test_a_training_run_logs_each_replys_tokens_logprobs_and_advantage_and_the_report_shows_them(tmp_path):
    from test_train import tiny_config
    from turnrl.models import load_policy
    from turnrl.train import train

    cfg = tiny_config(tmp_path / "run", iterations=2)
    cfg.algo.filter = "none"  # every episode is trained on: every reply has an advantage
    train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    tokenizer = load_policy(str(run / "final")).tokenizer
    lines = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for episode in (e for line in lines for e in line["episodes"]):
        replies = [text for role, text in episode["transcript"] if role == "assistant"]
        assert len(episode["replies"]) == len(replies) == len(episode["turn_rewards"]) == episode["turns"]
        assert sum(episode["turn_rewards"]) == pytest.approx(episode["reward"])
        for reply, text in zip(episode["replies"], replies):
            assert len(reply["tokens"]) == len(reply["logprobs"]) > 0 and all(lp <= 0 for lp in reply["logprobs"])
            ids = tokenizer("".join(reply["tokens"]), add_special_tokens=False)["input_ids"]
            assert "<answer>" + tokenizer.decode(ids, skip_special_tokens=True) == text  # the reply, token by token
            assert isinstance(reply["advantage"], float)
    held_out = json.loads((run / "eval_samples.json").read_text())["after_rl"]
    assert held_out[0]["replies"] and "advantage" not in held_out[0]["replies"][0]
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert page.count("title='logprob ") >= sum(len(r["tokens"]) for r in lines[-1]["episodes"][0]["replies"])
    assert "advantage +" in page or "advantage -0" in page


def test_success_rates_are_shown_with_their_standard_error(tmp_path):
    evals = {"after_rl": {**EVALS["after_rl"], "success_stderr": 0.0412, "greedy_success_stderr": 0.05}}
    run = fake_run(tmp_path, RECORDS[:2], evals)
    assert main(["report", str(run)]) == 0
    assert "<th>after_rl</th><td>0.625 ± 0.041</td><td>0.750 ± 0.050</td><td>0.500</td>" in \
        (run / "report.html").read_text()
