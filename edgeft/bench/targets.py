"""What `edgeft bench` measures: variants found in bundles, artifact dirs, model dirs or .gguf files.

Torch-free. A torch model dir (hf artifact) is accepted on the build host only; on a device the
variants are GGUF files and ONNX model dirs, and the first one given is the reference for the
teacher-forced agreement and KL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft import variants
from edgeft.artifact import read_manifest
from edgeft.bench import grounded
from edgeft.bench.harness import Target
from edgeft.constants import (
    BUNDLE_FILE,
    BUNDLE_MODEL_DIR,
    EVAL_FILE,
    KIND_BENCH,
    KIND_DATA,
    KIND_GGUF,
    KIND_HF,
    KIND_ONNX,
    MANUAL_HELDOUT_FILE,
    REPORT_JSON,
)
from edgeft.errors import UserError


@dataclass
class Targets:
    """Variants to measure, the tokenizer to feed them, and reports already written (bench dirs, bundles)."""

    variants: list[Target]
    tokenizer_dir: Path | None
    reports: list[list[dict]]
    retrieval: grounded.Retrieval | None = None  # the manual and retriever a bundle ships (the first one found)


def export_variants(kind: str, path: Path) -> list[Target]:
    """The variants an export artifact built, from its manifest (edgeft.variants names the files); a directory
    without a manifest holds model files that say their own type (GGUF header, ONNX type dir)."""
    metrics = _manifest(path).get("metrics") or {}
    if kind == KIND_GGUF and isinstance(metrics.get("files"), dict):
        lora = (metrics.get("adapter") or {}).get("file")
        return [_target(variants.get("gguf", t), path / meta["file"], str(path / lora) if lora else "")
                for t, meta in sorted(metrics["files"].items())]
    if kind == KIND_ONNX and isinstance(metrics.get("types"), dict):
        return [_target(variants.get("onnx", t), path / variants.get("onnx", t).file) for t in sorted(metrics["types"])
                if (path / variants.get("onnx", t).file / "model.onnx").is_file()]
    if kind == KIND_GGUF:
        return [t for p in sorted(path.glob("*.gguf")) if (t := gguf_file(p)) is not None]
    return [_target(variants.get("onnx", p.parent.name), p.parent) for p in sorted(path.glob("*/model.onnx"))
            if f"onnx:{p.parent.name}" in variants.VARIANTS]


def gguf_file(p: Path) -> Target | None:
    """A loose .gguf file as a target, its type read from its header; None for a LoRA adapter or an imatrix."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(p).fields
    except (ValueError, OSError) as e:
        raise UserError(f"bench: {p}: not a readable GGUF file ({e}); pass a model .gguf") from None

    def value(key):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()

    kind = value("general.type")  # llama.cpp writes "adapter" (LoRA) or "imatrix"; models say "model" or nothing
    if (kind is not None and bytes(kind).decode() != "model") or "imatrix.chunk_count" in fields:
        return None
    file_type = value("general.file_type")
    v = variants.gguf_from_file_type(int(file_type[0])) if file_type else None
    if v is None:
        raise UserError(f"bench: {p}: its general.file_type {file_type} is none of "
                        f"{', '.join(variants.quants('gguf'))}; convert it with edgeft export_gguf")
    return _target(v, p)


def _target(v, path: Path, lora: str = "") -> Target:
    return Target(v.name, v.format, v.quant, str(path), lora)


def _manifest(path: Path) -> dict:
    return read_manifest(path) or {}


def discover(paths: list[Path]) -> Targets:
    """Variants from every path; a bench artifact dir or a bundle's report adds its records instead."""
    t = Targets([], None, [])
    for p in paths:
        found, tok = _one(Path(p), t)
        for v in found:
            if v.format == "torch" and not any(x.format == "torch" for x in t.variants):
                v = Target("tuned", v.format, v.quant, v.path)  # the first torch model is the reference
            if any(x.name == v.name for x in t.variants):
                v = Target(f"{v.name}@{Path(v.path).parent.name}", v.format, v.quant, v.path)
            t.variants.append(v)
        if t.tokenizer_dir is None and tok is not None and (tok / "tokenizer.json").is_file():
            t.tokenizer_dir = tok
    return t


def eval_set(path: Path, heldout: Path | None) -> tuple[list[dict], str]:
    """Eval records and held-out manual text from a data artifact dir or a JSONL file (+ a .txt)."""
    from edgeft.records import load_records, read_jsonl

    path = Path(path)
    text = ""
    if path.is_dir():
        kind = _kind(path)
        if kind != KIND_DATA:
            raise UserError(f"--eval: {path} is not a data artifact (kind {kind}); pass its eval JSONL or "
                            "the run's data dir")
        records = read_jsonl(path / EVAL_FILE)
        if (path / MANUAL_HELDOUT_FILE).is_file():
            text = (path / MANUAL_HELDOUT_FILE).read_text()
    else:
        records = load_records(path)
    if heldout is not None:
        if not Path(heldout).is_file():
            raise UserError(f"--heldout: file not found: {heldout}")
        text = Path(heldout).read_text(encoding="utf-8")
    return records, text


def _one(p: Path, t: Targets) -> tuple[list[Target], Path | None]:
    if p.is_file() and p.suffix == ".gguf":
        t = gguf_file(p)
        if t is None:
            raise UserError(f"bench: {p} is a LoRA adapter or an importance matrix, not a model; pass the model .gguf")
        return [t], p.parent
    if not p.is_dir():
        raise UserError(f"bench: {p}: not a .gguf file or a directory; pass a bundle, an artifact dir, "
                        "an ONNX model dir or a .gguf file")
    if (p / BUNDLE_FILE).is_file():
        bundle = verified_bundle(p)  # as `ask` does: a tampered bundle is refused, never measured
        spec = bundle.spec["variant"]
        if REPORT_JSON in bundle.blobs:
            t.reports.append(json.loads(bundle.blobs[REPORT_JSON]))
        t.retrieval = t.retrieval or grounded.from_bundle(bundle)
        lora = str(p / spec["lora"]) if spec.get("lora") else ""
        return [Target(spec["name"], spec["format"], spec["quant"], str(p / spec["path"]), lora)], \
            p / BUNDLE_MODEL_DIR
    kind = _kind(p)
    if kind == KIND_BENCH:
        t.reports.append(json.loads((p / REPORT_JSON).read_text()))
        return [], None
    if kind in (KIND_GGUF, KIND_ONNX):
        vs = export_variants(kind, p)
        return vs, (p if kind == KIND_GGUF else (Path(vs[0].path) if vs else p))
    if kind == KIND_DATA:
        raise UserError(f"bench: {p} is a data artifact; pass it as --eval")
    if (p / "model.onnx").is_file():
        if f"onnx:{p.name}" not in variants.VARIANTS:
            raise UserError(f"bench: {p}: an ONNX model dir is named for its type ({', '.join(variants.quants('onnx'))})"
                            "; rename it or pass its export artifact dir")
        return [_target(variants.get("onnx", p.name), p)], p
    if kind == KIND_HF or ((p / "config.json").is_file() and any(p.glob("*.safetensors"))):
        return [Target(p.name, "torch", "fp32", str(p))], p
    vs = export_variants(KIND_GGUF, p) + export_variants(KIND_ONNX, p)
    if not vs:
        raise UserError(f"bench: {p}: no bundle.json, manifest, .gguf file or */model.onnx found; pass a bundle, "
                        "an export artifact dir or a model file")
    return vs, p


def verified_bundle(p: Path):
    """Open and verify a bundle as `ask` does (signature against the device's trusted keys, if any)."""
    from edgeft.device.bundle import open_bundle
    from edgeft.device.signing import trusted_keys

    bundle = open_bundle(p, trusted=trusted_keys(None))
    bundle.close()  # the bench workers open the model themselves
    return bundle


def _kind(p: Path) -> str | None:
    return _manifest(p).get("kind")
