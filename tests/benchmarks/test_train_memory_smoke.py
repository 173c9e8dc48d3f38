"""benchmarks/train_memory.py --smoke: every variant trained in its own process on a tiny model; self-consistent
JSON (never a memory or speed check)."""

from __future__ import annotations

from tests.benchmarks.smoke import smoke_report

VARIANTS = ("qlora_gc", "qlora", "lora", "full")


def test_smoke_runs_every_variant_with_consistent_ratios(tmp_path):
    rep, _ = smoke_report("train_memory.py", tmp_path)
    assert rep["smoke"] is True and rep["steps"] == 2 and rep["max_length"] == 128
    assert rep["model"]["weights"] == "random" and rep["model"]["num_hidden_layers"] == 2

    res = rep["results"]
    assert set(res) == set(VARIANTS)
    for name, r in res.items():
        assert "error" not in r, (name, r)
    key = rep["memory_key"]
    assert key == ("peak_cuda_mib" if res["lora"]["device"] == "cuda" else "peak_rss_mib")
    lora = res["lora"]
    for name, r in res.items():
        assert r[key] > 0 and r["s_per_step"] > 0 and r["tokens_per_s"] > 0, name
        assert 0 < r["trainable_params"] <= r["total_params"], name
        # ratios vs lora: the quotients of the JSON's own numbers (rounded to 3 decimals)
        assert abs(r["memory_ratio_vs_lora"] - r[key] / lora[key]) <= 5e-4 + 1e-9, name
        assert abs(r["step_time_ratio_vs_lora"] - r["s_per_step"] / lora["s_per_step"]) <= 5e-4 + 1e-9, name
    assert lora["memory_ratio_vs_lora"] == lora["step_time_ratio_vs_lora"] == 1.0
    assert res["full"]["trainable_params"] == res["full"]["total_params"]
    for name in ("qlora_gc", "qlora", "lora"):
        assert res[name]["trainable_params"] < res["full"]["trainable_params"], name


def test_an_unknown_model_shape_is_refused_with_the_known_ones(tmp_path):
    import subprocess
    import sys

    from benchmarks.train_inputs import RANDOM, SHAPES
    from tests.benchmarks.smoke import REPO

    known = ", ".join(RANDOM + k for k in SHAPES)
    for args, says in ((["--model", "random:nope"], f"random:nope: unknown shape; known: {known}"),
                       (["--smoke", "--model", "random:nope"], "--smoke trains its own tiny model; drop --model")):
        proc = subprocess.run([sys.executable, "benchmarks/train_memory.py", *args, "--work", str(tmp_path),
                               "--out", str(tmp_path / "m.json")], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode != 0 and says in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "m.json").exists()
