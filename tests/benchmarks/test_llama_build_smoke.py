"""benchmarks/llama_build.py --smoke: nothing built, the installed wheel against itself; self-consistent JSON
(never a speed check)."""

from __future__ import annotations

import statistics
from pathlib import Path

from tests.benchmarks.smoke import close as _close
from tests.benchmarks.smoke import smoke_report


def test_smoke_measures_the_installed_wheel_against_itself(tmp_path):
    rep, proc = smoke_report("llama_build.py", tmp_path, work=False, timeout=300)

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
