"""export_onnx route=genai (onnxruntime-genai model builder in .venv-genai) and GenaiRuntime on the tiny Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgeft import artifact
from edgeft.errors import UserError
from edgeft.onnx import genai as onnx_genai
from edgeft.runtime.onnx import MODEL_FILE, OnnxRuntime
from edgeft.stages import export_onnx as ex

PROMPT_TEXT = "Question: What is the torque for the wheel bolts?\nAnswer:"
NO_MIN = {"min_top1_int4": 0.0}  # random weights: int4 agreement ~0.5 (the gate itself: test_export_onnx)


def _hf(root, model_dir):
    return artifact.build(root / "hf", kind="hf", stage="train", params={}, parent=None,
                          payload=lambda d: shutil.copytree(model_dir, d, dirs_exist_ok=True) and {})


@pytest.fixture(scope="module")
def genai(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("genai")
    return ex.run(_hf(root, tiny_llama_dir), ex.Config(types=("fp32", "int4"), route="genai", **NO_MIN),
                  root / "onnx")


@pytest.fixture(scope="module")
def torch_greedy(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT_TEXT).input_ids
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        logits = model(torch.tensor([ids])).logits[0].numpy()
    new = gen[0, len(ids):].tolist()
    return ids, [t for t in new if t != tok.eos_token_id], logits


def test_builder_layout_versions_and_own_tokenizer(genai, tiny_llama_dir):
    art = artifact.load(genai.path, kind="onnx")
    route = art.metrics["route"]
    assert route["route"] == "genai" and route["converter_versions"]["transformers"].startswith("5.")
    assert art.manifest["inputs"]["converter"]["onnxruntime-genai"] == route["runtime_version"]
    for t in ("fp32", "int4"):
        d = art.path / t
        assert (d / "genai_config.json").is_file() and (d / MODEL_FILE).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "config.json"):
            assert (d / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name  # not transformers 5's
        assert not list(d.glob(".genai-cache*")) and not list(art.path.glob(".genai-cache*"))
    fp32 = art.metrics["types"]["fp32"]
    assert fp32["greedy_match"] == 1.0 and fp32["max_abs_logit_diff"] < 1e-4
    assert art.metrics["types"]["int4"]["quant"]["block_size"] == 32
    assert art.metrics["types"]["int4"]["size_bytes"] < fp32["size_bytes"] / 3


def test_fused_gqa_graph(genai):
    import onnx

    ops = {n.op_type for n in onnx.load(str(genai.path / "int4" / MODEL_FILE), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits", "GatherBlockQuantized"} <= ops and "Attention" not in ops


def test_genai_runtime_matches_torch_and_plain_onnxruntime(genai, torch_greedy):
    from edgeft.runtime.onnx_genai import GenaiRuntime

    ids, new, ref_logits = torch_greedy
    rt = GenaiRuntime(genai.path / "fp32", n_threads=1)
    assert rt.encode(PROMPT_TEXT) == ids  # genai's tokenizer + the BOS rule = the HF ids
    res = rt.generate(ids, 12)
    assert res.tokens == new and res.prompt_tokens == len(ids) and res.ttft_s > 0
    assert np.abs(rt.logits(ids) - ref_logits).max() < 1e-4
    plain = OnnxRuntime(genai.path / "fp32", n_threads=1)  # the same graph under a bare session
    assert plain.generate(ids, 12).tokens == new
    assert np.abs(plain.logits(ids) - rt.logits(ids)).max() < 1e-5
    a = rt.generate(ids, 10, temperature=0.9, top_k=20, seed=3).tokens
    assert a == rt.generate(ids, 10, temperature=0.9, top_k=20, seed=3).tokens
    assert rt.generate(ids, 10, temperature=0.9, top_k=1, seed=5).tokens == new[:10]
    assert len(rt.generate(ids, 30, ignore_eos=True).tokens) == 30
    rt.close()
    plain.close()


def test_stops_before_eos(genai, torch_greedy, tmp_path):
    from edgeft.runtime.onnx_genai import GenaiRuntime

    ids, new, _ = torch_greedy
    d = tmp_path / "m"
    shutil.copytree(genai.path / "fp32", d)
    for name in ("config.json", "generation_config.json"):  # make the 3rd greedy token an EOS
        cfg = json.loads((d / name).read_text())
        (d / name).write_text(json.dumps({**cfg, "eos_token_id": [cfg["eos_token_id"], new[2]]}))
    res = GenaiRuntime(d).generate(ids, 12)
    assert res.tokens == new[:2] and res.stopped_at_eos


def test_unsupported_arch_and_lm_head_trap_are_refused(tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "phi3"}))
    with pytest.raises(UserError, match="'phi3' is not supported by the ONNX export route=genai; "
                                        "supported: llama, mistral, qwen2; route=optimum supports .*phi3"):
        ex.run(_hf(tmp_path, model), ex.Config(route="genai", types=("fp32",)), tmp_path / "out")
    (model / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["vocab_size"]}))
    with pytest.raises(UserError, match="intermediate_size equals vocab_size .* LM head"):
        ex.run(_hf(tmp_path / "b", model), ex.Config(route="genai", types=("fp32",)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_converter_env_is_a_user_error(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setenv(onnx_genai.GENAI_PYTHON_ENV, str(tmp_path / "nowhere" / "python"))
    with pytest.raises(UserError, match="make genai-env"):
        ex.run(_hf(tmp_path, tiny_llama_dir), ex.Config(route="genai", types=("fp32",)), tmp_path / "out")


def test_genai_runtime_imports_no_torch():
    code = ("import sys, edgeft.runtime.onnx_genai; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_genai_latency_contract_counts_forwards(genai, monkeypatch):
    """Each append_tokens runs a forward: TTFT is the prompt's alone, decode the n-1 after the first token."""
    from edgeft.runtime import onnx_genai

    from conftest import assert_forward_accounting, slowed

    real = onnx_genai.og.Generator

    class SlowGenerator:
        def __init__(self, *a):
            self._g = real(*a)
            self.append_tokens = slowed(self._g.append_tokens)

        def __getattr__(self, name):
            return getattr(self._g, name)

    rt = onnx_genai.GenaiRuntime(genai.path / "fp32", n_threads=1)
    monkeypatch.setattr(onnx_genai.og, "Generator", SlowGenerator)
    assert_forward_accounting(rt.generate([1, 20, 30, 40], 4, ignore_eos=True), 4)
    rt.close()
