"""The llama.cpp smoke generation in a child process, and how a crash of any llama.cpp child is named."""

import os
import stat

import pytest

from edgeft.errors import StageFailure
from edgeft.runtime import smoke


@pytest.fixture
def sigill_python(tmp_path):
    """An 'interpreter' that dies of an illegal instruction, as a wrong llama.cpp build does on its first matmul."""
    exe = tmp_path / "python-sigill"
    exe.write_text("#!/bin/sh\ncat >/dev/null\nkill -ILL $$\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


def test_smoke_generation_runs_on_this_cpu():
    pytest.importorskip("llama_cpp")
    ok, line = smoke.check(n_tokens=6)
    assert ok, line
    assert "6 tokens generated" in line


def test_smoke_names_sigill_with_the_fix(monkeypatch, sigill_python):
    monkeypatch.setattr(smoke.sys, "executable", sigill_python)
    ok, line = smoke.check()
    assert not ok and "SIGILL" in line and "make setup" in line and "exit code -4" not in line


def test_parity_gate_names_sigill(monkeypatch, sigill_python, tmp_path):
    from edgeft.gguf import parity as gguf_parity

    monkeypatch.setattr(gguf_parity.sys, "executable", sigill_python)
    with pytest.raises(StageFailure, match="SIGILL.*make setup"):
        gguf_parity.run_child({"f16": tmp_path / "m.gguf"}, [[1, 2]], tmp_path)


def test_bench_worker_names_sigill(monkeypatch, sigill_python, tmp_path, tiny_llama_dir, tiny_qa_jsonl):
    from edgeft.bench import harness
    from edgeft.records import load_records

    monkeypatch.setattr(harness.sys, "executable", sigill_python)
    cfg = harness.Config(max_samples=2, max_new_tokens=4, n_ctx=64, repeats=1, decode_tokens=4, ppl_tokens=0)
    v = harness.Target("gguf-f16", "gguf", "f16", str(tmp_path / "m.gguf"))
    with pytest.raises(StageFailure, match="gguf-f16.*SIGILL"):
        harness.run_bench([v], load_records(tiny_qa_jsonl), tiny_llama_dir, cfg, tmp_path / "work")


def test_doctor_runs_the_smoke_and_names_the_cpu(capsys):
    pytest.importorskip("llama_cpp")
    from edgeft import host
    from edgeft.device import doctor

    assert doctor.report(None) == 0
    out = capsys.readouterr().out
    assert f"cpu: {host.cpu_model()}" in out and "llama.cpp runs on this CPU" in out
    assert os.cpu_count() and "no model was run" in out
