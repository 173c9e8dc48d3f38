"""The GGUF writer on Qwen3 and Gemma 3 (text): F16 files run by llama.cpp against PyTorch FP32.

Tiny random-weight configs from conftest.build_family carry each family's quirks (q/k norms, head_dim !=
hidden / heads; Gemma 3's sliding-window and global layers, pre/post norms, 1 + w norms, scaled tied
embeddings). Tolerances are relative to the largest |logit| of the reference; the bounds sit above
what was measured on AMD EPYC Zen 4 (AVX512) with llama-cpp-python 0.3.36 built without -march=native.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import GEMMA3_WINDOW, build_family
from gguf import GGUFReader, Keys

from edgeft.errors import UserError
from edgeft.gguf import writer as gguf_writer

# long enough that the Gemma 3 sliding layer (window GEMMA3_WINDOW tokens) sees only part of it
TEXT = "Check the torque of the pump before the valve, then replace the filter"
N_NEW = 12


def _llama_cpp_vs_torch(gguf_file: Path, model_dir: Path, text: str = TEXT) -> dict:
    """llama.cpp's greedy continuation, then torch's and llama.cpp's teacher-forced logits on prompt + it.

    rel: max |logit diff| / max |torch logit|. top1: share of positions with the same argmax. decisive:
    positions whose argmaxes differ although torch's margin exceeds twice the largest |diff| (a near-tie
    may flip under F16 weights; a layout bug flips decisive ones)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgeft.runtime.gguf import GGUFRuntime

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text).input_ids
    with GGUFRuntime(gguf_file, n_threads=1, kv_type="f32") as rt:
        assert rt.tokenize(text, add_bos=True) == ids
        got = rt.generate(ids, N_NEW).tokens
        logits = rt.logits(ids + got)
    with torch.no_grad():
        ref = model(torch.tensor([ids + got])).logits[0].numpy()
    err = np.abs(logits - ref).max()
    best, theirs = ref.argmax(-1), logits.argmax(-1)
    rows = np.arange(len(ref))
    decisive = int(((best != theirs) & (ref[rows, best] - ref[rows, theirs] > 2 * err)).sum())
    return {"ids": ids, "got": got, "ref": ref, "rel": float(err / np.abs(ref).max()),
            "top1": float((best == theirs).mean()), "decisive": decisive}


def _summary(r: dict) -> dict:
    summary = {k: r[k] for k in ("rel", "top1", "decisive")}
    print(summary)  # the measured figures, with -s
    return summary


def _fields(path: Path) -> tuple[dict, set]:
    reader = GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name for t in reader.tensors}


def test_qwen3_f16_round_trip_under_llama_cpp(family_dirs, tmp_path):
    """q/k norms per head (before rope), head_dim 128 with hidden 256 / 4 heads, no biases, tied head."""
    model_dir = family_dirs("qwen3")
    out = tmp_path / "q3.gguf"
    info = gguf_writer.convert(model_dir, out, "f16")
    assert info["arch"] == "qwen3" and info["tokenizer"] == "gpt2"
    fields, names = _fields(out)
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names and "output.weight" not in names
    assert fields["qwen3.attention.key_length"] == 128 and fields["qwen3.rope.dimension_count"] == 128
    assert fields[Keys.Tokenizer.PRE] == "qwen2"
    r = _llama_cpp_vs_torch(out, model_dir)
    # F16 weights: measured rel 1.3e-3, top-1 0.97 (one near-tie of 38); a wrong norm or layout gives rel ~1
    assert _summary(r) and r["rel"] < 5e-3 and r["top1"] >= 0.9 and r["decisive"] == 0, _summary(r)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["270m-no-softcap", "final-softcap"])
def test_gemma3_f16_round_trip_under_llama_cpp(tiny_tokenizer_dir, tmp_path, softcap):
    """Sliding-window + global layers, q/k norms, pre/post norms (1 + w), head_dim != hidden / heads, tied."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = build_family("gemma3_text", tiny_tokenizer_dir, tmp_path / "g3", final_logit_softcapping=softcap)
    out = tmp_path / "g3.gguf"
    info = gguf_writer.convert(model_dir, out, "f16")
    assert info["arch"] == "gemma3" and info["tokenizer"] == "llama"
    fields, names = _fields(out)
    assert "output.weight" not in names
    assert {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight",
            "blk.0.post_ffw_norm.weight"} <= names
    assert fields["gemma3.attention.sliding_window"] == GEMMA3_WINDOW
    assert list(fields["gemma3.attention.sliding_window_pattern"]) == [True, False]  # not llama.cpp's 5-in-6
    assert fields["gemma3.attention.key_length"] == 128 and fields["gemma3.rope.freq_base_swa"] == 10000.0
    assert fields.get("gemma3.final_logit_softcapping") == softcap
    assert "tokenizer.chat_template" not in fields  # a base model: none invented
    r = _llama_cpp_vs_torch(out, model_dir)
    assert len(r["ids"]) > 3 * GEMMA3_WINDOW
    # the window matters for this prompt: the same weights with two global layers give other logits
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                layer_types=["full_attention"] * 2).eval()
    with torch.no_grad():
        unwindowed = full(torch.tensor([r["ids"] + r["got"]])).logits[0].numpy()
    assert np.abs(unwindowed - r["ref"]).max() / np.abs(r["ref"]).max() > 0.05
    # F16 weights, and ggml's GELU reads an fp16 table: measured rel 1.4e-3 (F32 file: 1e-4), top-1 1.0
    assert _summary(r) and r["rel"] < 5e-3 and r["top1"] >= 0.9 and r["decisive"] == 0, _summary(r)


def _edited(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family, change, message", [
    ("gemma3_text", {"query_pre_attn_scalar": 256}, r"query_pre_attn_scalar 256 != 128"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("gemma3_text", {"layer_types": ["sliding_attention"]}, "layer_types must list"),
    ("gemma3_text", {"hidden_activation": "silu"}, "hidden_act 'silu'"),
    ("qwen3", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window layers"),
])
def test_what_llama_cpp_would_compute_differently_is_refused_before_writing(family_dirs, tmp_path, family, change,
                                                                             message):
    model_dir = _edited(family_dirs(family), tmp_path / "m", **change)
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError, match=message):
        gguf_writer.convert(model_dir, out, "f16")
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_a_made_up_architecture_is_refused_in_one_line_naming_every_supported_one(family_dirs, tmp_path):
    model_dir = _edited(family_dirs("qwen3"), tmp_path / "m", architectures=["TinyMadeUpForCausalLM"])
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError) as e:
        gguf_writer.convert(model_dir, out)
    assert "\n" not in str(e.value)
    assert str(e.value).endswith("supported: " + ", ".join(gguf_writer.ARCHITECTURES))
    assert {"Qwen3ForCausalLM", "Gemma3ForCausalLM"} <= set(gguf_writer.ARCHITECTURES)
    assert not any(tmp_path.glob("m.gguf*"))


def test_qwen2_with_pruned_heads_runs_under_llama_cpp_as_llama(tiny_qwen_tokenizer_dir, tmp_path):
    """heads x head_dim != hidden (what pruning KV groups leaves): llama.cpp's qwen2 graph cannot load it, its
    llama graph computes the same model (q/k/v biases read, q/k rows and biases permuted for its rope)."""
    model_dir = build_family("qwen2", tiny_qwen_tokenizer_dir, tmp_path / "q2", head_dim=32)
    out = tmp_path / "q2.gguf"
    assert gguf_writer.convert(model_dir, out, "f16")["arch"] == "llama"
    fields, names = _fields(out)
    assert "blk.0.attn_q.bias" in names and fields["llama.attention.key_length"] == 32
    r = _llama_cpp_vs_torch(out, model_dir)
    assert _summary(r) and r["rel"] < 5e-3 and r["top1"] >= 0.9 and r["decisive"] == 0, _summary(r)
