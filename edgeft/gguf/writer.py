"""Convert a transformers model dir to one GGUF file: our own converter over gguf-py's GGUFWriter.

llama.cpp's convert_hf_to_gguf.py is not installable with the PyPI `gguf` (ENVIRONMENT.md), so this
module does the part we need. One table per architecture (edgeft.gguf.archs) maps HF tensor names
to GGUF tensors and checks the hyperparameters; metadata goes through the writer's add_* methods
(the keys live in gguf.Keys); the tokenizer is translated by edgeft.gguf.vocab. The header and
tensor infos are written first from the planned shapes and types, then the data streams tensor by
tensor: each is read from its safetensors file with plain reads at the offsets the file's header gives (no memory map, whose touched pages would
stay in this process's resident set, and no torch), converted, written and dropped, so peak memory
stays near the largest tensor (times the few copies a conversion makes).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES
from gguf import GGMLQuantizationType as QType

from edgeft import variants
from edgeft.errors import UserError
from edgeft.gguf import archs
from edgeft.gguf import vocab as gguf_vocab
from edgeft.gguf.archs import ARCHITECTURES, ArchSpec  # noqa: F401  (the supported list, re-exported)
from edgeft.safetensors_file import SafeTensorsFile

# what this writer produces itself (the table's gguf types with no llama.cpp quantizer target)
OUT_TYPES = tuple(t for t in variants.quants("gguf") if not variants.get("gguf", t).llama_ftype)
_QTYPE = {t: QType[variants.get("gguf", t).tensor_type] for t in OUT_TYPES}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some checkpoints saved; llama.cpp recomputes them


@dataclass(frozen=True)
class _Planned:
    """One tensor of the output file: where it comes from and what it becomes."""

    hf_name: str
    file: Path
    gguf_name: str
    shape: tuple[int, ...]
    qtype: QType
    permute_heads: int  # 0 = no q/k permutation, else the head count to permute with
    offset: float = 0.0  # added to the values (Gemma norms)


def convert(hf_dir: Path, out_file: Path, out_type: str = "f16", name: str | None = None) -> dict:
    """Write `hf_dir` (config.json + safetensors + tokenizer) as one GGUF file; return what was written."""
    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_type not in OUT_TYPES:
        raise UserError(f"GGUF type {out_type!r} is not written by this converter; "
                        f"valid: {', '.join(OUT_TYPES)}")
    spec, hp, config = model_spec(hf_dir)
    locations = tensor_locations(hf_dir)
    plan, fallbacks = _plan(spec, hp, locations, out_type)
    n_rows = next(p.shape[0] for p in plan if p.gguf_name.startswith(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]))
    vocab = gguf_vocab.load(hf_dir, spec.vocab, n_rows, config)

    with atomic_writer(out_file, spec.arch) as writer:
        archs.add_metadata(writer, hp, out_type, name or hf_dir.name, n_rows)
        gguf_vocab.write(writer, vocab)
        for p in plan:
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)))
            writer.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with ExitStack() as stack:
            handles: dict[Path, SafeTensorsFile] = {}
            for p in plan:  # one tensor in memory at a time
                if p.file not in handles:
                    handles[p.file] = stack.enter_context(SafeTensorsFile(p.file))
                writer.write_tensor_data(_encode(p, handles[p.file].read_f32(p.hf_name)))
    types: dict[str, int] = {}
    for p in plan:
        types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
    return {"arch": MODEL_ARCH_NAMES[spec.arch], "out_type": out_type, "n_tensors": len(plan),
            "n_params": int(sum(np.prod(p.shape) for p in plan)), "tensor_types": types,
            "fallbacks": fallbacks, "vocab_size": len(vocab.tokens), "tokenizer": vocab.model,
            "size_bytes": out_file.stat().st_size}


@contextmanager
def atomic_writer(out_file: Path, arch):
    """A GGUFWriter on `out_file`.part, renamed into place when the block ends cleanly, removed otherwise."""
    tmp = out_file.with_name(out_file.name + ".part")
    writer = gguf.GGUFWriter(tmp, MODEL_ARCH_NAMES[arch])
    try:
        yield writer
        writer.close()
        os.replace(tmp, out_file)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half q/k rows -> llama.cpp's interleaved rope layout (per head: evens, odds)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of permute_qk: llama.cpp layout back to HF's."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def model_spec(hf_dir: Path) -> tuple[ArchSpec, dict, dict]:
    """(architecture spec, checked hyperparameters, raw config) of a transformers model dir."""
    config = _read_json(Path(hf_dir) / "config.json")
    spec = archs.arch_spec(config, Path(hf_dir))
    return spec, archs.hparams(config, Path(hf_dir), spec), config


def gguf_tensor_name(spec: ArchSpec, hf_stem: str) -> str | None:
    """GGUF name (without .weight) of HF module `hf_stem` (e.g. model.layers.3.mlp.up_proj), or None."""
    return _gguf_name(hf_stem, {k: TENSOR_NAMES[t] for k, t in spec.tensors.items()})


def qk_heads(spec: ArchSpec, hp: dict, hf_stem: str) -> int:
    """Head count to permute the rows of `hf_stem` with (0: no permutation)."""
    if spec.permute_qk and hf_stem.endswith(".q_proj"):
        return hp["heads"]
    if spec.permute_qk and hf_stem.endswith(".k_proj"):
        return hp["kv_heads"]
    return 0


def tensor_locations(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = hf_dir / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        missing = sorted({f for f in weight_map.values() if not (hf_dir / f).is_file()})
        if missing:
            raise UserError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return {k: hf_dir / f for k, f in weight_map.items()}
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"{hf_dir}: weights are pickle files ({', '.join(pickles)}), which are never "
                            "loaded (they can run code); re-save with "
                            "model.save_pretrained(dir, safe_serialization=True)")
        raise UserError(f"{hf_dir}: no *.safetensors weights found")
    out: dict[str, Path] = {}
    for f in files:
        with SafeTensorsFile(f) as st:
            for k in st.keys():
                if k in out:
                    raise UserError(f"{hf_dir}: tensor {k} is in both {out[k].name} and {f.name}")
                out[k] = f
    return out


def _plan(spec: ArchSpec, hp: dict, locations: dict[str, Path], out_type: str) -> tuple[list[_Planned], dict]:
    """Map every HF tensor to its GGUF name and type, in llama.cpp's order (embeddings, blocks, head)."""
    allowed = set(MODEL_TENSORS[spec.arch])
    templates = {}
    for hf_stem, t in spec.tensors.items():
        if t not in allowed:  # a table bug, not a user error
            raise ValueError(f"{t.name} is not a tensor of {MODEL_ARCH_NAMES[spec.arch]}")
        templates[hf_stem] = TENSOR_NAMES[t]
    planned, fallbacks = [], {}
    with ExitStack() as stack:
        handles: dict[Path, SafeTensorsFile] = {}
        for hf_name in locations:
            if hf_name.endswith(_IGNORED):
                continue
            if hf_name == "lm_head.weight" and hp["tied"]:
                continue  # tied: llama.cpp reads token_embd when output is absent
            stem, _, suffix = hf_name.rpartition(".")
            gguf_name = _gguf_name(stem, templates)
            if gguf_name is None or suffix not in ("weight", "bias"):
                raise UserError(f"tensor {hf_name} has no GGUF counterpart for "
                                f"{MODEL_ARCH_NAMES[spec.arch]}; the model has parameters this converter "
                                "does not know")
            if suffix == "bias" and not spec.biases:
                raise UserError(f"tensor {hf_name}: llama.cpp's {MODEL_ARCH_NAMES[spec.arch]} graph reads no "
                                "biases, so the file would compute another model")
            f = locations[hf_name]
            if f not in handles:
                handles[f] = stack.enter_context(SafeTensorsFile(f))
            shape = handles[f].shape(hf_name)
            heads = qk_heads(spec, hp, stem)
            qtype, why = _choose_type(shape, out_type)
            if why:
                fallbacks[f"{gguf_name}.{suffix}"] = why
            offset = spec.norm_offset if stem.endswith("norm") else 0.0
            planned.append(_Planned(hf_name, f, f"{gguf_name}.{suffix}", shape, qtype, heads, offset))
    if not any(p.gguf_name.startswith(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]) for p in planned):
        raise UserError("model has no model.embed_tokens.weight tensor")
    planned.sort(key=_order)
    return planned, fallbacks


def _gguf_name(stem: str, templates: dict[str, str]) -> str | None:
    if stem in templates:
        return templates[stem]
    parts = stem.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            key = ".".join(parts[:i] + ["{bid}"] + parts[i + 1:])
            if key in templates:
                return templates[key].format(bid=int(part))
    return None


def _order(p: _Planned) -> tuple:
    first = p.gguf_name.startswith(TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD])
    parts = p.gguf_name.split(".")
    block = int(parts[1]) if parts[0] == "blk" else -1
    return (0 if first else 1 if block >= 0 else 2, block, p.gguf_name)


def _choose_type(shape: tuple[int, ...], out_type: str) -> tuple[QType, str | None]:
    """Norms, biases (1-D) stay F32; 2-D weights get the target unless their rows don't fit its blocks."""
    if len(shape) < 2 or out_type == "f32":
        return QType.F32, None
    target = _QTYPE[out_type]
    block = gguf.GGML_QUANT_SIZES[target][0]
    if shape[-1] % block:
        return QType.F16, f"F16: row length {shape[-1]} is not a multiple of the {target.name} block {block}"
    return target, None


def _encode(p: _Planned, data: np.ndarray) -> np.ndarray:
    if p.offset:
        data = data + np.float32(p.offset)
    if p.permute_heads:
        data = permute_qk(data, p.permute_heads)
    if p.qtype == QType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if p.qtype == QType.F16:
        out = data.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(data).all():
            raise UserError(f"tensor {p.hf_name} overflows float16 (max |w| = {np.abs(data).max():.4g}); "
                            "export f32 or bf16 instead")
        return out
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), p.qtype)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not found; the GGUF writer needs a transformers model dir")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e})") from None
