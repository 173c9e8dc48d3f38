"""The device side stays torch-free: imports, and a whole `edgeft bench` of GGUF files with torch unimportable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEVICE_MODULES = [f"edgeft.runtime.{p.stem}" for p in sorted((REPO / "edgeft/runtime").glob("*.py"))
                  if p.stem not in ("__init__", "hf")] + \
                 [f"edgeft.bench.{p.stem}" for p in sorted((REPO / "edgeft/bench").glob("*.py")) if p.stem != "__init__"]


def test_runtime_and_bench_import_without_torch():
    code = ("import importlib, sys\n"
            f"for m in {DEVICE_MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
            "print(bad)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    assert "edgeft.bench.select" in DEVICE_MODULES and "edgeft.runtime.gguf" in DEVICE_MODULES


@pytest.fixture(scope="module")
def gguf_files(tiny_llama_dir, tmp_path_factory) -> Path:
    from edgeft.gguf import writer as gguf_writer

    out = tmp_path_factory.mktemp("dev")
    for t in ("f32", "f16"):
        gguf_writer.convert(tiny_llama_dir, out / f"model-{t}.gguf", t)
    return out


def _torch_free_env(tmp_path) -> dict:
    """An environment where any import of torch or transformers, in the CLI or a worker, fails."""
    block = tmp_path / "block"
    for name in ("torch", "transformers"):
        (block / name).mkdir(parents=True)
        (block / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the device')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(REPO)])}


def test_cli_bench_select_runs_with_torch_unimportable(tmp_path, gguf_files, tiny_llama_dir, tiny_qa_jsonl):
    """Fast half of the test below: one torch-free `edgeft bench --select` of two GGUF files, one prompt."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "edgeft.cli", "bench", str(gguf_files / "model-f32.gguf"),
           str(gguf_files / "model-f16.gguf"), "--tokenizer", str(tiny_llama_dir), "--eval", str(tiny_qa_jsonl),
           "--out", str(out), "--samples", "1", "--repeats", "1", "--profile", "tiny",
           "--set", "profile.context_length=128", "--select", "--reference-score", "0",
           "--set", "profile.memory_budget_gb=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_torch_free_env(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in records] == ["gguf-f32", "gguf-f16"]
    assert records[0]["agreement_reference"] and records[1]["top1_agreement"] >= 0.9
    assert records[1]["size_bytes"] < records[0]["size_bytes"]
    assert "selected: gguf-f16" in proc.stdout  # the smaller of two equally accurate files


@pytest.mark.slow  # four CLI runs and their llama.cpp workers: ~40 s on a busy 2-core box
def test_cli_bench_runs_with_torch_unimportable(tmp_path, gguf_files, tiny_llama_dir, tiny_qa_jsonl):
    env = _torch_free_env(tmp_path)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "edgeft.cli", "bench", str(gguf_files / "model-f32.gguf"),
           str(gguf_files / "model-f16.gguf"), "--tokenizer", str(tiny_llama_dir), "--eval", str(tiny_qa_jsonl),
           "--out", str(out), "--samples", "2", "--repeats", "1", "--profile", "tiny", "--set", "profile.context_length=128"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in records] == ["gguf-f32", "gguf-f16"]
    assert records[0]["agreement_reference"] and records[0]["top1_agreement"] is None
    assert records[1]["top1_agreement"] >= 0.9 and not records[1].get("agreement_reference")
    assert records[1]["size_bytes"] < records[0]["size_bytes"]
    assert all(r["decode_tok_s"] > 0 and r["decode_tok_s_llama"] > 0 for r in records)
    # --select without a tuned record cannot know the accuracy to keep: a one-line bad-input error
    sel = subprocess.run(cmd + ["--select"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert sel.returncode == 2 and "no 'tuned' record" in sel.stderr and "[skip]" in sel.stdout
    ok = subprocess.run(cmd + ["--select", "--reference-score", "0",  # random weights: rouge_l 0 everywhere
                               "--set", "profile.memory_budget_gb=1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "selected: gguf-f16" in ok.stdout  # the smaller of two equally accurate files
    assert "[skip]" in ok.stdout  # budgets gate; they do not invalidate the measurement
    tight = subprocess.run(cmd + ["--select", "--reference-score", "0", "--set", "profile.memory_budget_gb=0.01",
                                  "--set", "profile.runtime_overhead_gb=0"], capture_output=True, text=True, env=env,
                           cwd=tmp_path)
    assert tight.returncode == 2 and "closest miss gguf-f16" in tight.stderr and "> budget 10.2 MiB" in tight.stderr
