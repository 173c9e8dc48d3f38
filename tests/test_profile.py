"""Device profiles (values checked on load) and the pre-flight: fit, step down the ladder, refuse."""

import json
import struct
from pathlib import Path

import pytest

from edgeft import profile
from edgeft.bundle import preflight
from edgeft.errors import UserError

SHIPPED = {"jetson", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "rpi5-8gb", "x86-cpu", "android-arm64", "tiny"}


def test_every_shipped_profile_loads():
    assert SHIPPED <= set(profile.names())
    for name in profile.names():
        p = profile.load(name)
        assert p.name == name
        assert 0 < p.memory_budget_gb <= p.memory_gb and p.bandwidth_gbs > 0
        lad = profile.ladder(p)
        assert set(lad) == {f"gguf:{t}" for t in p.gguf} | {f"onnx:{t}" for t in p.onnx}


def test_datasheet_bandwidths_and_jetson_runtimes():
    bw = {n: profile.load(n).bandwidth_gbs for n in SHIPPED}
    assert (bw["jetson"], bw["jetson-orin-nx-16gb"], bw["jetson-agx-orin-64gb"], bw["rpi5-8gb"]) == (68, 102.4, 204.8, 17)
    for n in ("jetson", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"):
        p = profile.load(n)
        assert p.accelerator == "cuda" and p.n_gpu_layers == -1 and p.onnx_provider == "CUDAExecutionProvider"
        # what installs on JetPack: onnxruntime-gpu from NVIDIA's index, llama.cpp built with CUDA; not genai
        assert "onnxruntime-gpu" in p.install and "GGML_CUDA=on" in p.install and "genai" not in p.install
    for n in ("rpi5-8gb", "x86-cpu", "android-arm64"):
        p = profile.load(n)
        assert p.n_gpu_layers == 0 and p.onnx_provider == "CPUExecutionProvider" and p.threads >= 2


@pytest.mark.parametrize("over,needle", [
    ({"accuracy_budget": "1.5"}, "accuracy_budget=1.5"),
    ({"bandwidth_gbs": "0"}, "bandwidth_gbs=0.0"),
    ({"memory_budget_gb": "9"}, "exceeds memory_gb"),
    ({"onnx_provider": "MagicEP"}, "onnx_provider='MagicEP'"),
    ({"n_gpu_layers": "-1"}, "needs a GPU"),
    ({"onnx_provider": "CUDAExecutionProvider"}, "needs a GPU"),
    ({"accelerator": "tpu"}, "accelerator='tpu'"),
    ({"kv_cache_type": "q4"}, "kv_cache_type"),
    ({"context_length": "4"}, "context_length=4"),
    ({"threads": "0"}, "threads=0"),
    ({"runtime_overhead_gb": "5"}, "runtime_overhead_gb"),
    ({"gguf": "q8_0,q8_0"}, "lists a type twice"),
    ({"ladder": "gguf:q8_0,onnx:int8"}, "missing: gguf:q4_k_m"),
    ({"ladder": "q8_0,gguf:q4_k_m,onnx:int8"}, "FORMAT:QUANT"),
    ({"ladder": "gguf:q8_0,gguf:q4_k_m,onnx:int8,onnx:int4"}, "not built: onnx:int4"),
    ({"gguf": "", "onnx": ""}, "nothing to build"),
])
def test_bad_values_name_the_key(over, needle):
    with pytest.raises(UserError, match="rpi5-8gb.yaml") as e:
        profile.load("rpi5-8gb", {"gguf": "q8_0,q4_k_m", "onnx": "int8", "ladder": "gguf:q8_0,onnx:int8,gguf:q4_k_m",
                                   **over})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_empty_ladder_orders_by_bits():
    p = profile.load("x86-cpu", {"ladder": ""})
    assert profile.ladder(p) == ("onnx:fp32", "gguf:f16", "onnx:int8", "gguf:q8_0", "gguf:q4_k_m")


def _fake_llama(tmp: Path, hidden=2048, layers=22, heads=32, kv_heads=4, inter=5632, vocab=32000, tied=False) -> Path:
    """A TinyLlama-1.1B-shaped model dir holding only safetensors headers (the pre-flight reads no weights)."""
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    if not tied:
        shapes["lm_head.weight"] = [vocab, hidden]
    hd = hidden // heads
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [heads * hd, hidden], p + "self_attn.k_proj.weight": [kv_heads * hd, hidden],
                       p + "self_attn.v_proj.weight": [kv_heads * hd, hidden], p + "self_attn.o_proj.weight": [hidden, heads * hd],
                       p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                       p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
                       p + "post_attention_layernorm.weight": [hidden]})
    header, off = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(__import__("math").prod(shape))
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [off, off + n]}
        off += n
    blob = json.dumps(header).encode()
    (tmp / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob)
    (tmp / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "intermediate_size": inter, "vocab_size": vocab,
        "max_position_embeddings": 2048}))
    return tmp


def test_estimate_arithmetic(tmp_path):
    shape = preflight.model_shape(_fake_llama(tmp_path))
    assert shape.params == 1_100_048_384  # TinyLlama-1.1B's published parameter count
    p = profile.load("jetson", {"context_length": "2048"})
    e = preflight.estimate(shape, "gguf:q8_0", p)
    kv = 2 * 22 * 4 * 64 * 2048 * 2  # K and V, layers, kv heads, head dim, tokens, f16 bytes
    assert e.kv_cache_gb == round(kv / 2**30, 4)
    weights = (shape.matrix_params + shape.head_params + shape.embed_params) * 8.5 / 8 + shape.vector_params * 4
    assert e.weights_gb == round(weights / 2**30, 4)
    assert e.total_gb == round((weights + kv + 0.6 * 2**30) / 2**30, 4)
    read = weights - shape.embed_params * 8.5 / 8 + kv / 2
    assert e.predicted_decode_tok_s == round(68e9 / read, 1)
    speeds = [preflight.estimate(shape, v, p).predicted_decode_tok_s for v in ("gguf:f16", "gguf:q8_0", "gguf:q4_k_m")]
    assert speeds == sorted(speeds)  # fewer bytes per token, faster
    capped = preflight.estimate(shape, "gguf:q8_0", profile.load("jetson-agx-orin-64gb"))
    assert capped.context_length == 2048  # the model's max_position_embeddings caps the profile's 8192


def test_plan_steps_down_the_ladder(tmp_path):
    shape_dir = _fake_llama(tmp_path)
    # 1.1B: f16 ~2.1 GiB, int8 (block-16 scales, 10 bits) ~1.3 GiB, q8_0 ~1.1 GiB, q4_k_m ~0.6 GiB of weights;
    # with the runtime and KV cache a 1.6 GiB budget holds q8_0 down
    p = profile.load("x86-cpu", {"memory_budget_gb": "1.6", "context_length": "2048"})
    fits, notes = preflight.plan(shape_dir, p, profile.ladder(p))
    assert [e.variant for e in fits] == ["gguf:q8_0", "gguf:q4_k_m"]
    assert notes[-1].startswith("pre-flight: skipped onnx:int8") and "> budget 1.6 GiB" in notes[-1]
    assert notes[0].startswith("pre-flight: refused onnx:fp32") and "stepping down the ladder" in notes[0]
    assert notes[1].startswith("pre-flight: refused gguf:f16") and "> budget 1.6 GiB" in notes[1]


def test_plan_refuses_when_nothing_fits(tmp_path):
    p = profile.load("rpi5-8gb", {"memory_budget_gb": "0.5"})
    with pytest.raises(UserError) as e:
        preflight.plan(_fake_llama(tmp_path), p, profile.ladder(p))
    msg = str(e.value)
    assert "no variant fits profile rpi5-8gb's 0.5 GiB budget" in msg and "gguf:q4_0" in msg
    assert "context_length" in msg and "\n" not in msg


def test_corrupt_safetensors_header_is_a_user_error(tmp_path):
    _fake_llama(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="corrupt safetensors header"):
        preflight.model_shape(tmp_path)


def test_type_overrides_without_a_ladder_reorder_by_bits():
    p = profile.load("jetson", {"gguf": "q4_k_m,f16", "onnx": ""})  # the YAML's ladder no longer matches
    assert profile.ladder(p) == ("gguf:f16", "gguf:q4_k_m")
    with pytest.raises(UserError, match="missing: gguf:f16"):
        profile.load("jetson", {"gguf": "q4_k_m,f16", "onnx": "", "ladder": "gguf:q4_k_m"})
