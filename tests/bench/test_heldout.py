"""Held-out manual text for perplexity: never in any training input, and a JSON sections manual."""

from __future__ import annotations

import json

import pytest

from edgeft.constants import MANUAL_FILE, MANUAL_HELDOUT_FILE
from edgeft.errors import UserError
from edgeft.stages import data

QA = [{"messages": [{"role": "user", "content": "How do I pair the remote?"},
                    {"role": "assistant", "content": "Point it at the sensor and hold the two buttons for 3 seconds."}]}]
LINES = [f"Section {i} explains how the picture mode number {i} changes the colour and the brightness of the panel."
         for i in range(40)]
LINES[7] = "To pair it, point it at the sensor and hold the two buttons for 3 seconds or more."  # a QA answer's text


def test_hold_out_never_takes_trained_text_and_keeps_every_line():
    text = "\n".join(LINES) + "\n"
    kept, held = data.hold_out_manual(text, QA, 0.25, seed=0)
    held_lines = held.splitlines()
    assert len(held_lines) == 10  # 25% of 40 lines
    assert LINES[7] not in held_lines  # shares an 8-word run with the answer
    assert sorted(kept.splitlines() + held_lines) == sorted(LINES)
    assert data.hold_out_manual(text, QA, 0.25, seed=0) == (kept, held)  # deterministic
    assert data.hold_out_manual(text, QA, 0.25, seed=1)[1] != held


def test_data_stage_reads_json_sections_and_holds_out(tmp_path):
    train = tmp_path / "qa.jsonl"
    train.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"answer {i}"}) + "\n" for i in range(20)))
    manual = tmp_path / "manual.json"
    manual.write_text(json.dumps({f"s{i}": {"id": f"s{i}", "title": f"Title {i}", "text": [" ".join(line.split()[:6]), " ".join(line.split()[6:])]}
                                  for i, line in enumerate(LINES)}))
    art = data.run(None, data.Config(train=str(train), eval="", manual=str(manual), manual_heldout=0.1),
                   tmp_path / "data")
    kept = (art.path / MANUAL_FILE).read_text()
    held = (art.path / MANUAL_HELDOUT_FILE).read_text().splitlines()
    assert "Title 0\n" in kept and len(held) == 8  # 10% of 80 lines (40 titles + 40 bodies); titles are short
    assert all(h in LINES and h not in kept for h in held)  # a section's lines rejoined into one body line
    assert art.metrics["manual_heldout_lines"] == 8

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"title": "no text"}]))
    with pytest.raises(UserError, match="sections with 'text'"):
        data.run(None, data.Config(train=str(train), eval="", manual=str(bad)), tmp_path / "data2")
    assert not (tmp_path / "data2").exists()
