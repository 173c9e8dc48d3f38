"""What this host's CPU is and which of its features change numerics or the llama.cpp build. Stdlib only.

One place for the facts the train manifest, `edgeft doctor`, the bench and the Makefile's llama.cpp
build all need: the CPU model, the ISA features that change summation order or precision (AVX2,
AVX-512, AVX512-BF16, AMX), and the portable llama.cpp build for those features.

The llama.cpp build is explicit flags, never `-march=native`, and never AMX: llama.cpp's AMX path
dies with SIGILL (`tilezero`) in VMs and containers that report AMX but do not let a process use
it, and a native wheel from pip's cache dies the same way on the next CPU. The flags follow the
host's features (so it stays as fast as native, see benchmarks/llama_build.py), and the wheel is
cached under a key made of those flags: a wheel is only ever reused on a CPU with the same features.

    python -m edgeft.host describe      # cpu model and numerics features, one JSON line
    python -m edgeft.host cmake-args    # CMAKE_ARGS for the portable llama-cpp-python build
    python -m edgeft.host wheel-key     # the wheel cache key for those args
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

# cpuinfo flag -> the ggml CMake option it enables; each option needs every flag listed
_GGML_OPTIONS = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    # ggml's GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512vbmi",)),
    ("GGML_AVX512_VNNI", ("avx512_vnni",)),
    ("GGML_AVX512_BF16", ("avx512_bf16",)),
)
# never enabled, whatever the CPU reports (see the module docstring)
_GGML_NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# the features that change what a kernel computes or in which order it sums
NUMERICS_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
SIGILL_FIX = ("llama.cpp was built for instructions this CPU cannot run (SIGILL): rebuild it portably with "
              "`make setup` (explicit AVX2/AVX-512 flags, no AMX, a wheel cached per CPU feature set), "
              "or `CMAKE_ARGS=\"$(python -m edgeft.host cmake-args)\" pip install --force-reinstall "
              "--no-cache-dir llama-cpp-python`")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags the kernel reports (x86 'flags', ARM 'Features'); empty when unknown."""
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(val.split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU model name ('AMD EPYC ...', 'Intel(R) Xeon(R) ...'), else the machine type."""
    text = cpuinfo if cpuinfo is not None else _read_cpuinfo()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and val.strip():
            return val.strip()
    return platform.processor() or platform.machine()


def describe(cpuinfo: str | None = None) -> dict:
    """CPU model, cores, machine and the numerics-relevant ISA features present (sorted)."""
    flags = cpu_flags(cpuinfo)
    return {"cpu": cpu_model(cpuinfo), "cores": os.cpu_count(), "machine": platform.machine(),
            "system": platform.system(), "isa": sorted(f for f in NUMERICS_FEATURES if f in flags)}


def ggml_cmake_args(cpuinfo: str | None = None, machine: str | None = None) -> list[str]:
    """CMake options for a llama.cpp build that runs on this CPU's features and never uses AMX.

    On x86-64: GGML_NATIVE=OFF with each ISA option on exactly when the CPU has it. Elsewhere (ARM):
    the native build, which is safe there because the wheel key includes the CPU's features."""
    machine = machine or platform.machine()
    if machine.lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags(cpuinfo)
    args = ["-DGGML_NATIVE=OFF"]
    for option, needs in _GGML_OPTIONS:
        args.append(f"-D{option}={'ON' if all(n in flags for n in needs) else 'OFF'}")
    args += [f"-D{option}=OFF" for option in _GGML_NEVER]
    return args


def wheel_key(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """A cache key for a llama-cpp-python wheel: same key, same instructions compiled in."""
    machine = machine or platform.machine()
    args = ggml_cmake_args(cpuinfo, machine)
    # a native (ARM) build depends on every feature flag, an explicit one only on its arguments
    basis = args if args else sorted(cpu_flags(cpuinfo))
    digest = hashlib.sha256(json.dumps([machine, basis]).encode()).hexdigest()[:12]
    return f"{machine}-{'portable' if args else 'native'}-{digest}"


def is_sigill(returncode: int | None) -> bool:
    """True when a child process died of an illegal instruction (subprocess reports -SIGILL)."""
    import signal

    return returncode is not None and returncode in (-signal.SIGILL, 128 + signal.SIGILL)


def describe_exit(returncode: int | None) -> str:
    """'exit code N', or the signal's name and, for SIGILL, the build fix."""
    import signal

    if returncode is None:
        return "no exit code"
    if is_sigill(returncode):
        return f"killed by SIGILL (illegal instruction). {SIGILL_FIX}"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def main(argv: list[str]) -> int:
    """Print what the Makefile asks for: describe | cmake-args | wheel-key."""
    what = argv[0] if argv else "describe"
    if what == "describe":
        print(json.dumps(describe()))
    elif what == "cmake-args":
        print(" ".join(ggml_cmake_args()))
    elif what == "wheel-key":
        print(wheel_key())
    else:
        print(f"usage: python -m edgeft.host [describe|cmake-args|wheel-key], not '{what}'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
