"""The harness end to end on the tiny Llama: torch reference vs an F32 GGUF of the same weights."""

from __future__ import annotations

import pytest

from edgeft.bench.harness import Config, Target, build_samples, run_bench
from edgeft.constants import REPORT_FIELDS
from edgeft.records import load_records

HELDOUT = ("Check the drive belt tension every month and replace a worn belt.\n"
           "The controller shows the discharge pressure in bar.\n")


def test_samples_hold_timing_lengths_and_perplexity_windows(tiny_llama_dir, tiny_qa_jsonl):
    cfg = Config(max_samples=5, n_ctx=64, decode_tokens=16, ppl_tokens=20)
    s = build_samples(load_records(tiny_qa_jsonl), tiny_llama_dir, cfg, HELDOUT)
    assert len(s["items"]) == 5 and s["prompt_lengths"] == [8, 32]  # n_ctx/8 and n_ctx/2
    assert sum(len(w) - 1 for w in s["ppl_items"]) == 20  # the token budget, scored positions
    assert all(w[0] == s["bos_id"] for w in s["ppl_items"])


def test_gguf_f32_matches_torch_reference_on_one_prompt(tiny_llama_dir, tiny_qa_jsonl, tmp_path):
    """Fast half of the test below, the same strict parity on one prompt: the bench's torch worker and its
    llama.cpp worker, fed the same F32 weights, agree on every teacher-forced top-1, on the greedy answer,
    and in KL (< 1e-4) and perplexity (rel 1e-3)."""
    from edgeft.gguf import writer as gguf_writer

    gguf_writer.convert(tiny_llama_dir, tmp_path / "m-f32.gguf", "f32")
    cfg = Config(max_samples=1, max_new_tokens=8, n_ctx=64, warmup=0, repeats=1, prompt_lengths=(8,),
                 decode_tokens=4, ppl_tokens=32, kv_cache_type="f32", threads=1)
    variants = [Target("tuned", "torch", "fp32", str(tiny_llama_dir)),
                Target("gguf-f32", "gguf", "f32", str(tmp_path / "m-f32.gguf"))]
    ref, g = run_bench(variants, load_records(tiny_qa_jsonl), tiny_llama_dir, cfg, tmp_path / "work", HELDOUT)
    assert g["top1_agreement"] == 1.0 and g["kld"] < 1e-4 and g["greedy_match"] == 1.0
    assert g["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)


@pytest.mark.slow  # torch + llama.cpp worker processes: ~20 s idle, ~50 s on a busy 2-core box
def test_gguf_f32_matches_torch_reference(tiny_llama_dir, tiny_qa_jsonl, tmp_path):
    from edgeft.gguf import writer as gguf_writer

    gguf_writer.convert(tiny_llama_dir, tmp_path / "m-f32.gguf", "f32")
    cfg = Config(max_samples=3, max_new_tokens=8, n_ctx=128, repeats=2, decode_tokens=8, ppl_tokens=64,
                 kv_cache_type="f32")
    variants = [Target("tuned", "torch", "fp32", str(tiny_llama_dir)),
                Target("gguf-f32", "gguf", "f32", str(tmp_path / "m-f32.gguf"))]
    recs = run_bench(variants, load_records(tiny_qa_jsonl), tiny_llama_dir, cfg, tmp_path / "work", HELDOUT)
    ref, g = recs
    for r in recs:
        assert set(REPORT_FIELDS) <= set(r) and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["predicted_decode_tok_s"] > 0 and r["load_s"] > 0 and r["params"] == ref["params"]
    assert g["top1_agreement"] == 1.0 and g["kld"] < 1e-4 and g["greedy_match"] == 1.0
    assert g["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)  # same weights, same held-out ids
    assert g["decode_tok_s_llama"] > 0 and "decode_tok_s_llama" not in ref
    assert g["predicted_footprint_mb"] < ref["predicted_footprint_mb"] + 1  # f32 both: same weight bytes
