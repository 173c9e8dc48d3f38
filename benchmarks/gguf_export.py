"""GGUF export vs llama.cpp's own converter on real-size random-weight Llama configs.

For each model (benchmarks/common.py: 0.35b, 1.1b): HF dir -> F16 GGUF by edgeft.gguf.writer and by
llama.cpp's convert_hf_to_gguf.py (run in place inside the llama-cpp-python sdist, with its vendored
gguf-py), each in a fresh subprocess: wall time and peak RSS (VmHWM). Both F16 files then go through
llama.cpp's quantizer to Q4_K_M and are decoded with 2 threads (warm-up, median of 3, each file in its
own process). Decode is also shown as a share of this machine's memory bandwidth, measured here with
a STREAM-like copy. Prints ratios ours/theirs and writes JSON; it never asserts.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/gguf_export.py [--models 0.35b,1.1b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import build_random_model, cache_dir  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, REPEATS, THREADS = 32, 128, 3, 2

_OURS = """
import json, sys, time
t0 = time.perf_counter()
from edgeft.gguf.writer import convert
convert(sys.argv[1], sys.argv[2], "f16")
dt = time.perf_counter() - t0
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": dt, "peak_rss_mib": hwm / 1024}))
"""
_THEIRS = """
import json, os, runpy, sys, time
script = sys.argv[1]
sys.argv = [script, sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f16"]
t0 = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
dt = time.perf_counter() - t0
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"seconds": dt, "peak_rss_mib": hwm / 1024}))
"""
_QUANT = """
import ctypes, json, sys, time, logging, llama_cpp
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
p = llama_cpp.llama_model_quantize_default_params()
p.nthread = int(sys.argv[3]); p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
t0 = time.perf_counter()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0}))
"""
_DECODE = """
import json, sys
from edgeft.runtime.gguf import GGUFRuntime
n_prompt, n_new, repeats, threads = map(int, sys.argv[2:6])
ids = [1] + [(i * 7919) % 31000 + 500 for i in range(n_prompt - 1)]
with GGUFRuntime(sys.argv[1], n_threads=threads, n_ctx=n_prompt + n_new + 8) as rt:
    rt.generate(ids, 16, ignore_eos=True)  # warm-up: page the weights in, build the graph
    runs = []
    for _ in range(repeats):
        r = rt.generate(ids, n_new, ignore_eos=True)
        runs.append((len(r.tokens) - 1) / r.decode_s)
print(json.dumps({"tok_s": runs}))
"""
_COPY = """
import json, time, numpy as np
n = 1 << 25  # 32M float64 per array: 256 MiB, far beyond any cache
a, b = np.zeros(n), np.ones(n)
runs = []
for _ in range(7):
    t0 = time.perf_counter()
    np.copyto(a, b)  # STREAM copy: one read + one write of n doubles
    runs.append(2 * 8 * n / (time.perf_counter() - t0) / 1e9)
print(json.dumps({"copy_gbs": runs}))
"""


def main() -> None:
    """Run the comparison for the requested models and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.35b,1.1b")
    ap.add_argument("--work", default="/tmp/edgeft-gguf-bench", help="scratch dir (model + GGUFs; deleted)")
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "gguf_export.json"))
    args = ap.parse_args()
    llama_dir = _llama_cpp_source()
    report = {"machine": {"cpus": os.cpu_count(), "threads": THREADS}, "llama_cpp_source": str(llama_dir),
              "bandwidth": _bandwidth(), "models": {}}
    bw = report["bandwidth"]["copy_gbs_median"]
    print(f"memory bandwidth (numpy STREAM copy, 1 thread, median of 7): {bw:.1f} GB/s", flush=True)
    for name in args.models.split(","):
        work = Path(args.work) / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            report["models"][name] = _one_model(name, work, llama_dir, bw)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _write(args.out, report)
    _write(args.out, report)
    print(f"wrote {args.out}")


def _one_model(name: str, work: Path, llama_dir: Path, bw: float) -> dict:
    t0 = time.perf_counter()
    model = build_random_model(work / "hf", name)
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    print(f"\n[{name}] built random model in {time.perf_counter() - t0:.0f} s ({model_bytes / 2**30:.2f} GiB fp32)",
          flush=True)
    res: dict = {"model_bytes": model_bytes}
    for who in ("theirs", "ours"):  # page cache warmed for both (the build wrote the files just now)
        _warm(model)
        out = work / f"{who}-f16.gguf"
        if who == "ours":
            r = _child(["-c", _OURS, str(model), str(out)], cwd=REPO)
        else:
            r = _child(["-c", _THEIRS, str(llama_dir / "convert_hf_to_gguf.py"), str(model), str(out)],
                       cwd=llama_dir, theirs=True)
        r["f16_bytes"] = out.stat().st_size
        q = work / f"{who}-q4_k_m.gguf"
        qr = _child(["-c", _QUANT, str(out), str(q), str(THREADS)], cwd=REPO)
        r["quantize_s"], r["q4_k_m_bytes"] = qr["seconds"], q.stat().st_size
        r["q4_k_m_weight_bytes_per_token"] = _bytes_per_token(q)
        out.unlink()
        res[who] = r
        print(f"[{name}] {who:6s}: convert {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['peak_rss_mib'] * 2**20 / model_bytes:.2f}x model bytes); "
              f"Q4_K_M {r['q4_k_m_bytes'] / 2**20:.0f} MiB",
              flush=True)
    runs: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(REPEATS):  # interleaved, so drift on a shared machine hits both
        for who in ("theirs", "ours"):
            r = _child(["-c", _DECODE, str(work / f"{who}-q4_k_m.gguf"), str(PROMPT_TOKENS), str(NEW_TOKENS),
                        "1", str(THREADS)], cwd=REPO)
            runs[who] += r["tok_s"]
    for who in ("ours", "theirs"):
        tps = statistics.median(runs[who])
        res[who]["decode_tok_s"], res[who]["decode_runs"] = tps, runs[who]
        gbs = tps * res[who]["q4_k_m_weight_bytes_per_token"] / 1e9
        res[who]["decode_gbs"], res[who]["decode_bandwidth_share"] = gbs, gbs / bw
    res["q4_k_m_tensors_identical"] = _same_tensors(work / "ours-q4_k_m.gguf", work / "theirs-q4_k_m.gguf")
    print(f"[{name}] Q4_K_M tensors (names, types, bytes) identical between the two files: "
          f"{res['q4_k_m_tensors_identical']}", flush=True)
    o, t = res["ours"], res["theirs"]
    res["ratios"] = {"time": o["seconds"] / t["seconds"], "peak_rss": o["peak_rss_mib"] / t["peak_rss_mib"],
                     "q4_k_m_decode": o["decode_tok_s"] / t["decode_tok_s"],
                     "q4_k_m_size": o["q4_k_m_bytes"] / t["q4_k_m_bytes"]}
    print(f"[{name}] decode Q4_K_M ({THREADS} threads, {PROMPT_TOKENS}+{NEW_TOKENS} tokens, median of {REPEATS}): "
          f"ours {o['decode_tok_s']:.1f} tok/s ({o['decode_bandwidth_share']:.0%} of {bw:.1f} GB/s), "
          f"theirs {t['decode_tok_s']:.1f} tok/s ({t['decode_bandwidth_share']:.0%})")
    r = res["ratios"]
    print(f"[{name}] ratios ours/theirs: time {r['time']:.2f} (target <= 1.0), peak RSS {r['peak_rss']:.2f} "
          f"(<= 1.0), Q4_K_M decode {r['q4_k_m_decode']:.2f} (>= 1.0), Q4_K_M size {r['q4_k_m_size']:.3f}", flush=True)
    return res


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types, shapes and bytes."""
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and list(ta[n].shape) == list(tb[n].shape)
        and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)) for n in ta)


def _bytes_per_token(path: Path) -> int:
    """Weight bytes read per decoded token: every tensor except the token embedding (one row is read)."""
    from gguf import GGUFReader

    return int(sum(t.n_bytes for t in GGUFReader(path).tensors if t.name != "token_embd.weight"))


def _bandwidth() -> dict:
    r = _child(["-c", _COPY], cwd=REPO)
    return {"copy_gbs": r["copy_gbs"], "copy_gbs_median": statistics.median(r["copy_gbs"]),
            "method": "STREAM-like copy with numpy (np.copyto, 256 MiB float64 arrays, 1 thread), read+write"}


def _warm(model: Path) -> None:
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass


def _child(argv: list[str], cwd: Path, theirs: bool = False) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    if theirs:
        e.pop("NO_LOCAL_GGUF", None)  # theirs must use its vendored gguf-py (it skips it when this is set)
        e.pop("PYTHONPATH", None)
    else:
        e["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=e, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _llama_cpp_source() -> Path:
    """llama.cpp inside the sdist of the installed llama-cpp-python, downloaded once into the cache."""
    from importlib.metadata import version

    ver = version("llama_cpp_python")
    root = cache_dir() / "sdist"
    src = root / f"llama_cpp_python-{ver}" / "vendor" / "llama.cpp"
    if not (src / "convert_hf_to_gguf.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-binary",
                            ":all:", "--no-deps", "-d", tmp], check=True)  # its build backend comes isolated
            tarball = next(Path(tmp).glob("*.tar.gz"))
            shutil.unpack_archive(tarball, root)
    return src


def _write(path: str, report: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
