"""The host facts and the portable llama.cpp build, for both CPU families this project runs on."""

import signal
import subprocess
import sys

import pytest

from edgeft import host

# /proc/cpuinfo lines as each family reports them (trimmed to the flags that matter and a few others)
SPR = ("model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 avx_vnni "
       "avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16 avx512_fp16 "
       "amx_bf16 amx_tile amx_int8\n")
ZEN4 = ("model name\t: AMD EPYC 9R14\nflags\t\t: fpu sse4_2 avx f16c fma avx2 bmi2 avx512f avx512dq avx512cd "
        "avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16\n")
ALDER = "model name\t: 12th Gen Intel(R) Core(TM) i7-1260P\nflags\t\t: sse4_2 avx f16c fma avx2 bmi2 avx_vnni\n"
PI5 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimdhp cpuid asimdrdm\nModel\t: Raspberry Pi 5\n"


def _opts(args):
    return dict(a.removeprefix("-D").split("=") for a in args)


@pytest.mark.parametrize("cpuinfo", [SPR, ZEN4, ALDER])
def test_x86_build_is_explicit_and_never_amx(cpuinfo):
    opts = _opts(host.ggml_cmake_args(cpuinfo, "x86_64"))
    assert opts["GGML_NATIVE"] == "OFF"
    assert opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == opts["GGML_AMX_BF16"] == "OFF"
    assert opts["GGML_AVX2"] == opts["GGML_FMA"] == opts["GGML_F16C"] == "ON"


def test_x86_build_follows_the_features():
    spr, zen4, alder = (_opts(host.ggml_cmake_args(c, "x86_64")) for c in (SPR, ZEN4, ALDER))
    assert spr["GGML_AVX512"] == spr["GGML_AVX512_BF16"] == spr["GGML_AVX512_VNNI"] == "ON"
    assert zen4["GGML_AVX512"] == zen4["GGML_AVX512_BF16"] == "ON" and zen4["GGML_AVX_VNNI"] == "OFF"
    assert alder["GGML_AVX512"] == alder["GGML_AVX512_BF16"] == "OFF" and alder["GGML_AVX_VNNI"] == "ON"
    # a CPU missing one of the five AVX-512 subsets ggml compiles with gets no AVX-512 at all
    partial = ZEN4.replace(" avx512vl", "")
    assert _opts(host.ggml_cmake_args(partial, "x86_64"))["GGML_AVX512"] == "OFF"


def test_wheel_key_is_the_compiled_instruction_set():
    """AMX (never compiled in) and other unused flags do not split the cache; every compiled-in feature does:
    Sapphire Rapids (AVX-VNNI) and Zen 4 get their own wheels, so does a laptop without AVX-512 and an ARM
    board (native, keyed by all its features)."""
    assert host.wheel_key(ZEN4 + " amx_tile amx_int8 sha_ni", "x86_64") == host.wheel_key(ZEN4, "x86_64")
    assert host.wheel_key(SPR, "x86_64") != host.wheel_key(ZEN4, "x86_64")
    assert host.wheel_key(ALDER, "x86_64") != host.wheel_key(SPR, "x86_64")
    assert host.ggml_cmake_args(PI5, "aarch64") == []
    assert host.wheel_key(PI5, "aarch64").startswith("aarch64-native-")
    assert host.wheel_key(PI5, "aarch64") != host.wheel_key(PI5.replace(" sha2", ""), "aarch64")


def test_describe_names_the_cpu_and_the_numerics_features():
    d = host.describe(SPR)
    assert d["cpu"] == "Intel(R) Xeon(R) Platinum 8488C"
    assert {"avx512_bf16", "amx_tile", "avx512f", "avx2"} <= set(d["isa"]) and "avx_vnni" not in d["isa"]
    assert host.describe(ZEN4)["cpu"] == "AMD EPYC 9R14" and "amx_tile" not in host.describe(ZEN4)["isa"]
    assert host.describe(PI5)["cpu"] == "Raspberry Pi 5"


def test_a_sigill_death_is_named_with_the_fix():
    proc = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert host.is_sigill(proc.returncode)
    msg = host.describe_exit(proc.returncode)
    assert "SIGILL" in msg and "illegal instruction" in msg and "make setup" in msg
    assert host.describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert host.describe_exit(3) == "exit code 3" and not host.is_sigill(3)


def test_cli_prints_what_the_makefile_reads():
    out = subprocess.run([sys.executable, "-m", "edgeft.host", "cmake-args"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == host.ggml_cmake_args()
    bad = subprocess.run([sys.executable, "-m", "edgeft.host", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_installed_llama_cpp_has_no_amx():
    """The build this suite runs with is the portable one: llama.cpp reports no AMX kernel compiled in."""
    llama_cpp = pytest.importorskip("llama_cpp")
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX" not in info.replace("AMX_INT8 = 0", "").replace("AMX = 0", ""), info
