"""The HF -> GGUF writer: tensor layout, metadata, vocab and quantization, read back with GGUFReader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, Keys
from safetensors.numpy import load_file

from edgeft.errors import UserError
from edgeft.gguf import writer as gguf_writer

from test_writer_archs import N_HEADS, N_KV, _copy_tokenizer, _variant  # the tiny models' shapes and builders


HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
PER_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
for _b in range(2):
    HF_TO_GGUF.update({f"model.layers.{_b}.{k}.weight": f"blk.{_b}.{v}.weight" for k, v in PER_LAYER.items()})


@pytest.fixture(scope="module")
def hf_tensors(tiny_llama_dir) -> dict[str, np.ndarray]:
    return load_file(tiny_llama_dir / "model.safetensors")


@pytest.fixture(scope="module")
def f32_file(tiny_llama_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gguf") / "m-f32.gguf"
    return out, gguf_writer.convert(tiny_llama_dir, out, "f32")


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _field(reader: GGUFReader, key: str):
    return reader.fields[key.format(arch="llama")].contents()


def test_f32_names_shapes_types(f32_file, hf_tensors):
    path, info = f32_file
    tensors = _tensors(path)
    assert set(tensors) == set(HF_TO_GGUF.values())
    for hf_name, name in HF_TO_GGUF.items():
        assert tensors[name].tensor_type == QType.F32
        assert tuple(tensors[name].data.shape) == hf_tensors[hf_name].shape, name
    assert info["tensor_types"] == {"F32": len(HF_TO_GGUF)} and info["fallbacks"] == {}
    assert info["n_params"] == sum(t.size for t in hf_tensors.values())


def test_f32_values_and_qk_permutation_invert_exactly(f32_file, hf_tensors):
    tensors = _tensors(f32_file[0])
    for hf_name, name in HF_TO_GGUF.items():
        got = np.asarray(tensors[name].data)
        if ".q_proj" in hf_name:
            got = gguf_writer.unpermute_qk(got, N_HEADS)
        elif ".k_proj" in hf_name:
            got = gguf_writer.unpermute_qk(got, N_KV)  # GQA: k has n_kv_heads heads
        np.testing.assert_array_equal(got, hf_tensors[hf_name], err_msg=name)
    # the permutation really moves rows (else the inversion above proves nothing)
    q = hf_tensors["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(gguf_writer.permute_qk(q, N_HEADS), q)


def test_metadata_and_vocab(f32_file, tiny_llama_dir):
    reader = GGUFReader(f32_file[0])
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert _field(reader, Keys.General.ARCHITECTURE) == "llama"
    assert _field(reader, Keys.General.NAME) == tiny_llama_dir.name
    expected = {
        Keys.LLM.CONTEXT_LENGTH: config["max_position_embeddings"], Keys.LLM.EMBEDDING_LENGTH: 256,
        Keys.LLM.BLOCK_COUNT: 2, Keys.LLM.FEED_FORWARD_LENGTH: 640, Keys.Attention.HEAD_COUNT: N_HEADS,
        Keys.Attention.HEAD_COUNT_KV: N_KV, Keys.Rope.DIMENSION_COUNT: 64, Keys.LLM.VOCAB_SIZE: 384,
        Keys.General.FILE_TYPE: int(gguf.LlamaFileType.ALL_F32),
        Keys.Tokenizer.MODEL: "llama", Keys.Tokenizer.BOS_ID: 1, Keys.Tokenizer.EOS_ID: 2,
        Keys.Tokenizer.UNK_ID: 0, Keys.Tokenizer.PAD_ID: 0, Keys.Tokenizer.ADD_BOS: True,
        Keys.Tokenizer.ADD_EOS: False, Keys.Tokenizer.ADD_PREFIX: True,
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, Keys.Rope.FREQ_BASE) == pytest.approx(10000.0)
    assert _field(reader, Keys.Attention.LAYERNORM_RMS_EPS) == pytest.approx(1e-5)
    assert "Answer:" in _field(reader, Keys.Tokenizer.CHAT_TEMPLATE)
    tokens, types = _field(reader, Keys.Tokenizer.LIST), _field(reader, Keys.Tokenizer.TOKEN_TYPE)
    assert len(tokens) == len(types) == len(_field(reader, Keys.Tokenizer.SCORES)) == 384
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert tokens[3] == "<0x00>"


def _hf_layout(name: str, data: np.ndarray) -> np.ndarray:
    """A GGUF tensor back in HF's row order (q/k rows are permuted for llama.cpp's rope)."""
    if name.endswith(".attn_q.weight"):
        return gguf_writer.unpermute_qk(data, N_HEADS)
    if name.endswith(".attn_k.weight"):
        return gguf_writer.unpermute_qk(data, N_KV)  # GQA: k has n_kv_heads heads
    return data


def _dequantize_q8_0(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 bytes decoded by hand, not by gguf.quants: blocks of 34 bytes, an fp16 scale d then 32 int8 q,
    value = d * q (ggml's block_q8_0)."""
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def test_q8_0_dequantizes_to_the_fp32_source_within_half_a_step(tiny_llama_dir, hf_tensors, tmp_path):
    """Every Q8_0 tensor, decoded by hand, against the safetensors fp32 weights it came from.

    Q8_0 rounds each block of 32 to the step d = absmax/127 and stores d as fp16, so each value is off by
    at most d/2 (rounding) + 127 * d * 2**-11 (the fp16 scale's rounding, times |q| <= 127): 0.562 d.
    A wrong scale, block order, row order or q/k permutation is off by whole steps.
    """
    out = tmp_path / "m-q8_0.gguf"
    info = gguf_writer.convert(tiny_llama_dir, out, "q8_0")
    tensors = _tensors(out)
    assert info["tensor_types"] == {"Q8_0": 16, "F32": 5}
    bound = 0.5 + 127 * 2.0**-11
    for hf_name, name in HF_TO_GGUF.items():
        ref = hf_tensors[hf_name].astype(np.float32)
        if ref.ndim == 1:
            assert tensors[name].tensor_type == QType.F32
            np.testing.assert_array_equal(np.asarray(tensors[name].data), ref, err_msg=name)
            continue
        assert tensors[name].tensor_type == QType.Q8_0
        got = _hf_layout(name, _dequantize_q8_0(tensors[name].data, ref.shape))
        step = np.abs(ref).reshape(-1, 32).max(axis=1, keepdims=True) / 127  # per block, from the source
        err = np.abs(got - ref).reshape(-1, 32)
        assert (err <= bound * step).all(), f"{name}: {float((err / step).max()):.3f} steps off (bound {bound:.3f})"
        assert float((err / step).max()) > 0.4, name  # really quantized: some value lands near half a step


def test_f16_and_bf16_round_to_nearest(tiny_llama_dir, hf_tensors, tmp_path):
    """F16/BF16 tensors, decoded by hand, against the fp32 source: round to nearest is within half an ulp,
    2**-11 (f16) or 2**-8 (bf16) of each value's magnitude (f16 subnormals: half of 2**-24 absolute)."""
    for out_type, qtype in (("f16", QType.F16), ("bf16", QType.BF16)):
        out = tmp_path / f"m-{out_type}.gguf"
        gguf_writer.convert(tiny_llama_dir, out, out_type)
        tensors = _tensors(out)
        for hf_name, name in HF_TO_GGUF.items():
            ref = hf_tensors[hf_name].astype(np.float32)
            t = tensors[name]
            if ref.ndim == 1:
                assert t.tensor_type == QType.F32, name  # norms stay F32
                continue
            assert t.tensor_type == qtype, name
            bits = np.ascontiguousarray(t.data).view(np.uint16).reshape(ref.shape)
            if out_type == "f16":
                got, rel, floor = bits.view(np.float16).astype(np.float32), 2.0**-11, 2.0**-25
            else:
                got, rel, floor = (bits.astype(np.uint32) << 16).view(np.float32), 2.0**-8, 0.0
            got = _hf_layout(name, got)
            err = np.abs(got - ref)
            assert (err <= np.maximum(rel * np.abs(ref), floor)).all(), \
                f"{out_type} {name}: worst {float((err / np.abs(ref)).max()):.3g} of the value (half ulp {rel:.3g})"
            assert err.max() > 0, name  # really rounded, not stored as f32


def test_q8_0_logits_through_llama_cpp_stay_near_torch_fp32(tiny_llama_dir, tmp_path):
    """Model level: the Q8_0 file run by llama.cpp, teacher-forced on its own greedy continuations, against
    torch fp32 on the same ids. Measured on the tiny random Llama: max |logit diff| / max |torch logit|
    0.042-0.044 (f16 0.002; llama.cpp also rounds activations to Q8_0 in its dot products), top-1
    agreement 0.91-0.95 (random weights give flat logits, so near-ties flip). A wrong q/k permutation or
    scale gives ~1 relative and chance-level agreement."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.runtime.gguf import GGUFRuntime

    out = tmp_path / "m-q8_0.gguf"
    gguf_writer.convert(tiny_llama_dir, out, "q8_0")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    rel, hits = [], []
    with GGUFRuntime(out, n_threads=1, kv_type="f32") as rt:
        for text in ("Question: What is the torque for the wheel bolts?\nAnswer:", "The pump",
                     "Error code E12 means", "Replace the filter every"):
            ids = tok(text).input_ids
            seq = ids + rt.generate(ids, 24).tokens
            with torch.no_grad():
                ref = model(torch.tensor([seq])).logits[0].numpy()
            got = rt.logits(seq)
            rel.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
            hits.append(got.argmax(-1) == ref.argmax(-1))
    agree = float(np.concatenate(hits).mean())
    assert max(rel) < 0.08, rel
    assert agree >= 0.85, agree


def test_rows_not_fitting_q8_0_blocks_fall_back_to_f16(tiny_tokenizer_dir, tmp_path):
    model_dir = _variant(tiny_tokenizer_dir, tmp_path / "odd", intermediate_size=200)  # 200 % 32 != 0
    info = gguf_writer.convert(model_dir, tmp_path / "m.gguf", "q8_0")
    assert set(info["fallbacks"]) == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert "not a multiple" in info["fallbacks"]["blk.0.ffn_down.weight"]
    tensors = _tensors(tmp_path / "m.gguf")
    assert tensors["blk.0.ffn_down.weight"].tensor_type == QType.F16
    assert tensors["blk.0.ffn_up.weight"].tensor_type == QType.Q8_0


def test_sharded_bf16_checkpoint_streams_like_the_single_file(tiny_llama_dir, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="1MB")
    _copy_tokenizer(tiny_llama_dir, sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    gguf_writer.convert(sharded, tmp_path / "m.gguf", "f32")
    tensors = _tensors(tmp_path / "m.gguf")
    assert set(tensors) == set(HF_TO_GGUF.values())
    ref = model.model.layers[1].mlp.down_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data), ref)


def test_tied_embeddings_write_no_output_tensor(tiny_tokenizer_dir, tmp_path):
    model_dir = _variant(tiny_tokenizer_dir, tmp_path / "tied", tie_word_embeddings=True)
    gguf_writer.convert(model_dir, tmp_path / "m.gguf", "f16")
    names = set(_tensors(tmp_path / "m.gguf"))
    assert "token_embd.weight" in names and "output.weight" not in names


def test_vocab_padded_to_embedding_rows_and_added_tokens_appended(tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.save_pretrained(tok_dir)
    model_dir = _variant(tok_dir, tmp_path / "padded", vocab_size=400)
    info = gguf_writer.convert(model_dir, tmp_path / "m.gguf", "f16")
    reader = GGUFReader(tmp_path / "m.gguf")
    tokens, types = _field(reader, Keys.Tokenizer.LIST), _field(reader, Keys.Tokenizer.TOKEN_TYPE)
    assert info["vocab_size"] == len(tokens) == 400
    assert tokens[384] == "<|end|>" and types[384] == gguf.TokenType.CONTROL
    assert tokens[385] == "[PAD1]" and tokens[-1] == "[PAD15]"
    assert types[385] == gguf.TokenType.UNUSED  # as llama.cpp's converter: never matched in text


def test_unsupported_architecture_names_the_supported_ones(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="LlamaForCausalLM.*MistralForCausalLM"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_pickle_weights_are_refused_not_loaded(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"not even a pickle: it must never be opened")
    with pytest.raises(UserError, match="safe_serialization=True"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")


def test_unknown_out_type_and_missing_tokenizer_model(tiny_llama_dir, tmp_path):
    with pytest.raises(UserError, match="valid: f32, f16, bf16, q8_0"):
        gguf_writer.convert(tiny_llama_dir, tmp_path / "m.gguf", "q4_k_m")
    model_dir = tmp_path / "no-sp"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="tokenizer.model"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf.part").exists()


def test_sentencepiece_normalization_llama_cpp_skips_is_refused(tiny_llama_dir, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    model_dir = tmp_path / "nfkc"
    shutil.copytree(tiny_llama_dir, model_dir)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    proto.normalizer_spec.name = "nmt_nfkc"
    (model_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(UserError, match="normalization_rule_name='identity'"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")
