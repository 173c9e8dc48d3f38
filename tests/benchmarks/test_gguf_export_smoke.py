"""benchmarks/gguf_export.py --smoke: ours (and theirs when the sdist is cached), interleaved, self-consistent JSON."""

from __future__ import annotations

import statistics

from tests.benchmarks.smoke import close as _close
from tests.benchmarks.smoke import smoke_report

PER_RUN = ("seconds", "peak_rss_mib", "import_s", "import_rss_mib")


def test_smoke_reports_sides_imports_and_consistent_ratios(tmp_path):
    rep, proc = smoke_report("gguf_export.py", tmp_path, timeout=900)
    assert rep["smoke"] is True and rep["repeats"] >= 2

    bw = rep["bandwidth"]
    assert bw["threads"] == rep["machine"]["threads"] == 2  # the decode's thread count
    assert _close(bw["copy_gbs_median"], statistics.median(bw["copy_gbs"])) and bw["copy_gbs_median"] > 0
    assert _close(bw["copy_gbs_1thread_median"], statistics.median(bw["copy_gbs_1thread"]))

    m = rep["models"]["smoke"]
    sides = m["sides"]
    if rep["theirs_skipped"]:
        assert sides == ["ours"] and "theirs SKIPPED" in proc.stdout and "ratios" not in m
    else:
        assert sides == ["ours", "theirs"] and rep["sides"]["theirs"]
    for who in sides:
        s = m[who]
        for key in PER_RUN:
            runs = s[f"{key}_runs"]
            assert len(runs) == rep["repeats"] and all(x > 0 for x in runs), (who, key)
            assert _close(s[key], statistics.median(runs)), (who, key)
        assert _close(s["seconds_minus_imports"], s["seconds"] - s["import_s"])
        assert _close(s["peak_rss_mib_minus_imports"], s["peak_rss_mib"] - s["import_rss_mib"])
        assert len(s["decode_runs"]) == rep["repeats"]
        assert _close(s["decode_tok_s"], statistics.median(s["decode_runs"]))
        assert _close(s["bytes_per_token"], s["weight_bytes_per_token"] + s["kv_bytes_per_token"])
        assert 0 < s["weight_bytes_per_token"] <= s["q4_k_m_bytes"]
        assert _close(s["decode_gbs"], s["decode_tok_s"] * s["bytes_per_token"] / 1e9)
        assert _close(s["decode_bandwidth_share"], s["decode_gbs"] / bw["copy_gbs_median"])
    assert m["ours"]["modules_loaded"]["torch"] is False  # ours converts without torch

    if "theirs" in sides:
        o, t, r = m["ours"], m["theirs"], m["ratios"]
        assert t["modules_loaded"]["torch"] is True
        assert _close(r["time"], o["seconds"] / t["seconds"])
        assert _close(r["peak_rss"], o["peak_rss_mib"] / t["peak_rss_mib"])
        for key, num in (("time_minus_imports", "seconds_minus_imports"),
                         ("peak_rss_minus_imports", "peak_rss_mib_minus_imports")):
            a, b = o[num], t[num]  # differences of medians: on the tiny model noise can make one <= 0 (ratio null)
            assert (r[key] is None) == (a <= 0 or b <= 0), key
            assert r[key] is None or _close(r[key], a / b), key
        assert _close(r["import_rss"], o["import_rss_mib"] / t["import_rss_mib"])
        assert _close(r["q4_k_m_decode"], o["decode_tok_s"] / t["decode_tok_s"])
        assert _close(r["q4_k_m_size"], o["q4_k_m_bytes"] / t["q4_k_m_bytes"])
        assert _close(r["bytes_per_token"], o["bytes_per_token"] / t["bytes_per_token"])
        assert isinstance(m["f16_tensors_identical"], bool) and isinstance(m["q4_k_m_tensors_identical"], bool)
