"""Training memory: peak memory of qlora vs lora vs full on the same model, data and batch.

Each method runs the edgeft train stage in a fresh subprocess (so one run's peak never hides in
another's), batch 8, for a few optimizer steps, on --model (train_inputs.resolve_model): by default
the 58M-parameter Llama config of train_inputs.py (random weights, 32k vocab); `random:llama3.2-1b`
the real-size Llama 3.2 1B shape with random weights (where QLoRA's saving shows: on a GPU, a bf16
base against NF4); `smollm2` the real SmolLM2-135M-Instruct; or a local model dir. Peak memory is
the process's peak RSS (VmHWM) on CPU and torch.cuda.max_memory_allocated on GPU; step time is the
loop's wall time per step. Ratios are against `lora` measured in the same run.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/train_memory.py --out runs/bench/train_memory.json

--smoke: train_inputs.py's tiny model config (hidden 64, 2 layers; random weights, built under WORK/smoke)
with the benchmarks' cached 1024-piece smoke tokenizer (benchmarks.common.smoke_tokenizer), 2 steps, max_length
128, every variant still in its own process: every code path in seconds (most of it the four interpreters'
imports); its numbers say nothing about memory (a fresh interpreter's own footprint dominates).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> train.Config overrides. qlora with gradient checkpointing is how QLoRA is meant to run.
VARIANTS = {
    "qlora_gc": dict(method="qlora", gradient_checkpointing=True),
    "qlora": dict(method="qlora"),
    "lora": dict(method="lora"),
    "full": dict(method="full"),
}


def main() -> None:
    """Run every variant in its own process; print peak memory, step time and ratios vs lora; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="'' (the 58M random config), 'random:llama3.2-1b', 'smollm2' or a "
                                                "local transformers model dir (train_inputs.resolve_model)")
    ap.add_argument("--data", default="", help="JSONL of any edgeft format (default: the embedded demo QA)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--work", default="/tmp/edgeft-bench-train")
    ap.add_argument("--out", default="runs/bench/train_memory.json")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 2 steps, max_length 128: exercises every path, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        if args.model:
            raise SystemExit("--smoke trains its own tiny model; drop --model")
        args.steps, args.max_length = 2, 128
    if args.child:
        return child(args)

    started = time.time()
    model = None
    if not args.smoke:  # built (or refused) once here; every child then loads the same dir
        from benchmarks.train_inputs import model_shape, resolve_model

        model_dir, info = resolve_model(args.model, Path(args.work), False)
        model = {**info, **model_shape(model_dir)}
    results = {}
    for name in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--model", args.model, "--data", args.data,
                               "--steps", str(args.steps), "--max-length", str(args.max_length), "--work", args.work,
                               *(["--smoke"] if args.smoke else [])],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            print(f"{name}: FAILED {results[name]['error']}", flush=True)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]}", flush=True)
    ref = results.get("lora", {})
    key = "peak_cuda_mib" if ref.get("device") == "cuda" else "peak_rss_mib"
    print(f"\nvariant     {key:>14s}  vs lora   s/step  vs lora   trainable params")
    for name, r in results.items():
        if "error" in r or "error" in ref:
            continue
        r["memory_ratio_vs_lora"] = round(r[key] / ref[key], 3)
        r["step_time_ratio_vs_lora"] = round(r["s_per_step"] / ref["s_per_step"], 3)
        print(f"{name:10s} {r[key]:15.1f} {r['memory_ratio_vs_lora']:7.2f}x {r['s_per_step']:8.2f} "
              f"{r['step_time_ratio_vs_lora']:7.2f}x {r['trainable_params']:>12,d}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"memory_key": key, "steps": args.steps, "batch_size": 8, "max_length": args.max_length,
              "results": results, "wall_s": round(time.time() - started, 1)}
    if model:
        report["model"] = model
    if args.smoke:
        from benchmarks.train_inputs import SMOKE_CONFIG

        report.update(smoke=True, model={**SMOKE_CONFIG, "weights": "random"},
                      note="tiny model: the peaks are mostly the interpreter's and libraries' own; measures nothing")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def child(args) -> None:
    """One variant: train for `steps`, print one JSON line with its peaks."""
    import torch

    from benchmarks.common import peak_rss_mib
    from benchmarks.train_inputs import SMOKE_CONFIG, build_model, data_artifact, resolve_model
    from edgeft.stages import train

    work = Path(args.work)
    if args.smoke:
        work = work / "smoke"
        from benchmarks.common import smoke_tokenizer

        model_dir = build_model(work / "model-smoke", config=SMOKE_CONFIG, tokenizer=smoke_tokenizer())
    else:
        model_dir, _ = resolve_model(args.model, work, False)
    data_art, _ = data_artifact(args.data, work)
    cuda = torch.cuda.is_available()
    cfg = train.Config(**VARIANTS[args.child], max_steps=args.steps, batch_size=8, max_length=args.max_length,
                       lr=2e-4, eval_samples=0, log_every=1, seed=0,
                       compute_dtype="bfloat16" if cuda else "float32")
    out = work / f"mem-{args.child}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    m = train.run(str(model_dir), cfg, out, data=data_art).metrics
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"device": "cuda" if cuda else "cpu", "peak_rss_mib": round(peak_rss_mib(), 1),
                      "peak_cuda_mib": m.get("peak_cuda_mb"), "s_per_step": round(m["train_s"] / m["steps_run"], 3),
                      "tokens_per_s": m["tokens_per_s"], "trainable_params": m["trainable_params"],
                      "total_params": m["total_params"]}))


if __name__ == "__main__":
    main()
