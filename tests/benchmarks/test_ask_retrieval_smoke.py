"""benchmarks/ask_retrieval.py --smoke: a tiny bundle built, asked in every retrieval mode; self-consistent
JSON (never an accuracy check: the model has random weights)."""

from __future__ import annotations

from tests.benchmarks.smoke import smoke_report

SCORES = ("key_fact", "exact_match", "rouge_l")


def test_smoke_asks_every_mode_and_reports_consistent_ratios(tmp_path):
    rep, _ = smoke_report("ask_retrieval.py", tmp_path)
    assert rep["smoke"] is True and "random-weight" in rep["model"]
    assert rep["questions"] == 4 and rep["variant"] == "gguf-q8_0"
    assert not (tmp_path / "work" / "smoke").exists()  # scratch removed

    res = rep["results"]
    assert set(res) == {"off", "cite", "prompt"}
    off, cite, prompt = res["off"], res["cite"], res["prompt"]
    for mode, r in res.items():
        assert r["seconds"] >= 0, mode
    for k in SCORES:
        for r in (off, prompt):
            assert 0.0 <= r[k] <= 1.0, k
        assert k not in cite  # cite's answers are the closed-book ones: not a retrieval result
        # prompt / off: the quotient of the JSON's own numbers (null when off scored 0)
        ratio = prompt[f"{k}_vs_off"]
        if off[k]:
            assert abs(ratio - prompt[k] / off[k]) <= 5e-4 + 1e-9, k
        else:
            assert ratio is None, k
    assert "passage_has_key" not in off
    for r in (cite, prompt):
        assert 0.0 <= r["passage_has_key"] <= 1.0
    assert cite["same_answer_as_off"] == 1.0  # cite does not change the (greedy) answer
