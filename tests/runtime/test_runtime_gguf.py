"""GGUFRuntime against PyTorch FP32 on the tiny Llama: greedy tokens, logits, tokenization, the contract.

Tolerances seen here (max |logit diff| / max |logit|): an F32 GGUF with an F32 KV cache ~1.4e-6;
with llama.cpp's default F16 KV cache ~1.1e-3; an F16 GGUF ~2e-3 (its greedy tokens differ from
torch only where torch's top-2 margin is below the logit error, about 3e-3 here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeft.gguf import writer as gguf_writer
from edgeft.runtime.gguf import GGUFRuntime

PROMPTS = ("Check the torque", "Fault code E-1024 means", "Replace the filter every", "The pump")
NEW_TOKENS = 24
SAMPLES = ("the", "Check the torque of 45 Nm.", "Fault code E-1024\nreplace the pump", "tab\there",
           "a\n\nb", "ünïcode ✓ 日本", "12345.678", "trailing ", "inner  double  spaces", "Answer:\n")


@pytest.fixture(scope="module")
def files(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rt")
    paths = {t: out / f"m-{t}.gguf" for t in ("f32", "f16")}
    for t, p in paths.items():
        gguf_writer.convert(tiny_llama_dir, p, t)
    return paths


@pytest.fixture(scope="module")
def torch_ref(tiny_llama_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra threads only spin (30x slower on a busy 2-core box)
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    yield model, AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.set_num_threads(threads)


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _torch_greedy(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(_torch_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def _greedy_vs_torch(rt, model, ids: list[int]) -> tuple[int, int, float]:
    """(tokens that were torch's top-1, tokens, max |logit diff| / max |logit|) of llama.cpp's greedy run.
    Each token must be torch's top-1 or lie within 2x the measured logit error of it: a near-tie, where
    the ISA's summation order (AVX2, AVX-512, ...) may pick either; anything else fails here."""
    got = rt.generate(ids, NEW_TOKENS).tokens
    assert len(got) == NEW_TOKENS
    ref = _torch_logits(model, ids + got)
    err = np.abs(rt.logits(ids + got) - ref).max()
    agree = 0
    for row, token in zip(ref[len(ids) - 1:-1], got):
        agree += row.argmax() == token
        assert row.max() - row[token] <= 2 * err  # a difference only where torch was undecided
    return agree, len(got), float(err / np.abs(ref).max())


def test_f32_gguf_matches_torch_fp32(files, torch_ref):
    model, tok = torch_ref
    agree = total = 0
    with GGUFRuntime(files["f32"], n_threads=1, kv_type="f32") as exact, \
            GGUFRuntime(files["f32"], n_threads=1) as kv16:
        for prompt in PROMPTS:
            ids = tok(prompt).input_ids
            a, n, rel = _greedy_vs_torch(exact, model, ids)
            agree, total = agree + a, total + n
            assert rel < 1e-4
            want = _torch_greedy(model, ids, NEW_TOKENS)
            ref = _torch_logits(model, ids + want)
            assert np.abs(kv16.logits(ids + want) - ref).max() / np.abs(ref).max() < 5e-3  # F16 KV cache alone
    assert agree / total > 0.95


def test_f16_gguf_greedy_differs_from_torch_only_at_near_ties(files, torch_ref):
    model, tok = torch_ref
    agree = total = 0
    with GGUFRuntime(files["f16"], n_threads=1) as rt:
        for prompt in PROMPTS:
            a, n, rel = _greedy_vs_torch(rt, model, tok(prompt).input_ids)
            agree, total = agree + a, total + n
            assert rel < 1e-2
    assert agree / total > 0.9


def test_tokenize_matches_hf_tokenizer(files, torch_ref):
    _, tok = torch_ref
    with GGUFRuntime(files["f16"], n_threads=1) as rt:
        for text in SAMPLES:
            assert rt.tokenize(text, add_bos=False) == tok(text, add_special_tokens=False).input_ids, text
            assert rt.tokenize(text, add_bos=True) == tok(text).input_ids, text
        assert rt.tokenize("a</s>", add_bos=False)[-1] == tok.eos_token_id  # special text parsed


def test_leading_whitespace_follows_sentencepiece_not_hf_fast(files, torch_ref, tiny_llama_dir):
    """Irreducible: HF's fast Metaspace drops one '▁' before leading spaces; llama.cpp and SentencePiece keep it.

    Runtimes therefore take token ids, never text.
    """
    import sentencepiece as spm

    _, tok = torch_ref
    sp = spm.SentencePieceProcessor(model_file=str(tiny_llama_dir / "tokenizer.model"))
    with GGUFRuntime(files["f16"], n_threads=1) as rt:
        for text in (" leading", "  two spaces"):
            assert rt.tokenize(text, add_bos=False) == sp.encode(text)
            assert tok(text, add_special_tokens=False).input_ids == sp.encode(text)[1:]


def test_generate_contract(files, torch_ref):
    _, tok = torch_ref
    ids = tok(PROMPTS[0]).input_ids
    with GGUFRuntime(files["f16"], n_threads=1, n_ctx=64) as rt:
        assert rt.size_bytes == files["f16"].stat().st_size and rt.load_s > 0
        first = rt.generate(ids, 5)
        rt.generate(tok(PROMPTS[1]).input_ids, 7)
        again = rt.generate(ids, 5)  # the KV cache is reset between calls
        assert first.tokens == again.tokens and len(first.tokens) == 5
        assert first.prompt_tokens == len(ids) and not first.stopped_at_eos
        assert first.ttft_s > 0 and first.decode_s > 0 and first.decode_tok_s > 0
        assert rt.generate(ids, 0).tokens == []
        logits = rt.logits(ids)
        assert logits.shape == (len(ids), 384) and logits.dtype == np.float32
        np.testing.assert_array_equal(logits[-1].argmax(), first.tokens[0])
        with pytest.raises(ValueError, match="n_ctx"):
            rt.generate(ids, 64)


def test_generation_stops_at_eos(tiny_llama_dir, torch_ref, tmp_path):
    """A model rigged so EOS always wins: generation returns no tokens and says it stopped at EOS."""
    import torch

    model, tok = torch_ref
    rigged = type(model).from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        rigged.model.embed_tokens.weight[:, 0] = 10.0  # residual dim 0 is 10 for every token...
        for layer in rigged.model.layers:  # ...and no layer writes to it
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        rigged.model.norm.weight.zero_()
        rigged.model.norm.weight[0] = 1.0
        rigged.lm_head.weight.zero_()
        rigged.lm_head.weight[tok.eos_token_id, 0] = 1.0  # so only the EOS logit is positive
    rigged.save_pretrained(tmp_path / "rigged")
    tok.save_pretrained(tmp_path / "rigged")
    gguf_writer.convert(tmp_path / "rigged", tmp_path / "rigged.gguf", "f32")
    with GGUFRuntime(tmp_path / "rigged.gguf", n_threads=1) as rt:
        res = rt.generate(tok(PROMPTS[0]).input_ids, 10)
    assert res.tokens == [] and res.stopped_at_eos and res.decode_tok_s == 0.0


def test_runtime_imports_neither_torch_nor_transformers():
    code = ("import sys, edgeft.runtime.gguf; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_latency_contract_counts_forwards(files, monkeypatch):
    from edgeft.runtime import gguf as rt_mod

    from conftest import assert_forward_accounting, slowed

    with GGUFRuntime(files["f32"], n_threads=1) as rt:
        monkeypatch.setattr(rt_mod.llama_cpp, "llama_decode", slowed(rt_mod.llama_cpp.llama_decode))
        assert_forward_accounting(rt.generate([1, 20, 30, 40], 4, ignore_eos=True), 4)


def test_hf_runtime_latency_contract_counts_forwards(tiny_llama_dir):
    from edgeft.runtime.hf import HFRuntime

    from conftest import assert_forward_accounting, slowed

    rt = HFRuntime(tiny_llama_dir, n_threads=1)
    rt.model.forward = slowed(rt.model.forward)
    assert_forward_accounting(rt.generate([1, 20, 30, 40], 4, ignore_eos=True), 4)
