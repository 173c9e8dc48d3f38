"""export_onnx's INT8 (weight-only 8-bit MatMulNBits, 8-bit GatherBlockQuantized): every weight decoded by hand
against the fp32 source within the rounding bound, the tied LM head quantized rather than left fp32, and the
graph's logits against torch running those same weights (the export fixtures are in tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.onnx import quant as Q
from edgeft.runtime.onnx import MODEL_FILE, OnnxRuntime
from edgeft.stages import export_onnx as ex

from tests.onnx.weights import graph_nodes, rms_rel, source_weights
from conftest import NO_MIN, _hf_artifact


def _int8_weights(model_dir) -> dict[str, np.ndarray]:
    """The int8 graph's weights decoded by hand, keyed and laid out as torch's state dict ([out, in]).

    MatMulNBits (bits 8) holds W^T as [N, K/block, block] bytes, one code per byte, fp32 scales [N, K/block] and,
    symmetric, no zero points (the op's default 128): w = (code - 128) * scale. GatherBlockQuantized (bits 8)
    holds uint8 [vocab, hidden] and fp32 scales per block of the hidden axis, zero point 128 likewise."""
    inits, nodes = graph_nodes(model_dir / MODEL_FILE)
    out = {}
    for n, attrs in nodes:
        if n.op_type == "MatMulNBits":
            assert attrs["bits"] == 8 and not (len(n.input) > 3 and n.input[3]), n.name
            k, n_out, bs = attrs["K"], attrs["N"], attrs["block_size"]
            codes = inits[n.input[1]].reshape(n_out, -1)[:, :k].astype(np.float32)
            scale = inits[n.input[2]].reshape(n_out, -1)
            w = (codes - 128) * np.repeat(scale, bs, 1)[:, :k]
            # /model/layers.0/mlp/up_proj/MatMul_Q8 -> model.layers.0.mlp.up_proj.weight; /lm_head/MatMul_Q8 -> lm_head
            out[n.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"] = w
        elif n.op_type == "GatherBlockQuantized":
            assert attrs["bits"] == 8 and attrs["quantize_axis"] == 1 and attrs["gather_axis"] == 0
            codes = inits[n.input[0]].astype(np.float32) - 128
            out[n.input[0].removesuffix("_Q8")] = codes * np.repeat(inits[n.input[2]], attrs["block_size"], 1)
    return out


def _assert_within_rtn(got: np.ndarray, ref: np.ndarray, name: str, block: int, levels: int) -> None:
    """8-bit RTN per block of `block` inputs with step absmax / levels: off by at most half a step, except where
    the code clamps. MatMulNBits (onnxruntime's MLAS quantizer) uses levels 128: the block's extreme maps to code
    -128 exactly, so a value of the other sign within half a step of absmax rounds to +128, clamps to 127, and is
    off by up to one step (measured). Our GatherBlockQuantized uses levels 127 (codes -127..127): no clamp."""
    r = ref.reshape(-1, block)
    step = np.abs(r).max(axis=1, keepdims=True) / levels
    err = np.abs(got.reshape(-1, block) - r)
    clampable = np.abs(r) > (levels - 0.5) * step * (1 - 1e-6)
    # float32 rounding of value / scale: a value at k + 0.5 steps may land 1e-5 of a step past the half (measured)
    assert (err <= np.where(clampable, step, step / 2) * (1 + 1e-4) + 1e-9).all(), \
        f"{name}: {float((err / step).max()):.3f} steps off (RTN bound 0.5, 1 at the clamp)"
    assert float((err / step).max()) > 0.3, name  # really rounded to 8 bits


def _torch_logits_with(model_dir, weights: dict[str, np.ndarray], seqs) -> list[np.ndarray]:
    """Torch fp32 logits of the model with `weights` (torch names) in place of its own (a tied head unties)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if "lm_head.weight" in weights and model.config.tie_word_embeddings:
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # its own int8 copy
    state = dict(model.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(torch.from_numpy(w))
        return [model(torch.tensor([seq])).logits[0].numpy() for seq in seqs]


def test_int8_weights_are_the_fp32_weights_within_half_a_step(hf, tiny_llama_dir, torch_ref):
    """Without smoothing, every matrix (15 MatMulNBits, the embedding's GatherBlockQuantized) is within the 8-bit
    rounding bound of the torch fp32 source; the graph's logits against torch running those same 8-bit weights."""
    art = ex.run(hf, ex.Config(types=("int8",), int8_smooth_alpha=0.0, **NO_MIN), hf.path.parent / "int8-plain")
    q = art.metrics["types"]["int8"]["quant"]
    assert q == {"method": "weight-only MatMulNBits", "bits": 8, "block_size": 16, "symmetric": True,
                 "accuracy_level": 4, "matmulnbits_nodes": 15, "untied_transposes": 0,
                 "embeddings": "int8 (1 GatherBlockQuantized)", "float_matmuls": [], "calibration": {"prompts": 0}}
    src = source_weights(tiny_llama_dir)
    got = _int8_weights(art.path / "int8")
    assert set(got) == {k for k, v in src.items() if v.ndim == 2}  # every matrix, the embedding and head included
    for name, w in got.items():
        _assert_within_rtn(w, src[name], name, 16, 127 if name == "model.embed_tokens.weight" else 128)
    seqs = [ids + new for ids, new, _ in torch_ref]
    rt = OnnxRuntime(art.path / "int8")
    errs = [rms_rel(rt.logits(s), r) for s, r in zip(seqs, _torch_logits_with(tiny_llama_dir, got, seqs))]
    rt.close()
    # what is left is the runtime's arithmetic: int8 activations per block (accuracy_level 4) measured
    # 0.004-0.005 rms relative; against torch fp32 weights the 8-bit weights alone add about as much
    assert max(errs) < 0.02, errs


def test_default_int8_is_smoothed_calibrated_and_close_to_torch(exported, torch_ref):
    q = exported.metrics["types"]["int8"]["quant"]
    # q/k/v, gate/up and down of both layers and the head; o_proj is left (GQA shares its input's value heads)
    assert q["smooth_alpha"] == 0.5 and q["smoothed_matmuls"] == 13 and q["block_size"] == 16
    # no eval data here: the calibration falls back to the parity prompts, and says so
    assert q["calibration"] == {"prompts": 4, "disjoint_from_parity_sample": False}
    rt = OnnxRuntime(exported.path / "int8")
    errs = [rms_rel(rt.logits(ids + new), ref) for ids, new, ref in torch_ref]
    rt.close()
    # measured 0.034-0.035 rms relative (0.027-0.032 unsmoothed, int4 0.42-0.45): on random weights every layer's
    # rounding compounds; a wiring or smoothing bug lands near 1
    assert max(errs) < 0.07, errs


def _with_outliers(src_dir, out_dir, factor: float = 300.0):
    """The tiny Llama with massive activations that change nothing: a few channels of layer 0's post-attention norm
    scaled by `factor`, the matching input columns of gate/up divided by it (SmolLM2's down_proj inputs peak at 270x
    their rms)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    with torch.no_grad():
        for c in (3, 77, 200):
            layer.post_attention_layernorm.weight[c] *= factor
            layer.mlp.gate_proj.weight[:, c] /= factor
            layer.mlp.up_proj.weight[:, c] /= factor
    model.save_pretrained(out_dir)
    for f in src_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, out_dir / f.name)
    return model


def test_smoothing_is_exact_in_fp32_and_takes_the_outliers_out_of_int8(tmp_path, tiny_llama_dir, torch_ref):
    """On a model whose gate/up inputs carry 300x outliers: the smoothing rewrite alone leaves the fp32 logits as
    they were, and int8 with it is much closer to torch than without (accuracy_level 4 quantizes activations per
    block, each block's step set by its largest value)."""
    import onnx
    import torch

    from edgeft.onnx import parity as onnx_parity
    from edgeft.onnx.smooth import input_absmax, smooth

    model = _with_outliers(tiny_llama_dir, tmp_path / "outliers")
    src = _hf_artifact(tmp_path, tmp_path / "outliers")
    seqs = [ids + new for ids, new, _ in torch_ref]
    with torch.no_grad():
        refs = [model(torch.tensor([s])).logits[0].numpy() for s in seqs]
    errs = {}
    for alpha in (0.0, 0.5):
        art = ex.run(src, ex.Config(types=("fp32", "int8"), int8_smooth_alpha=alpha, **NO_MIN), tmp_path / f"a{alpha}")
        rt = OnnxRuntime(art.path / "int8")
        errs[alpha] = max(rms_rel(rt.logits(s), r) for s, r in zip(seqs, refs))
        rt.close()
    # measured: 0.48 rms relative without smoothing, 0.040 with (0.035 on the model without outliers)
    assert errs[0.5] < 0.25 * errs[0.0] and errs[0.5] < 0.07, errs

    fp32 = art.path / "fp32"
    with onnx_parity.TorchModel(src.path) as tm:
        absmax = input_absmax(tm.model, seqs)
    assert absmax["model.layers.0.mlp.gate_proj"].max() > 50 * np.median(absmax["model.layers.0.mlp.gate_proj"])
    m = onnx.load(str(fp32 / MODEL_FILE))
    done = smooth(m.graph, absmax, 0.8)
    assert len(done) == 13 and not any(d.endswith("o_proj") for d in done)
    out = tmp_path / "smoothed"
    Q.copy_sidecars(fp32, out)
    onnx.save(m, str(out / MODEL_FILE))
    rt, base = OnnxRuntime(out), OnnxRuntime(fp32)
    for s in seqs:
        a, b = rt.logits(s), base.logits(s)
        assert float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(b).max()), "smoothing changed the function"
    rt.close()
    base.close()


def test_a_tied_head_is_untied_and_quantized_not_left_fp32(tmp_path, tiny_bpe_llama_dir):
    """optimum exports a tied head as MatMul(x, Transpose(embedding)): folded, the head is an 8-bit MatMulNBits of
    its own and no float copy of the vocabulary matrix is left in the graph; int8_float_head keeps an fp32 copy."""
    import onnx

    src = _hf_artifact(tmp_path, tiny_bpe_llama_dir)
    art = ex.run(src, ex.Config(types=("fp32", "int8"), int8_accuracy_level=0, int8_block_size=32,
                                int8_smooth_alpha=0.0, **NO_MIN), tmp_path / "onnx")
    q = art.metrics["types"]["int8"]["quant"]
    assert q["untied_transposes"] == 1 and q["matmulnbits_nodes"] == 15 and q["accuracy_level"] == 0
    graph = onnx.load(str(art.path / "int8" / MODEL_FILE)).graph
    table = 512 * 256  # vocab x hidden: the fp32 vocabulary matrix the Transpose used to read
    assert not [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) == table]
    got = _int8_weights(art.path / "int8")
    emb = source_weights(tiny_bpe_llama_dir)["model.embed_tokens.weight"]
    _assert_within_rtn(got["lm_head.weight"], emb, "lm_head (tied)", 32, 128)
    _assert_within_rtn(got["model.embed_tokens.weight"], emb, "embedding", 32, 127)
    assert art.metrics["types"]["int8"]["size_bytes"] < 0.35 * art.metrics["types"]["fp32"]["size_bytes"]
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [40, 41, 42]]
    rt = OnnxRuntime(art.path / "int8")
    errs = [rms_rel(rt.logits(s), r) for s, r in zip(seqs, _torch_logits_with(tiny_bpe_llama_dir, got, seqs))]
    rt.close()
    assert max(errs) < 1e-4, errs  # accuracy_level 0: fp32 activations, torch's arithmetic on the same weights

    kept = ex.run(src, ex.Config(types=("int8",), int8_float_head=True, **NO_MIN), tmp_path / "float-head")
    q = kept.metrics["types"]["int8"]["quant"]
    assert q["float_matmuls"] == ["lm_head"] and q["matmulnbits_nodes"] == 14 and q["untied_transposes"] == 1
    graph = onnx.load(str(kept.path / "int8" / MODEL_FILE)).graph
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) == table]
    assert len(floats) == 1 and list(floats[0].dims) == [256, 512]  # the head's own [hidden, vocab] copy


def test_fold_weight_transposes_only_folds_constant_matmul_weights():
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t_w", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm"),
             helper.make_node("Transpose", ["x"], ["xt"], name="t_x", perm=[1, 0]),  # not a constant: kept
             helper.make_node("MatMul", ["xt", "V"], ["z"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
                          initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(w, "V")])
    assert Q.fold_weight_transposes(g) == 1
    assert [n.name for n in g.node] == ["mm", "t_x", "mm2"]
    folded = next(numpy_helper.to_array(i) for i in g.initializer if i.name == "Wt")
    np.testing.assert_array_equal(folded, w.T)


# 64: blocks of 32; 48: of 16 (32 does not divide it: halved); 40: no power of two >= 16 divides it, left fp32
@pytest.mark.parametrize("hidden, converted, block", [(64, 1, 32), (48, 1, 16), (40, 0, None)])
def test_int8_gather_decodes_within_half_a_step(hidden, converted, block):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 1, (50, hidden)).astype(np.float32)
    w[3, 5] = 40.0  # an outlier costs only its own block's precision
    g = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["y"], name="emb")], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, hidden])],
                          initializer=[numpy_helper.from_array(w, "E")])
    assert Q.quantize_gathers_int8(g, 32) == converted
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"ids": np.arange(50, dtype=np.int64)})[0]
    if converted:
        assert next(a.i for a in g.node[0].attribute if a.name == "block_size") == block
        _assert_within_rtn(y, w, "gather", block, 127)
        assert float(np.abs(y[4] - w[4]).max()) < 0.02  # rows without the outlier keep their own fine steps
    else:
        np.testing.assert_array_equal(y, w)
