"""The bench stage: measure the base, the tuned model and every exported variant on the eval split.

A data artifact built with retrieval (retrieval.json beside manual.txt) also gets each answer judged as
`edgeft ask` shows it: accuracy per split, abstention, citations, recall@k (edgeft.bench.grounded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from edgeft import artifact
from edgeft.bench import grounded, report, targets
from edgeft.bench.harness import Config as HarnessConfig
from edgeft.bench.harness import Target, run_bench
from edgeft.bench.select import select
from edgeft.constants import EVAL_FILE, KIND_BENCH, KIND_DATA, KIND_GGUF, KIND_HF, KIND_ONNX, MANUAL_HELDOUT_FILE
from edgeft.errors import UserError
from edgeft.records import read_jsonl

Config = HarnessConfig


def run(src: artifact.Artifact, cfg: Config, out: Path, *, data: artifact.Artifact,
        base: str | Path | None = None, exports: list[artifact.Artifact] = ()) -> artifact.Artifact:
    """Bench `src` (the tuned hf artifact, the reference) beside `base` and the export artifacts."""
    src = artifact.load(src.path, kind=KIND_HF)
    data = artifact.load(data.path, kind=KIND_DATA)
    exports = [artifact.load(e.path, kind=(KIND_GGUF, KIND_ONNX, KIND_HF)) for e in exports]
    variants = [Target("tuned", "torch", "fp32", str(src.path))]
    if base is not None:
        variants.append(Target("base", "torch", "fp32", str(base)))
    for e in exports:
        variants += export_variants(e)
    heldout = data.path / MANUAL_HELDOUT_FILE
    retrieval = grounded.from_data_dir(data.path)  # the manual and retriever the eval prompts were grounded with
    inputs = {"data_id": data.id, "variants": {v.name: v.path for v in variants},
              "export_ids": [e.id for e in exports], "base": str(base) if base else None}

    def payload(tmp: Path) -> dict:
        text = heldout.read_text() if heldout.is_file() else ""
        evals = read_jsonl(data.path / EVAL_FILE)
        records = run_bench(variants, evals, src.path, cfg, tmp / "work", text, retrieval)
        order = ["base", "tuned"] + [v.name for v in variants[2:]]
        records.sort(key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        _clear(tmp / "work")
        choice, line = selection(records, cfg)
        notes = [] if text else ["perplexity: '-' because the data artifact holds no held-out manual text "
                                 f"({MANUAL_HELDOUT_FILE}); pass data.manual to measure it"]
        notes += grounded.missing_note(evals, retrieval)
        notes += [f"{e.stage}: {e.metrics['dense_runtime_note']}" for e in exports
                  if e.metrics.get("dense_runtime_note")]
        report.write(records, tmp, line, notes)
        return {"variants": len(records), "samples": cfg.max_samples, "selected": choice}

    return artifact.build(out, kind=KIND_BENCH, stage="bench", params=cfg, parent=src, payload=payload,
                          inputs=inputs)


def selection(records: list[dict], cfg: Config) -> tuple[str | None, str]:
    """The variant the gate picks (or None) and the line the report shows about it."""
    try:
        pick = select(records, cfg)
    except UserError as e:
        return None, f"**Selected:** none. {e}"
    return pick["name"], (f"**Selected:** {pick['name']} ({pick['size_bytes']} bytes): keeps "
                          f"{pick['accuracy_kept']:.1%} of the tuned rouge_l (budget {cfg.accuracy_budget:.0%}), "
                          f"needs {pick['memory_mb']:.0f} MiB (budget {pick['memory_budget_mb']:.0f} MiB).")


def export_variants(art: artifact.Artifact) -> list[Target]:
    """One variant per .gguf file or onnx model dir in an export artifact; a pruned or distilled hf artifact
    is one torch variant named after its stage, and its exports carry that name (distill-gguf-q4_k_m)."""
    if art.kind == KIND_HF:
        return [Target(art.stage, "torch", "fp32", str(art.path))]
    parent = art.parent.get("stage")
    tag = f"{parent}-" if parent in ("prune", "distill") else ""
    return [dataclasses.replace(v, name=tag + v.name) for v in targets.export_variants(art.kind, art.path)]


def _clear(work: Path) -> None:
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
