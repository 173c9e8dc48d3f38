"""Bytes read per decoded token, from the artifact's own tensor tables, checked against hand counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeft.bench import footprint as F

# the tiny Llama of conftest: 2 layers, 4 heads of 64, 2 KV heads, untied head
KV_F16 = 2 * 2 * 2 * 64 * 2


def _torch_params(model_dir) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).num_parameters()


def test_torch_and_gguf_agree_with_hand_counts(tiny_llama_dir, tmp_path):
    from edgeft.gguf import writer as gguf_writer

    params = _torch_params(tiny_llama_dir)
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    emb_rest = (cfg["vocab_size"] - 1) * cfg["hidden_size"]  # embedding rows not gathered for one token
    t = F.of_variant("torch", tiny_llama_dir, kv_elem_bytes=4)
    assert t.params == params and t.weight_bytes == 4 * params
    assert t.touched_bytes == 4 * (params - emb_rest) and t.kv_bytes_per_pos == 2 * KV_F16

    gguf_writer.convert(tiny_llama_dir, tmp_path / "m-f32.gguf", "f32")
    g = F.of_variant("gguf", tmp_path / "m-f32.gguf", kv_elem_bytes=2)
    assert g.params == params and g.weight_bytes == 4 * params  # f32 file: every weight 4 bytes
    assert g.touched_bytes == 4 * (params - emb_rest) and g.kv_bytes_per_pos == KV_F16
    # bandwidth bound: 36 GB/s over (weights + 100 cached positions)
    assert g.predicted_tok_s(36, 100) == pytest.approx(36e9 / (g.touched_bytes + 100 * KV_F16))
    assert g.memory_mb(256) == pytest.approx((4 * params + 256 * KV_F16) / 2**20)


def test_onnx_gathered_table_counts_one_row(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    v, h = 64, 32
    emb = numpy_helper.from_array(np.zeros((v, h), np.float32), "emb")
    w = numpy_helper.from_array(np.zeros((h, v), np.int8), "w_q")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("Cast", ["w_q"], ["w"], to=1),
         helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, v])], [emb, w])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": h, "vocab_size": v, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False}))
    f = F.of_variant("onnx", tmp_path, kv_elem_bytes=4)
    assert f.weight_bytes == v * h * 4 + h * v
    assert f.touched_bytes == h * 4 + h * v  # one fp32 embedding row + the whole int8 matrix
    assert f.kv_bytes_per_pos == 2 * 1 * 1 * 16 * 4
    # params from the config: embed + 1 layer (q,o 32x32; k,v 32x16; mlp 3*32*48; 2 norms) + norm + head
    assert f.params == v * h + (2 * h * h + 2 * h * 16 + 3 * h * 48 + 2 * h) + h + v * h


def test_onnx_int4_embedding_counts_one_row(tmp_path):
    """GatherBlockQuantized (int4 embeddings): data, scales and zero points are read one row per token."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    v, h, block = 64, 32, 32
    data = numpy_helper.from_array(np.zeros((v, h // 2), np.uint8), "emb_q")  # 2 int4 per byte
    scales = numpy_helper.from_array(np.ones((v, h // block), np.float32), "emb_s")
    w = numpy_helper.from_array(np.zeros((h, v), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("GatherBlockQuantized", ["emb_q", "ids", "emb_s"], ["x"], domain="com.microsoft",
                          block_size=block, gather_axis=0, quantize_axis=1),
         helper.make_node("MatMul", ["x", "w"], ["logits"])], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, v])], [data, scales, w])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": h, "vocab_size": v, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": False}))
    f = F.of_variant("onnx", tmp_path, kv_elem_bytes=4)
    assert f.weight_bytes == v * h // 2 + v * 4 + h * v * 4
    assert f.touched_bytes == h // 2 + 4 + h * v * 4  # one row of data and of scales + the whole matrix
