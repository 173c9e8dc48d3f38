"""A peft LoRA adapter dir -> a GGUF LoRA adapter that llama.cpp applies at run time over its base.

The layout is llama.cpp's (convert_lora_to_gguf.py, src/llama-adapter.cpp): general.type =
"adapter", adapter.type = "lora", adapter.lora.alpha, and per adapted weight `<gguf name>.lora_a`
([rank, in], peft's lora_A as is) and `<gguf name>.lora_b` ([out, rank]). llama.cpp scales the
product by alpha / rank, peft by lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA, written here
as alpha = lora_alpha * sqrt(r)). lora_b rows of q/k get the same rope permutation as the base
weights (lora_a mixes input columns, which are not permuted). Variants llama.cpp cannot express
(DoRA, per-module rank/alpha, adapted biases or embeddings, modules_to_save) are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_ARCH_NAMES
from gguf import GGMLQuantizationType as QType

from edgeft.errors import UserError
from edgeft.gguf import writer as gguf_writer

ADAPTER_TYPES = ("f32", "f16")  # lora_a/lora_b storage; small tensors, kept in float
_PREFIX = "base_model.model."  # peft's wrapper prefix on every adapter tensor name
_ADAPTER_FILE = "adapter_model.safetensors"
_CONFIG_FILE = "adapter_config.json"


def convert_adapter(adapter_dir: Path, base_dir: Path, out_file: Path, out_type: str = "f32") -> dict:
    """Write the peft adapter in `adapter_dir` (trained on `base_dir`) as one GGUF LoRA file."""
    adapter_dir, out_file = Path(adapter_dir), Path(out_file)
    if out_type not in ADAPTER_TYPES:
        raise UserError(f"GGUF adapter type {out_type!r}; valid: {', '.join(ADAPTER_TYPES)}")
    lcfg = _adapter_config(adapter_dir)
    spec, hp, _ = gguf_writer.model_spec(base_dir)
    weights = adapter_dir / _ADAPTER_FILE
    if not weights.is_file():
        raise UserError(f"{adapter_dir}: no {_ADAPTER_FILE}; save the adapter with safe_serialization=True")
    rank, alpha = int(lcfg["r"]), float(lcfg["lora_alpha"])
    gguf_alpha = alpha * math.sqrt(rank) if lcfg.get("use_rslora") else alpha  # llama.cpp divides by rank
    pairs = _pairs(weights, spec, hp, rank)
    qtype = QType.F32 if out_type == "f32" else QType.F16
    with gguf_writer.atomic_writer(out_file, spec.arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha)
        writer.add_name(adapter_dir.name)
        for name, (a_key, b_key, heads) in pairs.items():
            for suffix, key in (("lora_a", a_key), ("lora_b", b_key)):
                shape = _shape(weights, key)
                nbytes = int(np.prod(shape)) * (4 if qtype == QType.F32 else 2)
                writer.add_tensor_info(f"{name}.weight.{suffix}", shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as st:
            for name, (a_key, b_key, heads) in pairs.items():
                a = st.get_tensor(a_key).float().numpy()
                b = st.get_tensor(b_key).float().numpy()
                if heads:
                    b = gguf_writer.permute_qk(b, heads)
                for t in (a, b):
                    writer.write_tensor_data(np.ascontiguousarray(t, dtype=np.float32 if qtype == QType.F32
                                                                  else np.float16))
    return {"arch": MODEL_ARCH_NAMES[spec.arch], "rank": rank, "lora_alpha": alpha, "gguf_alpha": gguf_alpha,
            "rslora": bool(lcfg.get("use_rslora")), "n_adapted": len(pairs), "out_type": out_type,
            "size_bytes": out_file.stat().st_size}


def check(adapter_dir: Path) -> dict:
    """The adapter's config if llama.cpp can apply it as a GGUF LoRA; UserError naming the blocker otherwise."""
    return _adapter_config(Path(adapter_dir))


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / _CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{adapter_dir}: no {_CONFIG_FILE}; pass a peft LoRA adapter dir")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
    refusals = {
        "peft_type": (cfg.get("peft_type") != "LORA", "only LORA adapters have a GGUF form"),
        "use_dora": (cfg.get("use_dora"), "llama.cpp has no DoRA magnitude vectors; merge instead"),
        "rank_pattern": (cfg.get("rank_pattern"), "GGUF LoRA has one rank rule; merge instead"),
        "alpha_pattern": (cfg.get("alpha_pattern"), "GGUF LoRA has one alpha; merge instead"),
        "modules_to_save": (cfg.get("modules_to_save"), "fully trained modules need merging"),
        "bias": (cfg.get("bias", "none") != "none", "adapted biases need merging"),
    }
    for key, (bad, why) in refusals.items():
        if bad:
            raise UserError(f"{path}: {key}={cfg.get(key)!r} cannot be exported as a GGUF adapter ({why}); "
                            "export the merged model (export_gguf.adapter=false)")
    return cfg


def _pairs(weights: Path, spec, hp: dict, rank: int) -> dict[str, tuple[str, str, int]]:
    """GGUF tensor name -> (lora_A key, lora_B key, q/k permutation heads), in file order."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as st:
        keys = list(st.keys())
    out: dict[str, tuple[str, str, int]] = {}
    for key in sorted(keys):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise UserError(f"{weights}: tensor {key} is not a lora_A/lora_B weight (embedding or "
                                "trainable-token adapters need merging); export the merged model")
            continue
        stem = key.removeprefix(_PREFIX).removesuffix(".lora_A.weight")
        b_key = key.removesuffix(".lora_A.weight") + ".lora_B.weight"
        if b_key not in keys:
            raise UserError(f"{weights}: {key} has no matching lora_B")
        name = gguf_writer.gguf_tensor_name(spec, stem)
        if name is None or name.startswith("token_embd"):
            raise UserError(f"{weights}: adapted module {stem} has no GGUF LoRA counterpart; export the "
                            "merged model")
        if _shape(weights, key)[0] != rank:
            raise UserError(f"{weights}: {key} has rank {_shape(weights, key)[0]}, adapter_config r={rank}")
        out[name] = (key, b_key, gguf_writer.qk_heads(spec, hp, stem))
    if not out:
        raise UserError(f"{weights}: no LoRA weights found")
    return dict(sorted(out.items(), key=lambda kv: _block_order(kv[0])))


def _block_order(name: str) -> tuple:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" else -1, name)


def _shape(weights: Path, key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as st:
        return tuple(st.get_slice(key).get_shape())
