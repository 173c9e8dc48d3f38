"""The GGUF writer on the other architectures it supports (qwen2, mistral, gemma) and the ones it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, Keys

from edgeft.errors import UserError
from edgeft.gguf import writer as gguf_writer

N_HEADS, N_KV = 4, 2  # the conftest tiny Llama


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
                                        r"Qwen2ForCausalLM, Qwen3ForCausalLM, GemmaForCausalLM, Gemma3ForCausalLM"):
        gguf_writer.convert(model_dir, tmp_path / "m.gguf")
