"""The whole chain on the tiny recipe and profile: data -> base -> qlora -> merge -> GGUF + ONNX -> bench."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.constants import REPORT_FIELDS, REPORT_PLOTS

REPO = Path(__file__).resolve().parent.parent


def _run(out, home, *extra):
    env = {**os.environ, "EDGEFT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "edgeft.cli", "run", "--recipe", str(REPO / "recipes/tiny.yaml"),
                           "--profile", "tiny", "--out", str(out), *extra], capture_output=True, text=True, env=env)


@pytest.mark.integration
def test_tiny_pipeline_end_to_end_and_rerun_skips(tmp_path):
    out, home = tmp_path / "run", tmp_path / "home"
    proc = _run(out, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for d in ("data", "train", "merge", "gguf", "onnx", "bench"):
        assert (out / d / "manifest.json").is_file(), d
    records = json.loads((out / "bench" / "report.json").read_text())
    names = [r["name"] for r in records]
    assert names[:2] == ["base", "tuned"]
    assert {"gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8"} <= set(names)
    for r in records:
        assert set(REPORT_FIELDS) <= set(r)
        assert r["size_bytes"] > 0 and r["decode_tok_s"] > 0
        assert r.get("agreement_reference") or 0 <= r["top1_agreement"] <= 1
    by = {r["name"]: r for r in records}
    assert by["tuned"]["agreement_reference"] and by["tuned"]["top1_agreement"] is None  # nothing measured, nothing claimed
    assert by["onnx-fp32"]["top1_agreement"] >= 0.99 and by["gguf-f16"]["top1_agreement"] >= 0.95
    assert (out / "bench" / "report.md").read_text().startswith("| name |")
    # held-out manual text scored by every runtime; latency and the bandwidth prediction for every variant
    assert all(r["perplexity"] and r["perplexity"] > 1 and r["predicted_decode_tok_s"] > 0 for r in records)
    assert by["gguf-f16"]["perplexity"] == pytest.approx(by["tuned"]["perplexity"], rel=0.02)
    assert all(r["decode_tok_s_llama"] > 0 for r in records if r["format"] == "gguf")
    assert all((out / "bench" / p).read_bytes().startswith(b"\x89PNG") for p in REPORT_PLOTS)
    assert (out / "bench" / "report.csv").read_text().splitlines()[0].startswith("name,format,quant")

    # after the report, each stage's wall time and peak memory from its manifest
    table = proc.stdout[proc.stdout.index("Stages (wall time"):].splitlines()
    rows = {r.split("|")[1].strip(): r.split("|")[2:6] for r in table if r.startswith("| ") and "stage" not in r}
    for d in ("data", "train", "merge", "export_gguf", "export_onnx", "bench"):
        m = json.loads((out / {"export_gguf": "gguf", "export_onnx": "onnx"}.get(d, d) / "manifest.json").read_text())
        assert [c.strip() for c in rows[d][:2]] == [str(m["metrics"]["wall_s"]), str(m["metrics"]["peak_rss_mb"])], d
        assert rows[d][3].strip() == ""  # built in this run
    # the GGUF gate and the bench run child processes: the largest of them is recorded where it was set
    assert any(c[2].strip() not in ("", "-") and float(c[2]) > 0 for c in rows.values())

    again = _run(out, home)  # every stage skipped: nothing ran again (no wall-time race on a shared box)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("[skip]") >= 6 and "[run ]" not in again.stdout
    assert again.stdout.count("| cached |") >= 6

    show = subprocess.run([sys.executable, "-m", "edgeft.cli", "show", str(out / "bench")], capture_output=True, text=True)
    assert show.returncode == 0
    stages = [line.split()[0] for line in show.stdout.splitlines() if "id=" in line]
    assert stages == ["bench", "merge", "train", "pretrain", "data"]
