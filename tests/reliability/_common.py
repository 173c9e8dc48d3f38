"""Shared helpers for the reliability suite (the `cli` fixture is in tests/conftest.py): check the
error contract (one line on stderr naming what to fix, exit 2 for bad input / 1 for runtime failures,
no traceback, nothing that looks finished)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "tiny.yaml"


def assert_error(result, code: int, *needles: str) -> str:
    """The one-line error contract; returns the line."""
    rc, _, err = result
    lines = err.strip().splitlines()
    assert rc == code, f"exit {rc}, stderr: {err[-2000:]}"
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(("edgeft: error:", "edgeft: failed:")), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_finished(root: Path) -> None:
    """No manifest (nothing that looks finished) and no staging dir anywhere under `root`."""
    if not root.exists():
        return
    assert not list(root.rglob("manifest.json")), list(root.rglob("manifest.json"))
    assert not [p for p in root.rglob(".tmp-*")], list(root.rglob(".tmp-*"))
