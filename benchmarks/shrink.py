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

--smoke: no demo run. The teacher is the benchmarks' tiny RANDOM-WEIGHT Llama (benchmarks.common.build_smoke_model,
saved fp16 as the merge artifact of a run dir under OUT, the way tests build a tuned model), the data a
64-example slice of the embedded train split (16 eval), one ratio (0.5), 1 distillation epoch, 4 eval
prompts, 8 new tokens, the export gate's top-1 bars off (random weights): every step of the full run in
seconds. Its accuracies (and their shares of the teacher's) say nothing; its sizes are the tiny model's.

    .venv/bin/python benchmarks/shrink.py --smoke [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METRICS = ("key_fact", "rouge_l", "exact_match")
# --smoke: examples of the embedded split kept (train, eval), and the run's sizes
SMOKE_TRAIN, SMOKE_EVAL = 64, 16
SMOKE = dict(ratios="0.5", epochs=1.0, samples=4, candidates=2, calib_samples=16, max_new_tokens=8,
             decode_tokens=8, prompt_lengths=(16,), parity_samples=4)
FULL = dict(candidates=4, calib_samples=128, max_new_tokens=40, decode_tokens=16, prompt_lengths=(32,))


def ensure_tuned(run: Path):
    """The demo recipe's tuned model and data artifacts in `run`: finished stages with the recipe's ids are
    reused, anything else is (re)built by the pipeline."""
    from edgeft import artifact, pipeline, profile

    recipe = pipeline.load_recipe(REPO / "recipes" / "demo-toy.yaml", {})
    arts = pipeline.run(recipe, profile.load("x86-cpu"), run)
    tuned = arts.get("merge") or arts["train"]
    print("teacher: " + " <- ".join(f"{a.stage} {a.id}" for a in artifact.lineage(tuned.path)), flush=True)
    return tuned, arts["data"]


def smoke_tuned(run: Path):
    """--smoke: a run dir holding a slice of the embedded data and the tiny random-weight model (fp16) as
    its merge artifact, built in seconds (as tests/conftest.py's make_tiny_run does)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from benchmarks.common import SMOKE_MODEL, build_smoke_model
    from edgeft import artifact
    from edgeft.demo.manual import write_embedded_data
    from edgeft.records import read_jsonl, write_jsonl
    from edgeft.stages import data

    src = run / "embedded"
    src.mkdir(parents=True, exist_ok=True)
    write_embedded_data(src, 0)
    write_jsonl(src / "train-smoke.jsonl", read_jsonl(src / "train.jsonl")[:SMOKE_TRAIN])
    write_jsonl(src / "eval-smoke.jsonl", read_jsonl(src / "eval.jsonl")[:SMOKE_EVAL])
    data_art = data.run(None, data.Config(train=str(src / "train-smoke.jsonl"), eval=str(src / "eval-smoke.jsonl"),
                                          format="qa", manual=str(src / "manual.txt")), run / "data")

    def payload(staging: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix=artifact.scratch_prefix(run / "merge"), dir=run) as tmp:
            model = build_smoke_model(Path(tmp) / "model")
            for f in model.iterdir():
                if f.name != "model.safetensors":
                    shutil.copy2(f, staging / f.name)
            tensors = load_file(str(model / "model.safetensors"))
            save_file({k: v.to(torch.float16) for k, v in tensors.items()}, str(staging / "model.safetensors"),
                      metadata={"format": "pt"})
        return {}

    tuned = artifact.build(run / "merge", kind="hf", stage="merge", params={"model": "smoke", **SMOKE_MODEL,
                                                                           "weights": "random", "dtype": "float16"},
                           parent=None, payload=payload)
    print("teacher (--smoke, random weights): "
          + " <- ".join(f"{a.stage} {a.id}" for a in artifact.lineage(tuned.path)), flush=True)
    return tuned, data_art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="demo run dir (built if absent; default runs/demo)")
    ap.add_argument("--out", type=Path, default=None, help="work dir (default: RUN/shrink-bench)")
    ap.add_argument("--ratios", default="0.25,0.5", help="shares of parameters to prune")
    ap.add_argument("--epochs", type=float, default=12.0, help="distillation epochs over the train split")
    ap.add_argument("--samples", type=int, default=120, help="eval prompts measured (0 = all)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random-weight teacher built under OUT (no demo run), ratio 0.5, 1 distill epoch, "
                         "4 eval prompts: exercises every step, measures nothing")
    args = ap.parse_args()
    p = dict(FULL)
    if args.smoke:
        p.update(SMOKE)
        args.ratios, args.epochs, args.samples = p["ratios"], p["epochs"], p["samples"]
        if args.run is not None:
            ap.error("--smoke builds its own tiny run under --out: pass no --run")
        args.out = args.out or Path(tempfile.gettempdir()) / "edgeft-bench-shrink-smoke"
        args.run = args.out / "smoke-run"
    args.run = args.run or REPO / "runs" / "demo"

    from edgeft.bench.harness import Config as BenchConfig
    from edgeft.bench.harness import Target, run_bench
    from edgeft.constants import EVAL_FILE
    from edgeft.records import read_jsonl
    from edgeft.stages import distill, export_gguf, prune

    started = time.time()
    tuned, data = smoke_tuned(args.run) if args.smoke else ensure_tuned(args.run)
    out = args.out or args.run / "shrink-bench"
    out.mkdir(parents=True, exist_ok=True)
    # random weights (--smoke): the export gate's top-1 bars would only measure noise; its other checks still run
    gcfg = (export_gguf.Config(types=("q4_k_m",), parity_samples=p["parity_samples"], min_top1_q8_0=0.0,
                               min_top1_quant=0.0) if args.smoke else export_gguf.Config(types=("q4_k_m",)))
    fp16_bytes = (tuned.path / "model.safetensors").stat().st_size
    rows, variants, timings = {}, [Target("tuned", "torch", "fp32", str(tuned.path))], {}
    q4 = export_gguf.run(tuned, gcfg, out / "tuned-gguf")
    variants.append(Target("tuned-q4_k_m", "gguf", "q4_k_m", str(q4.path / "model-q4_k_m.gguf")))
    rows["tuned"] = {"params": tuned_params(tuned.path), "bytes": fp16_bytes}
    rows["tuned-q4_k_m"] = {"params": rows["tuned"]["params"], "bytes": gguf_bytes(q4)}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        tag = f"r{int(ratio * 100)}"
        t0 = time.time()
        pruned = prune.run(tuned, prune.Config(ratio=ratio, candidates=p["candidates"],
                                               calib_samples=p["calib_samples"], max_length=96),
                           out / f"{tag}-prune", data=data)
        t1 = time.time()
        dcfg = distill.Config(epochs=args.epochs, batch_size=16, lr=3e-3, max_length=96, temperature=1.0, alpha=0.5)
        student = distill.run(pruned, dcfg, out / f"{tag}-distill", data=data, teacher=tuned)
        t2 = time.time()
        gg = export_gguf.run(student, gcfg, out / f"{tag}-gguf")
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
    cfg = BenchConfig(max_samples=args.samples, max_new_tokens=p["max_new_tokens"], repeats=1, warmup=0,
                      decode_tokens=p["decode_tokens"], prompt_lengths=p["prompt_lengths"], ppl_tokens=0)
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
    if args.smoke:
        result.update(smoke=True, teacher="tiny random-weight Llama (benchmarks.common.SMOKE_MODEL), fp16: "
                                          "accuracies are noise, the run exercises the code path only",
                      wall_s=round(time.time() - started, 1))
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
