"""What `edgeft bench` measures: variants found in bundles, artifact dirs, model dirs or .gguf files.

Torch-free. A torch model dir (hf artifact) is accepted on the build host only; on a device the
variants are GGUF files and ONNX model dirs, and the first one given is the reference for the
teacher-forced agreement and KL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeft.bench.harness import Variant
from edgeft.constants import (BUNDLE_FILE, BUNDLE_MODEL_DIR, EVAL_FILE, KIND_BENCH, KIND_DATA, KIND_GGUF,
                              KIND_HF, KIND_ONNX, MANIFEST_NAME, MANUAL_HELDOUT_FILE, REPORT_JSON)
from edgeft.errors import UserError


_NOT_MODELS = ("imatrix", "adapter")  # GGUF files an export writes beside its models


@dataclass
class Targets:
    """Variants to measure, the tokenizer to feed them, and reports already written (bench dirs, bundles)."""

    variants: list[Variant]
    tokenizer_dir: Path | None
    reports: list[list[dict]]


def export_variants(kind: str, path: Path) -> list[Variant]:
    """The variants an export artifact built, from its manifest (never every .gguf lying there: the imatrix
    and a LoRA adapter are GGUF files too); a directory without a manifest is globbed for model files."""
    metrics = _manifest(path).get("metrics") or {}
    if kind == KIND_GGUF and isinstance(metrics.get("files"), dict):
        lora = (metrics.get("adapter") or {}).get("file")
        return [Variant(f"gguf-{t}", "gguf", t, str(path / meta["file"]), str(path / lora) if lora else "")
                for t, meta in sorted(metrics["files"].items())]
    if kind == KIND_ONNX and isinstance(metrics.get("types"), dict):
        return [Variant(f"onnx-{t}", "onnx", t, str(path / t)) for t in sorted(metrics["types"])
                if (path / t / "model.onnx").is_file()]
    if kind == KIND_GGUF:
        return [Variant(f"gguf-{p.stem.split('-', 1)[-1]}", "gguf", p.stem.split("-", 1)[-1], str(p))
                for p in sorted(path.glob("*.gguf")) if not p.name.startswith(_NOT_MODELS)]
    return [Variant(f"onnx-{p.parent.name}", "onnx", p.parent.name, str(p.parent))
            for p in sorted(path.glob("*/model.onnx"))]


def _manifest(path: Path) -> dict:
    m = path / MANIFEST_NAME
    try:
        return json.loads(m.read_text()) if m.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{m}: corrupt manifest; rebuild the artifact") from None


def discover(paths: list[Path]) -> Targets:
    """Variants from every path; a bench artifact dir or a bundle's report adds its records instead."""
    t = Targets([], None, [])
    for p in paths:
        found, tok = _one(Path(p), t)
        for v in found:
            if v.format == "torch" and not any(x.format == "torch" for x in t.variants):
                v = Variant("tuned", v.format, v.quant, v.path)  # the first torch model is the reference
            if any(x.name == v.name for x in t.variants):
                v = Variant(f"{v.name}@{Path(v.path).parent.name}", v.format, v.quant, v.path)
            t.variants.append(v)
        if t.tokenizer_dir is None and tok is not None and (tok / "tokenizer.json").is_file():
            t.tokenizer_dir = tok
    return t


def eval_set(path: Path, heldout: Path | None) -> tuple[list[dict], str]:
    """Eval records and held-out manual text from a data artifact dir or a JSONL file (+ a .txt)."""
    from edgeft.data import load_records, read_jsonl

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


def _one(p: Path, t: Targets) -> tuple[list[Variant], Path | None]:
    if p.is_file() and p.suffix == ".gguf":
        q = p.stem.split("-", 1)[-1]
        return [Variant(f"gguf-{q}", "gguf", q, str(p))], p.parent
    if not p.is_dir():
        raise UserError(f"bench: {p}: not a .gguf file or a directory; pass a bundle, an artifact dir, "
                        "an ONNX model dir or a .gguf file")
    if (p / BUNDLE_FILE).is_file():
        bundle = verified_bundle(p)  # as `ask` does: a tampered bundle is refused, never measured
        spec = bundle.spec["variant"]
        if REPORT_JSON in bundle.blobs:
            t.reports.append(json.loads(bundle.blobs[REPORT_JSON]))
        lora = str(p / spec["lora"]) if spec.get("lora") else ""
        return [Variant(spec["name"], spec["format"], spec["quant"], str(p / spec["path"]), lora)], \
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
        return [Variant(f"onnx-{p.name}", "onnx", p.name, str(p))], p
    if kind == KIND_HF or ((p / "config.json").is_file() and any(p.glob("*.safetensors"))):
        return [Variant(p.name, "torch", "fp32", str(p))], p
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
    m = p / MANIFEST_NAME
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text()).get("kind")
    except json.JSONDecodeError:
        raise UserError(f"{m}: corrupt manifest; rebuild the artifact") from None
