"""GGUF LoRA adapters: llama.cpp applying our adapter over the base equals the merged model in torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFReader, Keys

from edgeft.errors import UserError
from edgeft.gguf import lora as gguf_lora
from edgeft.gguf import writer as gguf_writer

from conftest import make_adapter

IDS = [1, 37, 200, 55, 9, 310, 77, 120, 64, 250, 18, 99]


def _merged_logits(base_dir: Path, adapter_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          adapter_dir).merge_and_unload().eval()
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    finally:
        torch.set_num_threads(threads)


def _llama_cpp_logits(base: Path, lora: Path | None, ids: list[int], tmp: Path, scale: float = 1.0) -> np.ndarray:
    """Run in a subprocess: a bad adapter file can abort the process that loads it."""
    out = tmp / "logits.npy"
    code = ("import sys, numpy as np; from edgeft.runtime.gguf import GGUFRuntime\n"
            "rt = GGUFRuntime(sys.argv[1], n_threads=1, n_ctx=64, kv_type='f32', "
            "lora_path=sys.argv[2] or None, lora_scale=float(sys.argv[5]))\n"
            "np.save(sys.argv[4], rt.logits([int(x) for x in sys.argv[3].split(',')]))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(base), str(lora or ""), ",".join(map(str, IDS)),
                           str(out), str(scale)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(out)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora") / "adapter")


@pytest.fixture(scope="module")
def base_f32(tiny_llama_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "base-f32.gguf"
    gguf_writer.convert(tiny_llama_dir, out, "f32")
    return out


def test_adapter_file_layout(adapter_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "adapter.gguf"
    info = gguf_lora.convert_adapter(adapter_dir, tiny_llama_dir, out)
    assert info["n_adapted"] == 14 and info["gguf_alpha"] == 16.0 and info["rank"] == 8
    reader = GGUFReader(out)
    assert reader.fields[Keys.General.TYPE].contents() == "adapter"
    assert reader.fields[Keys.Adapter.TYPE].contents() == "lora"
    assert reader.fields[Keys.Adapter.LORA_ALPHA].contents() == pytest.approx(16.0)
    assert reader.fields[Keys.General.ARCHITECTURE].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 28
    # GGUF shapes are listed innermost first: lora_a ne = [in, r], lora_b ne = [r, out]
    assert list(tensors["blk.0.attn_k.weight.lora_a"].shape) == [256, 8]
    assert list(tensors["blk.0.attn_k.weight.lora_b"].shape) == [8, 128]
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape) == [640, 8]
    from safetensors.numpy import load_file

    raw = load_file(adapter_dir / "adapter_model.safetensors")
    b = raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    got = np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data)
    np.testing.assert_array_equal(got, gguf_writer.permute_qk(b, 4))  # q/k rows permuted like the base
    v = raw["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data), v)


def test_base_plus_adapter_equals_merged_model(adapter_dir, tiny_llama_dir, base_f32, tmp_path):
    out = tmp_path / "adapter.gguf"
    gguf_lora.convert_adapter(adapter_dir, tiny_llama_dir, out)
    ref = _merged_logits(tiny_llama_dir, adapter_dir, IDS)
    got = _llama_cpp_logits(base_f32, out, IDS, tmp_path)
    base_only = _llama_cpp_logits(base_f32, None, IDS, tmp_path)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < 1e-4
    assert np.abs(base_only - ref).max() / scale > 1e-2  # the adapter really changes the output
    half = _llama_cpp_logits(base_f32, out, IDS, tmp_path, scale=0.0)  # lora_scale reaches llama.cpp
    np.testing.assert_allclose(half, base_only, atol=1e-5)


def test_rslora_alpha_is_rescaled_for_llama_cpp(tiny_llama_dir, base_f32, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "rs", use_rslora=True, target_modules=["q_proj", "down_proj"])
    out = tmp_path / "rs.gguf"
    info = gguf_lora.convert_adapter(adapter, tiny_llama_dir, out, "f16")
    assert info["gguf_alpha"] == pytest.approx(16 * 8 ** 0.5) and info["n_adapted"] == 4
    assert {t.tensor_type for t in GGUFReader(out).tensors} == {gguf.GGMLQuantizationType.F16}
    ref = _merged_logits(tiny_llama_dir, adapter, IDS)
    got = _llama_cpp_logits(base_f32, out, IDS, tmp_path)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3  # f16 lora weights


def test_dora_and_unknown_modules_are_refused(tiny_llama_dir, adapter_dir, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(adapter_dir, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="use_dora.*export_gguf.adapter=false"):
        gguf_lora.convert_adapter(dora, tiny_llama_dir, tmp_path / "a.gguf")
    with pytest.raises(UserError, match="valid: f32, f16"):
        gguf_lora.convert_adapter(adapter_dir, tiny_llama_dir, tmp_path / "a.gguf", "q4_0")
    assert not list(tmp_path.glob("*.gguf*"))
