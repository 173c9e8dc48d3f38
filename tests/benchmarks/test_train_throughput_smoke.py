"""benchmarks/train_throughput.py --smoke runs every side and writes a self-consistent JSON (never a speed check)."""

from __future__ import annotations

from tests.benchmarks.smoke import smoke_report

BASELINES = ("trainer_defaults", "trainer_group_by_length", "trainer_padding_free")
VARIANTS = ("edgeft", "edgeft_packing", "edgeft_packing_mask4d", "edgeft_packing_mask4d_full_logits")


def test_smoke_writes_every_side_and_consistent_ratios(tmp_path):
    rep, _ = smoke_report("train_throughput.py", tmp_path)

    assert rep["smoke"] is True
    sides = rep["sides"]
    assert set(sides) == {*BASELINES, *VARIANTS}
    for name, s in sides.items():
        assert s["kind"] == ("baseline" if name in BASELINES else "edgeft")
        assert s["what"]
        assert s["tokens_per_s"] > 0, name
        assert s["timed_steps"] == s["steps"] - 1 >= 1  # step 1 is warm-up on every side
        assert len(s["runs"]) == rep["repeats"]
        for r in s["runs"]:
            assert r["tokens_per_s"] > 0 and r["tokens"] > 0 and r["timed_s"] > 0
    assert sides["trainer_padding_free"]["padding_share"] == 0.0

    pf = rep["padding_free_check"]
    assert isinstance(pf["equivalent"], bool)
    assert pf["equivalent"] == (pf["max_abs_logit_diff_use_cache_false"] <= pf["tolerance"])
    assert sides["trainer_padding_free"]["what"].endswith("(cross-attends: not equivalent)") != pf["equivalent"]

    ratios = rep["ratios"]
    assert set(ratios) == set(VARIANTS)
    for v in VARIANTS:
        assert set(ratios[v]) == set(BASELINES)
        for b in BASELINES:
            quotient = sides[v]["tokens_per_s"] / sides[b]["tokens_per_s"]
            assert abs(ratios[v][b] - quotient) <= 5e-4 + 1e-9, (v, b, ratios[v][b], quotient)
            for r, rv, rb in zip(rep["ratios_per_repeat"][v][b], sides[v]["runs"], sides[b]["runs"]):
                assert abs(r - rv["tokens_per_s"] / rb["tokens_per_s"]) <= 5e-4 + 1e-9
