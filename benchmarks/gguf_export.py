"""GGUF export vs llama.cpp's own converter on real-size random-weight Llama configs.

Sides, from the same HF dir (benchmarks/common.py: 0.35b, 1.1b; fp32 safetensors), each step in a
fresh subprocess with the page cache warmed:
- ours: edgeft.gguf.writer.convert(model, out, "f16"); imports gguf-py and numpy, no torch;
- theirs: llama.cpp's convert_hf_to_gguf.py --outtype f16, run in place inside the sdist of the
  installed llama-cpp-python (fetched once into the cache with pip download), with its vendored
  gguf-py; it imports torch.
Each repeat (3, interleaved, the side that goes first alternating) runs per side an import-only
process (ours: `import edgeft.gguf.writer`; theirs: the convert script's module body without
main(), i.e. its top-level imports and class registry) and then the conversion. Reported: median
wall time and peak RSS (VmHWM) of each, and the conversion minus its imports, so torch's import
cost is shown apart from the conversion's own. Both F16 files then go through the same llama.cpp
quantizer (llama-cpp-python's) to Q4_K_M, decoded by GGUFRuntime (F16 KV cache, 2 threads, 32-token
prompt + 128 new tokens; per repeat one warm process per side, alternating). Decode is shown
beside bytes read per token (edgeft.bench.footprint: every weight once, one embedding row, + the
KV cache at the mean context) and as a share of this machine's memory bandwidth, measured with
the decode's thread count (a STREAM-like numpy copy split over 2 threads; 1 thread shown too).
Prints ratios ours/theirs and writes JSON; it never asserts.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/gguf_export.py [--models 0.35b,1.1b]
    .venv/bin/python benchmarks/gguf_export.py --smoke   # tiny model, 2 repeats; theirs only if the sdist is cached
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

from benchmarks.common import build_random_model, build_smoke_model, cache_dir  # noqa: E402

THREADS = 2
FULL = dict(prompt=32, new_tokens=128, repeats=3)
SMOKE = dict(prompt=8, new_tokens=16, repeats=2)
SIDES = ("ours", "theirs")

_RSS = 'hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]\n'
_MODULES = 'mods = {m: m in sys.modules for m in ("torch", "transformers", "numpy", "safetensors")}\n'
_OURS = """
import json, sys, time
t0 = time.perf_counter()
from edgeft.gguf.writer import convert
if sys.argv[1] != "--imports-only":
    convert(sys.argv[1], sys.argv[2], "f16")
dt = time.perf_counter() - t0
""" + _RSS + _MODULES + """print(json.dumps({"seconds": dt, "peak_rss_mib": hwm / 1024, "modules": mods}))
"""
_THEIRS = """
import json, os, runpy, sys, time
script, imports_only = sys.argv[1], sys.argv[2] == "--imports-only"
sys.argv = [script] if imports_only else [script, sys.argv[2], "--outfile", sys.argv[3], "--outtype", "f16"]
t0 = time.perf_counter()
try:  # imports only: the module body (imports, model class registry) without the __main__ block
    runpy.run_path(script, run_name="convert_hf_to_gguf" if imports_only else "__main__")
except SystemExit as e:
    if e.code:
        raise
dt = time.perf_counter() - t0
""" + _RSS + _MODULES + """print(json.dumps({"seconds": dt, "peak_rss_mib": hwm / 1024, "modules": mods}))
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
    ids = [i % rt.n_vocab for i in ids]
    rt.generate(ids, min(16, n_new), ignore_eos=True)  # warm-up: page the weights in, build the graph
    runs = []
    for _ in range(repeats):
        r = rt.generate(ids, n_new, ignore_eos=True)
        runs.append((len(r.tokens) - 1) / r.decode_s)
print(json.dumps({"tok_s": runs}))
"""
_COPY = """
import json, sys, threading, time
import numpy as np
threads = int(sys.argv[1])
n = 1 << 25  # 32M float64 per array: 256 MiB, far beyond any cache
a, b = np.zeros(n), np.ones(n)
a.fill(1.0)  # fault every page in before timing
part = [(i * n // threads, (i + 1) * n // threads) for i in range(threads)]

def copy(i, go, done):
    lo, hi = part[i]
    go.wait()
    np.copyto(a[lo:hi], b[lo:hi])  # numpy releases the GIL: the threads copy in parallel
    done.wait()

runs = []
for _ in range(7):
    go, done = threading.Barrier(threads + 1), threading.Barrier(threads + 1)
    ts = [threading.Thread(target=copy, args=(i, go, done)) for i in range(threads)]
    for t in ts:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    done.wait()
    dt = time.perf_counter() - t0
    for t in ts:
        t.join()
    runs.append(2 * 8 * n / dt / 1e9)  # STREAM copy: one read + one write of n doubles
print(json.dumps({"copy_gbs": runs}))
"""


def main() -> None:
    """Run the comparison for the requested models and write the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.35b,1.1b")
    ap.add_argument("--work", default="/tmp/edgeft-gguf-bench", help="scratch dir (model + GGUFs; deleted)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats per side (default 3; --smoke 2)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 repeats, few tokens; theirs only when "
                                                         "llama.cpp's sdist is already cached (never fetched)")
    ap.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "gguf_export.json"))
    args = ap.parse_args()
    p = dict(SMOKE if args.smoke else FULL)
    if args.repeats:
        p["repeats"] = args.repeats
    llama_dir, skipped = (_cached_llama_cpp_source() if args.smoke else (_llama_cpp_source(), None))
    if skipped:
        print(f"theirs SKIPPED: {skipped}", flush=True)
    bw = _bandwidth()
    report = {"smoke": args.smoke, "machine": {"cpus": os.cpu_count(), "threads": THREADS},
              "repeats": p["repeats"], "decode": f"{p['new_tokens']} new tokens after {p['prompt']}",
              "sides": {"ours": "edgeft.gguf.writer.convert(..., 'f16'), fresh process",
                        "theirs": f"llama.cpp convert_hf_to_gguf.py --outtype f16 from {llama_dir} (vendored gguf-py), "
                                  "fresh process" if llama_dir else None,
                        "both": "then llama.cpp's quantizer (llama-cpp-python) to Q4_K_M, decoded by llama.cpp "
                                f"(GGUFRuntime, F16 KV cache, {THREADS} threads)"},
              "theirs_skipped": skipped, "llama_cpp_source": str(llama_dir) if llama_dir else None,
              "bandwidth": bw, "models": {}}
    print(f"memory bandwidth (numpy STREAM copy, read+write, median of 7): {bw['copy_gbs_median']:.1f} GB/s with "
          f"{THREADS} threads (the decode's), {bw['copy_gbs_1thread_median']:.1f} GB/s with 1", flush=True)
    names = ["smoke"] if args.smoke else args.models.split(",")
    for name in names:
        work = Path(args.work) / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            report["models"][name] = _one_model(name, work, llama_dir, bw["copy_gbs_median"], p)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _write(args.out, report)
    _write(args.out, report)
    print(f"wrote {args.out}")


def _one_model(name: str, work: Path, llama_dir: Path | None, bw: float, p: dict) -> dict:
    from edgeft.bench import footprint

    t0 = time.perf_counter()
    model = build_smoke_model(work / "hf") if name == "smoke" else build_random_model(work / "hf", name)
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    print(f"\n[{name}] built random model in {time.perf_counter() - t0:.0f} s ({model_bytes / 2**30:.3f} GiB fp32)",
          flush=True)
    sides = SIDES if llama_dir else ("ours",)
    res: dict = {"model_bytes": model_bytes, "sides": list(sides)}
    runs = {who: {k: [] for k in ("seconds", "peak_rss_mib", "import_s", "import_rss_mib")} for who in sides}
    for r in range(p["repeats"]):  # interleaved, the first side alternating: drift hits both
        for who in sides[r % len(sides):] + sides[:r % len(sides)]:
            imp = _convert(who, model, None, llama_dir)
            _warm(model)  # page cache warm for both (conversion, not disk, is measured)
            out = work / f"{who}-f16.gguf"
            conv = _convert(who, model, out, llama_dir)
            for k, src, key in (("seconds", conv, "seconds"), ("peak_rss_mib", conv, "peak_rss_mib"),
                                ("import_s", imp, "seconds"), ("import_rss_mib", imp, "peak_rss_mib")):
                runs[who][k].append(src[key])
            runs[who]["modules"] = conv["modules"]
            print(f"[{name}] repeat {r + 1} {who:6s}: convert {conv['seconds']:.2f} s, peak RSS "
                  f"{conv['peak_rss_mib']:.0f} MiB; its imports alone {imp['seconds']:.2f} s, "
                  f"{imp['peak_rss_mib']:.0f} MiB", flush=True)
    for who in sides:
        u = runs[who]
        r = {f"{k}_runs": u[k] for k in ("seconds", "peak_rss_mib", "import_s", "import_rss_mib")}
        r.update({k: statistics.median(u[k]) for k in ("seconds", "peak_rss_mib", "import_s", "import_rss_mib")})
        r["seconds_minus_imports"] = r["seconds"] - r["import_s"]
        r["peak_rss_mib_minus_imports"] = r["peak_rss_mib"] - r["import_rss_mib"]
        r["modules_loaded"] = u["modules"]
        f16 = work / f"{who}-f16.gguf"
        r["f16_bytes"] = f16.stat().st_size
        q = work / f"{who}-q4_k_m.gguf"
        qr = _child(["-c", _QUANT, str(f16), str(q), str(THREADS)], cwd=REPO)
        if qr["rc"] != 0:
            raise RuntimeError(f"llama.cpp quantization of {f16} failed (code {qr['rc']})")
        r["quantize_s"], r["q4_k_m_bytes"] = qr["seconds"], q.stat().st_size  # one run: the same quantizer for both
        fp = footprint.of_variant("gguf", q, 2)  # F16 KV cache, as GGUFRuntime runs it
        ctx = p["prompt"] + p["new_tokens"] / 2  # mean cached positions over the decode run
        r["weight_bytes_per_token"], r["kv_bytes_per_token"] = fp.touched_bytes, fp.kv_bytes_per_pos * ctx
        r["bytes_per_token"] = fp.bytes_per_token(ctx)
        res[who] = r
    if len(sides) == 2:
        res["f16_tensors_identical"] = _same_tensors(work / "ours-f16.gguf", work / "theirs-f16.gguf")
    for who in sides:
        (work / f"{who}-f16.gguf").unlink()
    dec: dict[str, list[float]] = {who: [] for who in sides}
    for r in range(p["repeats"]):  # interleaved, the first side alternating
        for who in sides[r % len(sides):] + sides[:r % len(sides)]:
            d = _child(["-c", _DECODE, str(work / f"{who}-q4_k_m.gguf"), str(p["prompt"]), str(p["new_tokens"]),
                        "1", str(THREADS)], cwd=REPO)
            dec[who] += d["tok_s"]
    for who in sides:
        o = res[who]
        o["decode_runs"], o["decode_tok_s"] = dec[who], statistics.median(dec[who])
        o["decode_gbs"] = o["decode_tok_s"] * o["bytes_per_token"] / 1e9
        o["decode_bandwidth_share"] = o["decode_gbs"] / bw
    if len(sides) == 2:
        res["q4_k_m_tensors_identical"] = _same_tensors(work / "ours-q4_k_m.gguf", work / "theirs-q4_k_m.gguf")
        o, t = res["ours"], res["theirs"]
        res["ratios"] = {"time": o["seconds"] / t["seconds"],
                         "time_minus_imports": _ratio(o["seconds_minus_imports"], t["seconds_minus_imports"]),
                         "peak_rss": o["peak_rss_mib"] / t["peak_rss_mib"],
                         "peak_rss_minus_imports": _ratio(o["peak_rss_mib_minus_imports"],
                                                          t["peak_rss_mib_minus_imports"]),
                         "import_rss": o["import_rss_mib"] / t["import_rss_mib"],
                         "q4_k_m_decode": o["decode_tok_s"] / t["decode_tok_s"],
                         "q4_k_m_size": o["q4_k_m_bytes"] / t["q4_k_m_bytes"],
                         "bytes_per_token": o["bytes_per_token"] / t["bytes_per_token"]}
    _print(name, res, sides, model_bytes, bw, p)
    return res


def _ratio(a: float, b: float) -> float | None:
    """a / b; None where a difference of medians came out <= 0 (noise exceeding the work: a tiny model)."""
    return a / b if a > 0 and b > 0 else None


def _print(name: str, res: dict, sides: tuple, model_bytes: int, bw: float, p: dict) -> None:
    n = p["repeats"]
    print(f"[{name}] median of {n} interleaved runs per side (each a fresh process):")
    for who in sides:
        r = res[who]
        mods = ", ".join(m for m, on in r["modules_loaded"].items() if on) or "none of torch/transformers/numpy"
        print(f"[{name}]   {who:6s}: convert {r['seconds']:.2f} s, peak RSS {r['peak_rss_mib']:.0f} MiB "
              f"({r['peak_rss_mib'] * 2**20 / model_bytes:.2f}x model bytes) | imports alone {r['import_s']:.2f} s, "
              f"{r['import_rss_mib']:.0f} MiB | conversion minus imports {r['seconds_minus_imports']:.2f} s, "
              f"{r['peak_rss_mib_minus_imports']:.0f} MiB | loaded: {mods}", flush=True)
    for who in sides:
        r = res[who]
        print(f"[{name}]   {who:6s}: Q4_K_M {r['q4_k_m_bytes'] / 2**20:.1f} MiB, decode {r['decode_tok_s']:.1f} tok/s "
              f"[{min(r['decode_runs']):.1f}-{max(r['decode_runs']):.1f}] ({THREADS} threads, {p['prompt']}+"
              f"{p['new_tokens']} tokens) x {r['bytes_per_token'] / 2**20:.2f} MiB/token (weights + F16 KV) = "
              f"{r['decode_gbs']:.1f} GB/s, {r['decode_bandwidth_share']:.0%} of {bw:.1f} GB/s", flush=True)
    if "ratios" not in res:
        print(f"[{name}] theirs skipped: no ratios", flush=True)
        return
    print(f"[{name}] tensors (names, types, shapes, bytes) identical: F16 {res['f16_tensors_identical']}, "
          f"Q4_K_M {res['q4_k_m_tensors_identical']}", flush=True)
    r = res["ratios"]
    f = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"[{name}] ratios ours/theirs: time {r['time']:.2f} (minus imports {f(r['time_minus_imports'])}; target "
          f"<= 1.0), peak RSS {r['peak_rss']:.2f} (minus imports {f(r['peak_rss_minus_imports'])}, imports alone "
          f"{r['import_rss']:.2f}; <= 1.0), Q4_K_M decode {r['q4_k_m_decode']:.2f} (>= 1.0), Q4_K_M size "
          f"{r['q4_k_m_size']:.3f}, bytes/token {r['bytes_per_token']:.3f}", flush=True)


def _convert(who: str, model: Path, out: Path | None, llama_dir: Path | None) -> dict:
    """One conversion (out given) or the side's imports alone (out None), in a fresh process."""
    if who == "ours":
        argv = ["-c", _OURS, str(model), str(out)] if out else ["-c", _OURS, "--imports-only"]
        return _child(argv, cwd=REPO)
    script = str(llama_dir / "convert_hf_to_gguf.py")
    argv = ["-c", _THEIRS, script, str(model), str(out)] if out else ["-c", _THEIRS, script, "--imports-only"]
    return _child(argv, cwd=llama_dir, theirs=True)


def _same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors: names, types, shapes and bytes."""
    import numpy as np
    from gguf import GGUFReader

    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and list(ta[n].shape) == list(tb[n].shape)
        and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)) for n in ta)


def _bandwidth() -> dict:
    many = _child(["-c", _COPY, str(THREADS)], cwd=REPO)["copy_gbs"]
    one = _child(["-c", _COPY, "1"], cwd=REPO)["copy_gbs"]
    return {"copy_gbs": many, "copy_gbs_median": statistics.median(many), "threads": THREADS,
            "copy_gbs_1thread": one, "copy_gbs_1thread_median": statistics.median(one),
            "method": f"STREAM-like copy with numpy (np.copyto, 256 MiB float64 arrays split over {THREADS} threads, "
                      "pages faulted in first), read+write bytes / wall time"}


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
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=e, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sdist_dir() -> Path:
    from importlib.metadata import version

    return cache_dir() / "sdist" / f"llama_cpp_python-{version('llama_cpp_python')}" / "vendor" / "llama.cpp"


def _cached_llama_cpp_source() -> tuple[Path | None, str | None]:
    """(llama.cpp source dir, None) when the sdist is already in the cache, else (None, why theirs is skipped)."""
    src = _sdist_dir()
    if (src / "convert_hf_to_gguf.py").is_file():
        return src, None
    return None, (f"--smoke does not fetch llama-cpp-python's sdist and {src} is not cached; a full run (or one "
                  "run of benchmarks/gguf_export.py without --smoke) fetches it once")


def _llama_cpp_source() -> Path:
    """llama.cpp inside the sdist of the installed llama-cpp-python, downloaded once into the cache."""
    from importlib.metadata import version

    ver = version("llama_cpp_python")
    root = cache_dir() / "sdist"
    src = _sdist_dir()
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
