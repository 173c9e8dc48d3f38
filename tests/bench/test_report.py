"""Report files: exact field order, the Pareto front, deterministic PNG bytes; perplexity's NLL by hand."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from edgeft.bench import metrics as M
from edgeft.bench import report
from edgeft.constants import REPORT_FIELDS, REPORT_PLOTS

plots = pytest.importorskip("edgeft.bench.plots")  # matplotlib: a host package


def _rec(name, size, rl, dec):
    r = {f: 0 for f in REPORT_FIELDS}
    r.update(name=name, format="gguf", quant=name, size_bytes=size, rouge_l=rl, decode_tok_s=dec, key_fact=0.5,
             latency={"lengths": {"16": {"ttft_ms": {"median": 1.0, "q1": 0.9, "q3": 1.1},
                                         "prefill_tok_s": {"median": 16.0, "q1": 15.0, "q3": 17.0}}},
                      "decode_tok_s": {"median": dec, "q1": dec, "q3": dec, "min": dec, "max": dec}})
    return r


RECS = [_rec("f16", 8e6, 0.90, 100.0), _rec("q8_0", 4e6, 0.90, 150.0), _rec("q4_k_m", 2e6, 0.80, 140.0),
        _rec("bad", 5e6, 0.70, 90.0)]


def test_pareto_front_by_hand():
    pts = [(r["size_bytes"], r["rouge_l"]) for r in RECS]
    assert plots.pareto(pts, x_lower_is_better=True) == [2, 1]  # q4 (smallest), q8 (most accurate, smaller than f16)
    pts = [(r["decode_tok_s"], r["rouge_l"]) for r in RECS]
    assert plots.pareto(pts, x_lower_is_better=False) == [1]  # q8_0 is fastest and most accurate


def test_report_files_fields_and_deterministic_pngs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        report.write(RECS, d, "**Selected:** q8_0")
    data = json.loads((a / "report.json").read_text())
    assert list(data[0])[: len(REPORT_FIELDS)] == list(REPORT_FIELDS)
    header = next(csv.reader((a / "report.csv").open()))
    assert header[: len(REPORT_FIELDS)] == list(REPORT_FIELDS) and "key_fact" in header and "latency" not in header
    md = (a / "report.md").read_text()
    assert md.startswith("| name | format | quant | size_bytes | params |") and "**Selected:** q8_0" in md
    assert "| f16 | 16 | 1 [0.9, 1.1] | 16 [15, 17] | 100 [100, 100] (100-100) |" in md
    for name in REPORT_PLOTS:
        png = (a / name).read_bytes()
        assert png.startswith(b"\x89PNG") and png == (b / name).read_bytes()
        assert b"Software" not in png and b"matplotlib" not in png
        assert f"![{name[:-4]}]({name})" in md


def test_token_nll_and_perplexity_by_hand():
    # vocab 2; uniform logits at step 0 -> nll ln 2; logits [0, ln 3] at step 1 -> p(token 1) = 3/4
    logits = np.array([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, 5.0]], np.float32)
    nll = M.token_nll(logits, [0, 0, 1])
    assert nll == pytest.approx([math.log(2.0), -math.log(0.75)], rel=1e-6)
    assert float(np.exp(nll.mean())) == pytest.approx(math.sqrt(2 * 4 / 3), rel=1e-6)


def test_llama_agreement_line():
    recs = [{"name": "gguf-f16", "decode_vs_llama": 0.98}, {"name": "gguf-q4", "decode_vs_llama": 0.90},
            {"name": "onnx-int8"}]
    (line,) = report.llama_agreement(recs)
    assert "gguf-f16 0.980, gguf-q4 0.900" in line and "Outside 5%: gguf-q4 0.900" in line
    assert report.llama_agreement(recs[:1])[0].endswith("All within 5%.")
    assert report.llama_agreement(recs[2:]) == []


def test_threads_note_only_when_the_profile_asked_for_more_threads_than_cores(tmp_path):
    capped = [{**r, "threads": 2, "threads_requested": 6} for r in RECS]
    (line,) = report.threads_note(capped)
    assert "asks for 6" in line and "2 usable cores" in line
    assert report.threads_note([{**r, "threads": 4, "threads_requested": 4} for r in RECS]) == []
    assert report.threads_note(RECS) == []  # records from before the field
    report.write(capped, tmp_path)
    assert "asks for 6" in (tmp_path / "report.md").read_text()


def test_worker_caps_threads_at_the_usable_cores(monkeypatch):
    from edgeft.bench import worker

    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert worker.usable_threads(6) == 2
    assert worker.usable_threads(1) == 1
    monkeypatch.setattr(worker.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert worker.usable_threads(6) == 6
