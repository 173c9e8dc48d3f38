"""Shared by the benchmarks' smoke tests: run `benchmarks/<script> --smoke` from the repo root, offline, in a
fresh process; assert it exited 0 (showing the output's tail when not); read the JSON it wrote.

Imported as `tests.benchmarks.smoke` (as tests/reliability/_common.py is), which works under `python -m pytest`
from the repo root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def close(a: float, b: float) -> bool:
    """Equal to a relative 1e-9: a number the JSON derived from its own numbers."""
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def run_smoke(script: str, *args: str | Path, env: dict[str, str] | None = None,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """`python benchmarks/<script> --smoke *args` in the repo root, offline (plus `env`), output captured;
    asserts exit 0 with the last 3000 characters of stdout and of stderr as the message."""
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *map(str, args)], cwd=REPO,
                          env={**os.environ, **OFFLINE, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def smoke_report(script: str, tmp_path: Path, *, work: bool = True,
                 timeout: int = 600) -> tuple[dict, subprocess.CompletedProcess]:
    """The common run: `--smoke [--work tmp_path/work] --out tmp_path/report.json`; returns (the JSON, the process)."""
    out = tmp_path / "report.json"
    proc = run_smoke(script, *(["--work", tmp_path / "work"] if work else []), "--out", out, timeout=timeout)
    return read_report(out), proc
