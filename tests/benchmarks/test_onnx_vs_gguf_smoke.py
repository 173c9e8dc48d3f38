"""benchmarks/onnx_vs_gguf.py --smoke: every side measured, interleaved, self-consistent JSON (never a speed check)."""

from __future__ import annotations

import statistics

from tests.benchmarks.smoke import close as _close
from tests.benchmarks.smoke import smoke_report

BASE = "gguf_q4_k_m"


def test_smoke_reports_both_sides_with_bytes_and_accuracy(tmp_path):
    rep, proc = smoke_report("onnx_vs_gguf.py", tmp_path, timeout=900)
    assert rep["smoke"] is True and rep["repeats"] >= 2  # >= 2: the round robin is exercised
    assert not (tmp_path / "work" / "smoke").exists()  # scratch removed
    m = rep["models"]["smoke"]
    v = m["variants"]
    expected = {BASE, "onnx_optimum_int4"} | (set() if rep["genai_skipped"] else
                                               {"onnx_genai_int4", "onnx_genai_int4_plain_ort"})
    assert set(v) == expected
    if rep["genai_skipped"]:
        assert "SKIPPED" in proc.stdout

    # what each side is, its KV cache type stated
    assert v[BASE]["role"] == "baseline" and v[BASE]["kv_cache"] == "f16"
    assert {"Q4_K", "Q6_K"} <= set(v[BASE]["weights"])  # Q4_K_M's mix, stated
    for name, rec in v.items():
        assert rec["what"] and rec["kv_cache"] in rec["what"], name
        assert name == BASE or (rec["kv_cache"] == "fp32" and rec["weights"]["MatMulNBits"] > 0)
        assert name in proc.stdout

    # interleaved repeats; medians and derived numbers are those of the runs listed
    for name, rec in v.items():
        for key in ("decode", "prefill"):
            runs = rec[f"{key}_runs"]
            assert len(runs) == rep["repeats"] and all(x > 0 for x in runs), (name, key)
            assert _close(rec[f"{key}_tok_s"], statistics.median(runs))
        assert _close(rec["bytes_per_token"], rec["weight_bytes_per_token"] + rec["kv_bytes_per_token"])
        assert 0 < rec["weight_bytes_per_token"] <= rec["size_bytes"]
        assert rec["kv_bytes_per_token"] > 0
        assert _close(rec["streamed_gbs"], rec["decode_tok_s"] * rec["bytes_per_token"] / 1e9)

    # ratios: the quotients of the JSON's own measured numbers, overall and per repeat
    ratios = m["ratios_vs_q4_k_m"]
    assert set(ratios) == set(v) - {BASE}
    base = v[BASE]
    for name, r in ratios.items():
        assert _close(r["decode"], v[name]["decode_tok_s"] / base["decode_tok_s"])
        assert _close(r["prefill"], v[name]["prefill_tok_s"] / base["prefill_tok_s"])
        assert _close(r["size"], v[name]["size_bytes"] / base["size_bytes"])
        assert _close(r["bytes_per_token"], v[name]["bytes_per_token"] / base["bytes_per_token"])
        for key in ("decode", "prefill"):
            per = m["ratios_per_repeat"][name][key]
            assert len(per) == rep["repeats"]
            for q, a, b in zip(per, v[name][f"{key}_runs"], base[f"{key}_runs"]):
                assert _close(q, a / b)

    # accuracy on every variant, in range; the random-weight caveat is stated
    acc = m["accuracy_prompts"]
    assert acc["positions"] > 0 and acc["sequences"] > 0
    for name, rec in v.items():
        assert 0.0 <= rec["tf_top1_agreement"] <= 1.0, name
        assert rec["tf_kld"] >= 0.0, name
        assert rec["tf_positions"] == acc["positions"], name
    assert 0.0 <= acc["reference_mean_entropy_nats"] <= acc["max_entropy_nats"] + 1e-6
    assert m["model"]["weights"] == "random" and m["accuracy_note"] and "RANDOM WEIGHTS" in proc.stdout

    # the stages' gates ran (bars off on random weights, with the reason)
    assert "gguf" in m["gates"] and "onnx_optimum" in m["gates"]
    for g in m["gates"].values():
        assert g["failed"] is None and g["bars"].startswith("off") and g["checked"]
    assert m["gates"]["gguf"]["files"]["f16"]["rel_logit_diff"] <= 0.02
