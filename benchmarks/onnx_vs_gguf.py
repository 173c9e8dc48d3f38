"""ONNX INT4 vs llama.cpp GGUF Q4_K_M: decode and prefill tokens/s on real-size random-weight Llama configs.

For each model (benchmarks/common.py: 0.35b, 1.1b), from the same HF dir:
- baseline: GGUF Q4_K_M made by edgeft.stages.export_gguf, run by edgeft.runtime.gguf (llama.cpp);
- ours (best): export_onnx route=genai int4 (onnxruntime-genai builder: fused QKV and gate/up,
  GroupQueryAttention, MatMulNBits block 32 symmetric, accuracy_level 4), run by GenaiRuntime;
- references: the same genai graph under the plain OnnxRuntime (Python token loop), and on the 0.35b
  (optimum-onnx's fp32 export peaks past 5 GiB RSS; --optimum-all runs it on 1.1b too) the
  optimum route int4 (MatMulNBits block 32, accuracy_level 4) under OnnxRuntime.
Random weights give flat logits, so the exports' accuracy minimums are off here (the gates still
run; the demo run checks accuracy). Each measurement runs in its own process with 2 threads:
warm-up, then median of 3. Decode: 128 new tokens after a 32-token prompt (EOS ignored). Prefill: a
256-token prompt, tokens / time to first token. Prints ratios vs Q4_K_M, writes JSON; never asserts.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/onnx_vs_gguf.py [--models 0.35b,1.1b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import build_random_model  # noqa: E402

DECODE_PROMPT, NEW_TOKENS, PREFILL_PROMPT, REPEATS, THREADS = 32, 128, 256, 3, 2

_MEASURE = """
import json, statistics, sys
kind, path, threads, n_dec, n_new, n_pre, repeats, vocab = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:9])
ids = lambda n: [1] + [(i * 7919) % (vocab - 100) + 50 for i in range(n - 1)]
n_ctx = max(n_dec + n_new, n_pre + 1) + 8
if kind == "gguf":
    from edgeft.runtime.gguf import GGUFRuntime
    rt = GGUFRuntime(path, n_threads=threads, n_ctx=n_ctx)
elif kind == "genai":
    from edgeft.runtime.onnx_genai import GenaiRuntime
    rt = GenaiRuntime(path, n_threads=threads, n_ctx=n_ctx)
else:
    from edgeft.runtime.onnx import OnnxRuntime
    rt = OnnxRuntime(path, n_threads=threads)
rt.generate(ids(n_dec), 16, ignore_eos=True)  # warm-up: page the weights in, build kernels
rt.generate(ids(n_pre), 1, ignore_eos=True)
dec, pre = [], []
for _ in range(repeats):
    r = rt.generate(ids(n_dec), n_new, ignore_eos=True)
    dec.append((len(r.tokens) - 1) / r.decode_s)
    r = rt.generate(ids(n_pre), 1, ignore_eos=True)
    pre.append(n_pre / r.ttft_s)
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"decode_runs": dec, "prefill_runs": pre, "decode_tok_s": statistics.median(dec),
                  "prefill_tok_s": statistics.median(pre), "peak_rss_mib": hwm / 1024,
                  "load_s": getattr(rt, "load_s", None)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.35b,1.1b")
    ap.add_argument("--work", default="/tmp/edgeft-onnx-vs-gguf", help="scratch dir (deleted per model)")
    ap.add_argument("--optimum-all", action="store_true", help="the optimum route on every model, not just 0.35b")
    ap.add_argument("--out", default="onnx_vs_gguf.json")
    args = ap.parse_args()
    report = {"threads": THREADS, "decode": f"{NEW_TOKENS} new tokens after {DECODE_PROMPT}",
              "prefill": f"{PREFILL_PROMPT}-token prompt / time to first token",
              "repeats": REPEATS, "cpu": _cpu(), "models": {}}
    for name in args.models.split(","):
        work = Path(args.work) / name
        shutil.rmtree(work, ignore_errors=True)
        try:
            report["models"][name] = _one_model(name, work, args.optimum_all or name == "0.35b")
        finally:
            shutil.rmtree(work, ignore_errors=True)  # GBs of weights: never left behind
        _write(args.out, report)
    print(f"wrote {args.out}")


def _one_model(name: str, work: Path, with_optimum: bool) -> dict:
    from edgeft import artifact
    from edgeft.stages import export_gguf, export_onnx

    hf_dir = build_random_model(work / "hf-src", name)
    src = artifact.build(work / "hf", kind="hf", stage="bench-input", params={"model": name}, parent=None,
                         payload=lambda d: [shutil.move(str(p), d / p.name) for p in hf_dir.iterdir()] and {})
    res: dict = {"variants": {}, "export_s": {}}

    t0 = time.perf_counter()
    gg = export_gguf.run(src, export_gguf.Config(types=("q4_k_m",), threads=THREADS, min_top1_q8_0=0.0,
                                                 min_top1_quant=0.0), work / "gguf")
    res["export_s"]["gguf_q4_k_m"] = round(time.perf_counter() - t0, 1)
    q4 = next(gg.path.glob("*q4_k_m*.gguf"))
    vocab = json.loads((src.path / "config.json").read_text())["vocab_size"]
    res["variants"]["gguf_q4_k_m"] = {"size_bytes": q4.stat().st_size, **_measure("gguf", q4, vocab)}

    t0 = time.perf_counter()
    og = export_onnx.run(src, export_onnx.Config(types=("int4",), route="genai", min_top1_int4=0.0,
                                                 parity_new_tokens=4), work / "onnx-genai")
    res["export_s"]["onnx_genai_int4"] = round(time.perf_counter() - t0, 1)
    res["genai_quant"] = og.metrics["types"]["int4"].get("quant")
    res["genai_versions"] = og.metrics["route"].get("converter_versions")
    d = og.path / "int4"
    size = sum(p.stat().st_size for p in d.glob("model.onnx*"))
    res["variants"]["onnx_genai_int4"] = {"size_bytes": size, **_measure("genai", d, vocab)}
    res["variants"]["onnx_genai_int4_plain_ort"] = {"size_bytes": size, **_measure("onnx", d, vocab)}
    shutil.rmtree(og.path)

    if with_optimum:
        t0 = time.perf_counter()
        oo = export_onnx.run(src, export_onnx.Config(types=("int4",), route="optimum", min_top1_int4=0.0,
                                                     parity_new_tokens=4), work / "onnx-optimum")
        res["export_s"]["onnx_optimum_int4"] = round(time.perf_counter() - t0, 1)
        d = oo.path / "int4"
        res["variants"]["onnx_optimum_int4"] = {
            "size_bytes": sum(p.stat().st_size for p in d.glob("model.onnx*")), **_measure("onnx", d, vocab)}
        shutil.rmtree(oo.path)

    base = res["variants"]["gguf_q4_k_m"]
    res["ratios_vs_q4_k_m"] = {k: {"decode": round(v["decode_tok_s"] / base["decode_tok_s"], 3),
                                   "prefill": round(v["prefill_tok_s"] / base["prefill_tok_s"], 3),
                                   "size": round(v["size_bytes"] / base["size_bytes"], 3)}
                               for k, v in res["variants"].items() if k != "gguf_q4_k_m"}
    print(f"[{name}] {THREADS} threads, median of {REPEATS}:")
    for k, v in res["variants"].items():
        r = res["ratios_vs_q4_k_m"].get(k, {"decode": 1.0, "prefill": 1.0})
        print(f"  {k:28s} decode {v['decode_tok_s']:7.1f} tok/s ({r['decode']:.2f}x)  prefill "
              f"{v['prefill_tok_s']:7.1f} tok/s ({r['prefill']:.2f}x)  {v['size_bytes'] / 2**20:7.1f} MiB  "
              f"peak RSS {v['peak_rss_mib']:.0f} MiB", flush=True)
    return res


def _measure(kind: str, path: Path, vocab: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS))
    argv = [sys.executable, "-c", _MEASURE, kind, str(path), *map(str, (THREADS, DECODE_PROMPT, NEW_TOKENS,
                                                                        PREFILL_PROMPT, REPEATS, vocab))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} measurement of {path} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def _write(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
