"""ONNX 8-bit on a real model: what each int8 recipe loses against torch fp32, and its size and decode speed.

All variants come from one optimum-onnx fp32 export of the model (export_onnx's fp32 route) and run under
edgeft.runtime.onnx.OnnxRuntime:
- fp32: the export itself (the baseline of the size and speed ratios);
- dyn_*: onnxruntime's dynamic quantization (quantize_dynamic, MatMulInteger: int8 weights, activations
  quantized per tensor to uint8 at run time), as edgeft's int8 was made before: per-tensor or per-channel
  weight scales, reduce_range (7-bit weights), with the embedding Gather or the MLP's down projection left
  fp32, or the tied LM head quantized too (its Transpose folded into a constant);
- w8_*: 8-bit MatMulNBits (edgeft.onnx.quant.quantize_int8): every MatMul with weights, the LM head included,
  one fp32 scale per block of 16, 32 or 128 weights, accuracy_level 0 (activations stay fp32) or 4 (int8 per
  block at run time), the embedding as an 8-bit GatherBlockQuantized; _smoothNN: SmoothQuant at alpha 0.NN
  first (edgeft.onnx.smooth, calibrated on eval prompts outside the measured sample); _fp32_X: X left fp32;
  _only_X: only X quantized (sensitivity);
- stage_int8: export_onnx's int8 from its Config defaults (what the stage ships).
Beside them, where activations carry outliers: per projection type, torch's max |input| / rms over the
sampled prompts (a per-tensor uint8 step is range / 255: the larger this ratio, the fewer levels the
typical activation gets).

Accuracy: teacher-forced top-1 agreement (with its one-sided 95% lower bound over prompts, edgeft.parity_stats),
mean KL(torch || variant) and max |logit diff| against torch fp32 on the torch greedy continuation of
each sampled prompt (the export gate's positions: eval prompts of the model's run data, spread, plus fixed
texts). Speed: decode tok/s, 2 threads, NEW tokens after a 32-token prompt (EOS ignored), median of REPEATS
after a warm-up, variants interleaved per repeat. Prints ratios vs fp32, writes JSON; never asserts.

    flock /tmp/edgeft-heavy.lock nice -n 10 .venv/bin/python benchmarks/onnx_int8.py --model runs/smollm2/merge
    .venv/bin/python benchmarks/onnx_int8.py --smoke   # tiny random model, few prompts, ~15 s
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import build_smoke_model, peak_rss_mib  # noqa: E402

THREADS = 2
FULL = dict(samples=64, parity_new_tokens=16, prompt=32, new_tokens=64, repeats=3)
SMOKE = dict(samples=4, parity_new_tokens=4, prompt=8, new_tokens=8, repeats=2)
# name -> how it is made: ("dynamic", quantize_dynamic kwargs, options) or ("w8", quantize_int8 kwargs)
VARIANTS = {
    "dyn_tensor": ("dynamic", dict(per_channel=False, reduce_range=False), {}),
    "dyn_channel_rr": ("dynamic", dict(per_channel=True, reduce_range=True), {}),  # edgeft's int8 until now
    "dyn_channel": ("dynamic", dict(per_channel=True, reduce_range=False), {}),
    "dyn_channel_rr_fp32_gather": ("dynamic", dict(per_channel=True, reduce_range=True, op_types=["MatMul"]), {}),
    "dyn_channel_rr_fp32_down": ("dynamic", dict(per_channel=True, reduce_range=True), {"exclude": "down_proj"}),
    "dyn_channel_rr_head": ("dynamic", dict(per_channel=True, reduce_range=True), {"fold_head": True}),
    "w8_b32_acc0": ("w8", dict(block_size=32, accuracy_level=0), {}),
    "w8_b128_acc0": ("w8", dict(block_size=128, accuracy_level=0), {}),
    "w8_b32_acc4": ("w8", dict(block_size=32, accuracy_level=4), {}),
    "w8_b128_acc4": ("w8", dict(block_size=128, accuracy_level=4), {}),
    "w8_b16_acc4": ("w8", dict(block_size=16, accuracy_level=4), {}),
    "w8_b32_acc0_fp32_head": ("w8", dict(block_size=32, accuracy_level=0, head=False), {}),
    "w8_b32_acc4_fp32_head": ("w8", dict(block_size=32, accuracy_level=4, head=False), {}),
    "w8_b32_acc0_fp32_emb": ("w8", dict(block_size=32, accuracy_level=0, embeddings=False), {}),
    "w8_b32_acc4_fp32_down": ("w8", dict(block_size=32, accuracy_level=4), {"exclude": "down_proj"}),
    "w8_b32_acc0_fp32_down": ("w8", dict(block_size=32, accuracy_level=0), {"exclude": "down_proj"}),
    # the MatMuls whose input peaks above OUTLIER x its rms on the sampled prompts keep fp32 weights
    "w8_b32_acc4_fp32_outliers": ("w8", dict(block_size=32, accuracy_level=4), {"outliers": True}),
}
OUTLIER = 100.0  # max|x| / rms(x) at a MatMul input above which w8_*_fp32_outliers keeps it fp32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# activation outliers moved into the weights first (SmoothQuant, edgeft.onnx.smooth), at strength alpha
VARIANTS.update({f"w8_b{b}_acc4_smooth{int(a * 100)}": ("w8", dict(block_size=b, accuracy_level=4, smooth_alpha=a),
                                                         {"calibrate": True})
                 for b in (16, 32) for a in (0.5, 0.8)})
# and the LM head (untied) left in fp32: where the logits are formed, every flip of a near-tie starts there
VARIANTS.update({f"w8_b{b}_acc4_smooth50_fp32_head": ("w8", dict(block_size=b, accuracy_level=4, smooth_alpha=0.5),
                                                      {"calibrate": True, "exclude": "lm_head"}) for b in (16, 32)})
# export_onnx's own int8, from its Config defaults (int8_*), calibrated as the stage calibrates
VARIANTS["stage_int8"] = ("stage", {}, {"calibrate": True})
VARIANTS["fp32_smooth80"] = ("smooth", dict(smooth_alpha=0.8), {"calibrate": True})  # the rewrite alone: exact?
# what a plain run measures (--variants all: every variant above and below)
DEFAULT_VARIANTS = ("dyn_tensor", "dyn_channel_rr", "dyn_channel_rr_fp32_down", "w8_b32_acc0", "w8_b32_acc4",
                    "w8_b16_acc4", "w8_b16_acc4_smooth50", "w8_b16_acc4_smooth50_fp32_head", "stage_int8")
# sensitivity: one projection type quantized (accuracy_level 4), everything else float
VARIANTS.update({f"w8_b32_acc4_only_{k}": ("w8", dict(block_size=32, accuracy_level=4, embeddings=False,
                                                      head=k == "lm_head"), {"only": k}) for k in PROJECTIONS})


def main() -> None:
    """Export fp32 once, make every variant, measure accuracy, size and decode speed; write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an hf artifact or model dir (e.g. runs/smollm2/merge); --smoke: a tiny one")
    ap.add_argument("--fp32", help="an existing fp32 ONNX dir of that model (skips the export)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated names, or all: " + ",".join(VARIANTS))
    ap.add_argument("--samples", type=int, help="eval prompts sampled (default 64; --smoke 4)")
    ap.add_argument("--work", default="/tmp/edgeft-onnx-int8", help="scratch dir (variants are deleted after)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few prompts and tokens")
    ap.add_argument("--no-decode", action="store_true", help="accuracy only (no decode timing)")
    ap.add_argument("--out", default="onnx_int8.json")
    args = ap.parse_args()
    if not args.smoke and not args.model:
        ap.error("--model DIR is needed (or --smoke)")
    p = dict(SMOKE if args.smoke else FULL)
    if args.samples is not None:
        p["samples"] = args.samples
    names = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work = Path(args.work)
    shutil.rmtree(work / "variants", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = _run(args, p, names, work)
    finally:
        shutil.rmtree(work / "variants", ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def _run(args, p: dict, names: list[str], work: Path) -> dict:
    from edgeft import artifact
    from edgeft.constants import EVAL_FILE, MANIFEST_NAME
    from edgeft.onnx import parity as onnx_parity
    from edgeft.onnx import quant as Q
    from edgeft.onnx.smooth import input_absmax
    from edgeft.records import read_jsonl
    from edgeft.runtime.onnx import OnnxRuntime
    from edgeft.stages import export_onnx as ex
    from edgeft.training import hf_io

    hf_dir = Path(args.model).resolve() if args.model else build_smoke_model(work / "hf-smoke")
    data = None
    if (hf_dir / MANIFEST_NAME).is_file():
        data = hf_io.run_data(artifact.load(hf_dir), EVAL_FILE)
    records = read_jsonl(data.path / EVAL_FILE) if data else None
    all_prompts = onnx_parity.build_prompts(hf_dir, records)
    prompts = onnx_parity.sample_prompts(all_prompts, p["samples"])
    cfg = json.loads((hf_dir / "config.json").read_text())
    report = {"smoke": args.smoke, "cpu": _cpu(), "threads": THREADS, "model": str(hf_dir),
              "config": {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                                 "tie_word_embeddings")},
              "prompts": {"source": str(data.path / EVAL_FILE) if data else "fixed texts (no run data found)",
                          "sampled": len(prompts), "parity_new_tokens": p["parity_new_tokens"]},
              "decode": f"{p['new_tokens']} new tokens after a {p['prompt']}-token prompt, {THREADS} threads, "
                        f"median of {p['repeats']} after a warm-up, variants interleaved",
              "repeats": p["repeats"], "variants": {}}
    fp32 = Path(args.fp32) if args.fp32 else work / "fp32"
    if not (fp32 / "model.onnx").is_file():
        t0 = time.perf_counter()
        ex.optimum_export(hf_dir, fp32)
        report["fp32_export_s"] = round(time.perf_counter() - t0, 1)
    with onnx_parity.TorchModel(hf_dir) as torch_model:
        report["activation_outliers"], per_module = _outliers(torch_model.model, prompts[: max(4, len(prompts) // 4)])
        report["outlier_modules"] = {m: v for m, v in sorted(per_module.items()) if v[0] > OUTLIER}
        # smoothing is calibrated on prompts outside the measured sample (the fixed texts' and eval prompts the
        # sample skipped), so it is not fitted to what it is scored on
        calib, _ = onnx_parity.calibration_prompts(all_prompts, prompts, ex.Config().int8_calibration_prompts)
        absmax = input_absmax(torch_model.model, [c.ids for c in calib])
        report["prompts"]["calibration"] = len(calib)
        rt = OnnxRuntime(fp32, n_threads=1)
        refs = onnx_parity.torch_references(torch_model, prompts, rt, p["parity_new_tokens"])
        rt.close()
        dirs = {"fp32": fp32}
        for name in names:
            out = work / "variants" / name
            t0 = time.perf_counter()
            how = _make(name, fp32, out, Q, per_module, absmax)
            dirs[name] = out
            report["variants"][name] = {"how": how, "quantize_s": round(time.perf_counter() - t0, 1)}
            print(f"{name}: made in {report['variants'][name]['quantize_s']} s", flush=True)
        report["variants"] = {"fp32": {"how": "optimum-onnx fp32 export"}, **report["variants"]}
        for name, d in dirs.items():
            rec = report["variants"][name]
            rec["size_bytes"] = Q.model_bytes(d)
            rec.update(_accuracy(d, refs, torch_model.logits))
            print(f"{name}: top-1 {rec['top1_agreement']:.4f} (95% lb {rec['top1_lower95']:.4f}) KL {rec['kld']:.4g} "
                  f"max|diff| {rec['max_abs_logit_diff']:.3g} over {rec['positions']} positions", flush=True)
    if args.no_decode:
        p["repeats"] = report["repeats"] = 0
    _time_decode(dirs, report, p)
    base = report["variants"]["fp32"]
    for rec in report["variants"].values():
        rec["decode_tok_s"] = statistics.median(rec["decode_runs"]) if rec["decode_runs"] else None
        rec["vs_fp32"] = {"size": rec["size_bytes"] / base["size_bytes"],
                          "decode": rec["decode_tok_s"] / base["decode_tok_s"] if rec["decode_runs"] else None}
    report["peak_rss_mib"] = round(peak_rss_mib(), 1)
    _print(report)
    return report


def _make(name: str, fp32: Path, out: Path, Q, outliers: dict, absmax: dict) -> dict:
    """Write variant `name` from the fp32 dir; returns what was applied."""
    kind, kwargs, opts = VARIANTS[name]
    if kind == "stage":
        from edgeft.stages import export_onnx as ex

        c = ex.Config()
        return Q.quantize_int8(fp32, out, block_size=c.int8_block_size, accuracy_level=c.int8_accuracy_level,
                               embeddings=c.int8_embeddings, large=False, absmax=absmax,
                               keep_float=("lm_head",) if c.int8_float_head else (), smooth_alpha=c.int8_smooth_alpha)
    if kind == "smooth":
        import onnx

        from edgeft.onnx.smooth import smooth

        Q.copy_sidecars(fp32, out)
        model = onnx.load(str(fp32 / "model.onnx"))
        untied = Q.fold_weight_transposes(model.graph)
        done = smooth(model.graph, absmax, kwargs["smooth_alpha"])
        onnx.save(model, str(out / "model.onnx"))
        return {"method": "smoothing only (fp32)", "untied_transposes": untied, "smoothed_matmuls": len(done), **kwargs}
    if kind == "w8":
        import onnx

        graph = onnx.load(str(fp32 / "model.onnx"), load_external_data=False).graph
        modules = {Q.module_path(n.name) for n in graph.node if n.op_type == "MatMul"}
        keep = [m for m in modules if opts.get("exclude") and m.endswith(opts["exclude"])]
        keep += [m for m in modules if opts.get("only") and not m.endswith(opts["only"])]
        keep += [m for m, (ratio, _) in outliers.items() if opts.get("outliers") and ratio > OUTLIER and m in modules]
        return Q.quantize_int8(fp32, out, **{"embeddings": True, "large": False, **kwargs}, keep_float=keep,
                               absmax=absmax if opts.get("calibrate") else None)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    Q.copy_sidecars(fp32, out)
    src = fp32 / "model.onnx"
    model = onnx.load(str(src))
    how = {"method": "quantize_dynamic", "weight_type": "QInt8", **kwargs}
    if opts.get("fold_head"):
        how["untied_transposes"] = Q.fold_weight_transposes(model.graph)
    exclude = [n.name for n in model.graph.node if opts.get("exclude") and opts["exclude"] in n.name
               and n.op_type == "MatMul"]
    if exclude:
        how["fp32_nodes"] = len(exclude)
    tmp = out / "pre.onnx"
    onnx.save(model, str(tmp))
    with Q.quiet(""):
        quantize_dynamic(tmp, out / "model.onnx", weight_type=QuantType.QInt8, per_channel=kwargs["per_channel"],
                         reduce_range=kwargs["reduce_range"], op_types_to_quantize=kwargs.get("op_types"),
                         nodes_to_exclude=exclude)
    tmp.unlink()
    return how


def _accuracy(model_dir: Path, refs: list, torch_logits) -> dict:
    """Teacher-forced agreement with torch on the reference continuations (the export gate's reducer)."""
    from edgeft.parity_stats import Agreement
    from edgeft.runtime.onnx import OnnxRuntime

    rt = OnnxRuntime(model_dir, n_threads=THREADS)
    stats = Agreement()
    try:
        for ref in refs:
            seq = ref.prompt + ref.tokens
            stats.add(torch_logits(seq), rt.logits(seq), start=len(ref.prompt) - 1, label=ref.label)
    finally:
        rt.close()
    return {**stats.summary(), "worst_prompt": list(stats.worst)}


def _outliers(model, prompts: list) -> tuple[dict, dict]:
    """Per projection type: max over layers and prompts of max|input| / rms(input), and the median layer's;
    and per module: (that ratio, max|input|), maxima over the prompts."""
    import torch

    seen: dict[str, list[float]] = {}
    hooks = []
    for name, mod in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in PROJECTIONS:
            def hook(m, inp, _out, kind=kind, name=name):
                x = inp[0].detach().float()
                ratio = float(x.abs().max() / x.pow(2).mean().sqrt().clamp_min(1e-12))
                seen.setdefault(kind, []).append((ratio, name, float(x.abs().max())))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for pr in prompts:
                model(torch.tensor([pr.ids]))
    finally:
        for h in hooks:
            h.remove()
    per_module: dict[str, tuple[float, float]] = {}
    for vals in seen.values():
        for ratio, name, peak in vals:
            old = per_module.get(name, (0.0, 0.0))
            per_module[name] = (round(max(old[0], ratio), 1), round(max(old[1], peak), 1))
    out = {}
    for kind, vals in seen.items():
        worst = max(vals)
        out[kind] = {"max_over_rms_worst": round(worst[0], 1), "worst_module": worst[1],
                     "max_abs_worst": round(worst[2], 1),
                     "max_over_rms_median": round(statistics.median(v[0] for v in vals), 1)}
    return out, per_module


def _time_decode(dirs: dict[str, Path], report: dict, p: dict) -> None:
    from edgeft.runtime.onnx import OnnxRuntime

    vocab = report["config"]["vocab_size"]
    ids = [1] + [(i * 7919) % (vocab - 100) + 50 for i in range(p["prompt"] - 1)]
    names = list(dirs)
    for rec in report["variants"].values():
        rec["decode_runs"] = []
    for r in range(p["repeats"]):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rt = OnnxRuntime(dirs[name], n_threads=THREADS)
            rt.generate(ids, 4, ignore_eos=True)  # warm-up: arenas, prepacking
            res = rt.generate(ids, p["new_tokens"], ignore_eos=True)
            rt.close()
            report["variants"][name]["decode_runs"].append((len(res.tokens) - 1) / res.decode_s)


def _print(report: dict) -> None:
    print(f"\nCPU {report['cpu']}; {report['prompts']['sampled']} prompts ({report['prompts']['source']}); "
          f"decode: {report['decode']}")
    print(f"MatMul inputs peaking above {OUTLIER:g} x rms (kept fp32 by *_fp32_outliers): "
          + ", ".join(f"{m} {r:g}x ({p:g})" for m, (r, p) in report["outlier_modules"].items()))
    print("activation outliers (torch, max|x| / rms at each projection's input; worst layer, median layer):")
    for kind, o in report["activation_outliers"].items():
        print(f"  {kind:10s} worst {o['max_over_rms_worst']:7.1f} ({o['worst_module']}, max|x| {o['max_abs_worst']})"
              f"  median {o['max_over_rms_median']:6.1f}")
    for name, v in report["variants"].items():
        print(f"  {name:28s} top-1 {v['top1_agreement']:.4f} (lb {v['top1_lower95']:.4f}) KL {v['kld']:<9.4g} "
              f"max|diff| {v['max_abs_logit_diff']:<7.3g} {v['size_bytes'] / 2**20:7.1f} MiB ({v['vs_fp32']['size']:.2f}x)"
              + (f"  decode {v['decode_tok_s']:6.1f} tok/s ({v['vs_fp32']['decode']:.2f}x)" if v["decode_runs"] else ""),
              flush=True)


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
