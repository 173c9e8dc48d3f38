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

from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft import variants
from edgeft.errors import UserError
from edgeft.shapes import ModelShape, kv_bytes_per_token, model_shape  # ModelShape, model_shape: public here too

GIB = 1 << 30
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


def bits_per_weight(variant: str) -> float:
    """Nominal bits per weight of FORMAT:QUANT (edgeft.variants); unknown types are a UserError."""
    return variants.parse(variant).bpw


def estimate(shape: ModelShape, variant: str, profile) -> Estimate:
    """Footprint and decode bound of `variant` (FORMAT:QUANT) at the profile's context length."""
    fmt, _, quant = variant.partition(":")
    bpw = bits_per_weight(variant)
    head = shape.head_params  # every format quantizes the embedding table too (onnx int4: int4_embeddings)
    weights = (shape.matrix_params + head + shape.embed_params) * bpw / 8 + shape.vector_params * 4
    ctx = context_length(shape, profile)
    kv_bytes = _ONNX_KV_BYTES.get(quant, 4) if fmt == "onnx" else _KV_BYTES[profile.kv_cache_type]
    kv_per_token = kv_bytes_per_token(shape, kv_bytes)  # K and V
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


def grounded_prompt_check(tokenizer_dir: Path, eval_records: list[dict], ctx: int, max_new_tokens: int,
                          profile) -> str | None:
    """A retrieval-tuned model's prompts carry its k passages: the longest grounded eval prompt plus a whole
    answer must fit the device context, else `ask` would drop passages the model was tuned to see.
    Refused (UserError naming the profile key) when it does not fit; returns a note with the figures."""
    from edgeft.runtime.prompt import PromptFormatter

    fmt = PromptFormatter(tokenizer_dir)
    lengths = [len(fmt.prompt_ids(r["messages"][:-1])) for r in eval_records if r.get("grounding")]
    if not lengths:
        return None
    need = max(lengths) + max_new_tokens
    if need > ctx:
        raise UserError(f"pre-flight: grounded prompts reach {max(lengths)} tokens (k passages + question) and an "
                        f"answer {max_new_tokens}; profile {profile.name} serves {ctx}: raise profile.context_length "
                        f"to >= {need}, or tune with a lower data.retrieval_k / data.retrieval_words")
    return (f"pre-flight: grounded prompts up to {max(lengths)} tokens (median {sorted(lengths)[len(lengths) // 2]}) "
            f"+ {max_new_tokens}-token answers fit the {ctx}-token context")
