"""edgeft.shapes: attention geometry from a config (dict or attributes), KV bytes, parameter counts."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from edgeft import shapes

# gemma3-270m-like: head_dim 256 is set explicitly and is not hidden_size // heads (640 // 4 = 160)
GEMMA3 = {"hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
          "num_hidden_layers": 18, "max_position_embeddings": 32768}
LLAMA = {"hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2}


def test_head_dim_explicit_or_from_hidden_size():
    assert shapes.head_dim(GEMMA3) == 256
    assert shapes.head_dim(LLAMA) == 64
    assert shapes.head_dim({**LLAMA, "head_dim": None}) == 64  # null in config.json: the HF default


def test_kv_heads_default_to_query_heads():
    assert shapes.kv_heads(LLAMA) == 4 == shapes.n_heads(LLAMA)
    assert shapes.kv_heads({**LLAMA, "num_key_value_heads": None}) == 4
    assert shapes.kv_heads(GEMMA3) == 1


def test_layers_and_max_positions():
    assert shapes.n_layers(GEMMA3) == 18 and shapes.max_positions(GEMMA3) == 32768
    assert shapes.max_positions(LLAMA) == 0  # unknown


def test_text_config_is_unwrapped():
    wrapper = {"model_type": "gemma3", "text_config": GEMMA3, "vision_config": {"hidden_size": 1152}}
    assert shapes.decoder_config(wrapper) is GEMMA3
    assert (shapes.head_dim(wrapper), shapes.kv_heads(wrapper), shapes.n_layers(wrapper),
            shapes.max_positions(wrapper)) == (256, 1, 18, 32768)
    assert shapes.decoder_config(LLAMA) is LLAMA


def test_attribute_configs_are_read_like_dicts():
    obj = SimpleNamespace(**{**LLAMA, "num_key_value_heads": 2})
    assert (shapes.head_dim(obj), shapes.kv_heads(obj), shapes.n_layers(obj)) == (64, 2, 2)
    assert shapes.head_dim(SimpleNamespace(**GEMMA3)) == 256
    with pytest.raises(KeyError):
        shapes.head_dim({"num_attention_heads": 4})
    with pytest.raises(AttributeError):
        shapes.head_dim(SimpleNamespace(num_attention_heads=4))


def test_transformers_config_object():
    transformers = pytest.importorskip("transformers")
    c = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    assert (shapes.head_dim(c), shapes.kv_heads(c), shapes.n_layers(c)) == (64, 2, 2)


def test_kv_bytes_per_token_by_hand():
    cfg = {**LLAMA, "num_key_value_heads": 2}
    # K and V, 2 layers, 2 KV heads, head_dim 256 // 4 = 64, f16
    assert shapes.kv_bytes_per_token(cfg, 2) == 2 * 2 * 2 * 64 * 2 == 1024
    assert shapes.kv_bytes_per_token(GEMMA3, 4) == 2 * 18 * 1 * 256 * 4
    shape = shapes.ModelShape(embed_params=0, head_params=0, matrix_params=0, vector_params=0, n_layers=3,
                              kv_heads=2, head_dim=16, max_positions=0)
    assert shapes.kv_bytes_per_token(shape, 2) == 2 * 3 * 2 * 16 * 2


def test_model_shape_of_tiny_llama(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    v, h, i, layers = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    s = shapes.model_shape(tiny_llama_dir)
    assert (s.n_layers, s.kv_heads, s.head_dim, s.max_positions) == (2, 2, 64, 512)
    assert s.embed_params == v * h and s.head_params == v * h  # untied
    # per layer: q, o (h x h), k, v (h x 2 heads x 64), gate, up, down (h x i); norms: 2 per layer + final
    assert s.matrix_params == layers * (2 * h * h + 2 * h * 2 * 64 + 3 * h * i)
    assert s.vector_params == layers * 2 * h + h
    assert shapes.kv_bytes_per_token(s, 2) == 2 * 2 * 2 * 64 * 2


def test_preflight_keeps_its_names():
    from edgeft.bundle import preflight

    assert preflight.ModelShape is shapes.ModelShape and preflight.model_shape is shapes.model_shape
