"""Shrink the embedded default: prune 25% and 50% of the tuned model's parameters, distill, then Q4_K_M.

The teacher is the demo's tuned model: the demo recipe is run through the pipeline into --run (default
runs/demo), so a finished stage is reused only when its artifact id (parent, params, input hashes) is the
demo recipe's; a run dir holding another recipe's model is rebuilt, never silently used. The teacher's id
and lineage are printed. For each ratio: prune (edgeft.stages.prune), distill from the teacher (edgeft.stages.distill),
export Q4_K_M (edgeft.stages.export_gguf). Every model is then measured by the bench harness on the same
eval prompts (trained facts asked in unseen phrasings): key_fact, rouge_l, exact_match, each as a share of
the tuned teacher's, and its size as a ratio to the fp16 tuned model. Target (issue 4): >= 90% of the
teacher's accuracy with an artifact >= 6x smaller. Prints a table and writes JSON; it never asserts.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/shrink.py [--run runs/demo] [--ratios 0.25,0.5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METRICS = ("key_fact", "rouge_l", "exact_match")


def ensure_tuned(run: Path):
    """The demo recipe's tuned model and data artifacts in `run`: finished stages with the recipe's ids are
    reused, anything else is (re)built by the pipeline."""
    from edgeft import artifact, pipeline, profile

    recipe = pipeline.load_recipe(REPO / "recipes" / "demo.yaml", {})
    arts = pipeline.run(recipe, profile.load("x86-cpu"), run)
    tuned = arts.get("merge") or arts["train"]
    print("teacher: " + " <- ".join(f"{a.stage} {a.id}" for a in artifact.lineage(tuned.path)), flush=True)
    return tuned, arts["data"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="demo run dir (built if absent)")
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: RUN/shrink-bench)")
    ap.add_argument("--ratios", default="0.25,0.5", help="shares of parameters to prune")
    ap.add_argument("--epochs", type=float, default=12.0, help="distillation epochs over the train split")
    ap.add_argument("--samples", type=int, default=120, help="eval prompts measured (0 = all)")
    args = ap.parse_args()

    from edgeft.bench.harness import Config as BenchConfig
    from edgeft.bench.harness import Target, run_bench
    from edgeft.constants import EVAL_FILE
    from edgeft.records import read_jsonl
    from edgeft.stages import distill, export_gguf, prune

    tuned, data = ensure_tuned(args.run)
    out = args.out or args.run / "shrink-bench"
    out.mkdir(parents=True, exist_ok=True)
    fp16_bytes = (tuned.path / "model.safetensors").stat().st_size
    rows, variants, timings = {}, [Target("tuned", "torch", "fp32", str(tuned.path))], {}
    q4 = export_gguf.run(tuned, export_gguf.Config(types=("q4_k_m",)), out / "tuned-gguf")
    variants.append(Target("tuned-q4_k_m", "gguf", "q4_k_m", str(q4.path / "model-q4_k_m.gguf")))
    rows["tuned"] = {"params": tuned_params(tuned.path), "bytes": fp16_bytes}
    rows["tuned-q4_k_m"] = {"params": rows["tuned"]["params"], "bytes": gguf_bytes(q4)}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        tag = f"r{int(ratio * 100)}"
        t0 = time.time()
        pruned = prune.run(tuned, prune.Config(ratio=ratio, candidates=4, calib_samples=128, max_length=96),
                           out / f"{tag}-prune", data=data)
        t1 = time.time()
        dcfg = distill.Config(epochs=args.epochs, batch_size=16, lr=3e-3, max_length=96, temperature=1.0, alpha=0.5)
        student = distill.run(pruned, dcfg, out / f"{tag}-distill", data=data, teacher=tuned)
        t2 = time.time()
        gg = export_gguf.run(student, export_gguf.Config(types=("q4_k_m",)), out / f"{tag}-gguf")
        timings[tag] = {"prune_s": round(t1 - t0, 1), "distill_s": round(t2 - t1, 1),
                        "distill_steps": student.metrics["steps"], "sizes": pruned.metrics["sizes_after"],
                        "kept_layers": pruned.metrics["kept_layers"]}
        n = pruned.metrics["params_after"]
        rows[f"{tag}-pruned"] = {"params": n, "bytes": (pruned.path / "model.safetensors").stat().st_size}
        rows[f"{tag}-distilled"] = {"params": n, "bytes": (student.path / "model.safetensors").stat().st_size}
        rows[f"{tag}-distilled-q4_k_m"] = {"params": n, "bytes": gguf_bytes(gg)}
        variants += [Target(f"{tag}-pruned", "torch", "fp32", str(pruned.path)),
                     Target(f"{tag}-distilled", "torch", "fp32", str(student.path)),
                     Target(f"{tag}-distilled-q4_k_m", "gguf", "q4_k_m", str(gg.path / "model-q4_k_m.gguf"))]
    cfg = BenchConfig(max_samples=args.samples, max_new_tokens=40, repeats=1, warmup=0, decode_tokens=16,
                      prompt_lengths=(32,), ppl_tokens=0)
    records = run_bench(variants, read_jsonl(data.path / EVAL_FILE), tuned.path, cfg, out / "bench-work")
    by = {r["name"]: r for r in records}
    teacher = by["tuned"]
    table = []
    for name, row in rows.items():
        r = by[name]
        entry = {"name": name, "params": row["params"], "bytes": row["bytes"],
                 "smaller_than_fp16": round(fp16_bytes / row["bytes"], 2)}
        for m in METRICS:
            entry[m] = r.get(m)
            entry[f"{m}_kept"] = round(r[m] / teacher[m], 3) if teacher.get(m) and r.get(m) is not None else None
        table.append(entry)
    result = {"run": str(args.run), "teacher_fp16_bytes": fp16_bytes, "samples": args.samples,
              "distill_epochs": args.epochs, "rows": table, "timings": timings, "target": {"accuracy_kept": 0.9,
                                                                                           "smaller": 6.0}}
    (out / "shrink.json").write_text(json.dumps(result, indent=2) + "\n")
    cols = ["name", "params", "bytes", "smaller_than_fp16", *METRICS, *(f"{m}_kept" for m in METRICS)]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for e in table:
        print("| " + " | ".join(str(e[c]) for c in cols) + " |")
    for tag, t in timings.items():
        print(f"{tag}: sizes {t['sizes']}, kept blocks {t['kept_layers']}, prune {t['prune_s']} s, "
              f"distill {t['distill_s']} s ({t['distill_steps']} steps)")
    print(f"wrote {out / 'shrink.json'}")


def tuned_params(path: Path) -> int:
    """Parameter count of an hf model dir, from its safetensors header (no weights loaded)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        total = 0
        for k in f.keys():
            n = 1
            for d in f.get_slice(k).get_shape():
                n *= d
            total += n
    return total


def gguf_bytes(art) -> int:
    """Size of the Q4_K_M file of a gguf artifact."""
    return (art.path / "model-q4_k_m.gguf").stat().st_size


if __name__ == "__main__":
    main()
