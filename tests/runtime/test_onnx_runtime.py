"""OnnxRuntime over the tiny Llama's fp32 and fp16 exports: KV-cache decoding, EOS, sampling, no torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeft import artifact
from edgeft.runtime.base import GenResult
from edgeft.runtime.onnx import MODEL_FILE, OnnxRuntime
from edgeft.stages import export_onnx as ex

PROMPT = [1, 40, 41, 42, 43, 44, 45]  # BOS + arbitrary ids inside the 384-token vocab


@pytest.fixture(scope="module")
def onnx_dirs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("rt")
    hf = artifact.build(root / "hf", kind="hf", stage="train", params={}, parent=None,
                        payload=lambda d: shutil.copytree(tiny_llama_dir, d, dirs_exist_ok=True) and {})
    # random weights: flat logits, fp16 agreement ~0.99, so the export's fp16 gate is off here
    art = ex.run(hf, ex.Config(types=("fp32", "fp16"), min_top1_fp16=0.0), root / "onnx")
    return {t: art.path / t for t in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def rt(onnx_dirs):
    r = OnnxRuntime(onnx_dirs["fp32"], n_threads=1)
    yield r
    r.close()


def _uncached_greedy(rt: OnnxRuntime, ids: list[int], n: int) -> list[int]:
    """Greedy by recomputing the whole sequence each step: the reference for the KV-cache path."""
    out: list[int] = []
    for _ in range(n):
        nxt = int(rt.logits(ids + out)[-1].argmax())
        if nxt in rt.eos_ids:
            break
        out.append(nxt)
    return out


def test_reads_config_and_session(rt, onnx_dirs):
    assert (rt.n_layers, rt.kv_heads, rt.head_dim) == (2, 2, 64)
    assert rt.eos_ids == frozenset({2})
    assert rt.past_dtype == np.float32
    assert rt.size_bytes == (onnx_dirs["fp32"] / MODEL_FILE).stat().st_size
    assert rt.load_s > 0


def test_kv_cache_generation_equals_full_recompute(rt):
    res = rt.generate(PROMPT, 20)
    assert isinstance(res, GenResult)
    assert res.tokens == _uncached_greedy(rt, PROMPT, 20)
    assert res.prompt_tokens == len(PROMPT)
    assert res.ttft_s > 0 and res.decode_s >= 0
    if not res.stopped_at_eos:
        assert len(res.tokens) == 20 and res.decode_tok_s > 0


def test_logits_shape_and_dtype(rt):
    logits = rt.logits(PROMPT)
    assert logits.shape == (len(PROMPT), 384) and logits.dtype == np.float32
    # the prefix rows of a longer pass equal the shorter pass: causal masking holds
    longer = rt.logits(PROMPT + [50, 51])
    np.testing.assert_allclose(longer[: len(PROMPT)], logits, atol=1e-5)


def test_stops_at_eos_from_config_list(tmp_path, onnx_dirs, rt):
    first = rt.generate(PROMPT, 1).tokens[0]
    model = tmp_path / "m"
    shutil.copytree(onnx_dirs["fp32"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "eos_token_id": [2, first]}))
    stopper = OnnxRuntime(model, n_threads=1)
    res = stopper.generate(PROMPT, 10)
    assert res.tokens == [] and res.stopped_at_eos and stopper.eos_ids == {2, first}
    stopper.close()


def test_zero_new_tokens_and_empty_prompt(rt):
    res = rt.generate(PROMPT, 0)
    assert res.tokens == [] and not res.stopped_at_eos and res.decode_tok_s == 0.0
    with pytest.raises(ValueError, match="empty prompt"):
        rt.generate([], 4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(rt):
    greedy = rt.generate(PROMPT, 12).tokens
    assert rt.generate(PROMPT, 12, temperature=0.8, top_k=1, seed=3).tokens == greedy
    a = rt.generate(PROMPT, 12, temperature=1.5, top_p=0.95, seed=7).tokens
    b = rt.generate(PROMPT, 12, temperature=1.5, top_p=0.95, seed=7).tokens
    assert a == b
    draws = {tuple(rt.generate(PROMPT, 12, temperature=1.5, seed=s).tokens) for s in range(4)}
    assert len(draws) > 1  # sampling actually samples


def test_fp16_model_uses_float16_past_and_tracks_fp32(onnx_dirs, rt):
    half = OnnxRuntime(onnx_dirs["fp16"], n_threads=1)
    assert half.past_dtype == np.float16
    assert half.size_bytes < rt.size_bytes
    logits = half.logits(PROMPT)
    assert logits.dtype == np.float32
    assert np.abs(logits - rt.logits(PROMPT)).max() < 0.1  # observed ~0.03 (fp16 weights and KV cache)
    assert half.generate(PROMPT, 8).tokens == rt.generate(PROMPT, 8).tokens
    half.close()


def test_close_and_missing_model(rt, onnx_dirs, tmp_path):
    other = OnnxRuntime(onnx_dirs["fp32"], n_threads=1)
    other.close()
    with pytest.raises(RuntimeError, match="closed"):
        other.logits(PROMPT)
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        OnnxRuntime(tmp_path)


def test_runtime_module_imports_no_torch():
    code = ("import sys, edgeft.runtime.onnx; "
            "bad = [m for m in ('torch', 'transformers', 'optimum') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_latency_contract_counts_forwards(onnx_dirs, monkeypatch):
    from conftest import assert_forward_accounting, slowed

    r = OnnxRuntime(onnx_dirs["fp32"], n_threads=1)
    monkeypatch.setattr(r, "_forward", slowed(r._forward))
    assert_forward_accounting(r.generate([1, 20, 30, 40], 4, ignore_eos=True), 4)
    r.close()
