"""benchmarks/bundle_verify.py --smoke: a tiny bundle built, signed, verified and asked in fresh processes;
self-consistent JSON (never a speed check)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def test_smoke_verifies_a_tiny_bundle_and_reports_a_consistent_ratio(tmp_path):
    out = tmp_path / "bv.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "benchmarks/bundle_verify.py", "--smoke", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["smoke"] is True and rep["repeats"] == 2 and "random-weight" in rep["model"]
    assert not (tmp_path / "work" / "smoke").exists()  # scratch removed

    assert rep["files"] > 0 and rep["bytes"] > 0 and rep["key_id"]
    for key in ("verify", "first_answer"):
        runs = rep[f"{key}_runs"]
        assert len(runs) == rep["repeats"] and all(x > 0 for x in runs), key
        assert rep[f"{key}_s"] > 0
        assert abs(rep[f"{key}_s"] - statistics.median(runs)) <= 1e-4, key  # runs are rounded to 4 decimals
    assert _close(rep["ratio"], rep["verify_s"] / rep["first_answer_s"])
    assert "ratio" in proc.stdout and "signed" in proc.stdout
