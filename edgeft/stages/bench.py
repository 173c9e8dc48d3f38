"""The bench stage: measure the base, the tuned model and every exported variant on the eval split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact
from edgeft.bench import report
from edgeft.bench.harness import Config as HarnessConfig
from edgeft.bench.harness import Variant, run_bench
from edgeft.constants import EVAL_FILE, KIND_BENCH, KIND_DATA, KIND_GGUF, KIND_HF, KIND_ONNX
from edgeft.data import read_jsonl

Config = HarnessConfig


def run(src: artifact.Artifact, cfg: Config, out: Path, *, data: artifact.Artifact,
        base: str | Path | None = None, exports: list[artifact.Artifact] = ()) -> artifact.Artifact:
    """Bench `src` (the tuned hf artifact, the reference) beside `base` and the export artifacts."""
    src = artifact.load(src.path, kind=KIND_HF)
    data = artifact.load(data.path, kind=KIND_DATA)
    exports = [artifact.load(e.path, kind=(KIND_GGUF, KIND_ONNX)) for e in exports]
    variants = [Variant("tuned", "torch", "fp32", str(src.path))]
    if base is not None:
        variants.append(Variant("base", "torch", "fp32", str(base)))
    for e in exports:
        variants += export_variants(e)
    inputs = {"data_id": data.id, "variants": {v.name: v.path for v in variants},
              "export_ids": [e.id for e in exports], "base": str(base) if base else None}

    def payload(tmp: Path) -> dict:
        records = run_bench(variants, read_jsonl(data.path / EVAL_FILE), src.path, cfg, tmp / "work")
        order = ["base", "tuned"] + [v.name for v in variants[2:]]
        records.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        for f in (tmp / "work").iterdir():
            f.unlink()
        (tmp / "work").rmdir()
        report.write(records, tmp)
        return {"variants": len(records), "samples": cfg.max_samples}

    return artifact.build(out, kind=KIND_BENCH, stage="bench", params=cfg, parent=src, payload=payload,
                          inputs=inputs)


def export_variants(art: artifact.Artifact) -> list[Variant]:
    """One variant per .gguf file or onnx model dir in an export artifact."""
    if art.kind == KIND_GGUF:
        return [Variant(f"gguf-{p.stem.split('-', 1)[-1]}", "gguf", p.stem.split("-", 1)[-1], str(p))
                for p in sorted(art.path.glob("*.gguf"))]
    return [Variant(f"onnx-{p.parent.name}", "onnx", p.parent.name, str(p.parent))
            for p in sorted(art.path.glob("*/model.onnx"))]
