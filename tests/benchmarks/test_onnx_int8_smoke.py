"""benchmarks/onnx_int8.py --smoke: every 8-bit recipe made, measured on the same positions, self-consistent JSON."""

from __future__ import annotations

import statistics

from tests.benchmarks.smoke import close as _close
from tests.benchmarks.smoke import smoke_report


def test_smoke_reports_every_variant_on_the_same_positions_with_consistent_ratios(tmp_path):
    rep, proc = smoke_report("onnx_int8.py", tmp_path, timeout=900)
    assert rep["smoke"] is True and rep["repeats"] == 2 and rep["cpu"]
    names = list(rep["variants"])
    assert names[0] == "fp32" and {"dyn_channel_rr", "w8_b32_acc0", "w8_b32_acc4", "stage_int8"} <= set(names)
    base = rep["variants"]["fp32"]
    positions = {v["positions"] for v in rep["variants"].values()}
    assert len(positions) == 1 and positions.pop() > 0  # one prompt set, one reference for all
    assert base["top1_agreement"] == 1.0 and base["kld"] < 1e-6  # fp32 against torch fp32
    for name, v in rep["variants"].items():
        assert 0.0 <= v["top1_lower95"] <= v["top1_agreement"] <= 1.0 and v["kld"] >= 0.0, name
        assert len(v["decode_runs"]) == rep["repeats"] and all(x > 0 for x in v["decode_runs"]), name
        assert _close(v["decode_tok_s"], statistics.median(v["decode_runs"])), name
        assert _close(v["vs_fp32"]["decode"], v["decode_tok_s"] / base["decode_tok_s"]), name
        assert _close(v["vs_fp32"]["size"], v["size_bytes"] / base["size_bytes"]), name
        if name != "fp32":
            assert v["size_bytes"] < 0.45 * base["size_bytes"], name  # 8-bit weights (a few fp32 tables left)
            assert v["quantize_s"] >= 0 and v["how"]["method"], name
        assert f"{name}" in proc.stdout
    w8 = rep["variants"]["w8_b32_acc0"]["how"]
    assert w8["bits"] == 8 and w8["block_size"] == 32 and w8["embeddings"].startswith("int8")
    from edgeft.stages.export_onnx import Config

    stage = rep["variants"]["stage_int8"]["how"]  # the stage's own int8, from its Config defaults
    assert stage["block_size"] == Config().int8_block_size and stage["smooth_alpha"] == Config().int8_smooth_alpha
    assert stage["smoothed_matmuls"] > 0 and rep["prompts"]["calibration"] > 0
    assert {"q_proj", "down_proj", "lm_head"} <= set(rep["activation_outliers"])
    assert all(o["max_over_rms_worst"] >= o["max_over_rms_median"] >= 1.0 for o in rep["activation_outliers"].values())
