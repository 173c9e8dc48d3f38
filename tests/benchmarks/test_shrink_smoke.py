"""benchmarks/shrink.py --smoke: prune, distill, Q4_K_M and the bench on a tiny random-weight teacher;
self-consistent JSON (never an accuracy or speed check)."""

from __future__ import annotations

from tests.benchmarks.smoke import read_report, run_smoke

METRICS = ("key_fact", "rouge_l", "exact_match")
ROWS = ("tuned", "tuned-q4_k_m", "r50-pruned", "r50-distilled", "r50-distilled-q4_k_m")


def test_smoke_shrinks_a_tiny_teacher_with_consistent_ratios(tmp_path):
    work = tmp_path / "work"
    proc = run_smoke("shrink.py", "--out", work, env={"TQDM_DISABLE": "1"}, timeout=900)
    rep = read_report(work / "shrink.json")
    assert rep["smoke"] is True and "random-weight" in rep["teacher"]
    assert rep["run"] == str(work / "smoke-run") and rep["distill_epochs"] == 1.0 and rep["samples"] == 4
    assert "teacher (--smoke, random weights): merge " in proc.stdout

    rows = {r["name"]: r for r in rep["rows"]}
    assert list(rows) == list(ROWS)
    fp16 = rep["teacher_fp16_bytes"]
    assert rows["tuned"]["bytes"] == fp16 > 0
    for name, r in rows.items():
        assert r["params"] > 0 and r["bytes"] > 0, name
        assert r["smaller_than_fp16"] == round(fp16 / r["bytes"], 2), name  # the quotient of its own numbers
        for m in METRICS:
            assert 0.0 <= r[m] <= 1.0, (name, m)
            teacher = rows["tuned"][m]
            assert r[f"{m}_kept"] == (round(r[m] / teacher, 3) if teacher else None), (name, m)
    # pruning halves the parameters (ratio 0.5 with the search's tolerance); distill and quantization keep them
    assert rows["r50-pruned"]["params"] == rows["r50-distilled"]["params"] == rows["r50-distilled-q4_k_m"]["params"]
    assert rows["r50-pruned"]["params"] < rows["tuned"]["params"] == rows["tuned-q4_k_m"]["params"]
    assert rows["r50-distilled-q4_k_m"]["bytes"] < rows["r50-distilled"]["bytes"]
    assert rows["tuned-q4_k_m"]["bytes"] < rows["tuned"]["bytes"]

    t = rep["timings"]["r50"]
    assert t["distill_steps"] == 4  # 64 examples, batch 16, 1 epoch
    assert t["prune_s"] >= 0 and t["distill_s"] >= 0
    assert t["kept_layers"] and t["sizes"]["layers"] == len(t["kept_layers"])
