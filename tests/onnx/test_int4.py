"""export_onnx's INT4 (MatMulNBits, GatherBlockQuantized): the weights decoded by hand against the fp32 source
within the RTN bound, and the ONNX logits against torch running those same weights (the export fixtures are
in tests/conftest.py, shared with tests/stages/test_export_onnx.py)."""

from __future__ import annotations

import numpy as np

from edgeft.runtime.onnx import MODEL_FILE, OnnxRuntime
from edgeft.stages import export_onnx as ex

from tests.onnx.weights import graph_nodes, rms_rel, source_weights
from conftest import NO_MIN


def _int4_weights(model_dir) -> dict[str, np.ndarray]:
    """The int4 graph's weights decoded by hand, keyed and laid out as torch's state dict ([out, in]).

    MatMulNBits holds W^T as [N, K/block, block/2] bytes, two 4-bit codes per byte (low nibble first),
    fp32 scales [N, K/block] and optional zero points (default 8): w = (code - zp) * scale. The embedding's
    GatherBlockQuantized holds signed int4 [vocab, hidden] and fp32 scales per block of the hidden axis.
    """
    inits, nodes = graph_nodes(model_dir / MODEL_FILE)
    out = {}
    for n, attrs in nodes:
        if n.op_type == "MatMulNBits":
            k, n_out, bs = attrs["K"], attrs["N"], attrs["block_size"]
            packed = inits[n.input[1]].reshape(n_out, -1)
            codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(n_out, -1)[:, :k].astype(np.float32)
            n_blocks = packed.shape[1] * 2 // bs
            scale = inits[n.input[2]].reshape(n_out, n_blocks)
            has_zp = len(n.input) > 3 and n.input[3]
            zp = inits[n.input[3]].reshape(n_out, n_blocks).astype(np.float32) if has_zp else np.full_like(scale, 8)
            w = (codes - np.repeat(zp, bs, 1)[:, :k]) * np.repeat(scale, bs, 1)[:, :k]
            # /model/layers.0/mlp/up_proj/MatMul_Q4 -> model.layers.0.mlp.up_proj.weight
            out[n.name.strip("/").rsplit("/", 1)[0].replace("/", ".") + ".weight"] = w
        elif n.op_type == "GatherBlockQuantized":
            assert attrs["quantize_axis"] == 1 and attrs["gather_axis"] == 0
            codes = inits[n.input[0]].astype(np.float32)
            out[n.input[0].removesuffix("_Q4")] = codes * np.repeat(inits[n.input[2]], attrs["block_size"], 1)
    return out


def _assert_within_symmetric_rtn(got: np.ndarray, ref: np.ndarray, name: str, block: int = 32) -> None:
    """Symmetric 4-bit RTN per block of `block` inputs: step s = absmax/8 (codes -8..7), so a value is off by at
    most s/2, except the clamped top code: a value within half a step of +absmax (the opposite sign of the
    block's extreme) rounds to 7 and is off by up to s. Measured: max error 0.1250 absmax, 0.5% above s/2."""
    r = ref.reshape(-1, block)
    step = np.abs(r).max(axis=1, keepdims=True) / 8
    err = np.abs(got.reshape(-1, block) - r)
    clampable = np.abs(r) > 7.5 * step * (1 - 1e-6)
    assert (err <= np.where(clampable, step, step / 2) * (1 + 1e-5) + 1e-9).all(), \
        f"{name}: {float((err / step).max()):.3f} steps off (RTN bound 0.5, 1 at the clamp)"
    assert float((err / step).max()) > 0.4, name  # really quantized to 4 bits


def _torch_logits_with(model_dir, weights: dict[str, np.ndarray], seqs) -> list[np.ndarray]:
    """Torch fp32 logits of the model with `weights` (torch names) put in place of its own."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    state = model.state_dict()
    with torch.no_grad():
        for name, w in weights.items():
            state[name].copy_(torch.from_numpy(w))
        return [model(torch.tensor([seq])).logits[0].numpy() for seq in seqs]


def _assert_int4_runs_its_weights(model_dir, weights, tiny_llama_dir, torch_ref, bar: float) -> None:
    """The int4 graph's logits against torch running the very same (dequantized) weights: what is left is
    the runtime's arithmetic (accuracy_level 4 rounds activations to int8 in MatMulNBits). Against torch fp32
    the int4 weights alone move the logits by 0.42-0.46 rms relative on this random model (flat logits,
    every block's rounding compounds), so that comparison could not tell a wiring bug from int4 itself."""
    seqs = [ids + new for ids, new, _ in torch_ref]
    rt = OnnxRuntime(model_dir)
    try:
        refs = _torch_logits_with(tiny_llama_dir, weights, seqs)
        errs = [rms_rel(rt.logits(seq), ref) for seq, ref in zip(seqs, refs)]
    finally:
        rt.close()
    assert max(errs) < bar, errs


def test_int4_weights_are_the_fp32_weights_within_the_rtn_bound(exported, tiny_llama_dir, torch_ref):
    """Every int4 weight (15 MatMulNBits and the embedding), decoded by hand, against the torch fp32 source;
    then the graph's logits against torch running those same int4 weights."""
    src = source_weights(tiny_llama_dir)
    got = _int4_weights(exported.path / "int4")
    assert set(got) == {k for k, v in src.items() if v.ndim == 2}  # every matrix, the embedding included
    for name, w in got.items():
        _assert_within_symmetric_rtn(w, src[name], name)
    # measured 0.025-0.027 rms relative (int8 activations); layer 0's v_proj fed the raw embedding instead of
    # its normed input (a wiring bug the weights above cannot show) measured 1.1
    _assert_int4_runs_its_weights(exported.path / "int4", got, tiny_llama_dir, torch_ref, bar=0.06)


def test_int4_hqq_is_asymmetric_with_accuracy_level(hf, exported, torch_ref, tiny_llama_dir):
    import onnx

    art = ex.run(hf, ex.Config(types=("int4",), int4_algo="hqq", int4_accuracy_level=4, **NO_MIN),
                 hf.path.parent / "hqq")
    q = art.metrics["types"]["int4"]["quant"]
    assert q["algo"] == "hqq" and q["symmetric"] is False and q["matmulnbits_nodes"] == 15
    nodes = [n for n in onnx.load(str(art.path / "int4" / MODEL_FILE)).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all(len(n.input) >= 4 and n.input[3] for n in nodes)  # zero points present
    assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute
            if a.name == "accuracy_level"} == {4}
    assert q["embeddings"].startswith("int4 rtn")  # HQQ has no Gather: the embedding goes through RTN
    # HQQ optimises each block's scale and zero point for the error RTN only rounds: per matrix, its relative
    # (Frobenius) error against the torch fp32 source must be below the symmetric RTN export's. Measured:
    # HQQ 0.075-0.076, RTN 0.085-0.086 on every matrix; a broken scale or zero point is far above both.
    src = source_weights(tiny_llama_dir)
    hqq, rtn = _int4_weights(art.path / "int4"), _int4_weights(exported.path / "int4")
    assert set(hqq) == set(rtn)
    for name in hqq:
        ref = src[name]
        if name == "model.embed_tokens.weight":  # RTN in both
            _assert_within_symmetric_rtn(hqq[name], ref, name)
            continue
        err_hqq, err_rtn = (float(np.linalg.norm(w[name] - ref) / np.linalg.norm(ref)) for w in (hqq, rtn))
        assert err_hqq < err_rtn < 0.1, (name, err_hqq, err_rtn)
    _assert_int4_runs_its_weights(art.path / "int4", hqq, tiny_llama_dir, torch_ref, bar=0.06)


def test_int4_embeddings_off_keeps_the_embedding_fp32_and_costs_bytes(hf, exported, torch_ref, tiny_llama_dir):
    import onnx

    art = ex.run(hf, ex.Config(types=("int4",), int4_embeddings=False, **NO_MIN), hf.path.parent / "int4-fp32emb")
    ops = {n.op_type for n in onnx.load(str(art.path / "int4" / MODEL_FILE)).graph.node}
    assert "GatherBlockQuantized" not in ops and "Gather" in ops
    t = art.metrics["types"]["int4"]
    assert t["quant"]["embeddings"] == "fp32"
    assert t["size_bytes"] > exported.metrics["types"]["int4"]["size_bytes"]
    from onnx import numpy_helper

    src = source_weights(tiny_llama_dir)
    graph = onnx.load(str(art.path / "int4" / MODEL_FILE)).graph
    emb = next(numpy_helper.to_array(i) for i in graph.initializer if i.name == "model.embed_tokens.weight")
    np.testing.assert_array_equal(emb, src["model.embed_tokens.weight"])  # the fp32 embedding, untouched
    got = _int4_weights(art.path / "int4")
    assert set(got) == {k for k, v in src.items() if v.ndim == 2} - {"model.embed_tokens.weight"}
    for name, w in got.items():
        _assert_within_symmetric_rtn(w, src[name], name)
    _assert_int4_runs_its_weights(art.path / "int4", {**got, "model.embed_tokens.weight": emb}, tiny_llama_dir,
                                  torch_ref, bar=0.06)
