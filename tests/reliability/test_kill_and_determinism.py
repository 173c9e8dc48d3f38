"""kill -9 at random points of train and export, then rerun: the same artifact bytes as an uninterrupted
run. Two uninterrupted runs of the same recipe and seed give byte-identical artifacts (CPU).

One uninterrupted reference run is shared by the tests of this module (each run is a subprocess)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability._common import TINY_RECIPE

COMPARED = ("data", "train", "merge", "gguf", "onnx")  # bench holds timings: a measurement, not an artifact
FAST = ("profile.bench_samples=2", "profile.gguf=f16,q4_k_m", "profile.onnx=int8")


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "edgeft.cli", "run", "--recipe", str(TINY_RECIPE), "--profile", "tiny",
            "--out", str(out), *FAST]


def _env(home: Path) -> dict:
    return {**os.environ, "EDGEFT_HOME": str(home), "PYTHONHASHSEED": str(random.randrange(1, 10**6))}


def _run(out: Path, home: Path) -> None:
    proc = subprocess.run(_cmd(out), capture_output=True, text=True, env=_env(home))
    assert proc.returncode == 0, proc.stderr[-3000:]


def _kill_during(out: Path, home: Path, marker: str, delay: tuple[float, float], seed: int) -> str:
    """Start a run, wait for `marker` on stdout, kill -9 the whole process group after a random delay."""
    proc = subprocess.Popen(_cmd(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(home),
                            start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    else:
        proc.wait()
        pytest.fail(f"run ended before {marker!r}: {''.join(seen)[-2000:]}")
    time.sleep(random.Random(seed).uniform(*delay))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return "".join(seen)


def _hashes(run: Path) -> dict:
    out = {}
    for d in COMPARED:
        m = json.loads((run / d / "manifest.json").read_text())
        out[d] = (m["id"], {k: v["sha256"] for k, v in m["files"].items()})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-runs")
    home = root / "home"
    _run(root / "ref", home)
    return root, home, _hashes(root / "ref")


@pytest.mark.integration
def test_same_recipe_and_seed_give_identical_artifacts(reference):
    root, home, ref = reference
    _run(root / "again", home)
    again = _hashes(root / "again")
    for d in COMPARED:
        assert again[d] == ref[d], f"{d} differs between two runs of the same recipe and seed"


@pytest.mark.integration
def test_kill_during_train_then_rerun(reference):
    root, home, ref = reference
    out = root / "killed-train"
    log = _kill_during(out, home, "[run ] train", (1.0, 4.0), seed=1)
    assert not (out / "train" / "manifest.json").exists(), log[-1500:]  # killed before it finished
    _run(out, home)
    assert _hashes(out) == ref
    assert not list(out.glob(".tmp-*"))  # the killed run's staging dir is gone


@pytest.mark.integration
def test_kill_during_export_then_rerun(reference):
    root, home, ref = reference
    out = root / "killed-export"
    shutil.copytree(root / "ref", out, ignore=shutil.ignore_patterns("gguf", "onnx", "bench"))
    _kill_during(out, home, "[run ] export_gguf", (0.2, 2.0), seed=2)
    assert not (out / "gguf" / "manifest.json").exists()
    _run(out, home)
    assert _hashes(out) == ref
    assert not list(out.glob(".tmp-*"))
