"""Write bench records as report.json, report.csv and report.md, and render the markdown table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from edgeft.constants import REPORT_CSV, REPORT_FIELDS, REPORT_JSON, REPORT_MD

EXTRA_FIELDS = ("load_s", "key_fact", "kld", "greedy_match")


def columns(records: list[dict]) -> list[str]:
    """Report fields first, then the extra ones present."""
    return list(REPORT_FIELDS) + [f for f in EXTRA_FIELDS if any(f in r for r in records)]


def write(records: list[dict], out: Path) -> str:
    """Write the three report files into `out`; returns the markdown table."""
    cols = columns(records)
    (out / REPORT_JSON).write_text(json.dumps(records, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(records)
    (out / REPORT_CSV).write_text(buf.getvalue())
    md = markdown(records, cols)
    (out / REPORT_MD).write_text(md)
    return md


def markdown(records: list[dict], cols: list[str] | None = None) -> str:
    """A GitHub markdown table of the records."""
    cols = cols or columns(records)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
