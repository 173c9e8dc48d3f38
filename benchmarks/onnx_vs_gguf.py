"""ONNX INT4 vs llama.cpp GGUF Q4_K_M: decode and prefill speed beside bytes read per token and accuracy vs torch.

Sides, all exported from the same HF model dir and run with 2 threads:
- baseline: GGUF Q4_K_M by edgeft.stages.export_gguf (llama.cpp's quantizer: Q4_K blocks, with Q6_K for
  output.weight and some attn_v/ffn_down, F32 norms), run by edgeft.runtime.gguf (llama.cpp), F16 KV cache
  (llama.cpp's default and what devices run);
- ours (best): export_onnx route=genai int4 (onnxruntime-genai builder: fused QKV and gate/up,
  GroupQueryAttention, MatMulNBits 4-bit block 32 symmetric RTN on every MatMul including the head,
  accuracy_level 4 = int8 activations, embedding GatherBlockQuantized), run by GenaiRuntime; KV cache
  dtype read from the graph (fp32 on CPU);
- references: the same genai graph under the plain OnnxRuntime (Python token loop), and on the 0.35b
  (optimum-onnx's fp32 export peaks past 5 GiB RSS; --optimum-all runs it on 1.1b too) the optimum
  route int4 (MatMulNBits block 32, accuracy_level 4) under OnnxRuntime.
The precisions differ (Q4_K_M mixes in Q6_K; KV f16 vs fp32), so beside every speed it prints:
- bytes read per decoded token: weights streamed (edgeft.bench.footprint: every weight once, one row of
  an untied embedding) + the KV cache at the mean decode context, at each side's KV dtype;
- teacher-forced top-1 agreement and mean KL(torch fp32 || variant) on a small prompt set: the
  model's eval conversations (answer tokens) when its run data is found, else fixed texts.

Model: by default the random-weight configs of benchmarks/common.py (--models 0.35b,1.1b). Random
weights give flat logits, so accuracy there means little (the output says so) and the exports'
top-1 bars are off; the structural gates still run (tokenizer ids, GGUF F16 logits vs torch, ONNX
fp32 greedy == torch). `--model DIR` takes a trained hf model dir or hf artifact (e.g.
runs/demo/merge): the bars stay at the stages' defaults, and a bar that fails is reported and the
export redone without it so the comparison still runs.

Timing: every repeat runs each variant once in a fresh process (load, warm-up, one timed decode,
one timed prefill), round robin, the starting variant rotated each repeat; medians over repeats
(3). Decode: 128 new tokens after a 32-token prompt (EOS ignored). Prefill: a 256-token prompt,
tokens / time to first token. Prints ratios vs Q4_K_M, writes JSON; never asserts.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/onnx_vs_gguf.py [--models 0.35b,1.1b]
    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/onnx_vs_gguf.py --model runs/demo/merge
    .venv/bin/python benchmarks/onnx_vs_gguf.py --smoke   # tiny random model, 2 repeats, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import build_random_model, build_smoke_model  # noqa: E402
from benchmarks.onnx_vs_gguf_child import THREADS, _accuracy_sequences, _child, _CHILD, _REFERENCE  # noqa: E402

FULL = dict(decode_prompt=32, new_tokens=128, prefill_prompt=256, repeats=3, eval_convs=32, texts=4,
            parity_new_tokens=16)
SMOKE = dict(decode_prompt=8, new_tokens=16, prefill_prompt=32, repeats=2, eval_convs=4, texts=2,
             parity_new_tokens=4)
BASE = "gguf_q4_k_m"
GGUF_KV = "f16"  # GGUFRuntime's default: what llama.cpp and the devices run
FLAT_ENTROPY = 0.8  # torch's mean entropy above this share of log(vocab): flat logits, accuracy says little


def main() -> None:
    """Run the comparison for each model and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.35b,1.1b", help="random-weight configs of benchmarks/common.py")
    ap.add_argument("--model", help="a trained hf model dir or hf artifact (e.g. runs/demo/merge) instead of --models")
    ap.add_argument("--work", default="/tmp/edgeft-onnx-vs-gguf", help="scratch dir (deleted per model)")
    ap.add_argument("--optimum-all", action="store_true", help="the optimum route on every model, not just 0.35b")
    ap.add_argument("--repeats", type=int, help="timed runs per variant (default 3; --smoke 2)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model (unless --model), 2 repeats, few tokens; the genai route only if "
                         ".venv-genai exists")
    ap.add_argument("--out", default="onnx_vs_gguf.json")
    args = ap.parse_args()
    p = dict(SMOKE if args.smoke else FULL)
    if args.repeats:
        p["repeats"] = args.repeats
    genai_missing = _genai_missing()
    if genai_missing and not args.smoke:
        sys.exit(f"the genai route (ours) needs its converter env: {genai_missing}")
    report = {"smoke": args.smoke, "threads": THREADS,
              "decode": f"{p['new_tokens']} new tokens after {p['decode_prompt']}",
              "prefill": f"{p['prefill_prompt']}-token prompt / time to first token",
              "repeats": p["repeats"], "timing": "each repeat: every variant once in a fresh process (load, "
              "warm-up, one timed decode, one timed prefill), round robin, start rotated; medians over repeats",
              "baseline": BASE, "cpu": _cpu(), "genai_skipped": genai_missing, "models": {}}
    if genai_missing:
        print(f"onnx_genai_int4 and its plain-ORT reference SKIPPED: {genai_missing}", flush=True)
    if args.model:
        jobs = [(Path(args.model).resolve().name, "given")]
    else:
        jobs = [("smoke", "random")] if args.smoke else [(n, "random") for n in args.models.split(",")]
    model_dir = Path(args.model).resolve() if args.model else None
    for name, origin in jobs:
        work = Path(args.work) / name
        shutil.rmtree(work, ignore_errors=True)
        # optimum's fp32 export of the 1.1b peaks past 5 GiB RSS: there only with --optimum-all
        with_optimum = args.smoke or args.optimum_all or model_dir is not None or name == "0.35b"
        try:
            report["models"][name] = _one_model(name, origin, model_dir, work, p, with_optimum, not genai_missing)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # GBs of weights: never left behind
        _write(args.out, report)
    print(f"wrote {args.out}")


def _one_model(name: str, origin: str, model_dir: Path | None, work: Path, p: dict, with_optimum: bool,
               with_genai: bool) -> dict:
    from edgeft import artifact
    from edgeft.bench import footprint
    from edgeft.constants import EVAL_FILE, KIND_HF, MANIFEST_NAME
    from edgeft.stages import export_gguf, export_onnx
    from edgeft.training import hf_io

    random_weights = origin == "random"
    work.mkdir(parents=True, exist_ok=True)
    if model_dir is not None and (model_dir / MANIFEST_NAME).is_file():
        src = artifact.load(model_dir, kind=KIND_HF)  # its lineage gives the stages (and us) its eval data
    else:
        if model_dir is not None:
            hf_dir = work / "hf-src"
            shutil.copytree(model_dir, hf_dir)
        elif name == "smoke":
            hf_dir = build_smoke_model(work / "hf-src")
        else:
            hf_dir = build_random_model(work / "hf-src", name)
        src = artifact.build(work / "hf", kind="hf", stage="bench-input", params={"model": name}, parent=None,
                             payload=lambda d: [shutil.move(str(f), d / f.name) for f in hf_dir.iterdir()] and {})
    cfg = json.loads((src.path / "config.json").read_text())
    data = hf_io.run_data(src, EVAL_FILE)
    res: dict = {"model": {"source": str(model_dir) if model_dir else f"random weights, benchmarks/common.py {name}",
                           "weights": "random" if random_weights else "given (--model)",
                           "config": {k: cfg.get(k) for k in ("model_type", "hidden_size", "intermediate_size",
                                                              "num_hidden_layers", "num_attention_heads",
                                                              "num_key_value_heads", "vocab_size")}},
                 "gates": {}, "export_s": {}, "variants": {}}

    # accuracy prompt set and torch's teacher-forced logits on it (in a child: the parent never holds the model)
    seqs, prompt_set = _accuracy_sequences(src.path, data, p)
    ref_path = work / "torch-reference.npz"
    ref = _child(_REFERENCE, {"model": str(src.path), "sequences": seqs, "threads": THREADS, "out": str(ref_path)})
    max_ent = math.log(cfg["vocab_size"])
    flat = ref["mean_entropy_nats"] > FLAT_ENTROPY * max_ent
    res["accuracy_prompts"] = {**prompt_set, "sequences": len(seqs), "positions": sum(e - s for _, s, e in seqs),
                               "reference": "torch fp32 (transformers), teacher-forced on the same ids",
                               "reference_mean_entropy_nats": ref["mean_entropy_nats"], "max_entropy_nats": max_ent,
                               "reference_mean_top1_prob": ref["mean_top1_prob"], "flat_logits": flat}
    bars_on = not random_weights
    bars_why = ("stage defaults (trained weights)" if bars_on else
                "off (0.0): random weights give flat logits, where top-1 is a coin toss between near-equal "
                "logits; the structural checks still run")
    why_note = (f"RANDOM WEIGHTS: flat logits (torch's mean entropy {ref['mean_entropy_nats']:.2f} of at most "
                f"{max_ent:.2f} nats), so top-1 and KL mean little here; run with --model DIR (a trained "
                "model, e.g. runs/demo/merge) for accuracy that does" if flat or random_weights else None)
    if flat and not random_weights:
        why_note = why_note.replace("RANDOM WEIGHTS", "GIVEN MODEL HAS")
    res["accuracy_note"] = why_note

    # GGUF: F16 too, so the stage's logits-vs-torch layout check (F16 gate file) runs; Q4_K_M is timed
    nobar = dict(min_top1_q8_0=0.0, min_top1_quant=0.0)
    gcfg = export_gguf.Config(types=("f16", "q4_k_m"), threads=THREADS, parity_samples=32,
                              **({} if bars_on else nobar))
    t0 = time.perf_counter()
    gg, failed = _export(lambda c: export_gguf.run(src, c, work / "gguf"), gcfg,
                         export_gguf.Config(**{**_fields(gcfg), **nobar}), bars_on)
    res["export_s"]["gguf_q4_k_m"] = round(time.perf_counter() - t0, 1)
    par = gg.metrics["parity"]
    n_eval = par.get("eval_prompts")
    res["gates"]["gguf"] = {
        "bars": bars_why, "min_top1_quant": gcfg.min_top1_quant, "failed": failed,
        "checked": ("tokenizer ids == HF on fixed texts" + (" and the eval prompts" if n_eval else "")
                    + "; F16 file's logits within 0.02 relative of torch fp32 and greedy equal where torch is "
                      "decisive; every file loads and generates"
                    + (f"; teacher-forced top-1 >= bar on {n_eval} eval conversations" if n_eval else
                       " (no eval data: the teacher-forced bar has nothing to check)")),
        "files": {t: {k: v for k, v in f.items() if k != "decisive_mismatches"} for t, f in par["files"].items()}}
    q4 = export_gguf.gguf_file(gg, "q4_k_m")
    variants = [dict(name=BASE, role="baseline", kind="gguf", path=q4, fmt="gguf", kv=GGUF_KV,
                     weights=gg.metrics["files"]["q4_k_m"]["tensor_types"],
                     what="GGUF Q4_K_M (llama.cpp quantizer) via llama.cpp (edgeft.runtime.gguf.GGUFRuntime)")]

    ocfg = dict(types=("int4",), parity_new_tokens=p["parity_new_tokens"], parity_samples=32,
                **({} if bars_on else {"min_top1_int4": 0.0}))
    routes = (["genai"] if with_genai else []) + (["optimum"] if with_optimum else [])
    for route in routes:
        key = f"onnx_{route}_int4"
        c = export_onnx.Config(route=route, **ocfg)
        t0 = time.perf_counter()
        art, failed = _export(lambda c, out=work / f"onnx-{route}": export_onnx.run(src, c, out), c,
                              export_onnx.Config(**{**_fields(c), "min_top1_int4": 0.0}), bars_on)
        res["export_s"][key] = round(time.perf_counter() - t0, 1)
        gate = art.metrics["types"]["int4"]
        res["gates"][f"onnx_{route}"] = {
            "bars": bars_why, "min_top1_int4": c.min_top1_int4, "failed": failed,
            "checked": "tokenizer ids == HF; fp32 base greedy == torch fp32 on every parity prompt (near-ties "
                       "excepted); int4 teacher-forced top-1 >= bar",
            "fp32": art.metrics.get("fp32_gate"), "int4": {k: v for k, v in gate.items() if k != "quant"},
            "parity_prompts": art.metrics.get("parity_prompts")}
        d = art.path / "int4"
        weights = _onnx_weights(d)
        if route == "genai":
            res["genai_quant"] = gate.get("quant")
            res["genai_versions"] = art.metrics["route"].get("converter_versions")
            variants.append(dict(name=key, role="ours", kind="genai", path=d, fmt="onnx", kv=weights["kv_cache"],
                                 weights=weights, what="ONNX int4, onnxruntime-genai builder, run by "
                                                       "onnxruntime-genai (edgeft.runtime.onnx_genai.GenaiRuntime)"))
            variants.append(dict(name=f"{key}_plain_ort", role="reference", kind="onnx", path=d, fmt="onnx",
                                 kv=weights["kv_cache"], weights=weights,
                                 what="the same genai graph, Python token loop over plain onnxruntime "
                                      "(edgeft.runtime.onnx.OnnxRuntime)"))
        else:
            variants.append(dict(name=key, role="reference" if with_genai else "ours (genai route skipped)",
                                 kind="onnx", path=d, fmt="onnx", kv=weights["kv_cache"], weights=weights,
                                 what="ONNX int4, optimum-onnx fp32 export + MatMulNBits/GatherBlockQuantized, "
                                      "run by plain onnxruntime (edgeft.runtime.onnx.OnnxRuntime)"))

    # what each variant reads per decoded token, and how close it is to torch
    ctx = p["decode_prompt"] + p["new_tokens"] / 2  # mean cached positions over the decode run
    for v in variants:
        kv_bytes = {"f16": 2, "fp16": 2, "f32": 4, "fp32": 4}[v["kv"]]
        fp = footprint.of_variant(v["fmt"], v["path"], kv_bytes)
        weight_bpt = fp.touched_bytes  # an int4 embedding (GatherBlockQuantized) counts one row per token
        acc = _child(_CHILD, {"mode": "accuracy", "kind": v["kind"], "path": str(v["path"]), "threads": THREADS,
                              "kv_type": GGUF_KV, "reference": str(ref_path), "sequences": seqs,
                              "n_ctx": max(len(s[0]) for s in seqs) + 8})
        size = v["path"].stat().st_size if v["fmt"] == "gguf" else \
            sum(f.stat().st_size for f in v["path"].glob("model.onnx*"))
        res["variants"][v["name"]] = {
            "role": v["role"], "what": f"{v['what']}, KV cache {v['kv']}, {THREADS} threads",
            "kv_cache": v["kv"], "weights": v["weights"], "size_bytes": size, "params": fp.params,
            "weight_bytes_per_token": weight_bpt, "kv_bytes_per_token": fp.kv_bytes_per_pos * ctx,
            "bytes_per_token": weight_bpt + fp.kv_bytes_per_pos * ctx, "decode_context_mean": ctx,
            "tf_top1_agreement": acc["tf_top1_agreement"], "tf_kld": acc["tf_kld"],
            "tf_positions": acc["tf_positions"], "decode_runs": [], "prefill_runs": [], "peak_rss_mib_runs": [],
            "load_s_runs": []}

    # timing: round robin over fresh processes, the first variant rotated each repeat
    vocab, bos = cfg["vocab_size"], cfg.get("bos_token_id", 1)
    bos = bos if isinstance(bos, int) else 1
    ids = lambda n: [bos] + [(i * 7919) % (vocab - 100) + 50 for i in range(n - 1)]  # noqa: E731
    n_ctx = max(p["decode_prompt"] + p["new_tokens"], p["prefill_prompt"] + 1) + 8
    for r in range(p["repeats"]):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            m = _child(_CHILD, {"mode": "time", "kind": v["kind"], "path": str(v["path"]), "threads": THREADS,
                                "kv_type": GGUF_KV, "n_ctx": n_ctx, "decode_ids": ids(p["decode_prompt"]),
                                "prefill_ids": ids(p["prefill_prompt"]), "new_tokens": p["new_tokens"]})
            rec = res["variants"][v["name"]]
            rec["decode_runs"].append(m["decode_tok_s"])
            rec["prefill_runs"].append(m["prefill_tok_s"])
            rec["peak_rss_mib_runs"].append(m["peak_rss_mib"])
            rec["load_s_runs"].append(m["load_s"])
    for rec in res["variants"].values():
        rec["decode_tok_s"] = statistics.median(rec["decode_runs"])
        rec["prefill_tok_s"] = statistics.median(rec["prefill_runs"])
        rec["peak_rss_mib"] = statistics.median(rec["peak_rss_mib_runs"])
        rec["load_s"] = statistics.median(rec["load_s_runs"])
        rec["streamed_gbs"] = rec["decode_tok_s"] * rec["bytes_per_token"] / 1e9  # what decode actually pulls

    base = res["variants"][BASE]
    res["ratios_vs_q4_k_m"] = {k: {"decode": v["decode_tok_s"] / base["decode_tok_s"],
                                   "prefill": v["prefill_tok_s"] / base["prefill_tok_s"],
                                   "size": v["size_bytes"] / base["size_bytes"],
                                   "bytes_per_token": v["bytes_per_token"] / base["bytes_per_token"]}
                               for k, v in res["variants"].items() if k != BASE}
    res["ratios_per_repeat"] = {k: {"decode": [a / b for a, b in zip(v["decode_runs"], base["decode_runs"])],
                                    "prefill": [a / b for a, b in zip(v["prefill_runs"], base["prefill_runs"])]}
                                for k, v in res["variants"].items() if k != BASE}
    _print(name, res, p)
    return res


def _export(run, cfg, cfg_nobar, bars_on: bool):
    """(artifact, None), or, when a top-1 bar fails, (the artifact exported without the bar, the failure)."""
    from edgeft.errors import StageFailure

    try:
        return run(cfg), None
    except StageFailure as e:
        if not bars_on or "top-1" not in str(e):
            raise
        print(f"GATE FAILED (reported, export redone without the top-1 bar): {e}", flush=True)
        return run(cfg_nobar), str(e)


def _fields(cfg) -> dict:
    from dataclasses import fields

    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def _onnx_weights(model_dir: Path) -> dict:
    """What an ONNX graph computes in: MatMulNBits settings, quantized gathers, float MatMuls, KV cache dtype."""
    import onnx

    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    attrs = {(a.name, onnx.helper.get_attribute_value(a)) for n in nbits for a in n.attribute
             if a.name in ("bits", "block_size", "accuracy_level")}
    kv = next((i.type.tensor_type.elem_type for i in m.graph.input if i.name.startswith("past_key_values")), 1)
    return {"MatMulNBits": len(nbits), "MatMulNBits_attrs": sorted(f"{k}={v}" for k, v in attrs),
            "MatMulNBits_zero_points": any(len(n.input) > 3 and n.input[3] for n in nbits),
            "GatherBlockQuantized": sum(n.op_type == "GatherBlockQuantized" for n in m.graph.node),
            "float_MatMul_with_weights": sum(n.op_type in ("MatMul", "Gemm") and any(x in inits for x in n.input)
                                             for n in m.graph.node),
            "kv_cache": {1: "fp32", 10: "fp16", 16: "bf16"}.get(kv, str(kv))}


def _print(name: str, res: dict, p: dict) -> None:
    acc = res["accuracy_prompts"]
    print(f"\n[{name}] model: {res['model']['source']} ({res['model']['weights']})", flush=True)
    if res["accuracy_note"]:
        print(f"  NOTE {res['accuracy_note']}")
    print(f"  accuracy prompt set: {acc['source']}; {acc['positions']} positions vs {acc['reference']}")
    print("  gates: " + "; ".join(f"{k}: bars {g['bars'].split(':')[0]}{', FAILED' if g['failed'] else ''}"
                                   for k, g in res["gates"].items()))
    print(f"  sides ({THREADS} threads each; KV cache types: " + ", ".join(
        f"{k} {v['kv_cache']}" for k, v in res["variants"].items()) + "):")
    for k, v in res["variants"].items():
        print(f"    {k:28s} {v['role']}: {v['what']}; weights {json.dumps(v['weights'], separators=(',', ':'))}")
    print(f"  decode {p['new_tokens']} tokens after {p['decode_prompt']}, prefill {p['prefill_prompt']}; median of "
          f"{p['repeats']} interleaved runs [min-max]; bytes/token = weights + KV at {p['decode_prompt']}+"
          f"{p['new_tokens'] // 2} cached positions; top-1/KL teacher-forced vs torch fp32:")
    for k, v in res["variants"].items():
        r = res["ratios_vs_q4_k_m"].get(k, {"decode": 1.0, "prefill": 1.0, "bytes_per_token": 1.0, "size": 1.0})
        print(f"    {k:28s} decode {v['decode_tok_s']:8.1f} tok/s ({r['decode']:.2f}x) "
              f"[{min(v['decode_runs']):.1f}-{max(v['decode_runs']):.1f}]  prefill {v['prefill_tok_s']:8.1f} tok/s "
              f"({r['prefill']:.2f}x)  bytes/token {v['bytes_per_token'] / 2**20:7.2f} MiB ({r['bytes_per_token']:.2f}x"
              f", KV {v['kv_bytes_per_token'] / 2**20:.2f} {v['kv_cache']}) -> {v['streamed_gbs']:5.1f} GB/s  "
              f"top-1 {v['tf_top1_agreement']:.3f} KL {v['tf_kld']:.4f}  {v['size_bytes'] / 2**20:7.1f} MiB "
              f"({r['size']:.2f}x)  peak RSS {v['peak_rss_mib']:.0f} MiB", flush=True)


def _genai_missing() -> str | None:
    """Why the genai route cannot run here, or None."""
    from edgeft.errors import UserError
    from edgeft.onnx import genai

    try:
        genai.converter_python()
    except UserError as e:
        return str(e)
    return None


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _write(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
