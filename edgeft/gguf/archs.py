"""Which transformers architectures the GGUF writer converts, and how each maps onto llama.cpp's.

One ArchSpec per HF architecture: its tensor table (HF module -> GGUF tensor), the quirks of the
llama.cpp graph that will run it (rope layout, activation, Gemma's 1 + w norms, which biases it
reads), and the hyperparameters llama.cpp needs, checked so that a value its graph cannot compute
is refused by name rather than converted into a file that runs differently from the HF model.
Checked against llama.cpp's own converter and graphs (llama-cpp-python 0.3.36: conversion/gemma.py
Gemma3Model, conversion/qwen.py Qwen3Model, src/models/gemma3.cpp, src/models/qwen3.cpp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, LlamaFileType

from edgeft import shapes, variants
from edgeft.errors import UserError


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps onto a llama.cpp architecture."""

    arch: MODEL_ARCH
    tensors: dict[str, MODEL_TENSOR]  # HF name without .weight/.bias ({bid} = layer) -> GGUF tensor
    permute_qk: bool  # llama.cpp's llama rope is interleaved, HF's is rotate_half: permute q/k rows
    vocab: str  # "spm" (SentencePiece tokenizer.model) or "gpt2" (byte-level BPE tokenizer.json)
    acts: tuple[str, ...] = ("silu",)  # HF hidden_act values llama.cpp's graph for this arch computes
    norm_offset: float = 0.0  # added to RMSNorm weights (Gemma stores w and scales by 1 + w)
    biases: bool = True  # whether llama.cpp's graph reads projection biases (qwen3/gemma3 load none on o_proj)
    tied_default: bool = False  # HF's tie_word_embeddings default for this architecture
    sliding: bool = False  # per-layer sliding-window attention (gemma3: layer_types, rope_local_base_freq)


_LLAMA_LIKE = {
    "model.embed_tokens": MODEL_TENSOR.TOKEN_EMBD,
    "model.norm": MODEL_TENSOR.OUTPUT_NORM,
    "lm_head": MODEL_TENSOR.OUTPUT,
    "model.layers.{bid}.input_layernorm": MODEL_TENSOR.ATTN_NORM,
    "model.layers.{bid}.self_attn.q_proj": MODEL_TENSOR.ATTN_Q,
    "model.layers.{bid}.self_attn.k_proj": MODEL_TENSOR.ATTN_K,
    "model.layers.{bid}.self_attn.v_proj": MODEL_TENSOR.ATTN_V,
    "model.layers.{bid}.self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "model.layers.{bid}.post_attention_layernorm": MODEL_TENSOR.FFN_NORM,
    "model.layers.{bid}.mlp.gate_proj": MODEL_TENSOR.FFN_GATE,
    "model.layers.{bid}.mlp.up_proj": MODEL_TENSOR.FFN_UP,
    "model.layers.{bid}.mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}
# per-head RMSNorm of q and k (one head_dim vector shared by the heads), applied before rope
_QK_NORMS = {"model.layers.{bid}.self_attn.q_norm": MODEL_TENSOR.ATTN_Q_NORM,
             "model.layers.{bid}.self_attn.k_norm": MODEL_TENSOR.ATTN_K_NORM}
_UNTIED = {k: v for k, v in _LLAMA_LIKE.items() if k != "lm_head"}

LLAMA = ArchSpec(MODEL_ARCH.LLAMA, _LLAMA_LIKE, permute_qk=True, vocab="spm")
# Qwen2 has the same tensor names plus q/k/v biases; llama.cpp runs it with NEOX rope (no permutation)
QWEN2 = ArchSpec(MODEL_ARCH.QWEN2, _LLAMA_LIKE, permute_qk=False, vocab="gpt2")
# llama.cpp's qwen2 graph assumes heads x head_dim == hidden; its llama graph does not and reads q/k/v biases:
# a Qwen2 with other head sizes (KV groups pruned) runs there, q/k rows and biases permuted for its rope
QWEN2_AS_LLAMA = ArchSpec(MODEL_ARCH.LLAMA, _LLAMA_LIKE, permute_qk=True, vocab="gpt2")
# Qwen3: Qwen2 without biases, with q/k norms; head_dim is its own (0.6B: 128 with hidden 1024, 16 heads)
QWEN3 = ArchSpec(MODEL_ARCH.QWEN3, {**_LLAMA_LIKE, **_QK_NORMS}, permute_qk=False, vocab="gpt2", biases=False)
# Gemma: always tied (no output tensor), NEOX rope, tanh-approximated GELU, embeddings scaled by
# sqrt(hidden) inside llama.cpp's graph as in HF's, norm weights stored as w for a scale of 1 + w
GEMMA = ArchSpec(MODEL_ARCH.GEMMA, _UNTIED, permute_qk=False, vocab="spm", acts=("gelu_pytorch_tanh",),
                 norm_offset=1.0, tied_default=True)
# Gemma 3 text: Gemma plus q/k norms and a norm after attention and after the MLP. HF's
# post_attention_layernorm is that post-attention norm (not the MLP's input norm, as in Llama):
# pre_feedforward_layernorm is. Sliding-window and global layers alternate as layer_types says.
GEMMA3 = ArchSpec(MODEL_ARCH.GEMMA3, {
    **_UNTIED, **_QK_NORMS,
    "model.layers.{bid}.post_attention_layernorm": MODEL_TENSOR.ATTN_POST_NORM,
    "model.layers.{bid}.pre_feedforward_layernorm": MODEL_TENSOR.FFN_PRE_NORM,
    "model.layers.{bid}.post_feedforward_layernorm": MODEL_TENSOR.FFN_POST_NORM,
}, permute_qk=False, vocab="spm", acts=("gelu_pytorch_tanh",), norm_offset=1.0, biases=False, tied_default=True,
    sliding=True)
ARCHITECTURES = {"LlamaForCausalLM": LLAMA, "MistralForCausalLM": LLAMA, "Qwen2ForCausalLM": QWEN2,
                 "Qwen3ForCausalLM": QWEN3, "GemmaForCausalLM": GEMMA, "Gemma3ForCausalLM": GEMMA3}
_SLIDING, _FULL = "sliding_attention", "full_attention"  # HF layer_types values


def arch_spec(config: dict, hf_dir: Path) -> ArchSpec:
    """The spec of config.json's architecture; any other is refused with the supported list."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            spec = ARCHITECTURES[a]
            heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
            if spec is QWEN2 and heads and hidden and heads * shapes.head_dim(config) != hidden:
                return QWEN2_AS_LLAMA
            return spec
    raise UserError(f"{hf_dir / 'config.json'}: architecture {archs or 'missing'} is not supported by the "
                    f"GGUF writer; supported: {', '.join(ARCHITECTURES)}")


def hparams(config: dict, hf_dir: Path, spec: ArchSpec) -> dict:
    """The hyperparameters llama.cpp needs, checked: a value we cannot express is an error."""
    where = hf_dir / "config.json"

    def need(key: str):
        if config.get(key) is None:
            raise UserError(f"{where}: missing {key!r}, needed for GGUF export")
        return config[key]

    act = config.get("hidden_activation") or config.get("hidden_act", "silu")
    if act not in spec.acts:
        raise UserError(f"{where}: hidden_act {act!r}; llama.cpp's "
                        f"{MODEL_ARCH_NAMES[spec.arch]} graph computes {' or '.join(spec.acts)} only")
    rope_scaling = config.get("rope_scaling")
    rtype = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type"))
    if rope_scaling and rtype not in ("linear", "default"):
        raise UserError(f"{where}: rope_scaling type {rtype!r} is not supported by the GGUF "
                        "writer (only none or linear)")
    if config.get("use_sliding_window"):
        raise UserError(f"{where}: use_sliding_window=true is not supported by the GGUF writer")
    if not spec.biases and config.get("attention_bias"):
        raise UserError(f"{where}: attention_bias=true; llama.cpp's {MODEL_ARCH_NAMES[spec.arch]} graph "
                        "reads no attention output bias, so the file would compute another model")
    hidden, heads = need("hidden_size"), need("num_attention_heads")
    hp = {
        "hidden": hidden, "heads": heads, "layers": need("num_hidden_layers"),
        "ffn": need("intermediate_size"), "ctx": need("max_position_embeddings"),
        "kv_heads": shapes.kv_heads(config), "head_dim": shapes.head_dim(config),
        "rms_eps": need("rms_norm_eps"), "rope_theta": config.get("rope_theta", 10000.0),
        "rope_linear": rope_scaling.get("factor") if rope_scaling and rtype == "linear" else None,
        "tied": bool(config.get("tie_word_embeddings", spec.tied_default)),
    }
    layer_types = config.get("layer_types") or []
    if not spec.sliding:
        if _SLIDING in layer_types:
            raise UserError(f"{where}: sliding-window layers (layer_types) are not supported by the GGUF writer "
                            f"for {MODEL_ARCH_NAMES[spec.arch]}")
        return hp
    hp.update(_sliding_hparams(config, where, hp, layer_types))
    return hp


def _sliding_hparams(config: dict, where: Path, hp: dict, layer_types: list) -> dict:
    """Gemma 3: the window, which layers use it, their rope base, the attention scale, the logit cap."""
    if config.get("use_bidirectional_attention"):
        raise UserError(f"{where}: use_bidirectional_attention=true (an embedding model); the GGUF writer "
                        "converts causal text models only")
    if config.get("attn_logit_softcapping") is not None:
        raise UserError(f"{where}: attn_logit_softcapping is set; llama.cpp's gemma3 graph has no attention "
                        "softcapping (Gemma 3 dropped it)")
    if len(layer_types) != hp["layers"] or set(layer_types) - {_SLIDING, _FULL}:
        raise UserError(f"{where}: layer_types must list {_SLIDING!r} or {_FULL!r} for each of the "
                        f"{hp['layers']} layers; re-save the config with transformers >= 4.53")
    # llama.cpp scales q by 1/sqrt(head_dim), except for its 62-layer (27B) type: 1/sqrt(hidden / heads);
    # HF by 1/sqrt(query_pre_attn_scalar). Every released Gemma 3 satisfies this; a config that does not
    # would run with another attention temperature.
    llama_scale = hp["hidden"] // hp["heads"] if hp["layers"] == 62 else hp["head_dim"]
    scalar = config.get("query_pre_attn_scalar", hp["head_dim"])
    if not math.isclose(float(scalar), float(llama_scale)):
        raise UserError(f"{where}: query_pre_attn_scalar {scalar} != {llama_scale}, the attention scale "
                        f"llama.cpp's gemma3 graph uses for this shape; set query_pre_attn_scalar={llama_scale}")
    window = config.get("sliding_window")
    if _SLIDING in layer_types and not window:
        raise UserError(f"{where}: layer_types has sliding layers but sliding_window is {window!r}")
    return {"sliding_window": int(window or 0), "swa_layers": [t == _SLIDING for t in layer_types],
            "rope_local_theta": float(config.get("rope_local_base_freq", 10000.0)),
            "final_softcap": config.get("final_logit_softcapping")}


def add_metadata(w: gguf.GGUFWriter, hp: dict, out_type: str, name: str, n_rows: int) -> None:
    """The model's keys (the tokenizer's are edgeft.gguf.vocab's) on a GGUFWriter."""
    w.add_name(name)
    w.add_context_length(hp["ctx"])
    w.add_embedding_length(hp["hidden"])
    w.add_block_count(hp["layers"])
    w.add_feed_forward_length(hp["ffn"])
    w.add_head_count(hp["heads"])
    w.add_head_count_kv(hp["kv_heads"])
    w.add_rope_freq_base(float(hp["rope_theta"]))
    w.add_layer_norm_rms_eps(float(hp["rms_eps"]))
    w.add_rope_dimension_count(hp["head_dim"])
    if hp["head_dim"] != hp["hidden"] // hp["heads"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if hp["rope_linear"]:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(hp["rope_linear"]))
    if hp.get("sliding_window"):
        # llama.cpp reads the window only when > 0, then the per-layer pattern (a bool array: which layers
        # slide; without it, 5 of every 6) and the rope base of the sliding layers (default 10000)
        w.add_sliding_window(hp["sliding_window"])
        w.add_sliding_window_pattern(hp["swa_layers"])
        w.add_rope_freq_base_swa(hp["rope_local_theta"])
    if hp.get("final_softcap"):
        w.add_final_logit_softcapping(float(hp["final_softcap"]))
    w.add_vocab_size(n_rows)
    w.add_file_type(LlamaFileType(variants.get("gguf", out_type).file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
