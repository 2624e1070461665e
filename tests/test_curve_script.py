"""scripts/curve.py: the text training curve used in README and docs/results.md."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "curve.py"
spec = importlib.util.spec_from_file_location("curve", SCRIPT)
curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curve)


def test_windows_average_the_metric_and_the_table_prints_them(tmp_path, capsys):
    records = [{"iteration": i, "rollout/success_rate": i / 10, "time/elapsed_seconds": 6.0 * (i + 1)}
               for i in range(7)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    got = curve.windows(records, "rollout/success_rate", 3)
    expected = [(0, 2, 0.1, 18.0), (3, 5, 0.4, 36.0), (6, 6, 0.6, 42.0)]
    assert [w[:2] for w in got] == [w[:2] for w in expected]
    assert [w[2:] for w in got] == [pytest.approx(w[2:]) for w in expected]
    assert curve.main([str(tmp_path), "--every", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| 0–2 | 0.100 | 0.3 |") and lines[4].startswith("| 6–6 | 0.600 | 0.7 |")
    assert curve.main([str(tmp_path), "--key", "nope"]) == 2
    assert curve.main([str(tmp_path / "missing")]) == 2
