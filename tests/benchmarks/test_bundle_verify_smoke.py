"""benchmarks/bundle_verify.py --smoke: a tiny bundle built, signed, verified and asked in fresh processes;
self-consistent JSON (never a speed check)."""

from __future__ import annotations

import statistics

from tests.benchmarks.smoke import close as _close
from tests.benchmarks.smoke import smoke_report


def test_smoke_verifies_a_tiny_bundle_and_reports_a_consistent_ratio(tmp_path):
    rep, proc = smoke_report("bundle_verify.py", tmp_path)
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
