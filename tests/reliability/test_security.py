"""No pickle, no shell strings from user input, no remote code unless the recipe asks for it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from edgeft.errors import UserError
from edgeft.training import hf_io

PKG = Path(__file__).resolve().parents[2] / "edgeft"
SOURCES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("pattern,why", [
    (r"^\s*(import pickle|from pickle|import dill|import cloudpickle)", "pickle executes code on load"),
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load needs weights_only=True"),
    (r"shell\s*=\s*True", "no shell strings"),
    (r"os\.system\(|os\.popen\(", "no shell strings"),
    (r"(?<![\w.])eval\(|(?<![\w.])exec\(", "no eval/exec of text"),
    (r"trust_remote_code\s*=\s*True", "remote code only when the recipe asks"),
    (r"allow_pickle\s*=\s*True", "numpy pickles execute code on load"),
])
def test_no_unsafe_calls_in_the_package(pattern, why):
    rx = re.compile(pattern)
    hits = [f"{p.relative_to(PKG.parent)}:{i}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line) and "# safe:" not in line]
    assert not hits, f"{why}: {hits}"


def test_a_model_with_its_own_code_needs_trust_remote_code(tmp_path, tiny_llama_dir):
    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="trust_remote_code=true"):
        hf_io.resolve_model(str(model))
    assert hf_io.resolve_model(str(model), trust_remote_code=True) == model


def test_subprocesses_get_argument_lists_not_strings():
    """Every subprocess call passes a list (user paths can hold spaces and shell metacharacters)."""
    rx = re.compile(r"subprocess\.(run|Popen|check_call|check_output)\(\s*f?[\"']")
    hits = [f"{p.relative_to(PKG.parent)}:{i}" for p in SOURCES
            for i, line in enumerate(p.read_text().splitlines(), 1) if rx.search(line)]
    assert not hits, hits
