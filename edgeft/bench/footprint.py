"""What a variant reads per decoded token, and the decode speed memory bandwidth allows. Torch-free.

Decoding one token streams every weight once except the token embedding, of which only one row is
gathered (unless the output head shares it), plus the whole KV cache so far. At a memory bandwidth
of B bytes/s the decode rate cannot exceed B / bytes_per_token: that bound is the prediction put
beside the measured tok/s. Sizes come from the artifact itself (GGUF tensor table, ONNX
initializers, safetensors header), so a quantized file is predicted from its real bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft import safetensors_file, shapes

_TORCH_RUNTIME_BYTES = 4  # HFRuntime computes in fp32 whatever dtype the safetensors hold


@dataclass(frozen=True)
class Footprint:
    """Parameter count and bytes of one variant, with the shape of its KV cache."""

    params: int  # weights, elements
    weight_bytes: int  # every weight as the runtime holds it, bytes
    touched_bytes: int  # weights read per decoded token (one embedding row unless tied), bytes
    kv_bytes_per_pos: int  # KV cache per context position over all layers (K and V), bytes

    def bytes_per_token(self, context: float) -> float:
        """Bytes read to decode one token with `context` positions already in the cache."""
        return self.touched_bytes + self.kv_bytes_per_pos * context

    def predicted_tok_s(self, bandwidth_gbs: float, context: float) -> float:
        """The bandwidth bound on decode tokens/s at `context` cached positions."""
        return bandwidth_gbs * 1e9 / self.bytes_per_token(context)

    def memory_mb(self, n_ctx: int) -> float:
        """Weights plus a full KV cache of `n_ctx` positions, MiB (runtime buffers not included)."""
        return (self.weight_bytes + self.kv_bytes_per_pos * n_ctx) / 2**20


def of_variant(fmt: str, path: str | Path, kv_elem_bytes: int) -> Footprint:
    """The footprint of a torch model dir, a .gguf file or an ONNX model dir."""
    path = Path(path)
    if fmt == "gguf":
        return _gguf(path, kv_elem_bytes)
    if fmt == "onnx":
        return _onnx(path, kv_elem_bytes)
    if fmt == "torch":
        return _torch(path, kv_elem_bytes)
    raise ValueError(f"unknown variant format {fmt!r}")


def _gguf(path: Path, kv_elem_bytes: int) -> Footprint:
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    meta = {k: r.fields[f"{arch}.{k}"].contents() for k in
            ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
             "attention.key_length") if f"{arch}.{k}" in r.fields}
    tensors = {t.name: t for t in r.tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    touched = total
    emb = tensors.get("token_embd.weight")
    if emb is not None and "output.weight" in tensors:  # untied: only one embedding row is read
        rows = int(emb.shape[-1])  # gguf shapes are [n_embd, n_vocab]
        touched -= int(emb.n_bytes) - int(emb.n_bytes) // rows
    # the GGUF keys under their config.json names (no key_length: n_embd / n_head, as without head_dim)
    cfg = {"num_hidden_layers": meta["block_count"], "hidden_size": int(meta["embedding_length"]),
           "num_attention_heads": meta["attention.head_count"],
           "num_key_value_heads": meta.get("attention.head_count_kv"), "head_dim": meta.get("attention.key_length")}
    return Footprint(params=sum(int(t.n_elements) for t in tensors.values()), weight_bytes=total,
                     touched_bytes=touched, kv_bytes_per_pos=shapes.kv_bytes_per_token(cfg, kv_elem_bytes))


def _onnx(model_dir: Path, kv_elem_bytes: int) -> Footprint:
    cfg = json.loads((model_dir / "config.json").read_text())
    kv = shapes.kv_bytes_per_token(cfg, kv_elem_bytes)
    files = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file() and p.name.startswith("model.onnx"))
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:  # device without the onnx package: every stored byte counts as read (an upper bound)
        return Footprint(params=_params_from_config(cfg), weight_bytes=files, touched_bytes=files,
                         kv_bytes_per_pos=kv)
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    sizes, elems = {}, {}
    for init in model.graph.initializer:
        n = 1
        for d in init.dims:
            n *= d
        elems[init.name] = n
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            sizes[init.name] = int(ext["length"])
        elif init.raw_data:
            sizes[init.name] = len(init.raw_data)
        else:
            sizes[init.name] = n * tensor_dtype_to_np_dtype(init.data_type).itemsize
    # embedding tables read one row per token: a Gather's data, a GatherBlockQuantized's data, scales and
    # zero points (int4 embeddings); input 1 of both is the token ids
    gathers = [n for n in model.graph.node if n.op_type in _GATHER_OPS]
    gathered = {x for n in gathers for pos, x in enumerate(n.input)
                if x in sizes and (pos == 0 or (pos > 1 and n.op_type == "GatherBlockQuantized"))}
    used_elsewhere = {i for node in model.graph.node if node.op_type not in _GATHER_OPS for i in node.input}
    total = sum(sizes.values())
    touched = total
    for name in gathered - used_elsewhere:  # an embedding table only gathered from: one row per token
        dims = next(i.dims for i in model.graph.initializer if i.name == name)
        rows = int(dims[0]) if dims else 1
        touched -= sizes[name] - sizes[name] // max(rows, 1)
    return Footprint(params=_params_from_config(cfg) or sum(elems.values()), weight_bytes=total,
                     touched_bytes=touched, kv_bytes_per_pos=kv)


_GATHER_OPS = ("Gather", "GatherBlockQuantized")


def _torch(model_dir: Path, kv_elem_bytes: int) -> Footprint:
    cfg = json.loads((model_dir / "config.json").read_text())
    infos = {t.name: t for f in sorted(model_dir.glob("*.safetensors")) for t in safetensors_file.tensors(f)}
    params = sum(t.numel for t in infos.values())
    weight_bytes = params * _TORCH_RUNTIME_BYTES
    touched = weight_bytes
    emb = next((t.shape for name, t in infos.items() if name.endswith("embed_tokens.weight")), None)
    tied = cfg.get("tie_word_embeddings", False) or not any(k.endswith("lm_head.weight") for k in infos)
    if emb is not None and not tied:
        touched -= (emb[0] - 1) * emb[1] * _TORCH_RUNTIME_BYTES
    return Footprint(params=params, weight_bytes=weight_bytes, touched_bytes=touched,
                     kv_bytes_per_pos=shapes.kv_bytes_per_token(cfg, kv_elem_bytes))


def _params_from_config(cfg: dict) -> int:
    """Parameters of a Llama-style decoder from its config (ONNX graphs hold quantized, packed weights)."""
    try:
        h, v, i, n = (int(cfg[k]) for k in ("hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers"))
    except KeyError:
        return 0
    heads, hd, kvh = shapes.n_heads(cfg), shapes.head_dim(cfg), shapes.kv_heads(cfg)
    attn = h * heads * hd * 2 + h * kvh * hd * 2
    if cfg.get("attention_bias") or cfg.get("model_type") == "qwen2":
        attn += heads * hd + 2 * kvh * hd
    layer = attn + 3 * h * i + 2 * h
    return v * h + n * layer + h + (0 if cfg.get("tie_word_embeddings") else v * h)
