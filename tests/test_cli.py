"""The CLI's contract for bad input: one line on stderr, exit code 2, nothing left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def edgeft(*args, cwd=None):
    env = {**os.environ, "EDGEFT_HOME": str(Path(cwd or REPO) / ".edgeft-home")}
    return subprocess.run([sys.executable, "-m", "edgeft.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env)


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeft: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0]


def test_malformed_data_line(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    out = tmp_path / "run"
    proc = edgeft("run", "--recipe", REPO / "recipes/tiny.yaml", "--profile", "tiny", "--out", out,
                  f"data.train={bad}", "data.eval=", f"base.model={tiny_llama_dir}", cwd=tmp_path)
    _assert_one_line_error(proc, "bad.jsonl:2", "missing field 'answer'")
    assert not out.exists()


def test_unknown_override_key(tmp_path):
    out = tmp_path / "run"
    proc = edgeft("run", "--recipe", REPO / "recipes/tiny.yaml", "--out", out, "train.learning_rate=1", cwd=tmp_path)
    _assert_one_line_error(proc, "train.learning_rate", "train.lr")
    assert not out.exists()


def test_missing_base_model(tmp_path, tiny_qa_jsonl):
    out = tmp_path / "run"
    proc = edgeft("run", "--recipe", REPO / "recipes/tiny.yaml", "--out", out, f"data.train={tiny_qa_jsonl}",
                  "base.model=/nonexistent/model", cwd=tmp_path)
    _assert_one_line_error(proc, "base.model")
    proc = edgeft("run", "--recipe", REPO / "recipes/tiny.yaml", "--out", out, f"data.train={tiny_qa_jsonl}",
                  "base.model=someorg/not-downloaded-model", cwd=tmp_path)
    _assert_one_line_error(proc, "someorg/not-downloaded-model")
    assert not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--profile", "nope"], "unknown profile 'nope'"),
    (["profile.threads=lots"], "threads: expected int"),
    (["train.method=magic"], "train.method"),
    (["novalue"], "expected key=value"),
])
def test_other_bad_input(tmp_path, args, needle):
    proc = edgeft("run", "--recipe", REPO / "recipes/tiny.yaml", "--out", tmp_path / "run", *args, cwd=tmp_path)
    _assert_one_line_error(proc, needle)


def test_show_on_non_artifact(tmp_path):
    _assert_one_line_error(edgeft("show", tmp_path), "not a finished edgeft artifact")
