"""The bench stage and `edgeft bench` on a data artifact built with retrieval: grounded figures per variant.

The tiny Llama has random weights, so what it says is noise; what these runs pin down is the plumbing:
the stratified sample, the runtime's judgement in the worker (the data stage's unanswerable questions name
an identifier no passage holds, so the pre-check refuses every one of them whatever the model says), the
recall of the measured items, the measured grounded TTFT, and the report's second table.
"""

from __future__ import annotations

import json

import pytest

from edgeft.bench import grounded
from edgeft.bench.harness import Config as BenchConfig
from edgeft.constants import EVAL_FILE, REPORT_JSON, REPORT_MD
from edgeft.records import read_jsonl

CFG = BenchConfig(max_samples=6, max_new_tokens=8, threads=1, n_ctx=512, warmup=0, repeats=1, prompt_lengths=(8,),
                  decode_tokens=4, ppl_tokens=0, accuracy_budget=0.0, memory_budget_gb=2.0)


@pytest.fixture(scope="module")
def grounded_data(tmp_path_factory):
    from edgeft.stages import data

    return data.run(None, data.Config(heldout_facts=0.3, unanswerable=0.15, train_phrasings=1, retrieval_k=3,
                                      manual_heldout=0), tmp_path_factory.mktemp("gdata") / "data")


def _check(rec: dict, evals: list[dict]) -> None:
    """The grounded figures of one record of a 6-sample bench over `evals`."""
    measured = [evals[i] for i in grounded.stratified([r["split"] for r in evals], CFG.max_samples)]
    splits = {s: sum(r["split"] == s for r in measured) for s in ("trained", "heldout", "unanswerable")}
    assert rec["eval_splits"] == splits and min(splits.values()) >= 1
    assert rec["abstention"] == 1.0  # the runtime's identifier pre-check, not the model
    assert rec["model_abstention"] == 0.0  # random weights never say the manual does not cover it
    assert rec["answer_status"]["not_in_manual"] >= splits["unanswerable"]
    assert sum(rec["answer_status"].values()) == 6
    found = [r["grounding"]["oracle_retrieved"] for r in measured if r["grounding"]["oracle_retrieved"] is not None]
    assert rec["recall_at_k"] == round(sum(found) / len(found), 4)
    assert rec["grounded_ttft_ms"] > 0 and rec["grounded_prompt_tokens"] > 300  # three passages and a question
    for f in grounded.FIELDS:
        assert f in rec


def test_bench_stage_reports_grounded_answers(grounded_data, hf, tmp_path):
    from edgeft.stages import bench

    art = bench.run(hf, CFG, tmp_path / "bench", data=grounded_data)
    (rec,) = json.loads((art.path / REPORT_JSON).read_text())
    _check(rec, read_jsonl(grounded_data.path / EVAL_FILE))
    md = (art.path / REPORT_MD).read_text()
    assert "Grounded answers (" in md and f"| tuned | {rec['key_fact_trained']:.4g} |" in md


def test_device_bench_judges_with_the_data_artifacts_retriever(grounded_data, tiny_llama_dir, tmp_path):
    """`edgeft bench` (torch-free path) with the data artifact as --eval; a changed manual is refused."""
    import shutil

    from edgeft.bench import command
    from edgeft.errors import StageFailure
    from edgeft.gguf import writer as gguf_writer
    from edgeft.profile import load

    gguf_writer.convert(tiny_llama_dir, tmp_path / "m-f32.gguf", "f32")
    recs = command.run([tmp_path / "m-f32.gguf"], load("tiny"), eval_path=grounded_data.path, out=tmp_path / "b",
                       tokenizer=tiny_llama_dir, cfg=CFG)
    _check(recs[0], read_jsonl(grounded_data.path / EVAL_FILE))
    edited = tmp_path / "data-edited"
    shutil.copytree(grounded_data.path, edited)
    (edited / "manual.txt").write_text("Preface.\n\n" + (edited / "manual.txt").read_text())
    with pytest.raises(StageFailure, match="changed since the data stage"):
        command.run([tmp_path / "m-f32.gguf"], load("tiny"), eval_path=edited, out=tmp_path / "b2",
                    tokenizer=tiny_llama_dir, cfg=CFG)
