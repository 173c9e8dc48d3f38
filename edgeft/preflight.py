"""Pre-flight: will a variant fit the device, and how fast can it decode there? Torch-free.

Memory = weights + KV cache at the profile's context length + the runtime's overhead, against the
profile's budget. Weights are counted from the safetensors headers (exact parameter counts per
tensor) times the bits per weight of the quant type; the KV cache from config.json (layers, KV
heads, head dim) times the cache's bytes per value. Decode is memory-bound on these devices: every
token reads the weights (less the embedding table, of which one row is read) and the KV cache once,
so bandwidth / bytes-per-token is an upper bound on tokens/s (llama.cpp reaches roughly 60-80% of it).
The ladder is walked best first: a variant that does not fit is refused with its numbers and the
next one down is tried; none fitting is a UserError that says what would make one fit.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft.errors import UserError

GIB = 1 << 30
# Bits per weight of a 2-D tensor in each type (the stored bytes x 8 / weights, scales included).
_BPW = {
    "gguf:f32": 32.0, "gguf:f16": 16.0, "gguf:bf16": 16.0,
    "gguf:q8_0": 8.5,  # 32 int8 + one fp16 scale per block
    "gguf:q6_k": 6.5625, "gguf:q5_k_m": 5.69, "gguf:q4_k_m": 4.89,  # llama.cpp's mix (attn_v/ffn_down wider)
    "gguf:q4_0": 4.5,  # 32 4-bit + one fp16 scale per block
    "onnx:fp32": 32.0, "onnx:fp16": 16.0,
    "onnx:int8": 8.0,  # per-channel scales are negligible; the embedding Gather is quantized too
    "onnx:int4": 5.0,  # MatMulNBits / GatherBlockQuantized: 4 bits + an fp32 scale per block of 32
}
_KV_BYTES = {"f16": 2, "f32": 4}
_ONNX_KV_BYTES = {"fp16": 2}  # the other ONNX types keep an fp32 KV cache (the exported graph's dtype)


@dataclass(frozen=True)
class Estimate:
    """One variant's predicted footprint on the device and its bandwidth-bound decode speed."""

    variant: str  # FORMAT:QUANT
    weights_gb: float  # GiB
    kv_cache_gb: float  # GiB at `context_length`
    overhead_gb: float  # GiB
    total_gb: float  # GiB
    budget_gb: float  # GiB
    context_length: int  # tokens the KV cache is sized for
    predicted_decode_tok_s: float  # upper bound from the profile's bandwidth
    fits: bool

    def line(self) -> str:
        """One human line: variant, memory split, verdict, predicted speed."""
        return (f"{self.variant}: {self.total_gb:.3g} GiB (weights {self.weights_gb:.3g} + KV cache "
                f"{self.kv_cache_gb:.3g} at {self.context_length} tokens + runtime {self.overhead_gb:.3g}) "
                f"{'<=' if self.fits else '>'} budget {self.budget_gb:.3g} GiB; decode <= "
                f"{self.predicted_decode_tok_s:.0f} tok/s from bandwidth")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from an hf model dir."""

    embed_params: int  # the input embedding table
    head_params: int  # the LM head (0 when tied to the embeddings)
    matrix_params: int  # every other 2-D weight
    vector_params: int  # norms and biases (kept in fp32 by every exporter)
    n_layers: int
    kv_heads: int
    head_dim: int
    max_positions: int  # the model's max_position_embeddings (0 = unknown)

    @property
    def params(self) -> int:
        return self.embed_params + self.head_params + self.matrix_params + self.vector_params


def bits_per_weight(variant: str) -> float:
    """Nominal bits per weight of FORMAT:QUANT; unknown types are a UserError."""
    if variant not in _BPW:
        raise UserError(f"pre-flight: no size model for {variant!r}; known: {', '.join(_BPW)}")
    return _BPW[variant]


def model_shape(hf_dir: Path) -> ModelShape:
    """Parameter counts from the safetensors headers and the attention shape from config.json."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir}: no config.json; pre-flight needs an hf model dir (the merge or train output)")
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)  # multimodal wrappers keep the decoder's config inside
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no .safetensors weights; save the model with safe_serialization=True")
    embed = head = matrix = vector = 0
    for f in files:
        for name, n, ndim in _tensor_sizes(f):
            if "embed_tokens" in name or name.endswith("wte.weight"):
                embed += n
            elif name.startswith("lm_head") or name.endswith("output.weight"):
                head += n
            elif ndim >= 2:
                matrix += n
            else:
                vector += n
    heads = int(cfg["num_attention_heads"])
    return ModelShape(embed_params=embed, head_params=head, matrix_params=matrix, vector_params=vector,
                      n_layers=int(cfg["num_hidden_layers"]),
                      kv_heads=int(cfg.get("num_key_value_heads") or heads),
                      head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                      max_positions=int(cfg.get("max_position_embeddings") or 0))


def estimate(shape: ModelShape, variant: str, profile) -> Estimate:
    """Footprint and decode bound of `variant` (FORMAT:QUANT) at the profile's context length."""
    fmt, _, quant = variant.partition(":")
    bpw = bits_per_weight(variant)
    head = shape.head_params  # every format quantizes the embedding table too (onnx int4: int4_embeddings)
    weights = (shape.matrix_params + head + shape.embed_params) * bpw / 8 + shape.vector_params * 4
    ctx = context_length(shape, profile)
    kv_bytes = _ONNX_KV_BYTES.get(quant, 4) if fmt == "onnx" else _KV_BYTES[profile.kv_cache_type]
    kv_per_token = 2 * shape.n_layers * shape.kv_heads * shape.head_dim * kv_bytes  # K and V
    kv = kv_per_token * ctx
    # per token: every weight but the embedding table (one row), unless it doubles as the LM head,
    # plus the KV cache at half the context on average
    read = weights - (shape.embed_params * bpw / 8 if head else 0) + kv / 2
    tok_s = profile.bandwidth_gbs * 1e9 / read if read > 0 else 0.0
    total = weights + kv + profile.runtime_overhead_gb * GIB
    return Estimate(variant=variant, weights_gb=round(weights / GIB, 4), kv_cache_gb=round(kv / GIB, 4),
                    overhead_gb=profile.runtime_overhead_gb, total_gb=round(total / GIB, 4),
                    budget_gb=profile.memory_budget_gb, context_length=ctx,
                    predicted_decode_tok_s=round(tok_s, 1), fits=total <= profile.memory_budget_gb * GIB)


def context_length(shape: ModelShape, profile) -> int:
    """The profile's context length, capped at what the model was built for."""
    if shape.max_positions:
        return min(profile.context_length, shape.max_positions)
    return profile.context_length


def plan(hf_dir: Path, profile, ladder: tuple[str, ...]) -> tuple[list[Estimate], list[str]]:
    """Walk the ladder best first: the variants that fit, and one message per step down or cap."""
    shape = model_shape(hf_dir)
    notes = []
    ctx = context_length(shape, profile)
    if ctx < profile.context_length:
        notes.append(f"pre-flight: the model serves at most {ctx} tokens (max_position_embeddings); "
                     f"profile {profile.name} asks {profile.context_length}: sizing the KV cache for {ctx}")
    ests = [estimate(shape, v, profile) for v in ladder]
    fitting = [e for e in ests if e.fits]
    if not fitting:
        small = min(ests, key=lambda e: e.total_gb)
        room = profile.memory_budget_gb - small.overhead_gb - small.kv_cache_gb
        raise UserError(
            f"pre-flight: no variant fits profile {profile.name}'s {profile.memory_budget_gb:g} GiB budget; "
            f"the smallest, {small.line()}; fix: lower profile.context_length (the KV cache is "
            f"{small.kv_cache_gb:.3g} GiB), shrink the model (prune/distill) to under "
            f"{max(room, 0):.3g} GiB of weights, or pick a larger device profile")
    for e in ests:
        if e is fitting[0]:
            break
        notes.append(f"pre-flight: refused {e.line()}; stepping down the ladder")
    for e in fitting:
        notes.append(f"pre-flight: ok {e.line()}")
    for e in ests[ests.index(fitting[0]):]:
        if not e.fits:
            notes.append(f"pre-flight: skipped {e.line()}")
    return fitting, notes


def as_dict(est: Estimate) -> dict:
    """JSON form of an estimate (bundle manifest)."""
    return asdict(est)


def _tensor_sizes(path: Path):
    """(name, elements, ndim) of every tensor in a safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path}: truncated safetensors file (no header); rebuild the model")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 << 20:
            raise UserError(f"{path}: safetensors header of {n} bytes is implausible; the file is corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt safetensors header; rebuild the model") from None
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in meta["shape"]:
            count *= d
        yield name, count, len(meta["shape"])
