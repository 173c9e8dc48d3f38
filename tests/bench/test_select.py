"""The gate and ladder: smallest variant within the accuracy and memory budgets, or the closest miss."""

import pytest

from edgeft.bench.select import select
from edgeft.errors import UserError
from edgeft.profile import Profile


def _rec(name, fmt, size, rl, rss):
    return {"name": name, "format": fmt, "quant": name.split("-")[-1], "size_bytes": size, "rouge_l": rl,
            "peak_rss_mb": rss, "decode_tok_s": 100.0}


RECORDS = [
    _rec("base", "torch", 14_000_000, 0.10, 300.0),
    _rec("tuned", "torch", 7_000_000, 0.80, 300.0),
    _rec("gguf-f16", "gguf", 7_000_000, 0.80, 60.0),
    _rec("gguf-q8_0", "gguf", 4_000_000, 0.79, 50.0),
    _rec("gguf-q4_k_m", "gguf", 2_000_000, 0.70, 40.0),
    _rec("onnx-int8", "onnx", 4_100_000, 0.78, 55.0),
]


def test_picks_smallest_within_accuracy_budget():
    # 0.95 * 0.80 = 0.76: q4_k_m (0.70) misses, q8_0 (0.79, 4.0 MB) beats onnx-int8 (4.1 MB)
    got = select(RECORDS, Profile(accuracy_budget=0.95, memory_budget_gb=1.0))
    assert got["name"] == "gguf-q8_0"
    assert got["accuracy_kept"] == pytest.approx(0.79 / 0.80, abs=1e-4)
    # a looser budget lets the 4-bit file through
    assert select(RECORDS, Profile(accuracy_budget=0.85, memory_budget_gb=1.0))["name"] == "gguf-q4_k_m"


def test_torch_variants_never_selected():
    recs = [r for r in RECORDS if r["format"] == "torch"]
    with pytest.raises(UserError, match="no gguf/onnx variant"):
        select(recs, Profile())


def test_memory_budget_excludes_and_names_the_overshoot():
    prof = Profile(accuracy_budget=0.95, memory_budget_gb=52 / 1024)  # 52 MiB: only q8_0 (50) fits
    assert select(RECORDS, prof)["name"] == "gguf-q8_0"
    with pytest.raises(UserError) as e:
        select(RECORDS, Profile(name="pi", accuracy_budget=0.95, memory_budget_gb=45 / 1024))
    msg = str(e.value)
    # closest miss: q8_0 is 5 MiB (11.1%) over; q4_k_m fits but is 0.06 (7.9%) short -> q4 is closer
    assert "closest miss gguf-q4_k_m" in msg and "short by 0.0600" in msg and "'pi'" in msg
    assert "\n" not in msg


def test_accuracy_miss_reports_the_gap():
    assert select(RECORDS, Profile(accuracy_budget=1.0, memory_budget_gb=1.0))["name"] == "gguf-f16"
    with pytest.raises(UserError) as e:
        select(RECORDS, Profile(accuracy_budget=1.05, memory_budget_gb=1.0))
    # need 0.84; f16 at 0.80 is the closest, 0.04 short
    assert "closest miss gguf-f16" in str(e.value) and "short by 0.0400" in str(e.value)
    from edgeft.stages.bench import Config  # the bench stage's config: budgets, no profile name

    with pytest.raises(UserError) as e:
        select(RECORDS, Config(accuracy_budget=1.05, memory_budget_gb=1.0))
    msg = str(e.value)
    assert "no variant within the profile's budgets; closest miss gguf-f16" in msg and "'?'" not in msg


def test_reference_from_argument_or_error():
    device = [r for r in RECORDS if r["format"] != "torch"]  # a bundle on a device: no torch records
    with pytest.raises(UserError, match="no 'tuned' record"):
        select(device, Profile())
    assert select(device, Profile(accuracy_budget=0.95), reference=0.80)["name"] == "gguf-q8_0"


def test_predicted_footprint_when_not_measured():
    recs = [{**r, "peak_rss_mb": None, "predicted_footprint_mb": r["size_bytes"] / 2**20 + 1} for r in RECORDS]
    got = select(recs, Profile(accuracy_budget=0.95, memory_budget_gb=5 / 1024))  # 5 MiB: q8_0 (4.8) fits, f16 (7.7) not
    assert got["name"] == "gguf-q8_0" and got["memory_mb"] == pytest.approx(4_000_000 / 2**20 + 1)


def _bench_dir(tmp_path):
    import json

    from edgeft import artifact
    from edgeft.constants import KIND_BENCH

    def payload(tmp):
        (tmp / "report.json").write_text(json.dumps(RECORDS))
        return {}

    return artifact.build(tmp_path / "bench", kind=KIND_BENCH, stage="bench", params={}, parent=None,
                          payload=payload).path


def test_cli_select_over_a_finished_report(tmp_path, capsys):
    from edgeft.cli import main

    bench = str(_bench_dir(tmp_path))
    assert main(["bench", bench, "--select", "--profile", "tiny", "--set", "profile.accuracy_budget=0.95"]) == 0
    assert "selected: gguf-q8_0 (gguf q8_0, 4000000 bytes)" in capsys.readouterr().out
    code = main(["bench", bench, "--select", "--profile", "tiny", "--set", "profile.accuracy_budget=0.95",
                 "--set", "profile.memory_budget_gb=0.04", "--set", "profile.runtime_overhead_gb=0"])
    err = capsys.readouterr().err  # 40.96 MiB: only q4_k_m (40) fits, and it is 0.06 short of 0.76
    assert code == 2 and err.count("\n") == 1 and "closest miss gguf-q4_k_m" in err and "short by 0.0600" in err
    assert main(["bench", bench, "--select", "--set", "train.epochs=2"]) == 2
    assert "only profile.key=value" in capsys.readouterr().err
