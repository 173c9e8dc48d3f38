"""benchmarks/llama_build.py --smoke: nothing built, the installed wheel against itself; self-consistent JSON
(never a speed check)."""

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


def test_smoke_measures_the_installed_wheel_against_itself(tmp_path):
    out = tmp_path / "lb.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "benchmarks/llama_build.py", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())

    # what the smoke is, said in the output and the JSON: one wheel on both sides, nothing built
    assert rep["smoke"] is True and rep["same_wheel"] is True
    assert "SAME wheel" in proc.stdout and "same installed" in rep["note"]
    assert Path(rep["wheel"]).is_dir() and rep["repeats"] == 2 and rep["threads"] >= 1
    assert rep["model"] == "smoke.gguf"
    assert not Path(rep["job"]["gguf"]).exists()  # written into a scratch dir that is gone

    for kind in ("portable", "native"):
        s = rep[kind]
        assert s["failures"] == 0, kind
        assert len(s["decode_runs"]) == rep["repeats"] and all(x > 0 for x in s["decode_runs"]), kind
        assert s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0, kind
        # the median of the runs listed (which are rounded to 2 decimals)
        assert abs(s["decode_tok_s"] - statistics.median(s["decode_runs"])) <= 0.01, kind
    p, n = rep["portable"], rep["native"]
    assert _close(rep["decode_ratio"], p["decode_tok_s"] / n["decode_tok_s"])
    assert _close(rep["prefill_ratio"], p["prefill_tok_s"] / n["prefill_tok_s"])
