"""`edgeft doctor [BUNDLE]`: what this device can run, and how fast the bundle runs on it. Torch-free.

Reports Python and runtime versions, GPU availability (llama.cpp's GPU offload support,
onnxruntime's execution providers, the NVIDIA driver or Jetson release when present) and memory.
With a bundle: verifies it, checks the memory its pre-flight estimated against what is available,
and runs a smoke bench (greedy generations for about `seconds`), printed beside the bundle's
bandwidth prediction and the figure measured on the build host. Without one it says that no
model was run.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from edgeft import host

_PACKAGES = (("edgeft", "edgeft"), ("numpy", "numpy"), ("tokenizers", "tokenizers"),
             ("onnxruntime", "onnxruntime"), ("onnxruntime-gpu", "onnxruntime"),
             ("llama-cpp-python", "llama_cpp"))
SMOKE_PROMPT = "What should I check first when the unit does not start?"


def report(bundle_path: str | Path | None = None, seconds: float = 10.0, threads: int | None = None,
           out=None, trusted: list[bytes] | None = None) -> int:
    """Print the device report; returns 0 when the bundle (if any) ran, 1 when its runtime is missing."""
    out = out or sys.stdout

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    say(f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPU cores")
    for dist, _ in _PACKAGES:
        try:
            say(f"  {dist:<17} {md.version(dist)}")
        except md.PackageNotFoundError:
            if dist != "onnxruntime-gpu":
                say(f"  {dist:<17} not installed")
    cpu = host.describe()
    say(f"cpu: {cpu['cpu']}; numerics-relevant ISA: {', '.join(cpu['isa']) or 'none reported'}")
    if "avx512_bf16" in cpu["isa"]:
        say("  avx512_bf16: bitsandbytes 4-bit inference on this CPU computes in bf16 whatever compute_dtype "
            "says (edgeft trains on its dequantize path and records the difference at merge)")
    status = {"llama_cpp": _llama_cpp(say), "onnxruntime": _onnxruntime(say)}
    _gpu_system(say)
    avail = _memory(say)
    if bundle_path is None:
        say("no bundle given: checked imports, versions, GPU support and memory only; no model was run "
            "(pass a bundle, e.g. `edgeft doctor dist/jetson`, for a smoke bench)")
        return 0
    return _bundle(Path(bundle_path), seconds, threads, status, avail, say, trusted)


def _llama_cpp(say) -> bool:
    try:
        import llama_cpp
    except ImportError as e:
        say(f"llama.cpp: cannot import llama_cpp ({e})")
        return False
    from edgeft.runtime import smoke

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    say(f"llama.cpp: GPU offload {'supported' if gpu else 'not supported (CPU build)'}; "
        f"mmap {'yes' if llama_cpp.llama_supports_mmap() else 'no'}")
    ok, line = smoke.check()  # in a child: a build this CPU cannot run dies there, not here
    say(f"llama.cpp: {line}" if not ok else line)
    return ok


def _onnxruntime(say) -> bool:
    try:
        import onnxruntime as ort
    except ImportError as e:
        say(f"onnxruntime: cannot import ({e})")
        return False
    say(f"onnxruntime: device {ort.get_device()}; providers {', '.join(ort.get_available_providers())}")
    return True


def _gpu_system(say) -> None:
    """NVIDIA driver / Jetson release files, when the OS has them."""
    tegra = Path("/etc/nv_tegra_release")
    if tegra.is_file():
        say(f"jetson: {tegra.read_text().splitlines()[0].strip()}")
    drv = Path("/proc/driver/nvidia/version")
    if drv.is_file():
        say(f"nvidia driver: {drv.read_text().splitlines()[0].strip()}")
    if not tegra.is_file() and not drv.is_file():
        say("gpu: no NVIDIA driver or Jetson release found")


def _memory(say) -> float | None:
    """Total and available memory in GiB (psutil, else /proc/meminfo); returns available GiB."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, avail = vm.total / 2**30, vm.available / 2**30
    except ImportError:
        info = {}
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                key, _, val = line.partition(":")
                info[key] = int(val.split()[0]) / 2**20
        except (OSError, ValueError):
            say("memory: unknown (no psutil, no /proc/meminfo)")
            return None
        total, avail = info.get("MemTotal", 0.0), info.get("MemAvailable", 0.0)
    say(f"memory: {total:.1f} GiB total, {avail:.1f} GiB available")
    return avail


def _bundle(path: Path, seconds: float, threads: int | None, status: dict, avail: float | None, say,
            trusted: list[bytes] | None = None) -> int:
    from edgeft.device.bundle import open_bundle, open_runtime

    t0 = time.perf_counter()
    bundle = open_bundle(path, trusted=trusted)
    signed = f"signed by key {bundle.signer}" if bundle.signer else "unsigned"
    say(f"bundle {path}: {len(bundle.manifest['files'])} files verified (sha256, {signed}) in "
        f"{time.perf_counter() - t0:.2f} s; variant {bundle.spec['variant']['name']} for profile "
        f"{bundle.spec['profile']['name']}")
    tuned, revs = bundle.grounding_spec(), bundle.spec.get("manual_revisions") or []
    say(f"manual: {bundle.spec.get('manual') or 'none'}"
        + (f", revised {len(revs)}x (last {revs[-1]['date']}, sha256 {revs[-1]['sha256'][:16]})" if revs else "")
        + (f"; answers grounded in {tuned.k} retrieved passages (the model was tuned so)" if tuned else ""))
    need = bundle.spec["preflight"]["chosen"]["total_gb"]
    if avail is not None:
        say(f"memory: the bundle needs about {need:.3g} GiB (pre-flight), {avail:.1f} GiB available: "
            f"{'ok' if need <= avail else 'NOT ENOUGH: close other programs or use a smaller variant'}")
    runtime = "llama_cpp" if bundle.format == "gguf" else "onnxruntime"
    if not status[runtime]:
        say(f"smoke bench: skipped, {runtime} is missing: {bundle.spec['profile']['install']}")
        return 1
    fmt = bundle.formatter()
    ids = fmt.prompt_ids([{"role": "user", "content": SMOKE_PROMPT}])
    t0 = time.perf_counter()
    rt = open_runtime(bundle, threads=threads)
    load_s = time.perf_counter() - t0
    n_new = min(64, bundle.spec["runtime"]["n_ctx"] - len(ids))
    ttft, rates, runs = [], [], 0
    try:
        rt.generate(ids, 4)  # warm-up
        start = time.perf_counter()
        while runs < 3 or time.perf_counter() - start < seconds:
            g = rt.generate(ids, n_new)
            runs += 1
            ttft.append(g.ttft_s * 1000)
            if g.decode_tok_s:
                rates.append(g.decode_tok_s)
            if time.perf_counter() - start > 3 * seconds:
                break
    finally:
        rt.close()
        bundle.close()
    sel, pre = bundle.spec["selected"], bundle.spec["preflight"]["chosen"]
    dec = f"{statistics.median(rates):.1f} tok/s decode" if rates else "decode not measured (EOS came first)"
    say(f"smoke bench: {runs} generations in {time.perf_counter() - start:.1f} s; load {load_s:.2f} s; "
        f"{dec}; time to first token {statistics.median(ttft):.1f} ms (medians)")
    say(f"  predicted on {bundle.spec['profile']['name']} from bandwidth: <= {pre['predicted_decode_tok_s']:.0f} "
        f"tok/s; measured on the build host ({bundle.spec['built_on']['cpu']}): "
        f"{sel.get('decode_tok_s', 0):.1f} tok/s with {bundle.spec['runtime']['threads']} threads")
    return 0
