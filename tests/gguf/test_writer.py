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

N_HEADS, N_KV = 4, 2  # the conftest tiny Llama
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


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 (q/k/v biases, tied embeddings) with a 512-token byte-level BPE (Qwen2 regex)."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from edgeft.demo.manual import generate_manual
    from edgeft.gguf.vocab import PRE_TOKENIZER_REGEX

    out = tmp_path_factory.mktemp("qwen2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX["qwen2"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    corpus = [f.prose for f in generate_manual(seed=0, n_facts=300).facts]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_KV, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):  # nonzero biases, so their path is exercised
                p.normal_(0, 0.08 if p.dim() == 2 else 0.05)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_qwen2_round_trip_under_llama_cpp(tiny_qwen2_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from edgeft.runtime.gguf import GGUFRuntime

    out = tmp_path / "q.gguf"
    info = gguf_writer.convert(tiny_qwen2_dir, out, "f32")
    assert info["arch"] == "qwen2" and info["tokenizer"] == "gpt2"
    reader = GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_k.bias" in names and "output.weight" not in names  # biases kept, head tied
    assert reader.fields[Keys.Tokenizer.PRE].contents() == "qwen2"
    assert len(reader.fields[Keys.Tokenizer.MERGES].contents()) > 0
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    with GGUFRuntime(out, n_threads=1, kv_type="f32") as rt:
        for text in ("Check the torque of 45 Nm.", " leading  spaces\n", "ünïcode ✓ 日本", "x<|im_end|>y"):
            assert rt.tokenize(text, add_bos=True) == tok(text).input_ids, text
        ids = tok("Check the torque").input_ids
        got = rt.generate(ids, 16).tokens
        with torch.no_grad():
            want = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
            ref = model(torch.tensor([ids + got])).logits[0].numpy()
        assert got == want
        assert np.abs(rt.logits(ids + got) - ref).max() / np.abs(ref).max() < 1e-4


def test_unknown_byte_level_pre_tokenizer_is_refused(tiny_qwen2_dir, tmp_path):
    model_dir = tmp_path / "other-regex"
    shutil.copytree(tiny_qwen2_dir, model_dir)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
    (model_dir / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="regex is not one llama.cpp knows"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")


def test_mistral_converts_with_the_llama_arch(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "mistral"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    assert gguf_writer.convert(model_dir, tmp_path / "m.gguf", "f16")["arch"] == "llama"


def _variant(tok_dir: Path, out: Path, **overrides) -> Path:
    """A 2-layer Llama like conftest's with some config values changed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=384, hidden_size=256, intermediate_size=640, num_hidden_layers=2,
               num_attention_heads=N_HEADS, num_key_value_heads=N_KV, max_position_embeddings=512,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(tok_dir, out)
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, dst / f.name)


def test_gemma_round_trip_under_llama_cpp(tiny_tokenizer_dir, tmp_path):
    """Gemma: norms stored as w (scale 1 + w), sqrt(hidden)-scaled embeddings, tanh GELU, tied head."""
    import torch
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

    from edgeft.runtime.gguf import GGUFRuntime

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = GemmaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_KV, head_dim=64,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      hidden_activation="gelu_pytorch_tanh")
    torch.manual_seed(0)
    model = GemmaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.08 if p.dim() == 2 else 0.3)  # norms away from 0, so the +1 offset matters
    model.save_pretrained(tmp_path / "gemma", safe_serialization=True)
    _copy_tokenizer(tiny_tokenizer_dir, tmp_path / "gemma")
    out = tmp_path / "g.gguf"
    info = gguf_writer.convert(tmp_path / "gemma", out, "f32")
    assert info["arch"] == "gemma"
    names = {t.name for t in GGUFReader(out).tensors}
    assert "output.weight" not in names and "blk.1.ffn_norm.weight" in names
    model.eval()
    ids = tok("Check the torque of the pump").input_ids
    with GGUFRuntime(out, n_threads=1, kv_type="f32") as rt:
        got = rt.generate(ids, 12).tokens
        with torch.no_grad():
            ref = model(torch.tensor([ids + got])).logits[0].numpy()
        # 1e-3, not 1e-4 as for llama/qwen2: ggml's CPU GELU reads an fp16 lookup table (seen: 2.4e-4)
        assert np.abs(rt.logits(ids + got) - ref).max() / np.abs(ref).max() < 1e-3
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    assert got == want[:len(got)]


def test_phi3_is_refused_naming_the_supported_architectures(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "phi3"
    shutil.copytree(tiny_llama_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["Phi3ForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"\['Phi3ForCausalLM'\].*supported: LlamaForCausalLM, MistralForCausalLM, "
                                        r"Qwen2ForCausalLM, GemmaForCausalLM"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")
