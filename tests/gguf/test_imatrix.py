"""Importance matrix: the sums llama-imatrix collects, its GGUF file, and its effect on llama.cpp's quantizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader

from edgeft.gguf import imatrix as gguf_imatrix
from edgeft.gguf import writer as gguf_writer
from edgeft.stages import export_gguf


@pytest.fixture(scope="module")
def sequences(tiny_llama_dir) -> list[list[int]]:
    from edgeft.runtime.prompt import PromptFormatter

    from conftest import tiny_qa

    fmt = PromptFormatter(tiny_llama_dir)
    return [fmt.encode(fmt.render([{"role": "user", "content": r["question"]},
                                   {"role": "assistant", "content": r["answer"]}])) for r in tiny_qa(24)]


@pytest.fixture(scope="module")
def imatrix(tiny_llama_dir, sequences):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return gguf_imatrix.compute(tiny_llama_dir, sequences)
    finally:
        torch.set_num_threads(threads)


def test_sums_cover_every_matmul_but_the_head(imatrix, sequences, tiny_llama_dir):
    import torch
    from transformers import LlamaForCausalLM

    sums, counts = imatrix
    per_layer = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(sums) == {f"blk.{b}.{n}.weight" for b in range(2) for n in per_layer}  # no output.weight
    n_tokens = sum(map(len, sequences))
    assert set(counts.values()) == {n_tokens}
    assert sums["blk.0.attn_q.weight"].shape == (256,) and sums["blk.1.ffn_down.weight"].shape == (640,)
    # q, k and v read the same normed input; gate and up too
    np.testing.assert_array_equal(sums["blk.1.attn_q.weight"], sums["blk.1.attn_v.weight"])
    np.testing.assert_array_equal(sums["blk.0.ffn_gate.weight"], sums["blk.0.ffn_up.weight"])
    # independent reference for one tensor: the squared input of layer 1's q_proj is its normed hidden state
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ref = np.zeros(256)
    with torch.no_grad():
        for ids in sequences:
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[1]
            x = model.model.layers[1].input_layernorm(h)[0].double().numpy()
            ref += (x * x).sum(0)
    np.testing.assert_allclose(sums["blk.1.attn_q.weight"], ref, rtol=1e-4)


def test_imatrix_file_is_llama_cpp_format(imatrix, tmp_path):
    sums, counts = imatrix
    path = tmp_path / "imatrix.gguf"
    gguf_imatrix.save(path, sums, counts, "llama", "train.jsonl", 24)
    reader = GGUFReader(path)
    assert reader.fields[gguf.Keys.General.TYPE].contents() == "imatrix"
    assert reader.fields[gguf_imatrix.DATASETS_KEY].contents() == ["train.jsonl"]
    assert reader.fields[gguf_imatrix.CHUNK_COUNT_KEY].contents() == 24
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(sums)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.ffn_down.weight.in_sum2"].data),
                                  sums["blk.0.ffn_down.weight"])
    assert float(np.asarray(tensors["blk.0.ffn_down.weight.counts"].data)[0]) == counts["blk.0.ffn_down.weight"]


def test_imatrix_lowers_the_activation_weighted_quantization_error(imatrix, tiny_llama_dir, tmp_path):
    sums, counts = imatrix
    f16 = tmp_path / "f16.gguf"
    gguf_writer.convert(tiny_llama_dir, f16, "f16")
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    export_gguf._llama_quantize(f16, plain, "q4_k_m", 1)
    export_gguf._llama_quantize(f16, weighted, "q4_k_m", 1, imatrix)
    assert plain.read_bytes() != weighted.read_bytes()
    ref = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(f16).tensors}
    better = 0
    names = [n for n in sums if "attn" in n]  # 256-wide rows: Q4_K (ffn_down's 640 falls back)
    for name in names:
        errs = []
        for path in (plain, weighted):
            t = next(t for t in GGUFReader(path).tensors if t.name == name)
            assert t.tensor_type in (QType.Q4_K, QType.Q6_K, QType.Q5_K)
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref[name].shape)
            errs.append(float((((w - ref[name]) ** 2) * (sums[name] / counts[name])).sum()))
        better += errs[1] < errs[0]
    assert better == len(names)  # every tensor: lower error where the activations are large
