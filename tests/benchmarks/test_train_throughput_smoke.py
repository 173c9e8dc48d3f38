"""benchmarks/train_throughput.py --smoke --methods lora,qlora runs every side, LoRA and QLoRA, each in its own
process, and writes a self-consistent JSON: tokens/s, peak memory and the ratios derived from them (never a speed
or memory check)."""

from __future__ import annotations

from tests.benchmarks.smoke import read_report, run_smoke

BASELINES = {"lora": ("trainer_defaults", "trainer_group_by_length", "trainer_padding_free"),
             "qlora": ("trainer_qlora_defaults", "trainer_qlora_group_by_length", "trainer_qlora_padding_free")}
VARIANTS = {"lora": ("edgeft", "edgeft_packing", "edgeft_packing_mask4d", "edgeft_packing_mask4d_full_logits"),
            "qlora": ("edgeft_qlora", "edgeft_qlora_packing")}
PADDING_FREE = ("trainer_padding_free", "trainer_qlora_padding_free")


def quotient_ok(ratio: float, a: float, b: float) -> bool:
    """`ratio` is a / b rounded to 3 decimals."""
    return abs(ratio - a / b) <= 5e-4 + 1e-9


def test_smoke_lora_and_qlora_every_side_with_memory_and_consistent_ratios(tmp_path):
    out = tmp_path / "report.json"
    proc = run_smoke("train_throughput.py", "--methods", "lora,qlora", "--work", tmp_path / "work", "--out", out)
    rep = read_report(out)

    assert rep["smoke"] is True and rep["methods"] == ["lora", "qlora"]
    assert rep["qlora"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    cpu = rep["host"]["cpu"]
    assert cpu and proc.stdout.startswith(f"cpu: {cpu}\n")  # the printed report starts with the CPU model
    assert f"\ncpu: {cpu}; model:" in proc.stdout  # and so does its final table
    key = rep["memory_key"]
    assert key == ("peak_cuda_mb" if rep["device"] == "cuda" else "peak_rss_mib")

    sides = rep["sides"]
    assert set(sides) == {n for m in ("lora", "qlora") for n in (*BASELINES[m], *VARIANTS[m])}
    for method in ("lora", "qlora"):
        for name in (*BASELINES[method], *VARIANTS[method]):
            s = sides[name]
            assert s["method"] == method, name
            assert s["kind"] == ("baseline" if name in BASELINES[method] else "edgeft"), name
            assert s["what"], name
            assert s["tokens_per_s"] > 0, name
            assert s["timed_steps"] == s["steps"] - 1 >= 1, name  # step 1 is warm-up on every side
            assert len(s["runs"]) == rep["repeats"], name
            for r in s["runs"]:
                assert r["tokens_per_s"] > 0 and r["tokens"] > 0 and r["timed_s"] > 0, name
                assert r["peak_rss_mib"] > 0 and r["process_s"] >= r["timed_s"], name
                assert r[key] > 0, name
            # one run per repeat: the side's peak is that run's, measured in its own process
            assert s["peak_memory"] == s[key] == s["runs"][0][key] > 0, name
    # the same adapter on every side of a method: the trainable parameter counts agree
    for method in ("lora", "qlora"):
        counts = {sides[n]["runs"][0]["trainable_params"] for n in (*BASELINES[method], *VARIANTS[method])}
        assert len(counts) == 1 and counts.pop() > 0, (method, counts)
    for name in PADDING_FREE:
        assert sides[name]["padding_share"] == 0.0

    pf = rep["padding_free_check"]
    assert isinstance(pf["equivalent"], bool)
    assert pf["equivalent"] == (pf["max_abs_logit_diff_use_cache_false"] <= pf["tolerance"])
    for name in PADDING_FREE:
        assert sides[name]["what"].endswith("(cross-attends: not equivalent)") != pf["equivalent"]

    ratios, memory, per_repeat = rep["ratios"], rep["memory_ratios"], rep["ratios_per_repeat"]
    assert set(ratios) == set(memory) == set(per_repeat) == {v for m in VARIANTS.values() for v in m}
    for method in ("lora", "qlora"):
        for v in VARIANTS[method]:
            # every edgeft variant against every baseline of its own method, and only those
            assert set(ratios[v]) == set(memory[v]) == set(per_repeat[v]) == set(BASELINES[method]), v
            for b in BASELINES[method]:
                assert quotient_ok(ratios[v][b], sides[v]["tokens_per_s"], sides[b]["tokens_per_s"]), (v, b)
                assert quotient_ok(memory[v][b], sides[v]["peak_memory"], sides[b]["peak_memory"]), (v, b)
                for r, rv, rb in zip(per_repeat[v][b], sides[v]["runs"], sides[b]["runs"]):
                    assert quotient_ok(r, rv["tokens_per_s"], rb["tokens_per_s"]), (v, b)
