"""`turnrl report RUN_DIR [RUN_DIR ...]`: runs on one self-contained HTML page (one run: `RUN_DIR/report.html`).

The page holds each run's held-out evaluations (`eval.json`: untrained, after SFT, after RL) with sample episodes
(`eval_samples.json`), learning curves of `metrics.jsonl` (the keys of docs/metrics.md, one panel per concern,
each iteration's value and a moving average; several runs are overlaid, a color per run), transcripts of
training episodes (`samples.jsonl`) and the resolved config. matplotlib draws the curves
(`pip install 'turnrl[report]'`); they are embedded as PNG, so the page is one file that opens anywhere. A run
still training can be reported at any time: the page shows what it has logged so far.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import importlib.util
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

from turnrl.checkpoint import MetricsLog, atomic_write_text

# (panel title, metric keys drawn in it); a panel is left out when none of its keys has a value in the run.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Held-out success during training (eval.every)", ("eval/success_rate", "eval/greedy_success_rate",
                                                         "eval/pass_at_k")),
    ("Rollout success", ("rollout/success_rate", "rollout/pass_at_group")),
    ("Rollout reward", ("rollout/mean_reward", "rollout/reward_std")),
    ("Valid turns", ("rollout/valid_turn_rate",)),
    ("Turns per episode", ("rollout/mean_turns",)),
    ("Group filter: kept fraction", ("filter/kept_fraction",)),
    ("Policy entropy", ("loss/entropy",)),
    ("KL to the reference", ("loss/kl",)),
    ("On-policy distillation: KL(student || teacher) per token", ("distill/reverse_kl",)),
    ("Value loss", ("loss/value",)),
    ("PPO clip fraction", ("actor/clip_frac",)),
    ("Gradient norm", ("actor/grad_norm",)),
    ("Logprob mismatch, engine vs. trainer", ("actor/logprob_mismatch",)),
    ("Mismatch correction: token ratio pi_train / pi_rollout", ("mismatch/ratio_min", "mismatch/ratio_mean",
                                                                 "mismatch/ratio_max")),
    ("Mismatch correction: tokens truncated or dropped", ("mismatch/affected_frac",)),
    ("Policy lag of the rollout (distributed.overlap)", ("rollout/policy_lag",)),
    ("Collapse: mutual information (nats)", ("collapse/mi", "collapse/mi_max")),
    ("Seconds per iteration", ("perf/rollout_seconds", "perf/env_seconds", "perf/update_seconds",
                               "perf/iteration_seconds")),
)
EVAL_COLUMNS = (("success_rate", "success"), ("greedy_success_rate", "greedy"), ("mean_return", "return"),
                ("pass_at_k", "pass@k"), ("valid_turn_rate", "valid turns"), ("mean_turns", "turns"),
                ("env_errors", "env errors"))
STDERR_KEYS = {"success_rate": "success_stderr", "greedy_success_rate": "greedy_success_stderr"}  # shown as ± se


class ReportError(ValueError):
    """The report cannot be made (not a run directory, no matplotlib, unknown metric keys): a one-line message."""


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of `key` over the records that hold a finite number for it (null = NaN/inf is left
    out, as are records written before the key existed)."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r.get("iteration", len(xs))))
            ys.append(float(v))
    return xs, ys


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def panels_for(records: list[dict], extra_keys: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """The panels with data: the default PANELS, then one panel per key matched by `extra_keys` (exact keys or
    shell patterns such as 'perf/*'). A pattern that matches no logged key is a ReportError naming the keys."""
    logged = sorted({k for r in records for k in r if k != "iteration"})
    has_data = {k for k in logged if series(records, k)[0]}
    panels = [(title, [k for k in keys if k in has_data]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    for pattern in extra_keys or []:
        matched = [k for k in logged if fnmatch.fnmatchcase(k, pattern)]
        if not matched:
            import difflib
            close = difflib.get_close_matches(pattern, logged, n=3)
            raise ReportError(f"no metric key matches {pattern!r}" + (f"; did you mean {', '.join(close)}?"
                                                                     if close else f" (logged: {len(logged)} keys)"))
        panels += [(key, [key]) for key in matched if key in has_data]
    return panels


LINESTYLES = ("-", "--", ":", "-.")


def curves(runs: list["Run"], keys: list[str]) -> list[tuple[str, list[int], list[float], str, str]]:
    """One panel's curves: (label, iterations, values, color, line style) for every run and key with data. One run:
    a color per key; several runs: a color per run and a line style per key, labelled `run: key`."""
    out = []
    for r, run in enumerate(runs):
        for k, key in enumerate(keys):
            xs, ys = series(run.records, key)
            if not xs:
                continue
            if len(runs) == 1:
                out.append((key, xs, ys, f"C{k}", "-"))
            else:
                out.append((f"{run.name}: {key}" if len(keys) > 1 else run.name, xs, ys, f"C{r % 10}",
                            LINESTYLES[k % len(LINESTYLES)]))
    return out


def _png(title: str, panel: list[tuple[str, list[int], list[float], str, str]]) -> str:
    """One panel as a base64 PNG: every curve's values (thin) and, past 20 points, their moving average."""
    # A bare Figure, not pyplot: no global backend or figure state is touched in the caller's process.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.0), dpi=100)
    ax = fig.subplots()
    for label, xs, ys, color, style in panel:
        smooth = len(ys) > 20
        ax.plot(xs, ys, color=color, linestyle=style, linewidth=0.8, alpha=0.45 if smooth else 1.0,
                marker=None if smooth else "o", markersize=3, label=None if smooth else label)
        if smooth:
            ax.plot(xs, moving_average(ys, max(2, len(ys) // 20)), color=color, linestyle=style, linewidth=1.8,
                    label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("iteration", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _eval_table(evals: dict) -> str:
    if not evals:
        return "<p>No held-out evaluation yet (eval.json is written at the start, after SFT and at the end).</p>"
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in EVAL_COLUMNS)
    rows = []
    for point, result in evals.items():
        cells = []
        for key, _ in EVAL_COLUMNS:
            v, se = result.get(key), result.get(STDERR_KEYS.get(key, ""))
            tail = f" ± {se:.3f}" if isinstance(v, float) and isinstance(se, float) else ""
            cells.append("<td>–</td>" if v is None else f"<td>{v:.3f}{tail}</td>" if isinstance(v, float) else
                         f"<td>{html.escape(str(v))}</td>")
        rows.append(f"<tr><th>{html.escape(point)}</th>{''.join(cells)}</tr>")
    first = next(iter(evals.values()))
    note = f"{first.get('episodes')} held-out start states × {first.get('k')} samples at T={first.get('temperature')}"
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table><p class=note>{html.escape(note)}</p>"


def _episodes_section(lines: list[dict], most: int = 12) -> str:
    """samples.jsonl as collapsible transcripts: at most `most` iterations, spread evenly from the first to the
    newest logged (newest first and open)."""
    if not lines:
        return "<p>No sample episodes logged (samples_per_iteration = 0, or no iteration yet).</p>"
    count = min(most, len(lines))
    picks = sorted({round(i * (len(lines) - 1) / max(1, count - 1)) for i in range(count)}, reverse=True)
    blocks = []
    for rank, index in enumerate(picks):
        line = lines[index]
        items = "".join(_episode_html(e) for e in line.get("episodes", []))
        blocks.append(f"<details{' open' if rank == 0 else ''}><summary>iteration {line.get('iteration')}</summary>"
                      f"{items}</details>")
    return "".join(blocks)


def _reply_html(text: str, reply: dict | None, reward: float | None) -> str:
    """A reply: its decoded text, or with `reply` (samples.jsonl's `replies`) its sampled tokens shaded by how
    unlikely the sampler found them (hover: the logprob), under a line with the turn's reward and advantage."""
    if not reply:
        return f"<div class=reply>{html.escape(str(text))}</div>"
    tokens = "".join(
        f"<span title='logprob {lp:.3f}' style='background: rgba(255, 120, 0, {1 - math.exp(min(lp, 0.0)):.2f})'>"
        f"{html.escape(tok)}</span>" for tok, lp in zip(reply.get("tokens", []), reply.get("logprobs", [])))
    facts = [f"reward {reward:.2f}" if reward is not None else ""]
    if "advantage" in reply:  # training episodes: what the update made of the reply
        advantage = reply["advantage"]
        facts.append("advantage " + ("- (not trained on)" if advantage is None else f"{advantage:+.3f}"))
    return (f"<div class=reply><span class=note>{html.escape(' · '.join(f for f in facts if f))}</span>\n"
            f"{tokens}</div>")


def _episode_html(e: dict) -> str:
    """One sampled episode (samples.jsonl / eval_samples.json, docs/metrics.md): a header line, then its turns."""
    replies, rewards = iter(e.get("replies") or []), iter(e.get("turn_rewards") or [])
    turns = "".join(_reply_html(text, next(replies, None), next(rewards, None)) if role == "assistant"
                    else f"<div class=obs>{html.escape(str(text))}</div>"
                    for role, text in e.get("transcript", []))
    head = (f"seed {e.get('seed')} · {'success' if e.get('success') else 'no success'} · reward "
            f"{e.get('reward', 0.0):.2f} · {e.get('turns')} turns · ended by {e.get('end_reason')}")
    return f"<div class=episode><p class=note>{html.escape(head)}</p>{turns}</div>"


def _eval_episodes_section(points: dict) -> str:
    """eval_samples.json: each evaluation point's sample episodes, the last point open."""
    if not points:
        return "<p>No held-out sample episodes (eval_samples.json) in this run.</p>"
    names = list(points)
    return "".join(f"<details{' open' if name == names[-1] else ''}><summary>{html.escape(name)}</summary>"
                   f"{''.join(_episode_html(e) for e in points[name])}</details>" for name in names)


@dataclass
class Run:
    """What the report reads of one run directory."""

    name: str
    path: Path
    config: dict
    records: list[dict]  # metrics.jsonl
    evals: dict  # eval.json
    samples: list[dict]  # samples.jsonl
    eval_samples: dict  # eval_samples.json


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ReportError(f"{str(run_dir)!r} is not a turnrl run directory (no config.json)")
    def optional_json(name: str) -> dict:
        path = run_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    return Run(run_dir.resolve().name, run_dir, json.loads(config_path.read_text()),
               MetricsLog(run_dir / "metrics.jsonl").read(), optional_json("eval.json"),
               MetricsLog(run_dir / "samples.jsonl").read(), optional_json("eval_samples.json"))


def _summary(run: Run) -> str:
    model, env, algo = run.config.get("model", {}), run.config.get("env", {}), run.config.get("algo", {})
    return (f"model {model.get('name')} · env {env.get('name')} · estimator {algo.get('estimator')} · "
            f"filter {algo.get('filter')} · {len(run.records)} of {run.config.get('iterations')} iterations logged")


def write_report(run_dirs: Path | list[Path], out: Path | None = None, keys: list[str] | None = None
                 ) -> tuple[Path, list]:
    """Writes the report of one run, or of several runs on one page (their curves overlaid), to `out` (default for
    one run: `RUN_DIR/report.html`; several runs need `out`). Returns the path and the panels drawn,
    [(title, [keys])]."""
    dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(d) for d in run_dirs]
    if not dirs:
        raise ReportError("name at least one run directory")
    if len(dirs) > 1 and out is None:
        raise ReportError(f"{len(dirs)} runs go on one page: name its file with --out, e.g. --out compare.html")
    if out is not None and not Path(out).parent.is_dir():
        raise ReportError(f"cannot write {str(out)!r}: directory {str(Path(out).parent)!r} does not exist")
    runs = [load_run(d) for d in dirs]
    if len({run.name for run in runs}) < len(runs):  # same directory names: tell them apart by path
        for run in runs:
            run.name = str(run.path)
    if importlib.util.find_spec("matplotlib") is None:
        raise ReportError("turnrl report draws with matplotlib: pip install 'turnrl[report]'")
    panels = panels_for([r for run in runs for r in run.records], keys)
    images = [f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
              f"{_png(title, curves(runs, panel_keys))}'></figure>" for title, panel_keys in panels]
    several = len(runs) > 1

    def per_run(render) -> str:
        return "".join((f"<h3>{html.escape(run.name)}</h3>" if several else "") + render(run) for run in runs)

    title = ", ".join(run.name for run in runs)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>turnrl report: {html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: 0.25em 0.8em; text-align: right; border-bottom: 1px solid #ddd; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 0.5em; }} figure {{ margin: 0; }}
.note {{ color: #666; font-size: 0.9em; }} pre {{ background: #f6f6f6; padding: 0.8em; overflow-x: auto; }}
.episode {{ max-width: 60em; margin: 0.5em 0 1.2em; }} summary {{ cursor: pointer; margin: 0.3em 0; }}
.obs, .reply {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.85em; padding: 0.4em 0.6em;
  margin: 0.2em 0; border-radius: 4px; }}
.obs {{ background: #f3f3f3; }} .reply {{ background: #e8f0fe; margin-left: 2em; }}
</style></head><body>
<h1>{html.escape(title if several else str(runs[0].path))}</h1>
{"".join(f"<p>{html.escape((run.name + ': ') if several else '')}{html.escape(_summary(run))}</p>" for run in runs)}
<h2>Held-out evaluation</h2>
{per_run(lambda run: _eval_table(run.evals))}
<p><b>Held-out episodes</b> <span class=note>(eval_samples.json: per evaluation a successful and an unsuccessful
episode when there are both)</span></p>
{per_run(lambda run: _eval_episodes_section(run.eval_samples))}
<h2>Training curves</h2>
<p class=note>Metric keys are documented in docs/metrics.md. Rollout keys are measured on the training start
states of each iteration, before its update.</p>
<div class=grid>{''.join(images) or '<p>No iteration logged yet.</p>'}</div>
<h2>Sample episodes</h2>
<p class=note>From samples.jsonl: per iteration a successful and an unsuccessful rollout episode when there are
both; observations in grey, the model's replies in blue.</p>
{per_run(lambda run: _episodes_section(run.samples))}
<h2>Config</h2>
{per_run(lambda run: f"<details><summary>config.json</summary><pre>{html.escape(json.dumps(run.config, indent=2))}"
                   f"</pre></details>")}
</body></html>
"""
    out = Path(out) if out is not None else runs[0].path / "report.html"
    atomic_write_text(out, page)  # a reader never sees half a page
    return out, panels
